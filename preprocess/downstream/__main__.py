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

from pipeline import config, storage
from pipeline.logs import LEVELS, setup_logging
from preprocess.config import RayConfig
from preprocess.downstream import DATASETS
from preprocess.downstream.common import (
    ConvertConfig,
    SplitInputs,
    job_config,
    list_videos,
    split_folder,
    split_frames,
    write_split_inputs,
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Flags generated from ConvertConfig and RayConfig (pipeline/config.py: defaults and help from the fields)."""
    p = argparse.ArgumentParser(
        prog=config.prog("python -m preprocess.downstream"),
        description=__doc__.split("\n\n")[0],
        formatter_class=config.HelpFormatter,
    )
    p.add_argument("dataset", choices=sorted(DATASETS), help="which benchmark")
    config.add_flags(p, ConvertConfig, dest="convert")
    config.add_flags(p, RayConfig, dest="ray", names={"address": "ray-address"}, only=("address", "num_cpus"))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    p.add_argument("--log-level", default="INFO", choices=LEVELS, help="log level (default: INFO)")
    return p


def build_config(args: argparse.Namespace) -> ConvertConfig:
    return config.build(ConvertConfig, config.flag_values(args, "convert"))


def prepare(dataset: str, cfg: ConvertConfig) -> dict[str, SplitInputs]:
    """Read the annotations, match them to the videos, write each split's job inputs (ValueError on bad input)."""
    splits = DATASETS[dataset].read_splits(cfg.annotations, cfg.val_count)
    videos = list_videos(cfg.videos)
    return {name: write_split_inputs(splits[name], videos, split_folder(cfg.out, name)) for name in cfg.splits}


def ray_session(ray_cfg: RayConfig):
    """One Ray connection for all splits (each run_job reuses it); closed if this call opened it."""
    from preprocess import job

    return job.ray_session(ray_cfg)


def run_splits(
    dataset: str, cfg: ConvertConfig, inputs: dict[str, SplitInputs], ray_cfg: RayConfig, progress: bool
) -> dict[str, dict]:
    """The sharding job on every split with videos; returns split -> {manifest, frames, summary}."""
    from preprocess.job import run_job

    results = {}
    todo = {name: si for name, si in inputs.items() if si.report.converted}
    with ray_session(ray_cfg) if todo else contextlib.nullcontext():
        for name, split_inputs in todo.items():
            frames = split_frames(cfg, name, DATASETS[dataset].FRAMES)
            result = run_job(job_config(cfg, split_inputs, name, frames, ray_cfg, progress))
            results[name] = {
                "manifest": result.manifest,
                "frames": frames,
                "ok": result.ok,
                "failed": result.failed,
                "summary": result.summary(),
            }
    return results


def write_summary(dataset: str, cfg: ConvertConfig, inputs: dict[str, SplitInputs], results: dict) -> str:
    summary = {
        "dataset": dataset,
        "config": dataclasses.asdict(cfg),
        "splits": {
            name: {"report": dataclasses.asdict(si.report), **results.get(name, {})} for name, si in inputs.items()
        },
    }
    uri = storage.join(cfg.out, "conversion.json")
    storage.write_bytes(uri, (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    return uri


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        ray_cfg = config.build(RayConfig, config.flag_values(args, "ray"))
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
        results = {} if cfg.convert_only else run_splits(args.dataset, cfg, inputs, ray_cfg, args.progress)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for name, result in results.items():
        print(f"--- {name} ({result['frames']} frames per video)\n{result['summary']}")
    print(f"summary: {write_summary(args.dataset, cfg, inputs, results)}")
    return 0 if all(r["manifest"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
