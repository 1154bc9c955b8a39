"""Command line: a retrieval benchmark's annotations + videos -> one shard data set per split.

    python -m preprocess.downstream msrvtt --annotations ann/ --videos videos/ --out shards/msrvtt

Writes ``<out>/inputs/<split>/`` (metadata, texts, report.json), runs the sharding job into
``<out>/<split>/`` for each split in one Ray session, and ``<out>/conversion.json`` last.
Exit codes: 0 done; 1 some shard was not committed (rerun the same command); 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys

from pipeline import storage
from preprocess.config import RayConfig
from preprocess.downstream import DATASETS
from preprocess.shard import add_geometry_args
from preprocess.downstream.common import (
    SPLITS,
    ConvertConfig,
    SplitInputs,
    job_config,
    list_videos,
    split_folder,
    split_frames,
    write_split_inputs,
)
from preprocess.shard import setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.downstream", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(DATASETS), help="which benchmark")
    p.add_argument("--annotations", required=True, help="folder of the benchmark's annotation files")
    p.add_argument("--videos", required=True, help="folder (or s3:// prefix) of whole videos <video_id>.<ext>")
    p.add_argument("--out", required=True, help="output root: <out>/<split>/ data sets")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of train,val,test")
    p.add_argument("--frames", type=int, default=None, help="frames per val/test video (default 12; 32 ActivityNet)")
    p.add_argument("--train-frames", type=int, default=None, help="frames stored per train video (default 2x --frames)")
    add_geometry_args(p)
    p.add_argument("--val-count", type=int, default=None, help="train videos held out for validation where the "
                   "benchmark has no val split (MSR-VTT, ActivityNet; default 500)")
    p.add_argument("--clips-per-shard", type=int, default=1000, help="videos per shard")
    p.add_argument("--convert-only", action="store_true", help="write the job inputs and reports only")
    p.add_argument("--ray-address", default=None, help="as preprocess/shard.py; 'local' starts a new local cluster")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local cluster")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def build_config(args: argparse.Namespace) -> ConvertConfig:
    return ConvertConfig(annotations=args.annotations, videos=args.videos, out=args.out,
                         splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                         frames=args.frames, train_frames=args.train_frames, short_side=args.short_side,
                         frame_size=args.frame_size,
                         val_count=args.val_count, clips_per_shard=args.clips_per_shard,
                         convert_only=args.convert_only)


def prepare(dataset: str, cfg: ConvertConfig) -> dict[str, SplitInputs]:
    """Read the annotations, match them to the videos, write each split's job inputs (ValueError on bad input)."""
    splits = DATASETS[dataset].read_splits(cfg.annotations, cfg.val_count)
    videos = list_videos(cfg.videos)
    return {name: write_split_inputs(splits[name], videos, split_folder(cfg.out, name)) for name in cfg.splits}


def ray_session(ray_cfg: RayConfig):
    """One Ray connection for all splits (each run_job reuses it); closed if this call opened it."""
    from preprocess import job

    return job.ray_session(ray_cfg)


def run_splits(dataset: str, cfg: ConvertConfig, inputs: dict[str, SplitInputs], ray_cfg: RayConfig,
               progress: bool) -> dict[str, dict]:
    """The sharding job on every split with videos; returns split -> {manifest, frames, summary}."""
    from preprocess.job import run_job

    results = {}
    todo = {name: si for name, si in inputs.items() if si.report.converted}
    with ray_session(ray_cfg) if todo else contextlib.nullcontext():
        for name, split_inputs in todo.items():
            frames = split_frames(cfg, name, DATASETS[dataset].FRAMES)
            result = run_job(job_config(cfg, split_inputs, name, frames, ray_cfg, progress))
            results[name] = {"manifest": result.manifest, "frames": frames, "ok": result.ok,
                             "failed": result.failed, "summary": result.summary()}
    return results


def write_summary(dataset: str, cfg: ConvertConfig, inputs: dict[str, SplitInputs], results: dict) -> str:
    summary = {"dataset": dataset, "config": dataclasses.asdict(cfg),
               "splits": {name: {"report": dataclasses.asdict(si.report), **results.get(name, {})}
                          for name, si in inputs.items()}}
    uri = storage.join(cfg.out, "conversion.json")
    storage.write_bytes(uri, (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        ray_cfg = RayConfig(address=args.ray_address, num_cpus=args.num_cpus)
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    try:
        inputs = prepare(args.dataset, cfg)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for split_inputs in inputs.values():
        print(split_inputs.report.summary())
    try:
        results = {} if cfg.convert_only else run_splits(args.dataset, cfg, inputs, ray_cfg, not args.no_progress)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for name, result in results.items():
        print(f"--- {name} ({result['frames']} frames per video)\n{result['summary']}")
    print(f"summary: {write_summary(args.dataset, cfg, inputs, results)}")
    return 0 if all(r["manifest"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
