"""The fetch settings (:class:`FetchConfig`) and the codes a failed fetch carries (:data:`CODES`)."""

from __future__ import annotations

import enum
import optparse
from dataclasses import dataclass, field

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
    "no_url": "the metadata line has no url to fetch from (preprocess/fetching/sources.py)",
}
"""Every ``error`` a fetch Failure can carry, with its meaning."""

TRANSIENT = frozenset({"rate_limited", "timeout", "truncated", "network", "http_5xx"})
"""Codes worth another try later: retried within one fetch, and again by ``--retry-failed``."""
PERMANENT = frozenset(CODES) - TRANSIENT
"""Codes that another try would not change (the video is gone, refused, or not a video)."""


def ytdlp_extractor_args(text: str) -> dict:
    """yt-dlp's ``extractor_args`` parameter from its command-line syntax, parsed by yt-dlp itself (one
    ``--extractor-args`` per space-separated spec); ValueError naming the bad spec (not its values)."""
    import yt_dlp

    specs = text.split()
    if not specs:
        raise ValueError("extractor_args must hold at least one IE_KEY:ARGS spec, or be unset")
    argv = [arg for spec in specs for arg in ("--extractor-args", spec)]
    try:
        return yt_dlp.parse_options(argv).ydl_opts["extractor_args"]
    except (optparse.OptParseError, SystemExit):
        keys = [spec.partition(":")[0] for spec in specs]
        raise ValueError(f"extractor_args must be IE_KEY:ARGS specs in yt-dlp's syntax; got specs for {keys}") from None


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
    extractor_args: str | None = field(default=None, repr=False)
    """yt-dlp extractor arguments, its ``--extractor-args`` syntax, several separated by spaces
    (``youtube:player_client=web youtubepot-bgutilhttp:base_url=http://10.0.0.5:4416``); may carry tokens: never
    logged."""

    SECRET_FIELDS = ("cookies", "proxy", "extractor_args")
    """Settings that may carry credentials: named as set in the run log, never shown."""

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
        if self.extractor_args is not None:
            ytdlp_extractor_args(self.extractor_args)

    @property
    def extractor_args_dict(self) -> dict:
        """``extractor_args`` as yt-dlp's ``extractor_args`` parameter (``{}`` when unset)."""
        return ytdlp_extractor_args(self.extractor_args) if self.extractor_args else {}

    @property
    def selector(self) -> str:
        """The yt-dlp format selector in effect."""
        return self.format_with_audio if self.audio else self.format
