"""Downloading one source video: YouTube (and other sites yt-dlp knows), plain http(s) and s3:// / file:// URLs.

:func:`fetch_video` is the whole interface: it downloads one URL into a folder and returns :class:`Fetched`, or a
:class:`~preprocess.failures.Failure` (stage ``fetch``) whose ``error`` says why (:data:`CODES`); it never raises
for a bad source. It is Ray-agnostic and thread-safe; politeness towards hosts comes from a shared gate
(:class:`preprocess.host_gate.HostGate`, or a client of one with the same three methods).

Routes (:func:`route`):

* a URL that one of yt-dlp's site extractors claims (``youtube.com/watch``, ``youtu.be``, ``/shorts/``, Vimeo...)
  goes through yt-dlp used as a library (:mod:`preprocess.fetch_ytdlp`): the info is extracted first, so the
  duration and size caps are checked before any video byte is downloaded;
* any other http(s) URL is downloaded by our own streaming client (``requests``), or by yt-dlp's generic
  extractor with ``http_downloader=yt-dlp``;
* ``s3://`` and ``file://`` URLs stream through :mod:`pipeline.storage`.

Politeness and robustness (the peers' complaints about video2dataset: hangs on slow hosts, 429 storms, temporary
files left on disk; docs/peers.md): every request takes a slot of its host from the gate and gives it back; a 429
or 503 with ``Retry-After`` (seconds or an HTTP date) closes the host for everybody until then; other transient
errors are retried with exponential backoff and full jitter; a cut connection resumes with a Range request (with
``If-Range``) when the server accepts ranges, else restarts; ``timeout_s`` bounds one video's download from its
first request on (retries and waits included); the byte cap is checked on ``Content-Length`` before the body is
read and again while reading; the first bytes and the Content-Type tell a video from an HTML/JSON/text page or an
image. Each download works in a private scratch folder inside ``dest_dir`` (``.fetch-<name>-*``) that is removed
whatever happens; only a complete file is moved to ``dest_dir/<name><ext>``.

Secrets: the cookies file and the proxy (which may carry a password) are passed to yt-dlp and requests and never
appear in a log record or a message; URLs in messages lose their userinfo and any query string that looks signed.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import functools
import http.client
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pipeline import storage
from preprocess.failures import Failure

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".fetch-"
"""Name prefix of the private folder each download works in (inside ``dest_dir``); removed when it ends."""
CHUNK = 256 << 10
SNIFF_BYTES = 512
CLOSED_S = 2.0
"""A gate wait longer than this means the host asked everybody to back off (a slot or rate wait is shorter)."""

DEFAULT_FORMAT = "bv[vcodec^=avc1][height<=720]/bv[height<=720]/b[height<=720]/wv/w"
DEFAULT_FORMAT_WITH_AUDIO = "bv[vcodec^=avc1][height<=720]+ba[ext=m4a]/bv[height<=720]+ba/b[height<=720]/wv+ba/w"

CODES = {
    "unavailable": "the site says the video is unavailable, removed, or its account terminated",
    "private": "a private or members-only video",
    "login_required": "the site asks to sign in (age-restricted)",
    "geo_blocked": "not available from this country",
    "http_403": "HTTP 403 (or S3 access denied)",
    "http_404": "HTTP 404 (or no such S3 object or local file)",
    "http_410": "HTTP 410 Gone",
    "http_4xx": "another HTTP 4xx status (the message names it)",
    "rate_limited": "HTTP 429 (or a bot check) after the retries",
    "http_5xx": "HTTP 5xx after the retries",
    "timeout": "the download took longer than timeout_s, or stalled past read_timeout_s after the retries",
    "too_large": "over max_video_bytes (announced size, or counted while reading)",
    "too_long": "longer than max_video_seconds (where the source says the duration)",
    "not_a_video": "an HTML/JSON/XML/text body, an image or a PDF, or a page with no video",
    "truncated": "fewer bytes than Content-Length after the retries",
    "network": "DNS, refused or reset connection, proxy or S3 endpoint errors after the retries",
    "fetch_error": "anything else (the message carries yt-dlp's first line)",
    "no_url": "the metadata line has no url to fetch from (preprocess/sources.py)",
}
"""Every ``error`` a fetch Failure can carry, with its meaning."""

TRANSIENT = frozenset({"rate_limited", "timeout", "truncated", "network", "http_5xx"})
"""Codes worth another try later: retried within one fetch, and again by ``--retry-failed``."""
PERMANENT = frozenset(CODES) - TRANSIENT
"""Codes that another try would not change (the video is gone, refused, or not a video)."""


class HttpDownloader(str, enum.Enum):
    """Who downloads plain http(s) URLs (those no yt-dlp site extractor claims)."""

    REQUESTS = "requests"
    """Our streaming client: Range resume, Retry-After, content sniffing."""
    YT_DLP = "yt-dlp"
    """yt-dlp's generic extractor (finds a video in a page, HLS/DASH manifests...)."""


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """How source videos are downloaded (``--fetch``)."""

    format: str = DEFAULT_FORMAT
    """yt-dlp format selector for sites such as YouTube: by default an H.264 (avc1) video-only stream of at most
    720p, the cheapest to decode on CPUs, else any video-only stream of at most 720p, else the smallest one."""
    format_with_audio: str = DEFAULT_FORMAT_WITH_AUDIO
    """yt-dlp format selector used instead of ``format`` when the ASR stage needs the audio track: the same video
    choice plus the best audio stream, merged by ffmpeg."""
    audio: bool = False
    """Download an audio track too (set by the job when the ASR stage runs, not a flag)."""
    http_downloader: HttpDownloader = HttpDownloader.REQUESTS
    """Who downloads plain http(s) URLs: ``requests`` (our client) or ``yt-dlp`` (its generic extractor)."""
    max_video_bytes: int = 2 << 30
    """A source video larger than this is not downloaded (or the download is stopped): ``too_large``."""
    max_video_seconds: float = 3 * 3600.0
    """A source video longer than this is not downloaded (``too_long``), where the source says its duration
    before the download (yt-dlp sites); for other URLs the decoder sees it."""
    timeout_s: float = 600.0
    """Longest one video's download may take, from its first request, retries and waits included: ``timeout``."""
    read_timeout_s: float = 30.0
    """Longest wait for a connection or for the next bytes of a response before that attempt fails."""
    retries: int = 4
    """Further attempts per video after a transient error (an attempt that received new bytes does not count)."""
    backoff_s: float = 1.0
    """Base of the exponential backoff between attempts (full jitter: a random wait up to base x 2^attempt)."""
    max_backoff_s: float = 60.0
    """Upper bound of one backoff wait."""
    host_concurrency: int = 4
    """Downloads from one host at once, job-wide."""
    host_rate: float = 2.0
    """New requests per second to one host, job-wide."""
    prefetch: int = 1
    """Videos downloaded ahead of the one being decoded (0: each is downloaded when its turn comes)."""
    cookies: str | None = field(default=None, repr=False)
    """Cookies file (Netscape format) given to yt-dlp, e.g. to pass YouTube's bot check; never logged."""
    proxy: str | None = field(default=None, repr=False)
    """Proxy URL for yt-dlp and http(s) downloads (``http://user:pw@host:port``, ``socks5://...``); never logged."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "http_downloader", HttpDownloader(self.http_downloader))
        for name in ("format", "format_with_audio"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty yt-dlp format selector")
        positive = ("max_video_bytes", "max_video_seconds", "timeout_s", "read_timeout_s", "host_rate")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("retries", "backoff_s", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) must be >= backoff_s ({self.backoff_s})")
        if self.host_concurrency < 1:
            raise ValueError(f"host_concurrency must be >= 1, got {self.host_concurrency}")
        if self.cookies is not None and (not isinstance(self.cookies, str) or not self.cookies):
            raise ValueError("cookies must be a path to a cookies file, or None")
        if self.proxy is not None and (not isinstance(self.proxy, str) or "://" not in self.proxy):
            raise ValueError("proxy must be a URL such as http://host:port, or None")

    @property
    def selector(self) -> str:
        """The yt-dlp format selector in effect."""
        return self.format_with_audio if self.audio else self.format


@dataclass(frozen=True)
class Fetched:
    """A source video on local disk."""

    path: str
    bytes: int
    url: str
    """The source URL with credentials and signed query strings removed (safe to log or store)."""
    seconds: float = 0.0
    """Wall time of the fetch, waits included."""
    attempts: int = 1
    duration: float | None = None
    """The duration the source announced (yt-dlp sites), else None."""


class FetchFailed(Exception):
    """One attempt failed with a code (internal to the fetch modules; fetch_video turns it into a Failure)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None):
        assert code in CODES, code
        super().__init__(reason)
        self.code, self.reason, self.retry_after = code, reason, retry_after


