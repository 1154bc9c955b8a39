"""Search with a trained checkpoint: index folders of video files or shard data sets, query by text or video file.

    python -m launch.search embed --checkpoint RUN --videos clips/ --out index.parquet
    python -m launch.search embed --checkpoint RUN --data shards/msrvtt/test --out index.parquet
    python -m launch.search query --checkpoint RUN --index index.parquet --text "a dog runs" -k 5
    python -m launch.search query --checkpoint RUN --index index.parquet --video clip.mp4 --target text

The table, shard data sets and text queries are train/search.py's. Raw video files need
preprocessing's decoder (preprocess/decode.py), and train/ never imports preprocess/, so they are
handled here, in the layer above both: a file is decoded to T frames spread uniformly over the whole
file, squashed to S x S (the checkpoint's training shape), JPEG-encoded and decoded again as in a
shard, then embedded. Files that cannot be decoded are skipped and listed in the table's metadata.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from pipeline.config import prog
from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
from train import search
from train.checkpoint import LoadedModel, load_model
from train.evaluate import encode_frames
from train.frames import decode_jpegs

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


def decode_video(path: str, num_frames: int, image_size: int) -> np.ndarray:
    """uint8 [T, 3, S, S]: T frames spread uniformly over the whole file, squashed to S x S."""
    cfg = DecodeConfig(num_frames=num_frames, short_side=image_size, jpeg_quality=95)
    (result,) = list(decode_clips(path, [ClipRequest(clip_id=path, start=0.0, end=None)], cfg))
    if not isinstance(result, DecodedClip):
        raise ValueError(f"{result.error}: {result.message}")
    return decode_jpegs(list(result.frames), image_size).contiguous().numpy()


def embed_files(
    loaded: LoadedModel, paths: list[str], batch_size: int = 8, progress: bool = True
) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths embedded, [N, E] embeddings, 'path: reason' of files that could not be decoded)."""
    from tqdm import tqdm

    done, rows, failed, pending, frames = [], [], [], [], []
    for path in tqdm(paths, desc="videos", unit="video", disable=not progress, file=sys.stderr):
        try:
            frames.append(decode_video(path, loaded.num_frames, loaded.image_size))
            pending.append(path)
        except ValueError as exc:
            failed.append(f"{path}: {exc}")
            logger.warning("skipping %s: %s", path, exc)
        if len(pending) == batch_size:
            rows.append(encode_frames(loaded, np.stack(frames)).numpy())
            done, pending, frames = done + pending, [], []
    if pending:
        rows.append(encode_frames(loaded, np.stack(frames)).numpy())
        done += pending
    embeddings = np.concatenate(rows) if rows else np.zeros((0, int(loaded.model.clip.text_projection.shape[1])))
    return done, embeddings.astype(np.float32), failed


def index_from_folder(
    loaded: LoadedModel, folder: str, batch_size: int, progress: bool
) -> tuple[search.Index, list[str]]:
    paths = list_video_files(folder)
    done, embeddings, failed = embed_files(loaded, paths, batch_size, progress)
    ids = [os.path.relpath(p, folder) for p in done]
    index = search.Index(
        kind=["video"] * len(done),
        id=ids,
        video=ids,
        text=[""] * len(done),
        source=done,
        embeddings=embeddings,
        meta={**search.index_meta(loaded, folder), "failed": failed},
    )
    return index, failed


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
    )


def run_embed(args: argparse.Namespace) -> int:
    if not args.videos:
        return search.run_embed(args)
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
    index, failed = index_from_folder(loaded, args.videos, args.batch_size, not args.no_progress)
    if failed:
        print(
            f"{len(failed)} files could not be decoded (listed in the table metadata); first: {failed[0]}",
            file=sys.stderr,
        )
    search.save_index(index, args.out)
    return 0


def run_query(args: argparse.Namespace) -> int:
    if args.video is None:
        return search.run_query(args)
    return search.run_query(args, lambda loaded: video_vector(loaded, args.video))


def main(argv: list[str] | None = None) -> int:
    return search.run_command(build_parser().parse_args(argv), run_embed, run_query, name="launch.search")


if __name__ == "__main__":
    sys.exit(main())
