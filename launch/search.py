"""Search with a trained checkpoint: index folders of video files or shard data sets, query by text or video file.

    python -m launch.search embed --checkpoint RUN --videos clips/ --out index.parquet
    python -m launch.search embed --checkpoint RUN --data shards/msrvtt/test --out index.parquet
    python -m launch.search query --checkpoint RUN --index index.parquet --text "a dog runs" -k 5
    python -m launch.search query --checkpoint RUN --index index.parquet --video clip.mp4 --target text

The table, shard data sets and text queries are train/search.py's. Raw video files need
preprocessing's decoder (preprocess/decode.py), and train/ never imports preprocess/, so they are
handled here, in the layer above both. A file is indexed as windows (``--window`` seconds every
``--stride`` seconds, `WindowConfig`), all decoded in one pass over the file: each window gives T
frames spread uniformly over it, squashed to S x S (the checkpoint's training shape) and embedded,
and a strip of small thumbnails; its row keeps the file, start and end. A file not longer than a
window is one row. A query by video file embeds the whole file. Files and windows that cannot be
decoded are skipped and listed in the table's metadata.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.config import add_flags, flag_values, prog
from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips, video_duration
from preprocess.failures import Failure
from train import search
from train.checkpoint import LoadedModel, load_model
from train.evaluate import encode_frames
from train.frames import decode_jpegs
from train.nearest import AnnConfig
from train.search_hits import clock
from train.search_index import COLUMNS, ThumbConfig, rows_table, thumbnail_strip

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv", ".ts")


def list_video_files(folder: str) -> list[str]:
    """Video files under a local folder (recursive), sorted."""
    if not os.path.isdir(folder):
        raise ValueError(f"videos {folder}: not a local folder")
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise ValueError(f"videos {folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return sorted(found)


@dataclass(frozen=True, kw_only=True)
class WindowConfig:
    """How a video file is cut into the windows it is indexed as, one row each."""

    window: float = 15.0
    """Seconds per window; a file not longer than this is one row spanning it."""
    stride: float = 7.5
    """Seconds from one window's start to the next's (at most --window: windows overlap or touch)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window) and self.window > 0):
            raise ValueError(f"--window must be a positive number of seconds, got {self.window}")
        if not (math.isfinite(self.stride) and 0 < self.stride <= self.window):
            raise ValueError(f"--stride must be in (0, --window = {self.window}] seconds, got {self.stride}")


def window_spans(duration: float, cfg: WindowConfig) -> list[tuple[float, float | None]]:
    """(start, end) of each window of a file of ``duration`` seconds; end None is the file's end.

    Windows start every ``stride`` seconds; the last one reaches the file's end: it is stretched to it when less
    than half a stride is left after it, else one more window ends there. A file not longer than a window (or of
    unknown length) is one window.
    """
    if not math.isfinite(duration) or duration <= cfg.window:
        return [(0.0, None)]
    spans: list[tuple[float, float | None]] = []
    k = 0
    while k * cfg.stride + cfg.window < duration - 1e-3:
        spans.append((k * cfg.stride, k * cfg.stride + cfg.window))
        k += 1
    last_start, last_end = spans[-1]
    if duration - last_end <= cfg.stride / 2:
        spans[-1] = (last_start, None)
    else:
        spans.append((duration - cfg.window, None))
    return spans


def decode_config(loaded: LoadedModel) -> DecodeConfig:
    """Frames as the model takes them: T uniform over the span, short side S (squashed to S x S when decoded)."""
    return DecodeConfig(num_frames=loaded.num_frames, short_side=loaded.image_size, jpeg_quality=95)


def decode_video(path: str, num_frames: int, image_size: int) -> np.ndarray:
    """uint8 [T, 3, S, S]: T frames spread uniformly over the whole file, squashed to S x S."""
    cfg = DecodeConfig(num_frames=num_frames, short_side=image_size, jpeg_quality=95)
    (result,) = list(decode_clips(path, [ClipRequest(clip_id=path, start=0.0, end=None)], cfg))
    if not isinstance(result, DecodedClip):
        raise ValueError(f"{result.error}: {result.message}")
    return decode_jpegs(list(result.frames), image_size).contiguous().numpy()


Window = tuple[dict, np.ndarray, list[bytes]]
"""A decoded window: its index columns, uint8 frames [T, 3, S, S] and thumbnail strip."""


