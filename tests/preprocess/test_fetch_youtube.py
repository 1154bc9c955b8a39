"""YouTube as it is today, offline: the YoutubeDL our fetcher builds has the deno runtime and the EJS solver
scripts (read from yt-dlp's own state and its verbose header), ``--plan-only --fetch`` reports them and warns when
YouTube URLs are planned without them, and yt-dlp's real error messages map to the right fetch codes."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from preprocess.fetching import js_runtime, ytdlp
from preprocess.fetching.attempts import Download, Secrets
from preprocess.fetching.config import PERMANENT, TRANSIENT, FetchConfig
from preprocess.fetching.fetch import Fetched, fetch_video
from preprocess.fetching.host_gate import HostGate
from tests.preprocess.http_faults import Fault, fault_server  # noqa: F401 - the fixture

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


def test_extractor_args_reach_the_extractors_and_never_a_message(tmp_path, fresh_lookup):
    """--fetch-extractor-args (e.g. a PO-token provider's server) as yt-dlp's own extractors read them; the values
    are scrubbed from messages like the proxy password; a bad spec is one line naming its key, not its value."""
    import yt_dlp

    args = "youtube:player_client=web,tv youtubepot-bgutilhttp:base_url=http://127.0.0.1:4999"
    with yt_dlp.YoutubeDL(_fetcher_params(tmp_path, extractor_args=args)) as ydl:
        youtube = ydl.get_info_extractor("Youtube")
        assert youtube._configuration_arg("player_client") == ["web", "tv"]
        assert youtube._configuration_arg("base_url", ie_key="youtubepot-bgutilhttp") == ["http://127.0.0.1:4999"]
    assert "player_client" not in _fetcher_params(tmp_path)
    secrets = Secrets.of(FetchConfig(extractor_args="youtube:po_token=web.gvs+SECRETTOKEN"))
    assert secrets.scrub("ERROR: bad token web.gvs+SECRETTOKEN") == "ERROR: bad token <redacted>"
    assert "SECRET" not in repr(FetchConfig(extractor_args="youtube:po_token=web.gvs+SECRETTOKEN"))
    with pytest.raises(ValueError, match=r"IE_KEY:ARGS .*\['youtube=web'\]$"):
        FetchConfig(extractor_args="youtube=web")


def test_the_run_log_names_secret_fetch_settings_as_set(tmp_path):
    from preprocess.shard import build_config, build_parser

    argv = ["--metadata", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"), "--fetch"]
    argv += [
        "--fetch-extractor-args",
        "youtube:po_token=web.gvs+SECRETTOKEN",
        "--fetch-proxy",
        "http://u:pw@127.0.0.1:1",
    ]
    fetch = build_config(build_parser().parse_args(argv)).run_config()["fetch"]
    assert (fetch["extractor_args"], fetch["proxy"], fetch["cookies"]) == ("<set>", "<set>", None)


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
    args += ["--require-texts", "none"]  # bare URLs carry no text: that check is tests/preprocess/test_input_checks.py
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


# ----------------------------------------------------------------------------- yt-dlp's errors -> fetch codes
# Each case raises an error the way yt-dlp does: an extractor below calls yt-dlp's own raise helpers
# (extractor/common.py raise_no_formats / raise_login_required / raise_geo_restricted) or makes a real request that
# fails (yt-dlp's networking wraps it in ExtractorError with the TransportError/HTTPError as cause), and YoutubeDL
# (built from our fetcher's parameters) wraps that in the DownloadError the fetcher sees (YoutubeDL.py,
# _handle_extraction_exceptions and trouble). describe_error then gives the code.


def _youtube_reason(ie, reason: str) -> str:
    """What extractor/youtube/_video.py (_real_extract, ``if reason:``) adds to YouTube's playability reason
    before ``raise_no_formats(reason, expected=True)``; the sentences are quoted from that code."""
    from yt_dlp.utils import remove_end

    if "sign in" in reason.lower():
        reason = remove_end(reason, "This helps protect our community. Learn more")
        return f"{remove_end(reason.strip(), '.')}. {ie._youtube_login_hint}"
    if "This content isn't available, try again later" in reason:
        return (
            f"{remove_end(reason.strip(), '.')}. The current session has been rate-limited by YouTube for up to an "
            "hour. It is recommended to use `-t sleep` to add a delay between video requests to avoid exceeding the "
            "rate limit. For more information, refer to  "
            "https://github.com/yt-dlp/yt-dlp/wiki/Extractors#this-content-isnt-available-try-again-later"
        )
    return reason


def _says(reason: str):
    return lambda ie: ie.raise_no_formats(_youtube_reason(ie, reason), expected=True)


YOUTUBE_SAYS = {
    # private: YouTube's reason as yt-dlp prints it (yt-dlp issues #4455, #2027); members-only: YouTube's text
    "private": (_says("Private video. Sign in if you've been granted access to this video"), "private"),
    "members_only": (
        _says("Join this channel to get access to members-only content like this video, and other exclusive perks."),
        "private",
    ),
    # removed / unavailable: extractor/youtube/_video.py test entries ('skip': ...) quote YouTube's reasons
    "unavailable": (_says("Video unavailable"), "unavailable"),
    "does_not_exist": (_says("This video does not exist."), "unavailable"),
    "not_available": (_says("This video is not available."), "unavailable"),
    "removed_policy": (
        _says("This video has been removed for violating YouTube's policy on hate speech."),
        "unavailable",
    ),
    "terminated": (
        _says(
            "This video is no longer available because the YouTube account associated with this video has been "
            "terminated."
        ),
        "unavailable",
    ),
    # geo: _video.py raises raise_geo_restricted(subreason, countries) for this subreason (its startswith check);
    # extractor/common.py raise_geo_restricted's default message
    "geo_subreason": (
        lambda ie: ie.raise_geo_restricted(
            "The uploader has not made this video available in your country", ["DE"], metadata_available=True
        ),
        "geo_blocked",
    ),
    "geo_default": (lambda ie: ie.raise_geo_restricted(), "geo_blocked"),
    # age: _video.py _is_agegated's reasons ('confirm your age', 'inappropriate'); YouTube's full reason
    "age": (_says("Sign in to confirm your age. This video may be inappropriate for some users."), "login_required"),
    # sign-in required: extractor/common.py raise_login_required's default; youtube/_base.py _check_login_required
    "registered_only": (lambda ie: ie.raise_login_required(), "login_required"),
    "login_details": (
        lambda ie: ie.raise_login_required(
            f"Login details are needed to download this content. {ie._youtube_login_hint}", method=None
        ),
        "login_required",
    ),
    # rate limits: the bot check (the suffix _video.py strips is quoted there), the "try again later" session
    # limit, and _video.py's "All player responses are invalid" (_extract_player_responses)
    "bot_check": (
        _says("Sign in to confirm you\u2019re not a bot. This helps protect our community. Learn more"),
        "rate_limited",
    ),
    "try_later": (_says("This content isn't available, try again later."), "rate_limited"),
    "ip_blocked": (
        lambda ie: _raise_extractor_error(
            "All player responses are invalid. Your IP is likely being blocked by Youtube", expected=True
        ),
        "rate_limited",
    ),
    # an extractor error we do not know (_video.py _extract_player_responses; not expected: a bug report hint)
    "unknown": (lambda ie: _raise_extractor_error("Failed to extract any player response"), "fetch_error"),
}
"""Case -> (what the extractor does, the expected code)."""


def _raise_extractor_error(message: str, expected: bool = False):
    from yt_dlp.utils import ExtractorError

    raise ExtractorError(message, expected=expected)


def _youtube_like_extractor():
    """An extractor named ``youtube`` (its messages read ``[youtube] <id>: ...``) with YouTube's login hint (it
    is one of YouTube's extractor classes) whose extraction does what ``actions[id]`` says."""
    from yt_dlp.extractor.youtube._base import YoutubeBaseInfoExtractor

    class YoutubeSaysIE(YoutubeBaseInfoExtractor):
        IE_NAME = "youtube"
        _VALID_URL = r"https?://says\.invalid/(?P<id>[\w.:/-]+)"
        actions: dict = {}

        def _real_extract(self, url):
            video_id = self._match_id(url)
            self.actions[video_id](self)

    return YoutubeSaysIE


def _yt_dlp_error(tmp_path: Path, case: str, action, **cfg) -> BaseException:
    """The DownloadError YoutubeDL (with our fetcher's parameters) raises when the extractor does ``action``."""
    import yt_dlp
    from yt_dlp.utils import DownloadError

    cls = _youtube_like_extractor()
    cls.actions = {case: action}
    with yt_dlp.YoutubeDL(_fetcher_params(tmp_path, **cfg)) as ydl:
        ydl.add_info_extractor(cls())
        with pytest.raises(DownloadError) as raised:
            ydl.extract_info(f"https://says.invalid/{case}", download=False, ie_key="YoutubeSays")
    return raised.value


@pytest.mark.parametrize("case", sorted(YOUTUBE_SAYS))
def test_youtube_refusals_map_to_their_codes(case, tmp_path):
    action, expected = YOUTUBE_SAYS[case]
    error = _yt_dlp_error(tmp_path, case, action)
    code, message, retry_after = ytdlp.describe_error(error)
    assert (code, retry_after) == (expected, None), (case, str(error))
    assert message.startswith(f"[youtube] {case}: ") and "\n" not in message, message
    assert (code in TRANSIENT) == (case in ("bot_check", "try_later", "ip_blocked")), "only the rate limits retry"


def _fetch_page(url: str):
    return lambda ie: ie._download_webpage(url, "net")


def test_network_and_http_errors_map_to_their_codes(fault_server, tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/watch"
    fault_server.add("slow", b"<html>" + bytes(10_000))
    fault_server.fault("slow", Fault(stall_after=100))
    cases = {
        "dns": (_fetch_page("http://no-such-host.invalid/watch"), "network", None, {}),
        "refused": (_fetch_page(refused), "network", None, {}),
        "proxy": (_fetch_page("http://example.invalid/watch"), "network", None, {"proxy": refused}),
        "stalled": (_fetch_page(fault_server.url("slow")), "timeout", None, {"read_timeout_s": 0.5}),
        "http_429": (
            _fetch_page(fault_server.fault("busy", Fault(status=429, headers={"Retry-After": "7"}))),
            "rate_limited",
            7.0,
            {},
        ),
        "http_503": (_fetch_page(fault_server.fault("down", Fault(status=503))), "http_5xx", None, {}),
        "http_404": (_fetch_page(fault_server.url("missing")), "http_404", None, {}),
        "http_403": (_fetch_page(fault_server.fault("no", Fault(status=403))), "http_403", None, {}),
    }
    got = {}
    for case, (action, _, _, cfg) in cases.items():
        code, message, retry_after = ytdlp.describe_error(_yt_dlp_error(tmp_path / case, case, action, **cfg))
        got[case] = (code, retry_after)
        assert message.startswith("[youtube] ") and " net: " in message and "\n" not in message, message
    assert got == {case: (code, wait) for case, (_, code, wait, _) in cases.items()}


def test_transient_codes_are_exactly_the_ones_worth_a_retry():
    # network (DNS, refused, reset, proxy) is retried; fetch_error (an extractor error we do not know) is not:
    # a swap of the two fails here and in the two tests above
    assert TRANSIENT == {"rate_limited", "timeout", "truncated", "network", "http_5xx"}
    assert {"network", "rate_limited"} <= TRANSIENT and not {"fetch_error", "private", "unavailable"} & TRANSIENT
    assert {"private", "unavailable", "geo_blocked", "login_required", "fetch_error"} <= PERMANENT