# ----------------------------------------------------------------------------- public entry point


def fetch_video(url: str, dest_dir: str, name: str, cfg: FetchConfig, gate) -> Fetched | Failure:
    """Download one source video into ``dest_dir`` as ``<name><ext>``; returns :class:`Fetched`, or a Failure
    (stage ``fetch``) for a bad source, a refused or failed download, never raising for one. Nothing is left in
    ``dest_dir`` on failure. ``gate`` has ``try_acquire``/``release``/``back_off`` (a HostGate or its client).

    Raises ValueError for a ``name`` that is not a plain file name and for a missing cookies file (bad settings,
    not a bad source)."""
    if not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name:
        raise ValueError(f"fetch name must be a plain file name, got {name!r}")
    if cfg.cookies is not None and not os.path.isfile(cfg.cookies):
        raise ValueError("the cookies file given in the fetch settings does not exist")
    secrets = Secrets.of(cfg)
    shown = redact_url(url)
    started = time.monotonic()
    os.makedirs(dest_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{name}-", dir=dest_dir)
    try:
        job = Download(url=url, shown=shown, cfg=cfg, gate=gate, host=host_key(url), scratch=scratch, secrets=secrets)
        try:
            path, duration = job.run(_downloader(url, cfg))
        except FetchFailed as fail:
            return _failure(fail, shown, secrets)
        final = os.path.join(dest_dir, name + os.path.splitext(path)[1])
        os.replace(path, final)
        seconds = time.monotonic() - started
        log.debug("fetched %s: %d bytes in %.1f s (%d attempts)", shown, os.path.getsize(final), seconds, job.attempts)
        return Fetched(final, os.path.getsize(final), shown, seconds, job.attempts, duration)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _failure(fail: FetchFailed, shown: str, secrets: Secrets) -> Failure:
    reason = " ".join(secrets.scrub(fail.reason).split())[:400]
    return Failure(stage="fetch", error=fail.code, message=f"{shown}: {reason}")


def _downloader(url: str, cfg: FetchConfig) -> Callable[[Download], tuple[str, float | None]]:
    """The function that makes one attempt at this URL, by route."""
    kind = route(url, cfg)
    if kind == "yt-dlp":
        from preprocess import fetch_ytdlp

        return fetch_ytdlp.attempt
    if kind == "storage":
        return storage_attempt
    return HttpStream().attempt


# ----------------------------------------------------------------------------- routing and naming


def route(url: str, cfg: FetchConfig) -> str:
    """Who downloads ``url``: ``storage`` (a URI pipeline.storage reads: s3://, file://), ``yt-dlp`` (a URL one
    of its site extractors claims, or any other with ``http_downloader=yt-dlp``) or ``requests`` (which refuses
    what is not http(s) with ``fetch_error``)."""
    if is_storage_uri(url):
        return "storage"
    if cfg.http_downloader is HttpDownloader.YT_DLP or site_extractor(url) is not None:
        return "yt-dlp"
    return "requests"


def is_storage_uri(url: str) -> bool:
    """A URI with a scheme that pipeline/storage.py reads (s3://, file://); False for http(s) and plain paths."""
    if not storage.has_scheme(url):
        return False
    try:
        storage.parse(url)
    except storage.StorageError:
        return False
    return True


@functools.cache
def _site_extractors() -> tuple:
    from yt_dlp.extractor import gen_extractor_classes

    return tuple(c for c in gen_extractor_classes() if c.ie_key() != "Generic")


def site_extractor(url: str) -> str | None:
    """The key of the yt-dlp site extractor that claims ``url`` (``Youtube``...), or None."""
    return next((c.ie_key() for c in _site_extractors() if c.suitable(url)), None)


def host_key(url: str) -> str:
    """What the gate counts by: the site for yt-dlp sites (``youtube`` for all of its hosts), ``bucket:<name>``
    for S3, ``local`` for local files, else the URL's ``host[:port]``."""
    if is_storage_uri(url):
        return f"bucket:{storage.parse(url).bucket}" if storage.is_remote(url) else "local"
    site = site_extractor(url)
    if site is not None:
        return site.lower()
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return f"{host}:{parts.port}" if parts.port else host


_SIGNED_QUERY = re.compile(r"sig|signature|token|key|credential|auth|pass|secret|session|policy|expires", re.I)
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without userinfo, fragment, and query string when any of its keys looks like a signature/token."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    query = "" if any(_SIGNED_QUERY.search(k) for k in keys) else parts.query
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=query, fragment=""))


