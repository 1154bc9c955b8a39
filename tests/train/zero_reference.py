"""The weights a resumed run holds: the test reference for checkpoint consolidation (tests/train/test_checkpoints.py).

    python -m tests.train.zero_reference RUN_DIR OUT.pt     (one process per rank, as train.main)

Every rank rebuilds the run's engine from its ``config.yaml``, loads the newest checkpoint through
DeepSpeed's own loader (the resume path, train/engine.py), gathers every parameter (ZeRO-3
partitions included) and rank 0 saves them. This reads the same files as zero_to_fp32 through
another DeepSpeed path: the model as training would continue from it.
"""

from __future__ import annotations

import sys

import deepspeed
import torch

from train import engine as ds
from train.config import load_config
from train.loop import build_task, register_direct_params
from train.optim import build_optimizer, build_scheduler
from train.run_layout import RunLayout


def main(run_dir: str, out: str) -> int:
    run = RunLayout(run_dir)
    cfg = load_config(run.config, [])
    rank, world_size = ds.init_distributed()
    task = build_task(cfg, rank, world_size)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.optim)
    engine = ds.initialize(task, optimizer, scheduler, ds.ds_config(cfg, world_size), register_direct_params(task))
    if ds.load_checkpoint(engine, run.checkpoints) is None:
        raise SystemExit(f"{run_dir}: no checkpoint")
    params = dict(task.model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        if rank == 0:
            torch.save({name: param.detach().clone() for name, param in params.items()}, out)
    ds.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