def file_windows(
    loaded: LoadedModel, path: str, name: str, windows: WindowConfig, thumbs: ThumbConfig
) -> Iterator[Window | str]:
    """The windows of one file, decoded in one pass (preprocess/decode.py); a window or file that cannot be
    decoded is a 'path: reason' string instead."""
    duration = video_duration(path)
    if isinstance(duration, Failure):
        yield f"{path}: {duration.error}: {duration.message}"
        return
    spans = window_spans(duration, windows)
    requests = [ClipRequest(clip_id=str(k), start=start, end=end) for k, (start, end) in enumerate(spans)]
    for result in decode_clips(path, requests, decode_config(loaded)):
        if not isinstance(result, DecodedClip):
            yield f"{path}: {result.error}: {result.message}"
            continue
        start, end = result.span
        row = {"kind": "video", "id": name if len(spans) == 1 else f"{name}@{clock(start)}", "video": name}
        row |= {"text": "", "source": path, "start": start, "end": end, "caption": "", "subtitle": ""}
        frames = decode_jpegs(list(result.frames), loaded.image_size).contiguous().numpy()
        yield row, frames, thumbnail_strip(result.frames, thumbs) if thumbs.frames else []


@dataclass
class Embedded:
    """Windows of video files, embedded: index columns, embeddings and strips, and what could not be decoded."""

    rows: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    strips: list[list[bytes]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def embed_files(
    loaded: LoadedModel,
    paths: list[str],
    batch_size: int = 8,
    progress: bool = True,
    windows: WindowConfig | None = None,
    thumbs: ThumbConfig | None = None,
    folder: str | None = None,
) -> Embedded:
    """Every file's windows, embedded ``batch_size`` windows at a time (batches span files); rows are named by
    their path relative to ``folder`` (default: the path)."""
    from tqdm import tqdm

    windows, thumbs = windows or WindowConfig(), thumbs or ThumbConfig()
    out, frames = Embedded(), []
    for path in tqdm(paths, desc="videos", unit="video", disable=not progress, file=sys.stderr):
        name = os.path.relpath(path, folder) if folder else path
        for item in file_windows(loaded, path, name, windows, thumbs):
            if isinstance(item, str):
                out.failed.append(item)
                logger.warning("skipping %s", item)
                continue
            out.rows.append(item[0])
            out.strips.append(item[2])
            frames.append(item[1])
            if len(frames) == batch_size:
                out.embeddings.append(encode_frames(loaded, np.stack(frames)).numpy())
                frames = []
    if frames:
        out.embeddings.append(encode_frames(loaded, np.stack(frames)).numpy())
    return out


def index_from_folder(
    loaded: LoadedModel,
    folder: str,
    batch_size: int,
    progress: bool,
    windows: WindowConfig | None = None,
    thumbs: ThumbConfig | None = None,
) -> search.Index:
    """The index of every video file under a folder, one row per window."""
    done = embed_files(loaded, list_video_files(folder), batch_size, progress, windows, thumbs, folder)
    dim = int(loaded.model.clip.text_projection.shape[1])
    embeddings = np.concatenate(done.embeddings) if done.embeddings else np.zeros((0, dim), np.float32)
    return search.Index(
        rows=rows_table({name: [r[name] for r in done.rows] for name in COLUMNS}),
        embeddings=embeddings.astype(np.float32, copy=False),
        meta={**search.index_meta(loaded, folder), "windows": asdict(windows or WindowConfig()), "failed": done.failed},
        thumbnails=done.strips,
    )


def video_vector(loaded: LoadedModel, path: str) -> np.ndarray:
    """The L2-normalised embedding of a video file query."""
    frames = decode_video(path, loaded.num_frames, loaded.image_size)
    return encode_frames(loaded, frames[None])[0].numpy()


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    return search.build_parser(
        prog=prog("python -m launch.search"),
        description=__doc__.split("\n\n")[0],
        more_sources=(("--videos", "local folder of video files (searched recursively)"),),
        more_queries=(("--video", "video file query: returns --target rows"),),
        more_embed=lambda embed: add_flags(embed, WindowConfig, dest="windows", title="windows of --videos files"),
    )


def run_embed(args: argparse.Namespace) -> int:
    if not args.videos:
        return search.run_embed(args)
    windows = WindowConfig(**flag_values(args, "windows"))
    thumbs = ThumbConfig(**flag_values(args, "thumbs"))
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
    index = index_from_folder(loaded, args.videos, args.batch_size, not args.no_progress, windows, thumbs)
    failed = index.meta["failed"]
    if failed:
        print(
            f"{len(failed)} files or windows could not be decoded (listed in the table metadata); first: {failed[0]}",
            file=sys.stderr,
        )
    search.save_index(index, args.out, AnnConfig(**flag_values(args, "ann")))
    return 0


def run_query(args: argparse.Namespace) -> int:
    if args.video is None:
        return search.run_query(args)
    args.query_name = f"video {args.video}"
    return search.run_query(args, lambda loaded: video_vector(loaded, args.video))


def main(argv: list[str] | None = None) -> int:
    return search.run_command(build_parser().parse_args(argv), run_embed, run_query, name="launch.search")


if __name__ == "__main__":
    sys.exit(main())
