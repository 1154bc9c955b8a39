"""One video's download across attempts (:class:`Download`: deadline, host gate, backoff, Retry-After), what
stops an attempt (:class:`FetchFailed`), what a body is (:func:`classify`, :class:`Sink`), and the secrets kept out of
every message (:class:`Secrets`, :func:`redact_url`). The routes' attempt functions (preprocess/fetching/http.py,
preprocess/fetching/ytdlp.py) build on these; preprocess/fetching/fetch.py picks the route."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from preprocess.fetching.config import CODES, TRANSIENT, FetchConfig

log = logging.getLogger(__name__)

CHUNK = 256 << 10
SNIFF_BYTES = 512
CLOSED_S = 2.0
"""A gate wait longer than this means the host asked everybody to back off (a slot or rate wait is shorter)."""


class FetchFailed(Exception):
    """One attempt failed with a code (internal to the fetch modules; fetch_video turns it into a Failure)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None):
        assert code in CODES, code
        super().__init__(reason)
        self.code, self.reason, self.retry_after = code, reason, retry_after


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
    """Strings that must never reach a log record or a message: the proxy URL (and its password), cookie paths,
    the extractor arguments' values (PO tokens, visitor data)."""

    words: tuple[str, ...]

    @classmethod
    def of(cls, cfg: FetchConfig) -> Secrets:
        words = [w for w in (cfg.proxy, cfg.cookies) if w]
        if cfg.proxy:
            userinfo = urlsplit(cfg.proxy).netloc.rpartition("@")[0]
            words += [w for w in (userinfo, *userinfo.split(":", 1)) if len(w) >= 3]
        for args in cfg.extractor_args_dict.values():
            words += [value for values in args.values() for value in values if len(value) >= 3]
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
    format: dict | None = None
    """What yt-dlp chose and downloaded (preprocess/fetching/formats.py ``chosen``); None on the other routes."""

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
