"""The end-to-end demo on an embedded default data set.

Run with ``make demo``. It grows with the project; today it writes a small data set of
generated clips as WebDataset shards plus manifest to local disk, reads it back through
the streaming reader and prints a summary.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from pipeline.manifest import Manifest, read_manifest, write_manifest
from pipeline.shards import ShardLimits, ShardWriter, iter_dataset
from pipeline.schema import ClipMeta, ClipSample, TextSource


def _sample(i: int) -> ClipSample:
    import io

    from PIL import Image

    frames = []
    for t in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), ((30 * i) % 256, (20 * t) % 256, 128)).save(buf, format="JPEG")
        frames.append(buf.getvalue())
    meta = ClipMeta(
        video_id=f"demo{i // 4}",
        clip_id=f"demo{i // 4}.{i % 4}.mp4",
        span=(2.0 * (i % 4), 2.0 * (i % 4) + 2.0),
        source_fps=30.0,
        frame_times=tuple(2.0 * (i % 4) + 0.25 * t for t in range(8)),
        frame_size=(64, 48),
        middle_frame=4,
        source_uri="generated",
        subtitle_source=TextSource(kind="given", origin="demo"),
        caption_source=TextSource(kind="given", origin="demo"),
    )
    return ClipSample(meta=meta, frames=tuple(frames), subtitle=f"clip {i}", caption=f"a coloured frame {i}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--clips", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = os.path.abspath(os.path.join(args.out, "shards"))
    start = time.perf_counter()
    with ShardWriter(root, "demo", ShardLimits(max_samples=16)) as writer:
        for i in range(args.clips):
            writer.write(_sample(i))
    write_manifest(root, Manifest(shards=tuple(writer.entries), config={"demo": True, "clips": args.clips}))
    manifest = read_manifest(root)
    read = sum(1 for _ in iter_dataset(root))
    print(f"wrote {manifest.num_samples} clips in {len(manifest.shards)} shards ({manifest.num_bytes} bytes) to {root}")
    print(f"read back {read} clips through the streaming reader in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
