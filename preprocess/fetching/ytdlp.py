"""One download attempt through yt-dlp used as a library (YouTube and the other sites it knows; its generic extractor
for direct files and pages), and the mapping of its errors to fetch codes
(:data:`preprocess.fetching.config.CODES`).

The info is extracted first (``extract_info(download=False)``), so a video longer than ``max_video_seconds`` or
announced larger than ``max_video_bytes`` is refused before any byte of it is downloaded; the same info is then
downloaded (``process_ie_result``). yt-dlp's own retries are off so that
:class:`preprocess.fetching.attempts.Download`'s backoff and the host gate apply; its ``.part`` file stays in the
scratch folder between attempts, so a cut download resumes. A progress hook enforces the whole-download timeout and
counts bytes. yt-dlp's messages go to this module's logger at DEBUG level with the proxy and cookie paths scrubbed;
nothing is printed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil

from preprocess.fetching import formats, js_runtime
from preprocess.fetching.attempts import Download, FetchFailed, Secrets, classify, retry_after

log = logging.getLogger(__name__)

_LOCAL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

STEM = "video"
"""File name stem yt-dlp writes in the scratch folder (the caller renames the result)."""

_PATTERNS = (
    ("private", r"private video|video is private|members[- ]only|join this channel"),
    (
        "geo_blocked",
        r"not (made this video )?available in your country|geo.?restrict|from your location|"
        r"blocked it in your country",
    ),
    # YouTube's bot check and session limits say nothing about the video: it may be fetched later (docs/fetching.md)
    (
        "rate_limited",
        r"not a bot|too many requests|http error 429|rate-limited|try again later|ip is likely being blocked",
    ),
    (
        "login_required",
        r"confirm your age|age.?restricted|inappropriate for some users|sign in|"
        r"only available for registered users|login details are needed",
    ),
    (
        "unavailable",
        r"video unavailable|has been removed|account associated with this video|terminated|"
        r"no longer available|video is (un|not )available|does not exist|this live event will begin|premieres in",
    ),
    ("http_403", r"http error 403"),
    ("http_404", r"http error 404"),
    ("http_410", r"http error 410"),
    ("http_5xx", r"http error 5\d\d"),
    ("http_4xx", r"http error 4\d\d"),
    ("too_large", r"larger than max-filesize"),
    ("truncated", r"content too short"),
    ("timeout", r"timed out|timeout"),
    (
        "network",
        r"failed to resolve|name or service not known|name resolution|nodename nor servname|"
        r"connection refused|connection reset|network is unreachable|unable to connect|getaddrinfo|"
        r"remote end closed|connection aborted|proxy",
    ),
    ("not_a_video", r"unsupported url|no video formats found|no video could be found"),
)
"""(code, pattern) tried in order on yt-dlp's lowered message (curly apostrophes made straight) when its cause
chain names no HTTP or network error; the first match wins, so the bot check (``Sign in to confirm you're not a
bot``) is ``rate_limited`` before any ``sign in`` is ``login_required``, and a private video's ``Sign in if you've
been granted access`` is ``private``. The strings are yt-dlp's and YouTube's as yt-dlp raises them
(tests/preprocess/test_fetch_youtube.py quotes each with its source)."""


def attempt(job: Download) -> tuple[str, float | None]:
    """Extract, check the caps, download; the file path in the scratch folder and the announced duration."""
    import yt_dlp
    from yt_dlp.cookies import CookieLoadError
    from yt_dlp.utils import DownloadError

    logger = YtdlpLogger(job.secrets)
    options = params(job, logger)
    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(job.url, download=False)
            duration = _check_info(info, job)
            info = ydl.process_ie_result(info, download=True)
    except DownloadError as exc:
        raise FetchFailed(*describe_error(exc)) from None
    except CookieLoadError:
        raise ValueError("yt-dlp cannot read the cookies file given in the fetch settings") from None
    except FetchFailed:
        raise  # our own verdict (progress hook, caps)
    except OSError as exc:
        if exc.errno in _LOCAL_DISK_ERRORS:
            raise  # not the source's fault: the shard task should know
        raise FetchFailed("network", f"{type(exc).__name__}: {_first_line(str(exc))}") from None
    except Exception as exc:  # an extractor that breaks on an unexpected page must not end the shard task
        raise FetchFailed("fetch_error", f"yt-dlp {type(exc).__name__}: {_first_line(str(exc))}") from None
    path = _output(info, job)
    if path is None:
        if logger.saw("larger than max-filesize"):
            raise FetchFailed("too_large", f"announced size > max_video_bytes {job.cfg.max_video_bytes}")
        raise FetchFailed("fetch_error", "yt-dlp wrote no file")
    with open(path, "rb") as f:
        classify(f.read(64), None, path)
    job.format = formats.chosen(info)
    return path, duration


def params(job: Download, logger: YtdlpLogger) -> dict:
    """The YoutubeDL parameters of one attempt: the format and its sort (preprocess/fetching/formats.py), the
    scratch folder, no retries of its own (ours apply), the caps, the deno runtime by path
    (preprocess/fetching/js_runtime.py), the extractor arguments, the proxy and a private cookies copy."""
    cfg = job.cfg
    out = {
        "format": cfg.selector,
        "outtmpl": {"default": f"{STEM}.%(ext)s"},
        "paths": {"home": job.scratch, "temp": job.scratch},
        "noplaylist": True,
        "playlistend": 1,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": logger,
        "progress_hooks": [_ProgressHook(job)],
        "socket_timeout": cfg.read_timeout_s,
        "retries": 0,
        "fragment_retries": 0,
        "extractor_retries": 0,
        "max_filesize": cfg.max_video_bytes,
        "continuedl": True,
        "cachedir": False,
        "updatetime": False,
        "color": {"stdout": "no_color", "stderr": "no_color"},
        **js_runtime.ytdlp_params(),
    }
    if cfg.format_sort:
        out["format_sort"] = list(cfg.format_sort)
    if cfg.proxy:
        out["proxy"] = cfg.proxy
    if cfg.extractor_args:
        out["extractor_args"] = cfg.extractor_args_dict
    if cfg.cookies:
        out["cookiefile"] = _private_cookies(cfg.cookies, job.scratch)
    return out


def _private_cookies(path: str, scratch: str) -> str:
    """A copy of the cookies file in the scratch folder: yt-dlp writes its cookie jar back to the file it was
    given when it closes, and several downloads share the user's file (the copy goes with the scratch folder)."""
    copy = os.path.join(scratch, "cookies.txt")
    if not os.path.exists(copy):
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o600)
    return copy


