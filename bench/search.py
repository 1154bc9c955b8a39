"""Search benchmark on CPU: videos embedded per second and query latency, tiny and ViT-B/32 (random weights).

    python bench/search.py [--videos 16] [--queries 20] [--index-rows 100000] [--threads 2]

Embedding is measured end to end as `launch.search embed --videos` runs it (PyAV decode of the whole
file to T frames, resize, encode_video) on preprocess.synthetic mp4s, and separately model-only.
Query latency = embed one text + cosine top-10 over an index of --index-rows random unit vectors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.search import embed_files, list_video_files  # noqa: E402
from preprocess.synthetic import make_corpus  # noqa: E402
from train.checkpoint import LoadedModel  # noqa: E402
from train.evaluate import encode_frames, encode_texts  # noqa: E402
from train.model import VideoCLIPConfig, build_model, tiny_clip_overrides  # noqa: E402
from train.search import Index, top_k  # noqa: E402

CONFIGS = {
    "tiny": dict(clip_model="ViT-B-32", clip_overrides=tiny_clip_overrides(vocab_size=49408), frames=4, size=32),
    "ViT-B/32": dict(clip_model="ViT-B-32", clip_overrides={}, frames=12, size=224),
}


def loaded_model(name: str) -> LoadedModel:
    spec = CONFIGS[name]
    model = build_model(VideoCLIPConfig(clip_model=spec["clip_model"], clip_overrides=spec["clip_overrides"])).eval()
    return LoadedModel(
        model=model,
        num_frames=spec["frames"],
        image_size=spec["size"],
        context_length=70,
        device=torch.device("cpu"),
        checkpoint="random",
    )


def bench_model(name: str, files: list[str], queries: int, index_rows: int) -> dict:
    loaded = loaded_model(name)
    embed_files(loaded, files[:2], progress=False)  # warm-up
    start = time.perf_counter()
    done, embeddings, failed = embed_files(loaded, files, batch_size=8, progress=False)
    end_to_end = len(done) / (time.perf_counter() - start)
    frames = np.random.default_rng(0).integers(
        0, 255, (8, loaded.num_frames, 3, loaded.image_size, loaded.image_size), dtype=np.uint8
    )
    encode_frames(loaded, frames)
    start = time.perf_counter()
    for _ in range(2):
        encode_frames(loaded, frames)
    model_only = 16 / (time.perf_counter() - start)
    dim = embeddings.shape[1]
    rows = np.random.default_rng(1).standard_normal((index_rows, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    index = Index(
        kind=["video"] * index_rows,
        id=[str(i) for i in range(index_rows)],
        video=[""] * index_rows,
        text=[""] * index_rows,
        source=[""] * index_rows,
        embeddings=rows,
        meta={},
    )
    latencies = []
    for q in range(queries):
        start = time.perf_counter()
        top_k(index, encode_texts(loaded, [f"a red circle moving left number {q}"])[0].numpy(), "video", 10)
        latencies.append(time.perf_counter() - start)
    return {
        "model": name,
        "frames": loaded.num_frames,
        "size": loaded.image_size,
        "videos_per_s": end_to_end,
        "model_only_videos_per_s": model_only,
        "query_ms_median": 1000 * float(np.median(latencies)),
        "query_ms_p90": 1000 * float(np.percentile(latencies, 90)),
        "index_rows": index_rows,
        "failed": len(failed),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=16, help="synthetic mp4s to embed (3 s, 320x240, 15 fps)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--models", default="tiny,ViT-B/32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(tmp, videos=args.videos, clips_per_video=1, size=(320, 240), fps=15, clip_seconds=3.0)
        files = list_video_files(str(corpus.videos))
        print(f"CPU, {args.threads} torch threads, {len(files)} videos of 3 s 320x240; index of {args.index_rows} rows")
        print(
            f"{'model':<10}{'frames':>7}{'size':>6}{'videos/s':>10}{'model-only/s':>14}{'query ms p50':>14}{'p90':>8}"
        )
        with torch.inference_mode():
            for name in args.models.split(","):
                r = bench_model(name, files, args.queries, args.index_rows)
                print(
                    f"{r['model']:<10}{r['frames']:>7}{r['size']:>6}{r['videos_per_s']:>10.2f}"
                    f"{r['model_only_videos_per_s']:>14.2f}{r['query_ms_median']:>14.1f}{r['query_ms_p90']:>8.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
