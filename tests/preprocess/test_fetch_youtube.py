"""YouTube as it is today, offline: the YoutubeDL our fetcher builds has the deno runtime and the EJS solver
scripts (read from yt-dlp's own state and its verbose header), ``--plan-only --fetch`` reports them and warns when
YouTube URLs are planned without them, and yt-dlp's real error messages map to the right fetch codes."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from preprocess.fetching import js_runtime, ytdlp
from preprocess.fetching.attempts import Download, Secrets
from preprocess.fetching.config import FetchConfig
from preprocess.fetching.fetch import Fetched, fetch_video
from preprocess.fetching.host_gate import HostGate
from tests.preprocess.http_faults import fault_server  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
YOUTUBE = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


class _Lines:
    """A yt-dlp ``logger`` that keeps every line."""

    def __init__(self):
        self.lines: list[str] = []

    def debug(self, message: str) -> None:
        self.lines.append(message)

    info = warning = error = debug


def _fetcher_params(tmp_path: Path, **overrides) -> dict:
    """The YoutubeDL parameters our fetcher builds for one attempt at a YouTube URL (ytdlp.params)."""
    cfg = FetchConfig(**overrides)
    secrets = Secrets.of(cfg)
    job = Download(
        url=YOUTUBE,
        shown=YOUTUBE,
        cfg=cfg,
        gate=HostGate(1, 1.0),
        host="youtube",
        scratch=str(tmp_path),
        secrets=secrets,
    )
    return ytdlp.params(job, ytdlp.YtdlpLogger(secrets))


@pytest.fixture
def fresh_lookup():
    """js_runtime looks the tools up (and warns) once per process: start and end each test with a clean slate."""
    js_runtime.tools.cache_clear()
    js_runtime._warn_once.cache_clear()
    yield
    js_runtime.tools.cache_clear()
    js_runtime._warn_once.cache_clear()


# ----------------------------------------------------------------------------- the runtime and the scripts


def test_the_fetchers_youtubedl_sees_the_venvs_deno_and_the_ejs_scripts(tmp_path, fresh_lookup):
    import yt_dlp
    from yt_dlp.extractor.youtube.jsc._builtin.ejs import ScriptSource

    seen = _Lines()
    with yt_dlp.YoutubeDL({**_fetcher_params(tmp_path), "verbose": True, "logger": seen}) as ydl:
        runtime = ydl._js_runtimes["deno"].info  # what yt-dlp itself found by running the binary
        youtube = ydl.get_info_extractor("Youtube")
        youtube.initialize()  # registers the JS challenge providers (no request is made)
        solver = next(p for p in youtube._jsc_director.providers.values() if p.PROVIDER_NAME == "deno")
        available = solver.is_available()
        lib, core = solver._lib_script, solver._core_script
        loaded = solver._run_js_runtime(  # yt-dlp's own deno command line runs the two scripts
            f"{lib.code}\nObject.assign(globalThis, lib);\n{core.code}\nconsole.log(typeof jsc)"
        )
    deno_version, ejs_version = importlib.metadata.version("deno"), importlib.metadata.version("yt-dlp-ejs")
    assert Path(runtime.path).parent == Path(sysconfig.get_path("scripts")), "the deno inside this venv"
    assert (runtime.name, runtime.version, runtime.supported) == ("deno", deno_version, True)
    assert available, "yt-dlp's deno challenge solver is usable"
    for script in (lib, core):
        assert (script.source, script.version) == (ScriptSource.PYPACKAGE, ejs_version), str(script)
    assert loaded == "function\n", "deno ran the EJS solver scripts and defined jsc()"
    assert f"[debug] JS runtimes: deno-{deno_version}" in seen.lines
    libraries = next(line for line in seen.lines if line.startswith("[debug] Optional libraries: "))
    assert f"yt_dlp_ejs-{ejs_version}" in libraries.split(": ", 1)[1].split(", ")


def test_without_runtime_and_scripts_other_sites_still_download_and_it_is_said_once(
    fault_server, tmp_path, caplog, monkeypatch, fresh_lookup
):
    video = _tiny_mp4(tmp_path)
    monkeypatch.setitem(sys.modules, "deno", None)  # `import deno` / `import yt_dlp_ejs` now fail: not installed
    monkeypatch.setitem(sys.modules, "yt_dlp_ejs", None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    caplog.set_level(logging.WARNING, logger=js_runtime.__name__)
    url = fault_server.add("v.mp4", video)
    cfg = FetchConfig(http_downloader="yt-dlp", retries=0)
    results = [fetch_video(url, str(tmp_path / f"d{i}"), "v", cfg, HostGate(4, 1000.0)) for i in range(2)]
    assert all(isinstance(r, Fetched) and Path(r.path).read_bytes() == video for r in results), results
    warnings = [r.getMessage() for r in caplog.records if r.name == js_runtime.__name__]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("YouTube downloads will fail or miss formats: no JS runtime")
    assert "yt-dlp-ejs package is not installed" in warnings[0] and "other sites are not affected" in warnings[0]
    assert "js_runtimes" not in _fetcher_params(tmp_path / "p"), "no runtime to give: yt-dlp's own default"


def _tiny_mp4(tmp_path: Path) -> bytes:
    path = tmp_path / "tiny.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10", "-t", "1"]
        + ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
        timeout=60,
    )
    return path.read_bytes()


# ----------------------------------------------------------------------------- --plan-only --fetch

WITHOUT_TOOLS = (
    "import runpy, sys; sys.modules.update(deno=None, yt_dlp_ejs=None); sys.argv[0] = {script!r}; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""Runs shard.py as if the deno and yt-dlp-ejs packages were not installed (their imports fail)."""


