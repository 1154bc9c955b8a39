"""Downloading one source video: YouTube (and other sites yt-dlp knows), plain http(s) and s3:// / file:// URLs.

:func:`fetch_video` is the whole interface: it downloads one URL into a folder and returns :class:`Fetched`, or a
:class:`~preprocess.failures.Failure` (stage ``fetch``) whose ``error`` says why (:data:`CODES`); it never raises
for a bad source. It is Ray-agnostic and thread-safe; politeness towards hosts comes from a shared gate
(:class:`preprocess.fetching.host_gate.HostGate`, or a client of one with the same three methods).

Routes (:func:`route`):

* a URL that one of yt-dlp's site extractors claims (``youtube.com/watch``, ``youtu.be``, ``/shorts/``, Vimeo...)
  goes through yt-dlp used as a library (:mod:`preprocess.fetching.ytdlp`): the info is extracted first, so the
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

import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline import storage
from preprocess.failures import Failure
from preprocess.fetching import formats, http, ytdlp
from preprocess.fetching.attempts import Download, FetchFailed, Secrets, redact_url
from preprocess.fetching.config import FetchConfig, HttpDownloader

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".fetch-"
"""Name prefix of the private folder each download works in (inside ``dest_dir``); removed when it ends."""


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
    format: dict | None = None
    """The stream yt-dlp chose (format id, width, height, codecs, announced size); None on the other routes."""

    def record(self, video_id: str) -> dict:
        """This download as a row of the shard's stats (``fetched``): what was chosen and the bytes on disk."""
        chosen = self.format or dict.fromkeys(formats.CHOSEN_FIELDS)
        return {"video_id": video_id, **chosen, "bytes": self.bytes}


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
        return Fetched(final, os.path.getsize(final), shown, seconds, job.attempts, duration, job.format)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _failure(fail: FetchFailed, shown: str, secrets: Secrets) -> Failure:
    reason = " ".join(secrets.scrub(fail.reason).split())[:400]
    return Failure(stage="fetch", error=fail.code, message=f"{shown}: {reason}")


def _downloader(url: str, cfg: FetchConfig) -> Callable[[Download], tuple[str, float | None]]:
    """The function that makes one attempt at this URL, by route."""
    kind = route(url, cfg)
    if kind == "yt-dlp":
        return ytdlp.attempt
    if kind == "storage":
        return http.storage_attempt
    return http.HttpStream().attempt


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
