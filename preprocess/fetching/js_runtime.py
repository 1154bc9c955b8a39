"""The JavaScript side of YouTube extraction: the runtime and the solver scripts yt-dlp runs to read stream URLs.

YouTube's player hides each stream URL behind JavaScript challenges (the ``n`` parameter and the signature). yt-dlp
solves them with its EJS scripts (the ``yt-dlp-ejs`` package) run by a JavaScript runtime; without both it sees
few or no formats. Both ship on PyPI and are pinned in setup.cfg: ``yt-dlp-ejs``, and ``deno``, the Deno binary in
a wheel, installed into the venv's ``bin/``. The runtime is handed to yt-dlp by path (its ``js_runtimes``
option), so a cluster node needs nothing outside the venv and no solver script is downloaded at run time.

When either is missing the fetcher still works for every other site; a warning says so once per process
(:func:`ytdlp_params`) and ``--plan-only --fetch`` says so when YouTube URLs are planned (:func:`report_lines`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

PIP_HINT = "pip install the deno and yt-dlp-ejs versions pinned in setup.cfg into this venv"
POT_PLUGIN = "bgutil-ytdlp-pot-provider"
"""The optional PO-token provider plugin docs/fetching.md describes (never a dependency)."""


@dataclass(frozen=True)
class JsTools:
    """What yt-dlp will have for YouTube's JavaScript challenges on this machine."""

    deno: str | None
    """Path of the deno binary (the ``deno`` package's, else one on PATH), or None."""
    deno_source: str
    """Where ``deno`` was found: ``deno package``, ``PATH`` or ``none``."""
    ejs: str | None
    """Version of the installed ``yt-dlp-ejs`` package, or None."""
    ejs_wanted: str | None
    """The EJS script version this yt-dlp expects (it ignores a package of another major.minor), if it says."""

    def problems(self) -> list[str]:
        """What keeps yt-dlp from solving YouTube's challenges (empty when nothing does)."""
        out = []
        if self.deno is None:
            out.append("no JS runtime (the deno package is not installed and no deno is on PATH)")
        if self.ejs is None:
            out.append("the yt-dlp-ejs package is not installed")
        elif self.ejs_wanted and _major_minor(self.ejs) != _major_minor(self.ejs_wanted):
            out.append(f"yt-dlp-ejs {self.ejs} is installed but this yt-dlp uses only {self.ejs_wanted}")
        return out


@functools.cache
def tools() -> JsTools:
    """The runtime and scripts found (looked up once per process)."""
    deno, source = _find_deno()
    return JsTools(deno=deno, deno_source=source, ejs=_ejs_version(), ejs_wanted=_ejs_wanted())


def _find_deno() -> tuple[str | None, str]:
    try:
        from deno import find_deno_bin

        return find_deno_bin(), "deno package"
    except (ImportError, FileNotFoundError):
        pass
    on_path = shutil.which("deno")
    return (on_path, "PATH") if on_path else (None, "none")


def _ejs_version() -> str | None:
    try:
        import yt_dlp_ejs
    except ImportError:
        return None
    return str(yt_dlp_ejs.version)


def _ejs_wanted() -> str | None:
    try:  # yt-dlp's own record of the EJS scripts it was released with (not a public API: tolerate its absence)
        from yt_dlp.extractor.youtube.jsc._builtin.vendor import VERSION
    except ImportError:
        return None
    return str(VERSION)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def ytdlp_params() -> dict:
    """yt-dlp parameters that give it the deno runtime by path; ``{}`` (yt-dlp's defaults) when there is none.
    The first call in a process logs one warning when YouTube downloads will lack the runtime or the scripts."""
    found = tools()
    _warn_once(tuple(found.problems()))
    return {"js_runtimes": {"deno": {"path": found.deno}}} if found.deno else {}


@functools.cache
def _warn_once(problems: tuple[str, ...]) -> None:
    if problems:
        log.warning(
            "YouTube downloads will fail or miss formats: %s (yt-dlp cannot solve YouTube's JavaScript challenges; "
            "other sites are not affected); %s",
            "; ".join(problems),
            PIP_HINT,
        )


def deno_version(path: str) -> str | None:
    """The version ``deno --version`` prints (``2.9.8``), or None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.match(r"deno (\S+)", out)
    return found.group(1) if found else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def report_lines(youtube_videos: int) -> list[str]:
    """``--plan-only --fetch``: the yt-dlp, runtime, EJS and PO-token plugin versions; a ``warning:`` line when
    ``youtube_videos`` > 0 and yt-dlp lacks what YouTube needs."""
    from yt_dlp.version import __version__ as ytdlp_version

    found = tools()
    version = deno_version(found.deno) if found.deno else None
    runtime = f"deno {version or '(does not run)'} ({found.deno_source}: {found.deno})" if found.deno else "none"
    pot = _package_version(POT_PLUGIN)
    lines = [
        f"fetch tools: yt-dlp {ytdlp_version}; JS runtime: {runtime}; yt-dlp-ejs: {found.ejs or 'none'}; "
        f"PO-token plugin: {f'{POT_PLUGIN} {pot}' if pot else 'none (optional, docs/fetching.md)'}"
    ]
    problems = found.problems() + (["deno is installed but does not run"] if found.deno and not version else [])
    if youtube_videos and problems:
        lines.append(
            f"warning: {youtube_videos} YouTube videos are planned but {'; '.join(problems)}: yt-dlp cannot solve "
            f"YouTube's JavaScript challenges and most of these downloads will fail; {PIP_HINT}"
        )
    return lines
