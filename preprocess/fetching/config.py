"""The fetch settings (:class:`FetchConfig`) and the codes a failed fetch carries (:data:`CODES`)."""

from __future__ import annotations

import enum
import optparse
from dataclasses import dataclass, field

from preprocess.fetching import formats

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

    format: str | None = None
    """yt-dlp format selector for sites such as YouTube, replacing the default choice (with yt-dlp's own sort).
    None: the smallest video-only stream whose short side is at least the stored one x ``margin``, rounded up to
    360p, 480p or 720p, H.264 first (docs/fetching.md, "Which stream"; 480p for 224 frames)."""
    format_with_audio: str | None = None
    """yt-dlp format selector used instead of ``format`` when the ASR stage needs the audio track. None: the
    default video choice plus the best audio stream, merged by ffmpeg."""
    margin: float = 2.0
    """The default choice wants a source short side of at least the stored short side x this, rounded up to 360,
    480 or 720: 2 takes 480p for 224 frames (bench/fetch_quality.py: 360p loses 0.75 dB PSNR to 720p, 480p 0.37)."""
    audio: bool = False
    """Download an audio track too (set by the job when the ASR stage runs, not a flag)."""
    stored_short_side: int | None = None
    """Short side of the stored frames, the default choice's measure (set by the job from the decode settings, not
    a flag); None: the decoded size is kept, and the largest stream of at most 720p is taken."""
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
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty yt-dlp format selector, or unset")
        if not 0.5 <= self.margin <= 4:
            raise ValueError(f"margin must be within 0.5..4, got {self.margin}")
        if self.stored_short_side is not None and not 1 <= self.stored_short_side <= 4096:
            raise ValueError(f"stored_short_side must be None or within 1..4096, got {self.stored_short_side}")
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
    def overridden(self) -> bool:
        """A format selector was given for this case (``format``, or ``format_with_audio`` with audio)."""
        return (self.format_with_audio if self.audio else self.format) is not None

    @property
    def selector(self) -> str:
        """The yt-dlp format selector in effect."""
        given = self.format_with_audio if self.audio else self.format
        return given if given is not None else formats.selector(self.audio)

    @property
    def target_short_side(self) -> int | None:
        """The short side the default choice asks of a source (None: the decoded size is kept)."""
        return formats.target_short_side(self.stored_short_side, self.margin)

    @property
    def format_sort(self) -> tuple[str, ...]:
        """yt-dlp's ``format_sort`` in effect: the default choice's, or none (yt-dlp's own) with a given selector."""
        return () if self.overridden else formats.sort(self.target_short_side)
