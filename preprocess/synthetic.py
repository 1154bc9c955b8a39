"""A small synthetic corpus in HD-VILA-100M's layout: coloured shapes moving in a direction.

Each source video holds ``clips_per_video`` clips back to back; each clip shows one shape
(circle, square or triangle) of one colour moving left, right, up or down over a plain or noisy
background, so its subtitle and caption (which name the colour, the shape and the direction)
differ from clip to clip. Everything is a function of the seed.

    python -m preprocess.synthetic --out DIR --videos 16 --clips-per-video 4 --seed 0 [--precut]

writes ``metadata.jsonl``, ``subtitles.jsonl``, ``captions.jsonl``, ``videos/<video_id>.mp4`` and,
with ``--precut``, ``clips/<video_id>/<clip_id>`` (each clip as its own file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SUBTITLES = (
    "look, the {colour} {shape} is going {where} now",
    "here we have {a} {colour} {shape} and it moves {direction}",
    "watch the {colour} {shape} slide {direction} across the screen",
    "okay so this {shape} is {colour} and it is heading {direction}",
)
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """What to generate."""

    videos: int = 16
    """Number of source videos."""
    clips_per_video: int = 4
    """Clips in each source video, back to back."""
    seed: int = 0
    """Everything (ids, content, texts) is a function of this."""
    size: tuple[int, int] = (160, 120)
    """Frame (width, height); both even."""
    fps: int = 15
    """Frame rate of the videos."""
    clip_seconds: float = 3.0
    """Length of each clip."""
    precut: bool = False
    """Also write each clip as its own file under clips/<video_id>/<clip_id>."""

    def __post_init__(self) -> None:
        if not 1 <= self.videos <= 100_000:
            raise ValueError(f"videos must be in 1..100000, got {self.videos}")
        if not 1 <= self.clips_per_video <= 1000:
            raise ValueError(f"clips_per_video must be in 1..1000, got {self.clips_per_video}")
        w, h = self.size
        if not (32 <= w <= 1920 and 32 <= h <= 1080 and w % 2 == 0 and h % 2 == 0):
            raise ValueError(f"size must be even (w, h) within 32..1920 x 32..1080, got {self.size}")
        if not 1 <= self.fps <= 60:
            raise ValueError(f"fps must be in 1..60, got {self.fps}")
        if not 0.5 <= self.clip_seconds <= 600:
            raise ValueError(f"clip_seconds must be in 0.5..600, got {self.clip_seconds}")


@dataclass(frozen=True, kw_only=True)
class ShapeClip:
    """The content of one clip."""

    video_id: str
    clip_id: str
    index: int
    """Position of the clip in its video."""
    colour: str
    shape: str
    direction: str
    noisy_background: bool
    subtitle: str
    caption: str


@dataclass(frozen=True, kw_only=True)
class CorpusPaths:
    """Where the corpus was written."""

    root: Path
    metadata: Path
    subtitles: Path
    captions: Path
    videos: Path
    clips: Path | None
    """The pre-cut clips folder, if written."""


def make_corpus(
    out_dir: str | Path,
    videos: int = 16,
    clips_per_video: int = 4,
    seed: int = 0,
    size: tuple[int, int] = (160, 120),
    fps: int = 15,
    clip_seconds: float = 3.0,
    precut: bool = False,
) -> CorpusPaths:
    """Write a corpus into ``out_dir`` and return its paths."""
    cfg = CorpusConfig(
        videos=videos,
        clips_per_video=clips_per_video,
        seed=seed,
        size=size,
        fps=fps,
        clip_seconds=clip_seconds,
        precut=precut,
    )
    return write_corpus(Path(out_dir), cfg)


def write_corpus(root: Path, cfg: CorpusConfig) -> CorpusPaths:
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not installed; the synthetic corpus needs it to encode videos")
    paths = CorpusPaths(
        root=root,
        metadata=root / "metadata.jsonl",
        subtitles=root / "subtitles.jsonl",
        captions=root / "captions.jsonl",
        videos=root / "videos",
        clips=root / "clips" if cfg.precut else None,
    )
    paths.videos.mkdir(parents=True, exist_ok=True)
    specs = clip_specs(cfg)
    by_video: dict[str, list[ShapeClip]] = {}
    for spec in specs:
        by_video.setdefault(spec.video_id, []).append(spec)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # one ffmpeg process per worker
        list(pool.map(lambda item: _write_video(paths, item[0], item[1], cfg), by_video.items()))
    _write_jsonl(paths.metadata, [_metadata_row(v, clips, cfg) for v, clips in by_video.items()])
    _write_jsonl(paths.subtitles, [{"clip_id": s.clip_id, "text": s.subtitle} for s in specs])
    _write_jsonl(paths.captions, [{"clip_id": s.clip_id, "caption": s.caption} for s in specs])
    log.info("wrote %d videos, %d clips to %s", len(by_video), len(specs), root)
    return paths


def clip_specs(cfg: CorpusConfig) -> list[ShapeClip]:
    """The clips of the corpus, in metadata order (a function of the seed only)."""
    rng = random.Random(cfg.seed)
    specs = []
    for _ in range(cfg.videos):
        video_id = _video_id(rng)
        for k in range(cfg.clips_per_video):
            specs.append(_clip_spec(rng, video_id, k))
    return specs


def _video_id(rng: random.Random) -> str:
    return rng.choice(ID_ALPHABET[:62]) + "".join(rng.choice(ID_ALPHABET) for _ in range(10))


def _clip_spec(rng: random.Random, video_id: str, k: int) -> ShapeClip:
    colour, shape, direction = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
    where = f"to the {direction}" if direction in ("left", "right") else direction
    a = "an" if colour[0] in "aeiou" else "a"  # "an orange square"
    subtitle = rng.choice(SUBTITLES).format(a=a, colour=colour, shape=shape, direction=direction, where=where)
    return ShapeClip(
        video_id=video_id,
        clip_id=f"{video_id}.{k}.mp4",
        index=k,
        colour=colour,
        shape=shape,
        direction=direction,
        noisy_background=rng.random() < 0.5,
        subtitle=subtitle,
        caption=f"{a} {colour} {shape} moving {direction}",
    )


def _metadata_row(video_id: str, clips: list[ShapeClip], cfg: CorpusConfig) -> dict:
    def stamp(seconds: float) -> str:
        ms = round(seconds * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"

    spans = [[stamp(c.index * cfg.clip_seconds), stamp((c.index + 1) * cfg.clip_seconds)] for c in clips]
    return {
        "video_id": video_id,
        "url": f"https://www.youtube.com/watch?v={video_id}",
        "clip": [{"clip_id": c.clip_id, "span": span} for c, span in zip(clips, spans)],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_video(paths: CorpusPaths, video_id: str, clips: list[ShapeClip], cfg: CorpusConfig) -> None:
    video = _Encoder(paths.videos / f"{video_id}.mp4", cfg)
    try:
        for clip in clips:
            frames = render_clip(clip, cfg)
            video.write(frames)
            if paths.clips is not None:
                (paths.clips / video_id).mkdir(parents=True, exist_ok=True)
                with _Encoder(paths.clips / video_id / clip.clip_id, cfg) as one:
                    one.write(frames)
    finally:
        video.close()


def render_clip(clip: ShapeClip, cfg: CorpusConfig) -> np.ndarray:
    """The clip's frames as uint8 [T, H, W, 3]: the shape crosses the frame in its direction."""
    w, h = cfg.size
    count = round(cfg.clip_seconds * cfg.fps)
    rng = np.random.default_rng(_stable_seed(clip.clip_id))
    if clip.noisy_background:
        background = rng.integers(60, 140, size=(h, w, 3), dtype=np.uint8)
    else:
        background = np.empty((h, w, 3), dtype=np.uint8)
        background[:] = rng.integers(70, 130, size=3, dtype=np.uint8)
    radius = max(4, min(w, h) // 6)
    mask = _shape_mask(clip.shape, radius)
    colour = np.array(COLOURS[clip.colour], dtype=np.uint8)
    dx, dy = DIRECTIONS[clip.direction]
    frames = np.repeat(background[None], count, axis=0)
    for i in range(count):
        progress = (i + 0.5) / count
        cx = w / 2 + dx * (progress - 0.5) * (w - 2 * radius)
        cy = h / 2 + dy * (progress - 0.5) * (h - 2 * radius)
        x0, y0 = int(round(cx)) - radius, int(round(cy)) - radius
        frames[i, y0 : y0 + 2 * radius, x0 : x0 + 2 * radius][mask] = colour
    return frames


def _stable_seed(text: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text)) % (1 << 32)


def _shape_mask(shape: str, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[0 : 2 * radius, 0 : 2 * radius] + 0.5
    if shape == "circle":
        return (xx - radius) ** 2 + (yy - radius) ** 2 <= radius**2
    if shape == "square":
        inset = radius * 0.2
        return (xx >= inset) & (xx <= 2 * radius - inset) & (yy >= inset) & (yy <= 2 * radius - inset)
    return np.abs(xx - radius) <= yy / 2  # triangle, apex up


class _Encoder:
    """An ffmpeg process encoding raw RGB frames from stdin to a small, bit-exact H.264 mp4."""

    def __init__(self, path: Path, cfg: CorpusConfig) -> None:
        w, h = cfg.size
        cmd = [
            "ffmpeg",
            "-v",
            "error",
            "-nostdin",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-r",
            str(cfg.fps),
            "-i",
            "pipe:0",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "23",
            "-g",
            str(cfg.fps),
            "-bf",
            "2",
            "-pix_fmt",
            "yuv420p",
            "-threads",
            "1",
            "-map_metadata",
            "-1",
            "-fflags",
            "+bitexact",
            "-flags:v",
            "+bitexact",
            "-movflags",
            "+faststart",
            str(path),
        ]
        self.path = path
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frames: np.ndarray) -> None:
        self.proc.stdin.write(np.ascontiguousarray(frames).tobytes())

    def close(self) -> None:
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {self.path}: {err.decode(errors='replace')[-500:]}")

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    from pipeline import config
    from pipeline.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m preprocess.synthetic",
        description=__doc__.split("\n\n")[0],
        formatter_class=config.HelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder")
    config.add_flags(parser, CorpusConfig, dest="corpus")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    try:
        cfg = config.build(CorpusConfig, config.flag_values(args, "corpus"))
    except ValueError as exc:
        parser.error(str(exc))
    paths = write_corpus(Path(args.out), cfg)
    print(f"wrote {cfg.videos} videos x {cfg.clips_per_video} clips to {paths.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