@dataclass(frozen=True)
class Secrets:
    """Strings that must never reach a log record or a message: the proxy URL (and its password), cookie paths."""

    words: tuple[str, ...]

    @classmethod
    def of(cls, cfg: FetchConfig) -> Secrets:
        words = [w for w in (cfg.proxy, cfg.cookies) if w]
        if cfg.proxy:
            userinfo = urlsplit(cfg.proxy).netloc.rpartition("@")[0]
            words += [w for w in (userinfo, *userinfo.split(":", 1)) if len(w) >= 3]
        return cls(tuple(sorted(set(words), key=len, reverse=True)))

    def scrub(self, text: str) -> str:
        for word in self.words:
            text = text.replace(word, "<redacted>")
        return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


# ----------------------------------------------------------------------------- attempts, retries, the gate


@dataclass
class Download:
    """One video's download across attempts: the deadline, the gate slot, backoff and Retry-After."""

    url: str
    shown: str
    cfg: FetchConfig
    gate: object
    host: str
    scratch: str
    secrets: Secrets
    attempts: int = 0
    progress: int = 0
    """High-water mark of bytes on disk; an attempt that raises it is not counted against ``retries``."""
    deadline: float | None = None

    def run(self, attempt: Callable[[Download], tuple[str, float | None]]) -> tuple[str, float | None]:
        misses = 0
        while True:
            before = self.progress
            self._acquire()
            self.attempts += 1
            try:
                return attempt(self)
            except FetchFailed as fail:
                error = fail
            finally:
                self.gate.release(self.host)
            misses = 0 if self.progress > before else misses + 1
            self._before_retry(error, misses)

    def _before_retry(self, fail: FetchFailed, misses: int) -> None:
        """Raise ``fail`` when it is final; else wait (backoff, or tell the gate about Retry-After)."""
        left = self.time_left()
        if fail.code not in TRANSIENT or misses > self.cfg.retries or left <= 0:
            raise fail
        if fail.retry_after is not None:
            self.gate.back_off(self.host, fail.retry_after)
            if fail.retry_after > left:
                raise FetchFailed(
                    fail.code, f"{fail.reason}; Retry-After {fail.retry_after:.0f} s exceeds the time left"
                )
            wait = 0.0
        else:
            wait = random.uniform(0, min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (misses - 1)))
            wait = min(wait, left)
        log.info(
            "fetch %s: %s (%s); attempt %d, retrying in %.1f s",
            self.shown,
            fail.code,
            self.secrets.scrub(fail.reason),
            self.attempts,
            fail.retry_after if fail.retry_after is not None else wait,
        )
        time.sleep(wait)

    def _acquire(self) -> None:
        """Wait for a slot of the host; the deadline starts with the first request."""
        while True:
            wait = self.gate.try_acquire(self.host)
            if wait <= 0:
                break
            if wait > self.time_left():
                if wait > CLOSED_S:  # only a Retry-After closes a host for that long
                    raise FetchFailed("rate_limited", f"host {self.host} closed for {wait:.0f} s more (Retry-After)")
                raise FetchFailed("timeout", f"no slot for host {self.host} within {self.cfg.timeout_s:g} s")
            time.sleep(wait)
        if self.deadline is None:
            self.deadline = time.monotonic() + self.cfg.timeout_s

    def time_left(self) -> float:
        return self.cfg.timeout_s if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self) -> None:
        if self.time_left() <= 0:
            raise FetchFailed("timeout", f"download not finished within {self.cfg.timeout_s:g} s")

    def check_size(self, size: int, announced: bool = False) -> None:
        if size > self.cfg.max_video_bytes:
            how = "announced size" if announced else "more than"
            raise FetchFailed("too_large", f"{how} {size} bytes > max_video_bytes {self.cfg.max_video_bytes}")


