"""Omnisource cross-modal contrastive losses (CLIP-ViP's OCL, arXiv 2209.06430) and fine-tuning InfoNCE.

Features are L2-normalised rows: video V, subtitle S, caption C (of the middle frame), middle
frame F, or text for fine-tuning. With world_size > 1 every feature set is all-gathered with
autograd (`torch.distributed.nn.functional.all_gather`) and every rank computes the same global
loss. That all_gather's backward sums the gradient over ranks, i.e. world_size x the local rows'
gradient; DDP/DeepSpeed then divide by world_size when averaging, which leaves exactly the
gradient of the global-batch loss (verified by tests/train/test_loss.py on 2 gloo ranks).
All ranks must hold the same number of rows.

Variants (each term is a mean cross-entropy over the global batch; the total is their plain sum):
    vs       s2v + v2s
    a        vs + f2c + c2f
    b        vs + v2c + c2v
    c        vs + v2c + c2v + f2c + c2f
    d        s2v + c2v + v2s_joint + v2c_joint + f2c + c2f   (CLIP-ViP's final post-pretraining loss)
    infonce  v2t + t2v                                       (fine-tuning)
`v2s_joint` / `v2c_joint`: video i scores [its subtitle (resp. caption); the other B-1 subtitles;
the other B-1 captions] -- 2B-1 candidates, its own caption (resp. subtitle) excluded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

# term name -> (query feature, candidate feature); logits = exp(logit_scale) * query @ candidate.T
PAIR_TERMS: dict[str, tuple[str, str]] = {
    "v2s": ("video", "subtitle"),
    "s2v": ("subtitle", "video"),
    "v2c": ("video", "caption"),
    "c2v": ("caption", "video"),
    "f2c": ("frame", "caption"),
    "c2f": ("caption", "frame"),
    "v2t": ("video", "text"),
    "t2v": ("text", "video"),
}
JOINT_TERMS = ("v2s_joint", "v2c_joint")

VARIANT_TERMS: dict[str, tuple[str, ...]] = {
    "vs": ("s2v", "v2s"),
    "a": ("s2v", "v2s", "f2c", "c2f"),
    "b": ("s2v", "v2s", "v2c", "c2v"),
    "c": ("s2v", "v2s", "v2c", "c2v", "f2c", "c2f"),
    "d": ("s2v", "c2v", "v2s_joint", "v2c_joint", "f2c", "c2f"),
    "infonce": ("v2t", "t2v"),
}


def required_features(variant: str) -> tuple[str, ...]:
    """Feature names a variant reads, in a stable order."""
    names: list[str] = []
    for term in VARIANT_TERMS[variant]:
        pair = ("video", "subtitle", "caption") if term in JOINT_TERMS else PAIR_TERMS[term]
        names.extend(name for name in pair if name not in names)
    return tuple(names)


def gather_rows(features_BE: Tensor, world_size: int) -> Tensor:
    """All ranks' rows in rank order, differentiable; identity when world_size == 1."""
    if world_size == 1:
        return features_BE
    return torch.cat(dist_nn.all_gather(features_BE), dim=0)


def pair_ce(query_BE: Tensor, candidate_BE: Tensor, scale: Tensor) -> Tensor:
    """Mean CE of row i of scale * query @ candidate.T against target i."""
    logits_BB = scale * query_BE @ candidate_BE.t()
    return F.cross_entropy(logits_BB, torch.arange(len(logits_BB), device=logits_BB.device))


def joint_pool_ce(positive_BB: Tensor, other_BB: Tensor) -> Tensor:
    """Row i: [positive_ii, positive_ij (j != i), other_ij (j != i)] with target positive_ii."""
    eye_BB = torch.eye(len(positive_BB), dtype=torch.bool, device=positive_BB.device)
    logits_B2B = torch.cat([positive_BB, other_BB.masked_fill(eye_BB, float("-inf"))], dim=1)
    return F.cross_entropy(logits_B2B, torch.arange(len(positive_BB), device=positive_BB.device))


def joint_terms(features: dict[str, Tensor], scale: Tensor) -> dict[str, Tensor]:
    """The V->{S, C} terms with the shared negative pool (v2s_joint and v2c_joint of variant d)."""
    video_subtitle_BB = scale * features["video"] @ features["subtitle"].t()
    video_caption_BB = scale * features["video"] @ features["caption"].t()
    return {
        "v2s_joint": joint_pool_ce(video_subtitle_BB, video_caption_BB),
        "v2c_joint": joint_pool_ce(video_caption_BB, video_subtitle_BB),
    }


class OCLLoss(nn.Module):
    """Contrastive loss by variant name; owns the cross-rank gather (rank/world_size explicit).

    forward(features, logit_scale) -> {term: loss, ..., "loss": sum of terms}.
    `logit_scale` is the log scale (the model's parameter); logits use its exp.
    """

    def __init__(self, variant: str, rank: int = 0, world_size: int = 1):
        super().__init__()
        if variant not in VARIANT_TERMS:
            raise ValueError(f"variant: must be one of {sorted(VARIANT_TERMS)}, got {variant!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got {rank}/{world_size}")
        self.variant = variant
        self.world_size = world_size
        self.terms = VARIANT_TERMS[variant]
        self.features = required_features(variant)

    def gather(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [name for name in self.features if name not in features]
        if missing:
            raise ValueError(f"features: variant {self.variant!r} needs {list(self.features)}, missing {missing}")
        if self.world_size > 1 and dist.get_world_size() != self.world_size:
            raise RuntimeError(f"world_size {self.world_size} != process group size {dist.get_world_size()}")
        return {name: gather_rows(features[name], self.world_size) for name in self.features}

    def forward(self, features: dict[str, Tensor], logit_scale: Tensor) -> dict[str, Tensor]:
        gathered = self.gather(features)
        scale = logit_scale.exp()
        losses: dict[str, Tensor] = {}
        if any(term in JOINT_TERMS for term in self.terms):
            losses.update(joint_terms(gathered, scale))
        for term in self.terms:
            if term not in JOINT_TERMS:
                query, candidate = PAIR_TERMS[term]
                losses[term] = pair_ce(gathered[query], gathered[candidate], scale)
        losses = {term: losses[term] for term in self.terms}
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses
