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

Missing texts (``present``: per text, which rows have a non-empty one): a row whose text is empty takes no part
in the terms that read that text, neither as a query nor as a candidate (the empty string's embedding is no
caption of anything), and each such term is the mean over the rows that do take part; a term no row of the global
batch takes part in is 0 and counted as skipped (``skipped/<term>``, with ``without/<text>``, the rows that lack
each text). With every text present the values are those of the plain formulas above (to rounding).
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
ROW_TEXT: dict[str, str] = {
    **{term: next(n for n in pair if n not in ("video", "frame")) for term, pair in PAIR_TERMS.items()},
    "v2s_joint": "subtitle",
    "v2c_joint": "caption",
}
"""The text a row of each term must have to take part (its query or its positive)."""

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


def masked_ce(logits_BN: Tensor, rows_B: Tensor | None) -> Tensor:
    """Mean CE of row i against target i over the rows in ``rows_B`` (all when None). Rows left out get zero
    logits first, so that no -inf of theirs can reach the sum or its gradient."""
    targets_B = torch.arange(len(logits_BN), device=logits_BN.device)
    if rows_B is None:
        return F.cross_entropy(logits_BN, targets_B)
    logits_BN = torch.where(rows_B[:, None], logits_BN, torch.zeros((), dtype=logits_BN.dtype))
    per_row_B = F.cross_entropy(logits_BN, targets_B, reduction="none")
    return (per_row_B * rows_B).sum() / rows_B.sum().clamp(min=1)


def without_columns(logits_BN: Tensor, columns_N: Tensor | None) -> Tensor:
    """The logits with the candidates not in ``columns_N`` ruled out (-inf)."""
    return logits_BN if columns_N is None else logits_BN.masked_fill(~columns_N[None, :], float("-inf"))


def pair_ce(query_BE: Tensor, candidate_BE: Tensor, scale: Tensor, rows_B=None, columns_B=None) -> Tensor:
    """Mean CE of row i of scale * query @ candidate.T against target i (over ``rows_B``, among ``columns_B``)."""
    logits_BB = without_columns(scale * query_BE @ candidate_BE.t(), columns_B)
    return masked_ce(logits_BB, rows_B)


def joint_pool_ce(positive_BB: Tensor, other_BB: Tensor, rows_B=None, other_B=None) -> Tensor:
    """Row i: [positive_ii, positive_ij (j != i), other_ij (j != i)] with target positive_ii; rows and positive
    candidates limited to ``rows_B``, other candidates to ``other_B``."""
    eye_BB = torch.eye(len(positive_BB), dtype=torch.bool, device=positive_BB.device)
    positive_BB = without_columns(positive_BB, rows_B)
    other_BB = without_columns(other_BB.masked_fill(eye_BB, float("-inf")), other_B)
    return masked_ce(torch.cat([positive_BB, other_BB], dim=1), rows_B)


def joint_terms(features: dict[str, Tensor], scale: Tensor, present: dict[str, Tensor]) -> dict[str, Tensor]:
    """The V->{S, C} terms with the shared negative pool (v2s_joint and v2c_joint of variant d)."""
    video_subtitle_BB = scale * features["video"] @ features["subtitle"].t()
    video_caption_BB = scale * features["video"] @ features["caption"].t()
    subtitle_B, caption_B = present.get("subtitle"), present.get("caption")
    return {
        "v2s_joint": joint_pool_ce(video_subtitle_BB, video_caption_BB, subtitle_B, caption_B),
        "v2c_joint": joint_pool_ce(video_caption_BB, video_subtitle_BB, caption_B, subtitle_B),
    }


def pair_masks(term: str, present: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """(rows, candidate columns) of a pair term: rows need the term's text; candidates that are texts need it too."""
    text = ROW_TEXT[term]
    if text not in present:
        return None, None
    return present[text], present[text] if PAIR_TERMS[term][1] == text else None


def gather_mask(present_B: Tensor, world_size: int) -> Tensor:
    """All ranks' rows of a mask in rank order (no gradient)."""
    if world_size == 1:
        return present_B
    parts = [torch.empty_like(present_B) for _ in range(world_size)]
    dist.all_gather(parts, present_B.contiguous())
    return torch.cat(parts)


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

    def forward(
        self, features: dict[str, Tensor], logit_scale: Tensor, present: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``present``: per text feature (subtitle, caption, text), a bool per local row: the text is not empty.
        Without it every text counts as present."""
        gathered = self.gather(features)
        masks = {name: gather_mask(m, self.world_size) for name, m in (present or {}).items() if name in gathered}
        scale = logit_scale.exp()
        losses: dict[str, Tensor] = {}
        if any(term in JOINT_TERMS for term in self.terms):
            losses.update(joint_terms(gathered, scale, masks))
        for term in self.terms:
            if term not in JOINT_TERMS:
                query, candidate = PAIR_TERMS[term]
                losses[term] = pair_ce(gathered[query], gathered[candidate], scale, *pair_masks(term, masks))
        losses = {term: losses[term] for term in self.terms}
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses | self.missing(masks)

    def missing(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """``without/<text>``: rows of the global batch without the text; ``skipped/<term>``: 1 for a term no row
        took part in, else 0 (both only with ``present``)."""
        out = {f"without/{name}": (~m).sum().float() for name, m in masks.items()}
        for term in self.terms:
            text = ROW_TEXT[term]
            if text in masks:
                out[f"skipped/{term}"] = (~masks[text].any()).float()
        return out