# ----------------------------------------------------------------------------- what a body is


_VIDEO_MAGIC = (
    (4, b"ftyp", ".mp4"),
    (0, b"\x1a\x45\xdf\xa3", ".mkv"),
    (0, b"FLV", ".flv"),
    (0, b"\x00\x00\x01\xba", ".mpg"),
    (0, b"OggS", ".ogv"),
    (0, b"0&\xb2u\x8e\x66\xcf\x11", ".wmv"),
    (4, b"moov", ".mov"),
    (4, b"mdat", ".mov"),
    (4, b"free", ".mov"),
    (4, b"wide", ".mov"),
)
_NOT_VIDEO_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
)
_NOT_VIDEO_TYPES = re.compile(r"^(text/|image/|application/(json|xml|xhtml|javascript|pdf)|[^;]*\+(json|xml))", re.I)
_TEXT_START = re.compile(rb"^\s*(<!doctype|<html|<\?xml|<head|<body|<!--|\{|\[)", re.I)
_EXT_OF_TYPE = {"video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov", "video/mp2t": ".ts"}


def classify(head: bytes, content_type: str | None, url_path: str) -> str:
    """The file extension to store a body under, or raise ``not_a_video`` for what cannot be a video."""
    kind = (content_type or "").split(";")[0].strip().lower()
    for offset, magic, ext in _VIDEO_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return _EXT_OF_TYPE.get(kind, ext) if ext in (".mkv", ".mov") else ext
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    if _mpeg_ts(head):
        return ".ts"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise FetchFailed("not_a_video", "the body is a WebP image")
    for magic, what in _NOT_VIDEO_MAGIC:
        if head.startswith(magic):
            raise FetchFailed("not_a_video", f"the body is {what}")
    if _TEXT_START.match(head) or _NOT_VIDEO_TYPES.match(kind) or _is_text(head):
        raise FetchFailed("not_a_video", f"the body is not a video (Content-Type {kind or 'none'}: {_peek(head)})")
    ext = os.path.splitext(url_path)[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else _EXT_OF_TYPE.get(kind, ".video")


def _mpeg_ts(head: bytes) -> bool:
    """An MPEG transport stream: a 0x47 sync byte every 188 bytes (192 in M2TS, after a 4-byte time code)."""
    for first, step in ((0, 188), (4, 192)):
        syncs = head[first::step]
        if len(syncs) >= 2 and set(syncs) == {0x47}:
            return True
    return False


def _is_text(head: bytes) -> bool:
    """Printable ASCII or UTF-8 text only (no container starts so: each opens with binary sizes or magic)."""
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)
    return False