def _check_info(info: dict, job: Download) -> float | None:
    """Refuse a playlist, a video too long, or one announced too large; returns the duration."""
    if info.get("_type") in ("playlist", "multi_video"):
        raise FetchFailed("fetch_error", "the URL is a playlist, not one video")
    duration = info.get("duration")
    if duration and duration > job.cfg.max_video_seconds:
        raise FetchFailed("too_long", f"duration {duration:g} s > max_video_seconds {job.cfg.max_video_seconds:g}")
    formats = info.get("requested_formats") or [info]
    sizes = [f.get("filesize") or f.get("filesize_approx") for f in formats]
    if all(sizes):
        job.check_size(int(sum(sizes)), announced=True)
    return float(duration) if duration else None


def _output(info: dict, job: Download) -> str | None:
    for download in info.get("requested_downloads") or []:
        path = download.get("filepath")
        if path and os.path.isfile(path):
            return path
    return None


class _ProgressHook:
    """Stops a download past the deadline or the byte cap (yt-dlp calls it for every block received)."""

    def __init__(self, job: Download):
        self.job = job
        self.sizes: dict[str, int] = {}

    def __call__(self, status: dict) -> None:
        self.job.check_time()
        self.sizes[status.get("tmpfilename") or status.get("filename") or ""] = status.get("downloaded_bytes") or 0
        total = sum(self.sizes.values())
        self.job.progress = max(self.job.progress, total)
        self.job.check_size(total)


class YtdlpLogger:
    """yt-dlp's ``logger`` parameter: its messages go to DEBUG, scrubbed; the last ones are kept for the codes."""

    def __init__(self, secrets: Secrets):
        self.secrets = secrets
        self.lines: list[str] = []

    def _keep(self, message: str) -> None:
        self.lines = [*self.lines[-49:], message]
        log.debug("yt-dlp: %s", self.secrets.scrub(message))

    debug = info = warning = error = _keep

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def describe_error(exc: BaseException) -> tuple[str, str, float | None]:
    """(code, one-line reason, Retry-After seconds or None) of a yt-dlp DownloadError, from its cause chain and
    its message."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError
    from yt_dlp.utils import GeoRestrictedError

    message = _first_line(str(exc))
    for cause in _causes(exc):
        if isinstance(cause, GeoRestrictedError):
            return "geo_blocked", message, None
        if isinstance(cause, HTTPError):
            headers = getattr(cause.response, "headers", None) or {}
            return _http_code(cause.status), message, retry_after(headers.get("Retry-After"))
        if isinstance(cause, TransportError) or isinstance(cause, (TimeoutError, ConnectionError)):
            timed_out = isinstance(cause, TimeoutError) or "timed out" in str(cause).lower()
            return ("timeout" if timed_out else "network"), message, None
    lowered = str(exc).lower().replace("\u2019", "'")
    for code, pattern in _PATTERNS:
        if re.search(pattern, lowered):
            return code, message, None
    return "fetch_error", message, None


def _http_code(status: int) -> str:
    special = {403: "http_403", 404: "http_404", 410: "http_410", 429: "rate_limited"}
    if status in special:
        return special[status]
    return "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "fetch_error"


def _causes(exc: BaseException):
    """The exception, what yt-dlp wrapped (exc_info, ExtractorError.cause) and Python's chain, nearest first."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        exc_info = getattr(current, "exc_info", None)
        todo += [exc_info[1] if exc_info else None, getattr(current, "cause", None)]
        todo += [current.__cause__, current.__context__]


def _first_line(text: str) -> str:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*ERROR:\s*", "", line)
    return line.split(" (caused by ")[0].strip()
