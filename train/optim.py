"""AdamW parameter groups and the warmup + cosine learning-rate schedule (CLIP-ViP's
post-pretraining settings; docs/training.md, "Config").

Weight decay: by default only matrices of linear / attention / conv layers are decayed. Biases,
norm weights, the logit scale, embeddings (token, position, class, temporal) and the video proxies
are not. The original CLIP-ViP meant to exclude norms but its name pattern never matched HF CLIP's
names, so it decayed norms, embeddings and proxies too; ``decay_all=True`` reproduces that (biases
and the logit scale stay excluded, as in the original).

Learning-rate multipliers: the logit scale (``logit_scale_lr_mul``; the original used 10x for DiDeMo
B/16) and the embedding tables and proxies (``embedding_lr_mul``). Adam moves every parameter by
about lr per step whatever its gradient, so a zero-initialised temporal embedding needs ~0.1/lr
steps before frame order reaches the tokens. Post-pretraining from CLIP keeps the multiplier at 1;
a model trained from scratch (the tiny test/demo config) learns order in a few hundred steps only
with a large one (tests/train/test_learning.py).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from train.config import OptimConfig

logger = logging.getLogger(__name__)

_NO_DECAY_WORDS = ("embedding", "proxy_tokens", "class_embedding", "ln_", "norm", "logit_scale", "bias")
_ALWAYS_NO_DECAY = ("bias", "logit_scale")
_EMBEDDING_WORDS = ("embedding", "proxy_tokens")


def lr_class(name: str) -> str:
    """Which learning-rate multiplier a parameter gets: "logit_scale", "embedding" or "main"."""
    if name.endswith("logit_scale"):
        return "logit_scale"
    if any(word in name for word in _EMBEDDING_WORDS):
        return "embedding"
    return "main"


def is_decayed(name: str, param: nn.Parameter, decay_all: bool) -> bool:
    """Whether a named parameter gets weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    if any(word in leaf for word in _ALWAYS_NO_DECAY) or name.endswith("logit_scale"):
        return False
    if decay_all:
        return True
    if param.ndim < 2:
        return False  # norm weights, class embedding, other vectors
    return not any(word in name for word in _NO_DECAY_WORDS)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Up to six groups: {main, embedding, logit scale} x {decay, no decay}, each with its lr multiplier."""
    lr_mul = {"main": 1.0, "embedding": cfg.embedding_lr_mul, "logit_scale": cfg.logit_scale_lr_mul}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    names: dict[tuple[str, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (lr_class(name), is_decayed(name, param, cfg.decay_all))
        buckets.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    groups = []
    for (kind, decay), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_mul": lr_mul[kind],
                "name": f"{kind}/{'decay' if decay else 'no_decay'}",
            }
        )
        logger.debug("param group %s: %s", groups[-1]["name"], names[(kind, decay)])
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW (no compiled DeepSpeed op needed, so it runs on CPU too)."""
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_mul"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then half-cosine down to min_lr."""
    warmup = max(1, math.ceil(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """LambdaLR applying `lr_factor` to every group (group lr_mul is folded into its base lr)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def retime_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, clock, total_steps: int, cfg: OptimConfig) -> None:
    """Make ``scheduler`` read `lr_factor` at ``clock(step)`` (a step counted in the run's first global batch) of
    ``total_steps`` (in those steps) from now on, and set every group's lr for the current step.

    A resume at another world size changes the global batch; the schedule then goes on by samples seen, not by
    steps taken: no jump back into warmup or ahead in the cosine."""
    scheduler.lr_lambdas = [lambda step: lr_factor(clock(step), total_steps, cfg)] * len(
        scheduler.optimizer.param_groups
    )
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
