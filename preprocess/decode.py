"""Decode only the frames each clip needs from a local video file, as resized JPEG bytes.

One call of :func:`decode_clips` opens the file once and serves every clip of that video in a
single forward pass over its packets (with a keyframe seek across long gaps between clips):

* each clip asks for a few target times (uniform or fixed-rate, see :func:`target_times`);
* packets are grouped by GOP (keyframe to keyframe) without decoding; a GOP whose packets hold
  no chosen frame is never fed to the decoder;
* inside a needed GOP the decoder gets the packets up to the last chosen frame (in decode order)
  and skips non-reference frames that are not chosen (``skip_frame = "NONREF"``), then drains;
* every chosen frame is resized (swscale) and JPEG-encoded at once, so at most the JPEGs of the
  clips in progress and one GOP of compressed packets are held, whatever the video's length.

Times are seconds on the source timeline: packet and frame timestamps (``pts * time_base``)
minus the video stream's start time, never frame counts, so variable frame rate files work.
Bad input never raises: it becomes a :class:`preprocess.failures.Failure` of the clip (its
``clip_id`` set) with a stage (open, probe, span, decode or encode), an error class and a
message naming the file. See docs/decoding.md.

A clip that asks for audio (``ClipRequest.audio``, for the ASR stage) also gets its span's audio,
decoded in the same pass (the audio packets are demuxed together with the video packets) and
resampled to 16 kHz mono float32; a file without an audio stream gives ``audio=None``. Without
such a request the audio stream is never read.

With ``DecodeConfig.thumbnails`` each stored frame is also kept as a small RGB image (the resized frame
box-reduced to a short side of about 56 pixels, before JPEG), from which preprocess/scoring/ computes the
clip's quality scores without decoding anything again.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from preprocess.failures import Failure

log = logging.getLogger(__name__)

AUDIO_RATE = 16_000
"""Sample rate of the audio given to clips that ask for it (mono float32)."""
MAX_GOP_BYTES = 256 << 20
"""Compressed bytes one GOP may hold; a longer keyframe interval fails the remaining clips (bounded memory)."""
TRAINING_SIZE = (224, 224)
"""Stored frame size by default: CLIP-ViP's 224x224 input (arXiv 2209.06430; its code squashes each frame to it)."""
THUMB_SIDE = 56
"""About the short side of the thumbnails kept for the quality scores (``DecodeConfig.thumbnails``): the stored
frame box-reduced by the whole factor that comes nearest (224 -> 56)."""
END_SLACK = 1e-3
"""Seconds a span's end may pass the video's end (its last frame plus one frame interval): timestamp rounding."""
IMAGE_CODECS = frozenset(
    "png apng mjpeg jpeg2000 jpegls jpegxl gif webp bmp tiff qoi targa pam pbm pgm ppm sgi dpx exr psd pcx "
    "xbm xpm xwd sunrast hdr dds photocd".split()
)
"""Still-image codecs: a stream of one of these holding a single frame is a picture, not a video."""


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Which frames to take from a clip and how to store them."""

    num_frames: int = 12
    """Frames per clip in uniform mode (used when ``fps`` is None)."""
    fps: float | None = None
    """If set: fixed-rate mode, frames at this rate from the clip start, capped at ``max_frames``."""
    max_frames: int = 32
    """Cap on frames per clip in fixed-rate mode (evenly subsampled above it)."""
    short_side: int | None = None
    """Keep the aspect ratio: resize so the short side has this many pixels (0 keeps the decoded
    size). Set this or ``frame_size``, not both."""
    frame_size: tuple[int, int] | None = None
    """Exact stored (width, height), aspect not kept. With neither set: 224x224 (`TRAINING_SIZE`), as
    the paper squashes every frame to the training size: done once here, the loader only decodes."""
    jpeg_quality: int = 90
    """JPEG quality, 1..95."""
    threads: int = 1
    """Decoder threads, 1..16."""
    seek_gap: float = 6.0
    """Seek (instead of reading on) when the next needed frame is more than this many seconds ahead."""
    thumbnails: bool = False
    """Also keep a small copy of each stored frame (``DecodedClip.thumbnails``), for the quality scores."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_frames <= 1024:
            raise ValueError(f"num_frames must be in 1..1024, got {self.num_frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 240):
            raise ValueError(f"fps must be None or in (0, 240], got {self.fps}")
        if not 1 <= self.max_frames <= 1024:
            raise ValueError(f"max_frames must be in 1..1024, got {self.max_frames}")
        if self.short_side is not None and self.frame_size is not None:
            raise ValueError(
                f"give frame_size (exact size) or short_side (aspect kept), not both: got "
                f"{self.frame_size} and {self.short_side}"
            )
        if self.short_side is None and self.frame_size is None:
            object.__setattr__(self, "frame_size", TRAINING_SIZE)
        if self.short_side is not None and not 0 <= self.short_side <= 4096:
            raise ValueError(f"short_side must be 0 (keep size) or in 1..4096, got {self.short_side}")
        if self.frame_size is not None:
            if len(self.frame_size) != 2 or not all(isinstance(v, int) and 16 <= v <= 4096 for v in self.frame_size):
                raise ValueError(f"frame_size must be None or (width, height) within 16..4096, got {self.frame_size}")
            object.__setattr__(self, "frame_size", tuple(self.frame_size))
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if not 1 <= self.threads <= 16:
            raise ValueError(f"threads must be in 1..16, got {self.threads}")
        if not (math.isfinite(self.seek_gap) and self.seek_gap > 0):
            raise ValueError(f"seek_gap must be a positive number of seconds, got {self.seek_gap}")


@dataclass(frozen=True, kw_only=True)
class ClipRequest:
    """One clip to take from a video file."""

    clip_id: str
    """Identifier carried into the result."""
    start: float
    """Start in seconds on the source timeline; 0.0 for a pre-cut clip file."""
    end: float | None
    """End in seconds; None means the end of the file (a pre-cut clip)."""
    audio: bool = False
    """Also return the span's audio (16 kHz mono float32), read in the same pass."""


@dataclass(frozen=True, kw_only=True)
class DecodedClip:
    """The frames of one clip."""

    clip_id: str
    frames: tuple[bytes, ...]
    """JPEG bytes, in time order."""
    frame_times: tuple[float, ...]
    """Source-timeline seconds of each stored frame (non-decreasing; repeats if the clip has fewer frames)."""
    frame_size: tuple[int, int]
    """(width, height) of the stored frames."""
    source_fps: float
    """The stream's average frame rate (0.0 if unknown)."""
    span: tuple[float, float]
    """The span used: the request, with the end resolved (pre-cut) or clamped to the video's end."""
    audio: np.ndarray | None = None
    """With ``ClipRequest.audio``: the span's audio, 16 kHz mono float32; None when the file has no audio stream."""
    thumbnails: tuple[Image.Image, ...] | None = None
    """With ``DecodeConfig.thumbnails``: each stored frame as a small RGB image (short side about ``THUMB_SIDE``,
    box-reduced from the stored frame), in time order."""


@dataclass(frozen=True)
class _VideoInfo:
    time_base: Fraction
    start_pts: int
    duration: float
    """Seconds; math.inf when the container does not say."""
    fps: float


@dataclass
class _Clip:
    """A clip in progress: its targets and the JPEGs found for them so far."""

    index: int
    request: ClipRequest
    span: tuple[float, float]
    targets: tuple[float, ...]
    frames: list[bytes | None] = field(default_factory=list)
    thumbs: list[Image.Image | None] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    size: tuple[int, int] | None = None
    missing: int = 0
    audio_parts: list | None = None
    """Audio chunks of the span so far; None when no audio was asked for (or there is none)."""
    audio_done: bool = True
    audio_until: float = -math.inf

    def __post_init__(self) -> None:
        self.frames = [None] * len(self.targets)
        self.thumbs = [None] * len(self.targets)
        self.times = [0.0] * len(self.targets)
        self.missing = len(self.targets)


@dataclass
class _Target:
    time: float
    clip: _Clip
    slot: int
    planned_pts: int | None = None


def target_times(start: float, end: float, cfg: DecodeConfig) -> tuple[float, ...]:
    """Seconds to sample in [start, end).

    Uniform mode: the centres of ``num_frames`` equal segments (never the exact span edges, which
    often sit on a cut). Fixed-rate mode: ``start + k / fps`` below ``end``, evenly subsampled
    down to ``max_frames`` when there are more.
    """
    length = end - start
    if cfg.fps is None:
        n = cfg.num_frames
        return tuple(start + (i + 0.5) * length / n for i in range(n))
    count = max(1, math.ceil(length * cfg.fps - 1e-9))
    times = [start + k / cfg.fps for k in range(count)]
    if count > cfg.max_frames:
        step = count / cfg.max_frames
        times = [times[int(i * step)] for i in range(cfg.max_frames)]
    return tuple(times)


def output_size(
    width: int, height: int, short_side: int | None, frame_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """(w, h): ``frame_size`` if given, else the short side scaled to ``short_side`` with the aspect
    kept; 0 keeps the size."""
    if frame_size is not None:
        return frame_size
    if short_side == 0:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def decode_clips(path: str, clips: Sequence[ClipRequest], cfg: DecodeConfig) -> Iterator[DecodedClip | Failure]:
    """Open the local video at ``path`` once and yield one result per request, in request order.

    Never raises for bad input: a file-level problem yields a Failure for every clip.
    Closing the generator early closes the file.
    """
    requests = list(clips)
    opened = _open(path)
    if isinstance(opened, Failure):
        yield from _fail_all(requests, opened)
        return
    container = opened
    try:
        probed = _probe(path, container)
        if isinstance(probed, Failure):
            yield from _fail_all(requests, probed)
            return
        stream, info = probed
        planned = [_plan_clip(path, i, r, info, cfg) for i, r in enumerate(requests)]
        audio = _audio_track(path, container, info) if any(r.audio for r in requests) else None
        yield from _Pass(path, container, stream, info, cfg, audio).run(planned)
    finally:
        container.close()


def video_duration(path: str) -> float | Failure:
    """Seconds of the local video at ``path`` as `decode_clips` measures it (math.inf when the container does not
    say), read from its headers without decoding; a Failure (no ``clip_id``) when the file cannot be opened."""
    opened = _open(path)
    if isinstance(opened, Failure):
        return opened
    try:
        probed = _probe(path, opened)
        return probed if isinstance(probed, Failure) else probed[1].duration
    finally:
        opened.close()


def _fail_all(requests: list[ClipRequest], problem: Failure) -> Iterator[Failure]:
    """A file-level problem fails every clip of the file."""
    for r in requests:
        yield dataclasses.replace(problem, clip_id=r.clip_id)


def _open(path: str) -> av.container.InputContainer | Failure:
    if not os.path.exists(path):
        return Failure(stage="open", error="missing_file", message=f"{path}: no such file")
    if not os.path.isfile(path):
        return Failure(stage="open", error="not_a_file", message=f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        return Failure(stage="open", error="empty_file", message=f"{path}: the file is empty (0 bytes)")
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError as exc:
        why = f"not a readable media container ({_short(exc)}); the file is corrupt, truncated, or not a video"
        return Failure(stage="open", error="corrupt_file", message=f"{path}: {why}")
    except av.FFmpegError as exc:
        why = f"ffmpeg cannot open it: {_short(exc)}"
        return Failure(stage="open", error="unsupported_format", message=f"{path}: {why}")
    except OSError as exc:
        return Failure(stage="open", error="unreadable_file", message=f"{path}: cannot read it: {exc}")


def _probe(path: str, container) -> tuple[av.video.stream.VideoStream, _VideoInfo] | Failure:
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        why = f"no video stream (streams present: {kinds})"
        return Failure(stage="probe", error="no_video_stream", message=f"{path}: {why}")
    stream = container.streams.video[0]
    codec_name = stream.codec_context.name if stream.codec_context is not None else None
    if not codec_name or codec_name == "none":
        why = "the video stream's codec has no decoder in this ffmpeg"
        return Failure(stage="probe", error="unsupported_codec", message=f"{path}: {why}")
    if stream.time_base is None:
        return Failure(stage="probe", error="no_timestamps", message=f"{path}: the video stream has no time base")
    if _is_still_image(container, stream):
        why = f"a still image ({container.format.name}, {codec_name}), not a video"
        return Failure(stage="probe", error="not_a_video", message=f"{path}: {why}")
    info = _video_info(stream, container)
    return stream, info


def _is_still_image(container, stream) -> bool:
    """An image demuxer (image2, png_pipe, ...) that finds one frame, or an image codec holding one frame (a
    one-frame GIF, a PNG in an mp4), whatever the file is named. Leaves the container at its start."""
    formats = container.format.name.split(",")
    if not any(f in ("image2", "image2pipe") or f.endswith("_pipe") for f in formats):
        return stream.codec_context.name in IMAGE_CODECS and stream.frames == 1
    count = 0
    try:
        for packet in container.demux(stream):
            count += packet.size > 0
            if count > 1:
                break
        container.seek(0)  # an image sequence (raw MJPEG, concatenated PNGs) is a video: rewind it
    except av.FFmpegError:
        pass
    return count <= 1


def _video_info(stream, container) -> _VideoInfo:
    tb = Fraction(stream.time_base)
    start_pts = stream.start_time if stream.start_time is not None else 0
    tagged_end = _tag_seconds(stream.metadata.get("DURATION"))  # Matroska/WebM: the video track's own end
    if stream.duration is not None and stream.duration > 0:
        duration = float(stream.duration * tb)
    elif tagged_end is not None and tagged_end > float(start_pts * tb):
        duration = tagged_end - float(start_pts * tb)
    elif container.duration is not None and container.duration > 0:
        offset = float(start_pts * tb) - (container.start_time or 0) / av.time_base
        duration = max(0.0, container.duration / av.time_base - offset)
    else:
        duration = math.inf
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return _VideoInfo(time_base=tb, start_pts=start_pts, duration=duration, fps=float(rate) if rate else 0.0)


def _tag_seconds(text: str | None) -> float | None:
    """``HH:MM:SS.nnnnnnnnn`` (the DURATION tag ffmpeg writes per Matroska track) in seconds; None if absent."""
    try:
        hours, minutes, seconds = text.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (AttributeError, ValueError):
        return None


def _plan_clip(path: str, index: int, r: ClipRequest, info: _VideoInfo, cfg: DecodeConfig) -> _Clip | Failure:
    def fail(error: str, why: str) -> Failure:
        return Failure(clip_id=r.clip_id, stage="span", error=error, message=f"{path}: clip {r.clip_id!r}: {why}")

    end = info.duration if r.end is None else r.end
    if not math.isfinite(r.start) or (r.end is not None and not math.isfinite(r.end)):
        return fail("span_invalid", f"span ({r.start}, {r.end}) is not finite")
    if r.start < 0 or end < 0:
        return fail("span_negative", f"span ({r.start}, {r.end}) has a negative time")
    if end < r.start:
        return fail("span_reversed", f"span end {end:.3f} s is before its start {r.start:.3f} s")
    if end == r.start:
        return fail("span_empty", f"span ({r.start:.3f}, {end:.3f}) has zero length")
    if r.start >= info.duration:
        return fail(
            "span_out_of_range", f"span starts at {r.start:.3f} s, after the video's end at {info.duration:.3f} s"
        )
    cut = r.end is None or end > info.duration  # a span the video's end cuts (one inside may be under a frame)
    end = min(end, info.duration)
    frame_dur = 1.0 / info.fps if info.fps > 0 else 0.0
    if math.isfinite(end) and cut and end - r.start < frame_dur:
        return fail(
            "span_out_of_range",
            f"only {end - r.start:.3f} s of the span lies inside the video "
            f"(duration {info.duration:.3f} s), less than one frame",
        )
    if not math.isfinite(end):
        return fail("span_out_of_range", "the video's duration is unknown, so a clip without an end cannot be cut")
    return _Clip(index=index, request=r, span=(r.start, end), targets=target_times(r.start, end, cfg))


def _audio_track(path: str, container, info: _VideoInfo) -> _AudioTrack | None:
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    if stream.codec_context is None or not stream.codec_context.name:
        log.warning("%s: the audio stream's codec has no decoder; no audio", path)
        return None
    return _AudioTrack(stream, origin=float(info.start_pts * info.time_base))


class _AudioTrack:
    """Decodes the audio packets met during the pass and hands each asking clip its span, resampled."""

    def __init__(self, stream, origin: float) -> None:
        self.stream = stream
        self.codec = stream.codec_context
        self.origin = origin
        """Seconds (audio time base) of the video's start: audio times go onto the video's timeline."""
        self.clips: list[_Clip] = []
        self.resampler = None
        self.cursor = 0.0
        self.expected: float | None = None
        self.errors = 0

    def pending(self) -> bool:
        return any(not c.audio_done for c in self.clips)

    def next_need(self) -> float:
        return min((max(c.span[0], c.audio_until) for c in self.clips if not c.audio_done), default=math.inf)

    def feed(self, packet) -> list[_Clip]:
        """Decode one audio packet; returns the clips whose audio is now complete."""
        try:
            frames = self.codec.decode(packet)
        except av.FFmpegError as exc:
            self.errors += 1
            log.debug("audio decode error: %s", _short(exc))
            return []
        fallback = float(packet.pts * packet.time_base) - self.origin if packet.pts is not None else self.expected
        finished: list[_Clip] = []
        for frame in frames:
            finished += self._frame(frame, fallback)
        return finished

    def _frame(self, frame, fallback: float | None) -> list[_Clip]:
        if frame.pts is not None and frame.time_base is not None:
            time = float(frame.pts * frame.time_base) - self.origin
        else:
            time = fallback if fallback is not None else (self.expected or 0.0)
        if self.resampler is None or self.expected is None or abs(time - self.expected) > 0.1:
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)  # start or gap (seek)
            self.cursor = time
        self.expected = time + frame.samples / frame.sample_rate
        finished: list[_Clip] = []
        for chunk in self.resampler.resample(frame):
            samples = chunk.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            finished += self._deliver(self.cursor, samples)
            self.cursor += len(samples) / AUDIO_RATE
        return finished

    def _deliver(self, t0: float, samples: np.ndarray) -> list[_Clip]:
        t1 = t0 + len(samples) / AUDIO_RATE
        finished = []
        for clip in self.clips:
            if clip.audio_done:
                continue
            lo, hi = max(t0, clip.span[0], clip.audio_until), min(t1, clip.span[1])
            if hi > lo:
                clip.audio_parts.append(samples[round((lo - t0) * AUDIO_RATE) : round((hi - t0) * AUDIO_RATE)])
                clip.audio_until = hi
            if t1 >= clip.span[1]:
                clip.audio_done = True
                finished.append(clip)
        return finished

    def finish(self) -> None:
        """End of file: whatever each clip got is its audio."""
        for clip in self.clips:
            clip.audio_done = True


_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
"""PIL turns, counterclockwise, by quarter turns."""


def _quarter_turns(frame) -> int:
    """Counterclockwise quarter turns that show the frame upright: its display matrix (a phone's rotation), as
    ``frame.rotation`` (PyAV: degrees counterclockwise); 0 for an angle that is not a multiple of 90."""
    degrees = frame.rotation % 360
    return round(degrees / 90) % 4 if abs(degrees - 90 * round(degrees / 90)) < 1 else 0


def _short(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).splitlines()[0][:200]


class _Pass:
    """One forward pass over a video's packets, serving every clip's targets."""

    def __init__(
        self, path: str, container, stream, info: _VideoInfo, cfg: DecodeConfig, audio: _AudioTrack | None = None
    ) -> None:
        self.path = path
        self.audio = audio
        self.clips: list[_Clip] = []
        self.container = container
        self.stream = stream
        self.info = info
        self.cfg = cfg
        self.codec = stream.codec_context
        self.tb = float(info.time_base)
        self.interpolation = "AREA"  # swscale box filter: antialiased downscaling, 2x faster than BICUBIC here
        self.codec.thread_count = cfg.threads
        self.codec.thread_type = "AUTO" if cfg.threads > 1 else "SLICE"
        self.pending: list[_Target] = []
        self.done: dict[int, DecodedClip | Failure] = {}
        self.last_frame = None
        self.last_time = -math.inf
        self.jpeg_cache: tuple[int, tuple[int, int], tuple[bytes, Image.Image | None]] | None = None
        self.decode_errors = 0
        self.stopped: tuple[str, str] | None = None
        """(error class, message) when the pass ended before the end of the file."""
        self.max_gop = 0.0
        self.prev_gop: list = []
        """The GOP before the current one, kept (compressed) for open-GOP leading frames."""
        self.interval = 1.0 / info.fps if info.fps > 0 else 0.0
        self.video_end = -math.inf
        """Seconds: the latest frame seen so far (packet or decoded) plus its duration, at least one frame interval."""
        self.waiting: dict[int, _Clip] = {}
        """Clips with all their frames whose span ends past ``video_end``: complete once the stream reaches it."""

    # -- orchestration -----------------------------------------------------------------------
    def run(self, planned: list[_Clip | Failure]) -> Iterator[DecodedClip | Failure]:
        for i, item in enumerate(planned):
            if isinstance(item, Failure):
                self.done[i] = item
        clips = [c for c in planned if isinstance(c, _Clip)]
        self.clips = clips
        if self.audio is not None:
            self.audio.clips = [c for c in clips if c.request.audio]
            for c in self.audio.clips:
                c.audio_parts, c.audio_done = [], False
        self.pending = sorted(
            (_Target(time=t, clip=c, slot=k) for c in clips for k, t in enumerate(c.targets)),
            key=lambda tg: (tg.time, tg.clip.index, tg.slot),
        )
        next_out = 0
        for _ in self._gops():
            while next_out in self.done:
                yield self.done.pop(next_out)
                next_out += 1
        self._finish_at_eof()
        while next_out < len(planned):
            yield self.done.pop(next_out)
            next_out += 1

    def _gops(self) -> Iterator[None]:
        """Group packets into GOPs and process each; yields after each processed GOP."""
        gop: list = []
        gop_bytes = 0
        skip_until: float | None = None
        audio = self.audio if self.audio is not None and self.audio.clips else None
        streams = (self.stream, audio.stream) if audio else (self.stream,)
        try:
            for packet in self.container.demux(*streams):
                if packet.size == 0:
                    continue
                if audio is not None and packet.stream.index == audio.stream.index:
                    if any(self._complete(c) for c in audio.feed(packet)):
                        yield None
                    if not self._wanted():
                        return
                    continue
                time = self._packet_time(packet)
                if self._reach(time, packet.duration):
                    yield None
                if not self.pending:
                    if not self._wanted():
                        return
                    continue  # frames all found; reading on for audio or to the end of a span
                gop_bytes += packet.size
                if gop_bytes > MAX_GOP_BYTES:
                    self.stopped = (
                        "gop_too_large",
                        f"a GOP holds over {MAX_GOP_BYTES >> 20} MiB of packets "
                        f"after {self.last_time:.3f} s; not buffering more",
                    )
                    return
                if skip_until is not None:
                    if not (packet.is_keyframe and time is not None and time >= skip_until):
                        continue
                    skip_until = None
                if packet.is_keyframe and gop:
                    self._process_gop(gop, eof=False)
                    gop, gop_bytes = [], packet.size
                    yield None
                    if not self._wanted():
                        return
                    if time is not None and self._seek_ahead(time):
                        skip_until = time
                        self.prev_gop = []
                        continue
                gop.append(packet)
        except av.FFmpegError as exc:
            self.stopped = ("decode_error", f"reading stopped after {self.last_time:.3f} s: {_short(exc)}")
            log.warning("%s: %s", self.path, self.stopped[1])
        if gop and self.pending:
            self._process_gop(gop, eof=True)

    def _wanted(self) -> bool:
        return bool(self.pending or self.waiting) or (self.audio is not None and self.audio.pending())

    def _next_need(self) -> float:
        """Earliest time still needed: the next frame target, a waiting clip's end, or the next audio a clip lacks."""
        frame = self.pending[0].time if self.pending else math.inf
        frame = min([frame] + [c.span[1] - self.interval for c in self.waiting.values()])
        return min(frame, self.audio.next_need()) if self.audio is not None else frame

    def _reach(self, time: float | None, duration: int | None) -> bool:
        """The stream holds a frame at ``time`` lasting ``duration`` (time-base units): complete the waiting
        clips whose span it now covers; True if any."""
        if time is None:
            return False
        self.video_end = max(self.video_end, time + max(self.interval, (duration or 0) * self.tb))
        waiting, self.waiting = self.waiting, {}
        return any([self._complete(c) for c in waiting.values()])

    def _seek_ahead(self, keyframe_time: float) -> bool:
        """Seek to the keyframe before the next target when it is far ahead; True if it did."""
        need = self._next_need()
        gap = need - keyframe_time
        if not math.isfinite(need) or gap <= max(self.cfg.seek_gap, 2 * self.max_gop):
            return False
        goal = need - self.max_gop
        pts = int(goal / self.info.time_base) + self.info.start_pts
        try:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as exc:
            log.debug("%s: seek to %.3f s failed (%s); reading on", self.path, goal, _short(exc))
            return False
        return True

    # -- one GOP -----------------------------------------------------------------------------
    def _process_gop(self, gop: list, eof: bool) -> None:
        times = [t for t in (self._packet_time(p) for p in gop) if t is not None]
        previous, self.prev_gop = self.prev_gop, gop
        if not times:
            return
        gop_start, gop_end = min(times), max(times)
        self.max_gop = max(self.max_gop, gop_end - gop_start)
        needed = [tg for tg in self.pending if eof or tg.time <= gop_end]
        if not needed:
            return
        chosen = self._plan_frames(gop, needed)
        if previous and gop[0].pts is not None and min(chosen) < gop[0].pts:
            gop = previous + gop  # open GOP: a chosen leading frame references the previous GOP
        self._decode_gop(gop, needed, chosen)
        assigned = {id(tg) for tg in needed if tg.clip.frames[tg.slot] is not None}
        self.pending = [tg for tg in self.pending if id(tg) not in assigned and tg.clip.index not in self.done]

    def _plan_frames(self, gop: list, needed: list[_Target]) -> set[int]:
        """Pick each target's frame: the first at or after it, or the last before it when that one
        would fall past the clip's end; returns the chosen pts."""
        frames = sorted(p.pts for p in gop if p.pts is not None)
        secs = [self._seconds(p) for p in frames]
        chosen: set[int] = set()
        for tg in needed:
            after = next((i for i, s in enumerate(secs) if s >= tg.time - 1e-6), None)
            if after is None:
                pick = len(frames) - 1
            elif secs[after] >= tg.clip.span[1] and after > 0 and secs[after - 1] >= tg.clip.span[0]:
                pick = after - 1
            else:
                pick = after
            tg.planned_pts = frames[pick]
            chosen.add(frames[pick])
        return chosen

    def _decode_gop(self, gop: list, needed: list[_Target], chosen: set[int]) -> None:
        last_needed = max(i for i, p in enumerate(gop) if p.pts is None or p.pts in chosen)
        for packet in gop[: last_needed + 1]:
            wanted = packet.pts is None or packet.pts in chosen
            skip = "DEFAULT" if wanted else "NONREF"
            if self.codec.skip_frame != skip:
                self.codec.skip_frame = skip
            self._feed(packet, needed)
        self._feed(None, needed)
        self.codec.flush_buffers()

    def _feed(self, packet, needed: list[_Target]) -> None:
        try:
            frames = self.codec.decode(packet)
        except av.FFmpegError as exc:
            self.decode_errors += 1
            log.debug("%s: decode error: %s", self.path, _short(exc))
            return
        for frame in frames:
            self._take(frame, needed)

    def _take(self, frame, needed: list[_Target]) -> None:
        """Give a decoded frame to the targets that planned it, or that lost their planned frame."""
        pts = frame.pts
        time = self._seconds(pts) if pts is not None else self.last_time
        self.last_frame, self.last_time = frame, time
        self._reach(time, frame.duration)
        for tg in needed:
            if tg.clip.frames[tg.slot] is not None or tg.clip.index in self.done:
                continue
            exact = pts is not None and tg.planned_pts == pts
            lost = pts is not None and tg.planned_pts is not None and pts > tg.planned_pts and time >= tg.time
            if exact or lost:
                self._store(tg, frame, time)

    # -- storing frames ----------------------------------------------------------------------
    def _store(self, tg: _Target, frame, time: float) -> None:
        clip = tg.clip
        if clip.size is None:
            upright = (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)
            clip.size = output_size(*upright, self.cfg.short_side, self.cfg.frame_size)
        try:
            jpeg, thumb = self._jpeg(frame, clip.size)
        except (av.FFmpegError, OSError, ValueError) as exc:
            self._fail(clip, "encode", "encode_error", f"cannot resize or JPEG-encode a frame: {_short(exc)}")
            return
        clip.frames[tg.slot], clip.thumbs[tg.slot], clip.times[tg.slot] = jpeg, thumb, time
        clip.missing -= 1
        self._complete(clip)

    def _complete(self, clip: _Clip) -> bool:
        """Finish a clip whose frames (and audio, if asked for) are all in; True if it did."""
        if clip.missing or not clip.audio_done or clip.index in self.done:
            return False
        if clip.span[1] > self.video_end + END_SLACK:
            self.waiting[clip.index] = clip
            return False
        audio = None
        if clip.audio_parts is not None:
            audio = np.concatenate(clip.audio_parts) if clip.audio_parts else np.zeros(0, np.float32)
        self.done[clip.index] = DecodedClip(
            clip_id=clip.request.clip_id,
            frames=tuple(clip.frames),
            frame_times=tuple(clip.times),
            frame_size=clip.size,
            source_fps=self.info.fps,
            span=clip.span,
            audio=audio,
            thumbnails=tuple(clip.thumbs) if self.cfg.thumbnails else None,
        )
        return True

    def _jpeg(self, frame, size: tuple[int, int]) -> tuple[bytes, Image.Image | None]:
        """The stored frame's JPEG, and its thumbnail when asked for (both cached for a frame picked twice)."""
        key = frame.pts if frame.pts is not None else -1
        if self.jpeg_cache is not None and self.jpeg_cache[:2] == (key, size):
            return self.jpeg_cache[2]
        turns = _quarter_turns(frame)
        width, height = (size[1], size[0]) if turns % 2 else size
        image = frame.to_image(width=width, height=height, interpolation=self.interpolation)
        if turns:  # resize, then turn: the same pixels as turning first, on fewer of them
            image = image.transpose(_TURNS[turns])
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.cfg.jpeg_quality)
        thumb = None
        if self.cfg.thumbnails:  # from the resized image, a whole-factor box reduction: ~0.05 ms a frame
            thumb = image.reduce(max(1, round(min(image.size) / THUMB_SIDE)))
        self.jpeg_cache = (key, size, (buf.getvalue(), thumb))
        return self.jpeg_cache[2]

    def _fail(self, clip: _Clip, stage: str, error: str, why: str) -> None:
        self.done[clip.index] = Failure(
            clip_id=clip.request.clip_id,
            stage=stage,
            error=error,
            message=f"{self.path}: clip {clip.request.clip_id!r}: {why}",
        )

    def _finish_at_eof(self) -> None:
        """Targets past the last decoded frame take it if close enough; other clips fail."""
        tolerance = max(0.5, 2.0 / self.info.fps) if self.info.fps > 0 else 0.5
        if self.audio is not None:
            self.audio.finish()
        for tg in self.pending:
            clip = tg.clip
            if clip.index in self.done or clip.frames[tg.slot] is not None:
                continue
            if self.last_frame is not None and tg.time - self.last_time <= tolerance:
                self._store(tg, self.last_frame, self.last_time)
                continue
            self._fail(clip, "decode", *self._eof_reason(tg))
        self.pending = []
        for clip in self.clips:
            self._complete(clip)
        for clip in self.waiting.values():
            self._fail(clip, "decode", *(self.stopped or self._beyond_end(clip)))
        self.waiting = {}

    def _beyond_end(self, clip: _Clip) -> tuple[str, str]:
        return "span_beyond_end", (
            f"the span ends at {clip.span[1]:.3f} s, more than one frame interval past the video's last frame "
            f"(the stream ends at {self.video_end:.3f} s; a truncated file, a wrong duration, or a still picture)"
        )

    def _eof_reason(self, tg: _Target) -> tuple[str, str]:
        if self.stopped is not None:
            return self.stopped
        if self.last_frame is None:
            return "no_frames", f"no frame could be decoded ({self.decode_errors} decode errors)"
        return "truncated_stream", (
            f"the stream ends at {self.last_time:.3f} s but the clip needs a frame at "
            f"{tg.time:.3f} s (truncated or corrupt file; {self.decode_errors} decode errors)"
        )

    # -- time ----------------------------------------------------------------------------------
    def _seconds(self, pts: int) -> float:
        return (pts - self.info.start_pts) * self.tb

    def _packet_time(self, packet) -> float | None:
        return self._seconds(packet.pts) if packet.pts is not None else None
