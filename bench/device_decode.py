"""Loader throughput with JPEGs decoded by the CPU workers against decoded on the GPU (data.decode_device=cuda).

    python bench/device_decode.py DATA [--workers 12] [--batch 32] [--frames 12] [--batches 60] [--rounds 3]

Two loaders of the same config over the same shards (DATA: a data set folder, e.g. the one bench/gpu_train.sh
writes), run in turn for ``--rounds`` rounds: ``cpu`` (the workers decode into shared memory; the batch is then
copied to the GPU, as training does) and ``cuda`` (the workers ship JPEG bytes; this process decodes each batch
with nvJPEG). Prints clips/s of each (median of rounds) and cuda/cpu. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import DataConfig  # noqa: E402
from train.loader import StreamingLoader  # noqa: E402


def rate(loader: StreamingLoader, batches: int, batch_size: int) -> float:
    """Clips/s over ``batches`` batches, each on the GPU when it is counted."""
    start = time.perf_counter()
    for _ in range(batches):
        batch = loader.next()
        frames = batch["frames"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    del frames
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/device_decode.py: needs a CUDA device")
    loaders = {}
    for device in ("cpu", "cuda"):
        cfg = DataConfig(
            train=[args.data],
            batch_size=args.batch,
            num_frames=args.frames,
            num_workers=args.workers,
            decode_device=device,
        )
        loaders[device] = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
        rate(loaders[device], 4, args.batch)  # warm up: workers started, first shards open
    rates: dict[str, list[float]] = {device: [] for device in loaders}
    for _ in range(args.rounds):
        for device, loader in loaders.items():
            rates[device].append(rate(loader, args.batches, args.batch))
    for loader in loaders.values():
        loader.close()
    cpu, cuda = (statistics.median(rates[d]) for d in ("cpu", "cuda"))
    print(
        f"RESULT loader {args.workers} workers, batch {args.batch}, {args.frames} frames: decode on CPU workers "
        f"{cpu:.1f} clips/s, on the GPU (nvJPEG) {cuda:.1f} clips/s, cuda/cpu {cuda / cpu:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
