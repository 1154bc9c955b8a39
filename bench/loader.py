"""Loader throughput per core vs the raw JPEG-decode limit of the same bytes (one process, one core).

    python bench/loader.py [--clips 64] [--stored-frames 16] [--frames 12] [--size 224] [--decoder pillow]

Writes a synthetic shard of 320x240 JPEG clips, then measures in the same run:
  raw     decoding exactly the JPEGs the loader decodes (same frame indices, no resize, no tar)
  loader  train.data.StreamingLoader with num_workers=0: tar streaming, shuffle, frame jitter,
          decode, bicubic resize to size x size, tokenisation, collation
and prints samples/s for both and their ratio (target >= 0.8). With --step-time it also prints the
CPU step time of the tiny and ViT-B/32 configs (forward + backward + AdamW, no DeepSpeed).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: rates are per core

from pipeline.manifest import Manifest, write_manifest  # noqa: E402
from pipeline.schema import ClipMeta, ClipSample, TextSource  # noqa: E402
from pipeline.shards import ShardLimits, ShardWriter  # noqa: E402


def make_clip(i: int, stored: int, rng: np.random.Generator) -> ClipSample:
    from PIL import Image

    base = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    frames = []
    for t in range(stored):
        img = np.roll(base, shift=4 * t, axis=1)
        buf = io.BytesIO()
        Image.fromarray(img).resize((320, 240)).save(buf, format="JPEG", quality=85)
        frames.append(buf.getvalue())
    meta = ClipMeta(video_id=f"v{i}", clip_id=f"v{i}.0.mp4", span=(0.0, stored / 3), source_fps=3.0,
                    frame_times=tuple(t / 3 for t in range(stored)), frame_size=(320, 240), middle_frame=stored // 2,
                    source_uri="bench", subtitle_source=TextSource(kind="given"), caption_source=TextSource(kind="given"))
    return ClipSample(meta=meta, frames=tuple(frames), subtitle=f"subtitle {i} " * 5, caption=f"caption {i}")


def write_data(root: str, clips: int, stored: int) -> list[ClipSample]:
    rng = np.random.default_rng(0)
    samples = [make_clip(i, stored, rng) for i in range(clips)]
    with ShardWriter(root, "bench", ShardLimits(max_samples=clips)) as writer:
        for s in samples:
            writer.write(s)
    write_manifest(root, Manifest(shards=tuple(writer.entries)))
    return samples


def raw_decode_rate(samples: list[ClipSample], frames: int, decoder: str) -> float:
    from train.data import frame_indices

    jpegs = []
    for i, s in enumerate(samples):
        idx = frame_indices(len(s.frames), frames, np.random.default_rng(i))
        jpegs.append([s.frames[j] for j in sorted(set(idx) | {s.meta.middle_frame})])
    start = time.perf_counter()
    if decoder == "pillow":
        from PIL import Image

        for clip in jpegs:
            for data in clip:
                with Image.open(io.BytesIO(data)) as img:
                    img.convert("RGB").load()
    else:
        import torch
        from torchvision.io import decode_jpeg

        decode_jpeg(torch.frombuffer(bytearray(jpegs[0][0]), dtype=torch.uint8))  # warm up
        start = time.perf_counter()
        for clip in jpegs:
            for data in clip:
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return len(samples) / (time.perf_counter() - start)


def loader_rate(root: str, clips: int, frames: int, size: int, decoder: str) -> float:
    from train.config import DataConfig
    from train.data import StreamingLoader

    cfg = DataConfig(train=[root], batch_size=8, num_frames=frames, image_size=size, num_workers=0,
                     shards_per_window=1, shuffle_buffer=16, decoder=decoder)
    loader = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
    loader.next()  # warm up (tokenizer, imports)
    batches = clips // 8
    start = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return batches * 8 / (time.perf_counter() - start)


def step_times() -> None:
    import torch

    from train.config import load_config
    from train.loop import build_task
    from train.optim import build_optimizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    for name, batch in (("tiny", 16), ("vit-b32", 2)):
        cfg = load_config(f"launch/configs/train/{name}.yaml", ["run_dir=/tmp/bench"])
        task = build_task(cfg, 0, 1)
        opt = build_optimizer(task, cfg.optim)
        d = cfg.data
        frames = torch.randint(0, 255, (batch, d.num_frames, 3, d.image_size, d.image_size), dtype=torch.uint8)
        image = frames[:, d.num_frames // 2]
        text = torch.randint(1, 4000, (batch, d.context_length))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            task(frames, image=image, subtitle=text, caption=text)["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        print(f"step time {name}: batch {batch}, {d.num_frames} frames at {d.image_size}: "
              f"{best:.3f} s/step, {best / batch:.3f} s/sample ({torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--stored-frames", type=int, default=16)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--decoder", default="pillow", choices=("pillow", "torchvision"))
    parser.add_argument("--step-time", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        samples = write_data(root, args.clips, args.stored_frames)
        raw = raw_decode_rate(samples, args.frames, args.decoder)
        loader = loader_rate(root, args.clips, args.frames, args.size, args.decoder)
    print(f"decoder {args.decoder}: raw JPEG decode {raw:.1f} clips/s/core, loader {loader:.1f} clips/s/core "
          f"({args.frames} frames at {args.size}), ratio {loader / raw:.2f} (target >= 0.8)")
    if args.step_time:
        step_times()


if __name__ == "__main__":
    main()