def _peek(head: bytes) -> str:
    text = head[:24].decode("ascii", "replace")
    return repr("".join(c if c.isprintable() else "." for c in text))


class Sink:
    """A body being written to a scratch file: counts bytes, checks the cap, the deadline and the first bytes."""

    def __init__(self, job: Download, content_type: str | None, url_path: str):
        self.job, self.content_type, self.url_path = job, content_type, url_path
        self.path = os.path.join(job.scratch, "body")
        self.ext: str | None = None
        self.head = b""
        self.written = 0

    def open(self, offset: int):
        """The file positioned at ``offset`` (0: a fresh start)."""
        if offset == 0:
            self.head, self.ext, self.written = b"", None, 0
        f = open(self.path, "r+b" if offset and os.path.exists(self.path) else "wb")
        f.truncate(offset)
        f.seek(offset)
        return f

    def write(self, f, data: bytes) -> None:
        f.write(data)
        self.written += len(data)
        self.job.progress = max(self.job.progress, self.written)
        if self.ext is None and len(self.head) < SNIFF_BYTES:
            self.head += data[: SNIFF_BYTES - len(self.head)]
            if len(self.head) >= SNIFF_BYTES:
                self.ext = classify(self.head, self.content_type, self.url_path)
        self.job.check_size(self.written)
        self.job.check_time()

    def finish(self) -> str:
        """The complete body, renamed with its extension."""
        if self.written == 0:
            raise FetchFailed("not_a_video", "the body is empty")
        ext = self.ext or classify(self.head, self.content_type, self.url_path)
        final = self.path + ext
        os.replace(self.path, final)
        return final


