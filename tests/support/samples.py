"""Small, valid clip samples for shard tests (real JPEG bytes, made with Pillow)."""

from __future__ import annotations

import io

from pipeline.schema import ClipMeta, ClipSample, TextSource


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_sample(clip_id: str, num_frames: int = 4, video_id: str = "vid", start: float = 0.0) -> ClipSample:
    times = tuple(start + 0.5 * i for i in range(num_frames))
    meta = ClipMeta(
        video_id=video_id,
        clip_id=clip_id,
        span=(start, start + 0.5 * num_frames),
        source_fps=30.0,
        frame_times=times,
        frame_size=(32, 24),
        middle_frame=num_frames // 2,
        source_uri=f"file:///videos/{video_id}.mp4",
        subtitle_source=TextSource(kind="given", origin="subs.jsonl"),
        caption_source=TextSource(kind="given", origin="caps.jsonl"),
    )
    frames = tuple(jpeg(((i * 40) % 256, 100, 200)) for i in range(num_frames))
    return ClipSample(meta=meta, frames=frames, subtitle=f"subtitle of {clip_id}", caption=f"caption of {clip_id}")