def _plan(meta: Path, *, tools: bool) -> subprocess.CompletedProcess:
    script = str(REPO / "preprocess/shard.py")
    head = [script] if tools else ["-c", WITHOUT_TOOLS.format(script=script)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH="/usr/bin:/bin")  # this worktree's code; no deno on PATH
    args = ["--metadata", str(meta), "--fetch", "--output", str(meta.parent / "out"), "--plan-only"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, timeout=300, env=env)


def _metadata(path: Path, urls: list[str]) -> Path:
    lines = [
        {"video_id": f"v{i}", "url": url, "clip": [{"clip_id": f"v{i}.0", "span": [0, 10]}]}
        for i, url in enumerate(urls)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_plan_only_fetch_prints_the_tools_and_warns_when_youtube_lacks_them(tmp_path):
    import yt_dlp.version

    youtube = _metadata(tmp_path / "yt.jsonl", [YOUTUBE, "https://youtu.be/abcdefghijk", "http://example.org/v.mp4"])
    ok = _plan(youtube, tools=True)
    assert ok.returncode == 0, ok.stderr
    deno = Path(sysconfig.get_path("scripts")) / "deno"
    versions = {name: importlib.metadata.version(name) for name in ("deno", "yt-dlp-ejs")}
    assert (
        f"fetch tools: yt-dlp {yt_dlp.version.__version__}; JS runtime: deno {versions['deno']} (deno package: "
        f"{deno}); yt-dlp-ejs: {versions['yt-dlp-ejs']}; PO-token plugin: none (optional, docs/fetching.md)"
    ) in ok.stdout.splitlines()
    assert "warning:" not in ok.stdout

    bare = _plan(youtube, tools=False)
    assert bare.returncode == 0, bare.stderr
    assert f"fetch tools: yt-dlp {yt_dlp.version.__version__}; JS runtime: none; yt-dlp-ejs: none;" in bare.stdout
    warning = [line for line in bare.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and warning[0].startswith("warning: 2 YouTube videos are planned but no JS runtime")
    assert "the yt-dlp-ejs package is not installed" in warning[0]

    others = _plan(_metadata(tmp_path / "web.jsonl", ["http://example.org/v.mp4"]), tools=False)
    assert others.returncode == 0 and "JS runtime: none" in others.stdout and "warning:" not in others.stdout
