"""The logit-scale clamp under ZeRO 1, 2 and 3: one rank of the probe run by tests/train/test_logit_clamp.py.

    python -m tests.train.logit_clamp_probe OUT.json     (one process per rank, as train.main)

For each stage every rank builds the tiny config's engine (train/engine.py `initialize`), pushes
the optimiser's fp32 master copy of ``logit_scale`` to 6.0 (past ln 200, train/model.py
``LOGIT_SCALE_MAX``; `_push_master`) and follows the training loop's order (train/loop.py
`run_loop`): a step, `clamp_param_`, another step, recording the scale that step's forward used.
It then pushes again, steps, clamps, reads at once and steps again. Every step has zero gradients,
so Adam leaves every value where it is and a step only copies the master into the model. It
records the model copy (`read_param`, or ``param.data`` as the forward sees it) and the master copy
(``safe_get_full_fp32_param``, a DeepSpeed read path that `clamp_param_` does not use); rank 0
writes them to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from train import engine as ds
from train.config import load_config
from train.loop import build_task, register_direct_params
from train.model import LOGIT_SCALE_MAX
from train.optim import build_optimizer, build_scheduler

TINY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch/configs/train/tiny.yaml"
)
PUSHED = 6.0


def _zero_grad_step(engine, batch: dict) -> float:
    """One engine step whose loss is the task's loss times zero (every gradient exists and is 0);
    returns the logit scale its forward used."""
    used = []
    hook = engine.module.loss.register_forward_pre_hook(lambda _, args: used.append(float(args[1])))
    losses = engine(batch["frames"], image=batch["image"], subtitle=batch["subtitle"], caption=batch["caption"])
    hook.remove()
    engine.backward(losses["loss"] * 0.0)
    engine.step()
    return used[0]


def _master(param: torch.nn.Parameter) -> float:
    return float(safe_get_full_fp32_param(param).reshape(-1)[0])


def _live(param: torch.nn.Parameter) -> float | None:
    """``param.data`` as it is (None when ZeRO-3 holds only the partition): what a forward would use."""
    return float(param.data.reshape(-1)[0]) if param.data.numel() else None


def _push_master(param: torch.nn.Parameter, value: float, world_size: int) -> None:
    """Set the fp32 master copy of ``param`` to ``value`` (every rank calls it).

    ZeRO-1/2: DeepSpeed's ``safe_set_full_fp32_param``. ZeRO-3: its counterpart (0.19.7) cannot set
    a parameter whose partitions are padded (a scalar over 2 ranks), so each rank writes its own
    slice of the padded value (the padding stays 0).
    """
    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, torch.full_like(safe_get_full_fp32_param(param), value))
        return
    optimizer = param._z3_optimizer
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=True)
    size = partition.numel()
    padded = torch.zeros(size * world_size, dtype=partition.dtype)
    padded[: param.ds_numel] = value
    start = size * optimizer._get_param_partition_rank(param)
    partition.data.copy_(padded[start : start + size])


def probe(stage: int, rank: int, world_size: int) -> dict:
    cfg = load_config(TINY, ["run_dir=unused", f"zero.stage={stage}"])
    task = build_task(cfg, rank, world_size)
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.optim)
    engine = ds.initialize(task, optimizer, scheduler, ds.ds_config(cfg, world_size), register_direct_params(task))
    g = torch.Generator().manual_seed(rank)
    frames = torch.randint(0, 256, (2, cfg.data.num_frames, 3, 32, 32), dtype=torch.uint8, generator=g)
    batch = {
        "frames": frames,
        "image": frames[:, 2],
        "subtitle": torch.randint(1, 400, (2, cfg.data.context_length), generator=g),
        "caption": torch.randint(1, 400, (2, cfg.data.context_length), generator=g),
    }
    logit_scale = task.model.logit_scale
    out = {"initial": {"module": ds.read_param(logit_scale), "master": _master(logit_scale)}}
    # the training loop's order: step, clamp, step (no read in between)
    _push_master(logit_scale, PUSHED, world_size)
    _zero_grad_step(engine, batch)
    out["pushed"] = {"live": _live(logit_scale), "master": _master(logit_scale)}
    ds.clamp_param_(logit_scale, 0.0, LOGIT_SCALE_MAX)
    out["next_forward"] = _zero_grad_step(engine, batch)
    out["after_step"] = {"module": ds.read_param(logit_scale), "master": _master(logit_scale)}
    # read right after the clamp, as a checkpoint or a logged row would
    _push_master(logit_scale, PUSHED, world_size)
    _zero_grad_step(engine, batch)
    ds.clamp_param_(logit_scale, 0.0, LOGIT_SCALE_MAX)
    out["clamped"] = {"module": ds.read_param(logit_scale), "master": _master(logit_scale)}
    out["forward_after_read"] = _zero_grad_step(engine, batch)  # ZeRO-3: gathered again from the partition
    engine.destroy()
    return out


def main(out_path: str) -> int:
    rank, world_size = ds.init_distributed()
    results = {"world_size": world_size, "deepspeed": deepspeed.__version__}
    for stage in (1, 2, 3):
        results[str(stage)] = probe(stage, rank, world_size)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    ds.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
