"""Training entry point.

    python -m train.main --config launch/configs/train/tiny.yaml data.train=[s3://bucket/ds] run_dir=runs/x

Run it under the ``deepspeed`` launcher (``launch/pretrain.sh``) or ``torchrun`` for several ranks;
started directly it runs as a single rank. ``--dry-run`` resolves and dumps the config and the
DeepSpeed JSON, builds the model and reads one batch, then exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

logger = logging.getLogger("train.main")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pipeline.config import HelpFormatter, settings_help
    from train.config import TrainConfig

    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=HelpFormatter,
        epilog="settings (key=value overrides; YAML sections alike):\n" + settings_help(TrainConfig),
    )
    parser.add_argument("--config", help="YAML config (see launch/configs/train/)")
    parser.add_argument("--dry-run", action="store_true", help="config, model, DeepSpeed JSON and one batch only")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")
    return parser.parse_args(argv)


def single_process_env() -> None:
    """Started without a launcher: act as rank 0 of 1."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def dry_run(cfg, rank: int, world_size: int) -> None:
    from train import engine
    from train.loader import StreamingLoader
    from train.loop import build_task

    task = build_task(cfg, rank, world_size)
    params = sum(p.numel() for p in task.parameters())
    loader = StreamingLoader(cfg.data.__class__(**{**cfg.data.__dict__, "num_workers": 0}), cfg.seed, rank, world_size)
    batch = loader.next()
    print(
        json.dumps(
            {
                "parameters": params,
                "ds_config": engine.ds_config(cfg, world_size),
                "batch": {k: list(v.shape) for k, v in batch.items() if hasattr(v, "shape")},
                "samples_per_epoch": loader.samples_per_epoch,
            },
            indent=1,
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.logs import setup_logging
    from train.checkpoint import adopt_init_checkpoint
    from train.config import check_resumable, dump_config, load_config
    from train.pretrained import resolve_pretrained
    from train.run_layout import RunLayout
    from train.run_outputs import wandb_settings
    from train.text_coverage import check_train_texts

    try:
        cfg = adopt_init_checkpoint(load_config(args.config, args.overrides))  # before config.yaml: no autos there
        resolve_pretrained(cfg.model)  # a tag or file that is not there, or of the other activation: one line here
        check_resumable(cfg)
        wandb_settings(cfg)  # log.wandb=true without the wandb package: one line here, before any rank starts
        check_train_texts(cfg)  # a loss term whose text most clips lack: one line, before any rank starts
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    single_process_env()
    from train import engine
    from train.loop import train

    rank, world_size = engine.init_distributed()
    setup_logging("INFO", rank=rank)
    if rank == 0:
        notes = [note for note in (cfg.model.random_start_note(),) if note]
        for note in notes:
            logger.warning(note)
        dump_config(cfg, RunLayout(cfg.run_dir).config, notes)
    if args.dry_run:
        if rank == 0:
            dry_run(cfg, rank, world_size)
        return 0
    from train.shard_errors import TooManyShardErrors

    try:
        results = train(cfg, rank, world_size)
    except TooManyShardErrors as exc:  # every rank stops at the same step with this line
        logger.error("training stopped: %s", exc)
        return 3
    if rank == 0 and results:
        logger.info("final eval: %s", json.dumps({k: round(v, 2) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
