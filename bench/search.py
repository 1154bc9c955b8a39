"""Search benchmark on CPU: videos embedded per second, query latency, and nearest rows by numpy vs FAISS.

    python bench/search.py [--videos 16] [--queries 20] [--index-rows 100000] [--threads 2]
    python bench/search.py --models "" --nn-rows 100000,1000000 --dim 512     # the nearest-rows table only

Embedding is measured end to end as `launch.search embed --videos` runs it (PyAV decode of each
3 s file, one window, to T frames, resize, thumbnails, encode_video) on preprocess.synthetic mp4s, and
separately model-only. Query latency = embed one text + cosine top-10 over an index of --index-rows
random unit vectors. The nearest-rows table times the top-10 search alone (train/nearest.py) over
--nn-rows random unit float32 vectors of --dim dims, numpy's brute force and FAISS's exact search on
the same array, and checks that both return the same rows.
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
from train.nearest import nearest_faiss, nearest_numpy  # noqa: E402
from train.search import Index, top_k  # noqa: E402
from train.search_index import COLUMNS, rows_table  # noqa: E402

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
    done = embed_files(loaded, files, batch_size=8, progress=False)
    end_to_end = len(done.rows) / (time.perf_counter() - start)
    frames = np.random.default_rng(0).integers(
        0, 255, (8, loaded.num_frames, 3, loaded.image_size, loaded.image_size), dtype=np.uint8
    )
    encode_frames(loaded, frames)
    start = time.perf_counter()
    for _ in range(2):
        encode_frames(loaded, frames)
    model_only = 16 / (time.perf_counter() - start)
    dim = done.embeddings[0].shape[1]
    columns = {name: [""] * index_rows for name in COLUMNS} | {"start": [0.0] * index_rows, "end": [1.0] * index_rows}
    columns |= {"kind": ["video"] * index_rows, "id": [str(i) for i in range(index_rows)]}
    index = Index(rows=rows_table(columns), embeddings=random_unit_rows(index_rows, dim), meta={})
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
        "failed": len(done.failed),
    }


def random_unit_rows(rows: int, dim: int, seed: int = 1, chunk: int = 65536) -> np.ndarray:
    """[rows, dim] float32 unit vectors, drawn and normalised in place a chunk at a time (no float64 copy)."""
    out = np.empty((rows, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for at in range(0, rows, chunk):
        part = out[at : at + chunk]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return out


def bench_nearest(rows: int, dim: int, queries: int, k: int = 10) -> dict:
    """Median and p90 ms of one top-k query by numpy and by FAISS over the same random rows."""
    block = random_unit_rows(rows, dim)
    asked = random_unit_rows(queries, dim, seed=2)
    result = {"rows": rows, "dim": dim, "same": True}
    found = {}
    for name, search in (("numpy", nearest_numpy), ("faiss", nearest_faiss)):
        search(block, asked[0], k)  # warm-up
        times = []
        for q in asked:
            start = time.perf_counter()
            found.setdefault(name, []).append(search(block, q, k)[1].tolist())
            times.append(time.perf_counter() - start)
        result[name] = (1000 * float(np.median(times)), 1000 * float(np.percentile(times, 90)))
    result["same"] = found["numpy"] == found["faiss"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=16, help="synthetic mp4s to embed (3 s, 320x240, 15 fps)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--models", default="tiny,ViT-B/32", help="models to time embedding with (empty: none)")
    p.add_argument("--nn-rows", default="100000,1000000", help="row counts of the numpy vs FAISS table (empty: none)")
    p.add_argument("--dim", type=int, default=512, help="embedding size of the numpy vs FAISS table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.models:
        bench_models(args)
    if args.nn_rows:
        print(f"\nnearest rows, top-10 of one query, {args.queries} queries, dim {args.dim}, {os.cpu_count()} CPUs")
        print(f"{'rows':>9}{'numpy p50 ms':>14}{'p90':>8}{'faiss p50 ms':>14}{'p90':>8}  same rows")
        for rows in (int(r) for r in args.nn_rows.split(",")):
            r = bench_nearest(rows, args.dim, args.queries)
            print(
                f"{rows:>9}{r['numpy'][0]:>14.1f}{r['numpy'][1]:>8.1f}{r['faiss'][0]:>14.1f}{r['faiss'][1]:>8.1f}"
                f"  {'yes' if r['same'] else 'NO'}"
            )
    return 0


def bench_models(args: argparse.Namespace) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
