"""Search benchmark on CPU: videos embedded per second, query latency, and nearest rows by numpy vs a FAISS IVF.

    python bench/search.py [--videos 16] [--queries 20] [--index-rows 100000] [--threads 2]
    python bench/search.py --models "" --nn-rows 100000,1000000 --dim 512     # the nearest-rows table only

Embedding is measured end to end as `launch.search embed --videos` runs it (PyAV decode of each
3 s file, one window, to T frames, resize, thumbnails, encode_video) on preprocess.synthetic mp4s, and
separately model-only. Query latency = embed one text + cosine top-10 over an index of --index-rows
random unit vectors. The nearest-rows table times the top-10 search alone (train/nearest.py) over
--nn-rows unit float32 vectors of --dim dims, random or clustered (`clustered_unit_rows`): numpy's exact
brute force, and the IVF index embed builds (`build_ivf`) at each --nprobe, with its recall@10 against
numpy's rows, its build time and size. Queries are fresh draws from the rows' distribution.
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
from train.nearest import build_ivf, nearest_ivf, nearest_numpy  # noqa: E402
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


def clustered_unit_rows(rows: int, dim: int, centres: int = 1000, noise: float = 0.5, seed: int = 1) -> np.ndarray:
    """[rows, dim] float32 unit vectors from a mixture: a random unit centre (of ``centres``) plus Gaussian noise
    of norm about ``noise``, normalised. Rows share about 0.8 cosine with their cluster (1 / (1 + noise^2)) and
    about 0 +- 0.05 with the others, so a row's neighbours are its cluster's."""
    rng = np.random.default_rng(seed)
    middle = random_unit_rows(centres, dim, seed=seed + 100)
    out = random_unit_rows(rows, dim, seed=seed)  # unit noise directions
    for at in range(0, rows, 65536):
        part = out[at : at + 65536]
        part *= noise
        part += middle[rng.integers(0, centres, len(part))]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return out


def index_bytes(ivf) -> int:
    """The size of the index as written (faiss.write_index) to a temporary file."""
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(ivf, os.path.join(tmp, "ivf.faiss"))
        return os.path.getsize(os.path.join(tmp, "ivf.faiss"))


def p50_ms(search, queries: np.ndarray) -> tuple[float, list]:
    search(queries[0])  # warm-up
    times, found = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(search(q))
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), found


def bench_nearest(rows: int, dim: int, queries: int, data: str, nprobes: list[int], k: int = 10) -> list[dict]:
    """Per nprobe: p50 ms of one top-k query by numpy and by the IVF index, recall@k of the IVF's rows against
    numpy's, the index's build seconds and bytes. Queries are fresh draws from the same distribution."""
    make = clustered_unit_rows if data == "clustered" else random_unit_rows
    block = make(rows, dim)
    asked = make(queries, dim, seed=2)
    exact_ms, exact = p50_ms(lambda q: set(nearest_numpy(block, q, k)[1].tolist()), asked)
    start = time.perf_counter()
    ivf = build_ivf(block)
    built = time.perf_counter() - start
    size = index_bytes(ivf)
    out = []
    for nprobe in nprobes:
        ms, found = p50_ms(lambda q, n=nprobe: set(nearest_ivf(ivf, block.__getitem__, q, k, n)[1].tolist()), asked)
        recall = float(np.mean([len(f & e) / k for f, e in zip(found, exact)]))
        out.append(
            dict(
                rows=rows,
                data=data,
                lists=ivf.nlist,
                nprobe=nprobe,
                numpy_ms=exact_ms,
                ivf_ms=ms,
                recall=recall,
                build_s=built,
                bytes=size,
            )
        )
    return out


def print_nearest(args: argparse.Namespace) -> None:
    import faiss

    print(
        f"\nnearest rows, top-10 of one query, {args.queries} queries, dim {args.dim}, {os.cpu_count()} CPUs, "
        f"FAISS {faiss.omp_get_max_threads()} threads; IndexIVFScalarQuantizer (8 bit), reranked"
    )
    print(
        f"{'rows':>9} {'data':<10}{'lists':>6}{'nprobe':>7}{'numpy ms':>10}{'IVF ms':>8}{'recall@10':>10}"
        f"{'build s':>9}{'index MB':>10}"
    )
    for rows in (int(r) for r in args.nn_rows.split(",")):
        for data in args.nn_data.split(","):
            for r in bench_nearest(rows, args.dim, args.queries, data, [int(n) for n in args.nprobe.split(",")]):
                print(
                    f"{r['rows']:>9} {r['data']:<10}{r['lists']:>6}{r['nprobe']:>7}{r['numpy_ms']:>10.1f}"
                    f"{r['ivf_ms']:>8.2f}{r['recall']:>10.3f}{r['build_s']:>9.1f}{r['bytes'] / 1e6:>10.1f}",
                    flush=True,
                )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=16, help="synthetic mp4s to embed (3 s, 320x240, 15 fps)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--index-rows", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--models", default="tiny,ViT-B/32", help="models to time embedding with (empty: none)")
    p.add_argument("--nn-rows", default="100000,1000000", help="row counts of the numpy vs IVF table (empty: none)")
    p.add_argument("--nn-data", default="random,clustered", help="row distributions of the numpy vs IVF table")
    p.add_argument("--nprobe", default="8,16,32,64", help="IVF cells scanned per query, one table row each")
    p.add_argument("--dim", type=int, default=512, help="embedding size of the numpy vs IVF table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.models:
        bench_models(args)
    if args.nn_rows:
        print_nearest(args)
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
