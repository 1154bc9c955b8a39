"""Which stream yt-dlp downloads: the smallest one that still holds every pixel the stored frames need.

The shards store frames with a short side of 224 (``--frame-size 224x224`` squashes, ``--short-side 224`` keeps
the aspect); a 720p source throws most of its pixels away at decode. So by default the fetcher asks for the
smallest stream whose short side is at least the stored short side times ``FetchConfig.margin``, rounded up to the
first rung of :data:`LADDER` that satisfies it (above the ladder: 720p, or the stored short side itself when that is
larger, since a 720p source still holds every stored pixel). The default margin, 2, takes
480p for 224 frames: bench/fetch_quality.py measured 360p sources 0.75 dB PSNR below 720p ones at 224x224, 480p
0.37 dB, for 3.6x and 2.3x fewer bytes (docs/fetching.md). With margin 1 (never upscale): 224 -> 360p,
448 -> 480p, 600 -> 720p. Within that size an H.264 stream is preferred (the cheapest to decode on CPUs), then VP9, then
AV1. The audio track is added only when the ASR stage needs it.

It is yt-dlp's own machinery: a format selector (:func:`selector`: a video-only stream, else one with audio) and a
``format_sort`` (:func:`sort`). ``+res:N`` sorts by the short side (yt-dlp's ``res`` is ``min(height, width)``,
so a portrait video is measured like a landscape one): the smallest short side >= N first, and only when no stream
is that large, the largest below it. ``vcodec:h264`` then ranks H.264 first, then the codecs yt-dlp rates below it
(VP8, MPEG-4), then the ones it rates above (HEVC, VP9, AV1), the nearest first. ``--fetch-format`` replaces both
(yt-dlp's default sort then applies).

:func:`chosen` reads what yt-dlp picked (format id, size, codec) from its info dict, for the shard's stats.
"""

from __future__ import annotations

import math

LADDER = (360, 480, 720)
"""Short sides (YouTube's 360p, 480p, 720p) the wanted size is rounded up to: below 360p YouTube's streams
(240p at ~0.2-0.3 Mbit/s) are too coarse to downscale from, and every rung above costs ~1.5-2x the bytes."""
KEEP_SIZE_SORT = ("res:720", "vcodec:h264")
"""Sort when the decoded size is kept (``--short-side 0``): the largest stream of at most 720p (as before)."""

VIDEO_ONLY = "bv/b/w"
"""A video-only stream (first in the sort), else the first with audio too, else whatever there is."""
WITH_AUDIO = "bv+ba[ext=m4a]/bv+ba/b/w"
"""The same video choice plus the best audio (AAC first: it muxes into mp4), merged by ffmpeg."""


def stored_short_side(frame_size: tuple[int, int] | None, short_side: int | None) -> int | None:
    """The stored frames' short side: ``min(W, H)`` of a squashed ``frame_size``, else ``short_side``; None when the
    decoded size is kept (``short_side`` 0)."""
    if frame_size is not None:
        return min(frame_size)
    return short_side or None


def target_short_side(stored: int | None, margin: float) -> int | None:
    """The short side a source needs: ``stored x margin`` rounded up to the first rung of :data:`LADDER` that holds
    it; above the ladder, its top (or ``stored`` itself when larger: the margin never asks beyond the ladder for
    frames a 720p source holds); None when the decoded size is kept."""
    if stored is None:
        return None
    needed = math.ceil(stored * margin - 1e-9)
    return next((rung for rung in LADDER if rung >= needed), max(LADDER[-1], stored))


def sort(target: int | None) -> tuple[str, ...]:
    """yt-dlp's ``format_sort`` for a target short side (see the module docstring)."""
    if target is None:
        return KEEP_SIZE_SORT
    return (f"+res:{target}", "vcodec:h264")


def selector(audio: bool) -> str:
    """The default format selector: video-only, or with the audio track for the ASR stage."""
    return WITH_AUDIO if audio else VIDEO_ONLY


CHOSEN_FIELDS = ("format_id", "width", "height", "vcodec", "acodec", "filesize")
"""What :func:`chosen` reports of a download."""


def chosen(info: dict) -> dict:
    """What yt-dlp downloaded: ``format_id`` (``v+a`` when merged), the video's ``width``, ``height`` and
    ``vcodec``, the audio's ``acodec`` (None without audio) and the announced ``filesize`` (None when unknown)."""
    parts = info.get("requested_formats") or [info]
    video = next((f for f in parts if f.get("vcodec") not in (None, "none")), parts[0])
    audio = next((f for f in parts if f.get("acodec") not in (None, "none")), None)
    sizes = [f.get("filesize") or f.get("filesize_approx") for f in parts]
    return {
        "format_id": info.get("format_id"),
        "width": video.get("width"),
        "height": video.get("height"),
        "vcodec": video.get("vcodec"),
        "acodec": audio.get("acodec") if audio else None,
        "filesize": int(sum(sizes)) if all(sizes) else None,
    }