# ----------------------------------------------------------------------------- plain http(s) through requests


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


class HttpStream:
    """Our http(s) client for one URL: state kept across attempts for Range resumes."""

    def __init__(self):
        self.sink: Sink | None = None
        self.total: int | None = None
        self.validator: str | None = None
        self.ranges = False

    def attempt(self, job: Download) -> tuple[str, float | None]:
        import requests

        with requests.Session() as session:
            if job.cfg.proxy:
                session.proxies = {"http": job.cfg.proxy, "https": job.cfg.proxy}
            resume = self.sink is not None and self.sink.written > 0 and self.ranges
            response = self._get(session, job, resume)
            with response:
                offset = self._accept(response, job, resume)
                self._read_body(response, job, offset)
        return self.sink.finish(), None

    def _get(self, session, job: Download, resume: bool):
        import requests

        headers = {"Accept-Encoding": "identity", "User-Agent": "clipvip-preprocess/1 (+requests)"}
        if resume:
            headers["Range"] = f"bytes={self.sink.written}-"
            if self.validator:
                headers["If-Range"] = self.validator
        timeout = max(0.1, min(job.cfg.read_timeout_s, job.time_left()))
        try:
            return session.get(job.url, stream=True, timeout=(timeout, timeout), headers=headers)
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as exc:
            raise FetchFailed("timeout", f"no answer within {timeout:g} s ({type(exc).__name__})") from None
        except requests.exceptions.ConnectionError as exc:
            raise FetchFailed("network", f"cannot connect: {_first_reason(exc)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
            raise FetchFailed("fetch_error", "not a URL this fetch can download (http(s)://, s3://, file://)") from None
        except requests.exceptions.RequestException as exc:
            raise FetchFailed("fetch_error", f"{type(exc).__name__}: {_first_reason(exc)}") from None

    def _accept(self, response, job: Download, resume: bool) -> int:
        """Check the status and headers; returns the byte offset the body starts at."""
        if response.status_code == 416:
            self.ranges = False  # the next attempt starts over
        _raise_for_status(response)
        if self.sink is None:
            self.sink = Sink(job, response.headers.get("Content-Type"), urlsplit(job.url).path)
        length = response.headers.get("Content-Length")
        if response.status_code == 206:
            offset, total = _content_range(response.headers.get("Content-Range", ""))
            if not resume or offset != self.sink.written:
                self.ranges = False
                raise FetchFailed("truncated", f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            self.total = total
        else:
            offset = 0
            self.ranges = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
            self.total = int(length) if length and length.isdigit() else None
            etag = response.headers.get("ETag", "")
            self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        if self.total is not None:
            job.check_size(self.total, announced=True)
        return offset

    def _read_body(self, response, job: Download, offset: int) -> None:
        import urllib3.exceptions

        with self.sink.open(offset) as f:
            while True:
                try:
                    data = response.raw.read1(CHUNK)
                except urllib3.exceptions.ReadTimeoutError:
                    where = f"at byte {self.sink.written}"
                    raise FetchFailed("timeout", f"no bytes for {job.cfg.read_timeout_s:g} s {where}") from None
                except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                    code = "truncated" if self.total is not None else "network"
                    where = f"connection lost at byte {self.sink.written}"
                    raise FetchFailed(code, f"{where}: {_first_reason(exc)}") from None
                if not data:
                    break
                self.sink.write(f, data)  # a local disk error propagates: it is not the source's fault
        if self.total is not None and self.sink.written < self.total:
            raise FetchFailed("truncated", f"{self.sink.written} of {self.total} bytes received")


_STATUS_CODES = {403: "http_403", 404: "http_404", 410: "http_410", 429: "rate_limited"}


def _raise_for_status(response) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    reason = f"HTTP {status} {response.reason or ''}".strip()
    if status in (429, 503):
        code = "rate_limited" if status == 429 else "http_5xx"
        raise FetchFailed(code, reason, retry_after=retry_after(response.headers.get("Retry-After")))
    if status in _STATUS_CODES:
        raise FetchFailed(_STATUS_CODES[status], reason)
    if status == 416:
        raise FetchFailed("truncated", f"{reason} (range not satisfiable)")
    if 500 <= status < 600:
        raise FetchFailed("http_5xx", reason)
    if 400 <= status < 500:
        raise FetchFailed("http_4xx", reason)
    raise FetchFailed("fetch_error", f"unexpected {reason}")


def _content_range(value: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return -1, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _first_reason(exc: BaseException) -> str:
    """The innermost cause's message, on one line (urllib3 wraps the useful part several levels down)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    for marker in ("Failed to resolve", "Name or service not known", "Connection refused", "Connection reset"):
        if marker in text:
            return marker
    return " ".join(text.split())[:200]


# ----------------------------------------------------------------------------- s3:// and file:// via storage


def storage_attempt(job: Download) -> tuple[str, float | None]:
    """One attempt at an s3:// or file:// source through pipeline.storage (which resumes cut S3 reads itself)."""
    sink = Sink(job, None, urlsplit(job.url).path)
    with _storage_errors():
        job.check_size(storage.size(job.url), announced=True)
        src = storage.open_read(job.url)
    with src, sink.open(0) as f:
        while True:
            with _storage_errors():
                data = src.read(CHUNK)
            if not data:
                break
            sink.write(f, data)
    return sink.finish(), None


@contextlib.contextmanager
def _storage_errors():
    try:
        yield
    except storage.StorageNotFound as exc:
        raise FetchFailed("http_404", str(exc)) from None
    except storage.StorageError as exc:
        code = "http_403" if "access denied" in str(exc) else "network"
        raise FetchFailed(code, str(exc)) from None
    except OSError as exc:
        raise FetchFailed("network", f"{type(exc).__name__}: {exc}") from None
