"""Caption stage cost: batched vs one-at-a-time captions/s, and the share of preprocessing time it adds.

Builds the tiny random VisionEncoderDecoder captioner of the tests (no download) and a synthetic
corpus, then

1. preprocesses the corpus on a local Ray cluster without and with the caption stage (same
   cluster, given subtitles, no given captions, so every clip is captioned) and prints the
   share of the with-stage wall time that the stage adds;
2. captions the same middle frames (read back from the shards) in batches of ``--batch-size``
   and one at a time, in this process, and prints captions/s of each and their ratio.

    python bench/captions.py            # 16 videos x 4 clips, ~2 minutes on 2 cores
    python bench/captions.py --quick    # 4 videos x 4 clips
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def preprocess(paths, out: Path, captioner, batch: int, num_cpus: int) -> float:
    from preprocess.config import InputConfig, PreprocessConfig, RayConfig, ShardingConfig
    from preprocess.decode import DecodeConfig
    from preprocess.job import run_job
    from preprocess.text.captions import CaptionConfig

    cfg = PreprocessConfig(
        inputs=InputConfig(metadata=str(paths.metadata), videos=str(paths.videos), subtitles=str(paths.subtitles)),
        sharding=ShardingConfig(output=str(out), clips_per_shard=8),
        decode=DecodeConfig(num_frames=8, short_side=224),
        ray=RayConfig(model_cpus=1.0, max_in_flight=num_cpus),
        captioner=CaptionConfig(model=str(captioner), batch_size=batch) if captioner else None,
        progress=False,
    )
    started = time.perf_counter()
    result = run_job(cfg)
    wall = time.perf_counter() - started
    assert result.manifest, result.summary()
    return wall


def model_start_seconds(model: Path) -> float:
    """What a fresh caption actor pays once: a new process importing torch/transformers and loading the model."""
    code = (
        "from preprocess.text.captions import CaptionConfig, Captioner; import sys; "
        "Captioner(CaptionConfig(model=sys.argv[1]))"
    )
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, str(model)],
        check=True,
        capture_output=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    return time.perf_counter() - started


def caption_rate(captioner, frames: list[bytes], batch: int) -> tuple[float, list[str]]:
    captioner.from_jpegs(frames[:batch])  # warm-up
    texts: list[str] = []
    started = time.perf_counter()
    for i in range(0, len(frames), batch):
        texts += captioner.from_jpegs(frames[i : i + batch])
    return len(frames) / (time.perf_counter() - started), texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frames", type=int, default=128, help="middle frames captioned in part 2 (cycled)")
    p.add_argument(
        "--num-cpus", type=int, default=3, help="CPUs of the local Ray cluster (one goes to the caption actor)"
    )
    args = p.parse_args()

    import ray

    from pipeline.shards import iter_dataset
    from preprocess.synthetic import make_corpus
    from preprocess.text.captions import CaptionConfig, Captioner
    from tests.preprocess.tiny_models import build_captioner

    root = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    try:
        videos = 4 if args.quick else 16
        paths = make_corpus(root / "corpus", videos=videos, clips_per_video=4, size=(320, 240))
        model = build_captioner(root / "captioner")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            preprocess(paths, root / "warmup", None, args.batch_size, args.num_cpus)  # workers and imports warm
            without = preprocess(paths, root / "plain", None, args.batch_size, args.num_cpus)
            with_stage = preprocess(paths, root / "captioned", model, args.batch_size, args.num_cpus)
        finally:
            ray.shutdown()
        clips = videos * 4
        print(f"preprocessing {clips} clips (8 frames, short side 224), Ray with {args.num_cpus} CPUs:")
        print(f"  without caption stage: {without:.2f} s   with it (batch {args.batch_size}): {with_stage:.2f} s")
        added = with_stage - without
        start = model_start_seconds(model)
        print(f"  the stage adds {added:.2f} s = {100 * added / with_stage:.1f}% of the with-stage time")
        print(
            f"  of which one-off actor start (new process, imports, model load; measured alone): {start:.2f} s; "
            f"the rest, {max(0.0, added - start):.2f} s = {100 * max(0.0, added - start) / with_stage:.1f}%, "
            "grows with the clips"
        )

        samples = list(iter_dataset(str(root / "captioned")))
        middle = [s.frames[s.meta.middle_frame] for s in samples]
        frames = [middle[i % len(middle)] for i in range(args.frames)]
        captioner = Captioner(CaptionConfig(model=str(model)))
        batched, texts_b = caption_rate(captioner, frames, args.batch_size)
        single, texts_1 = caption_rate(captioner, frames, 1)
        assert texts_b == texts_1, "batched captions differ from one-at-a-time captions"
        assert texts_b[: len(samples)] == [s.caption for s in samples], (
            "the pipeline's captions differ from the model's"
        )
        print(f"captioning {len(frames)} middle frames in this process (tiny ViT+GPT-2, CPU, {os.cpu_count()} cores):")
        print(
            f"  batch {args.batch_size}: {batched:.1f} captions/s   batch 1: {single:.1f} captions/s   "
            f"ratio {batched / single:.2f}x"
        )
        print("  captions identical between batch sizes and to the pipeline's: yes")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
