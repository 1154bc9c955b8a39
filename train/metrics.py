"""Text<->video retrieval metrics from a texts x videos similarity matrix (the CLIP-ViP
evaluation protocol; docs/model.md, "Metrics").

Ranks are 1-based: rank = 1 + (number of candidates scored strictly higher than the ground
truth). Tie rule: optimistic -- candidates tied with the ground truth do not push it down, so a
query whose row is constant gets rank 1. (The original code counts the same way but can emit
several ranks for one query on exact ties; here every query has exactly one rank.)

* t2v: each text i ranks all videos; its ground truth is text_to_video[i].
* v2t: each video ranks all texts; with several texts per video (MSR-VTT style) the video's rank
  is that of its best-ranked text. Videos without any text are gallery-only (no v2t query).
* R@K is the percentage of queries with rank <= K; medr / meanr are the median / mean rank.
* DSL (dual softmax, CAMoE): S * softmax(100 * S) over the text axis, i.e. for every video a
  softmax over all test texts. It is transductive -- it uses the whole test query set at once --
  and is reported separately under "dsl/" keys, never mixed with the plain numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_AT = (1, 5, 10)
DSL_TEMPERATURE = 100.0


def as_matrix(similarity_TV) -> np.ndarray:
    """A float64 [texts, videos] array from numpy or torch input; rejects non-finite values."""
    if hasattr(similarity_TV, "detach"):
        similarity_TV = similarity_TV.detach().float().cpu().numpy()
    matrix_TV = np.asarray(similarity_TV, dtype=np.float64)
    if matrix_TV.ndim != 2:
        raise ValueError(f"similarity must be 2-D [texts, videos], got shape {matrix_TV.shape}")
    if not np.isfinite(matrix_TV).all():
        raise ValueError("similarity contains NaN or inf")
    return matrix_TV


def check_text_to_video(text_to_video: Sequence[int], num_texts: int, num_videos: int) -> np.ndarray:
    index_T = np.asarray(text_to_video, dtype=np.int64)
    if index_T.shape != (num_texts,):
        raise ValueError(f"text_to_video has {index_T.shape} entries, the matrix has {num_texts} texts")
    if num_texts and (index_T.min() < 0 or index_T.max() >= num_videos):
        raise ValueError(f"text_to_video values must be in [0, {num_videos})")
    return index_T


def t2v_ranks(similarity_TV: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """1-based rank of each text's video among all videos (strictly-higher count + 1)."""
    positive_T = similarity_TV[np.arange(len(similarity_TV)), text_to_video]
    return (similarity_TV > positive_T[:, None]).sum(axis=1) + 1


def v2t_ranks(similarity_TV: np.ndarray, text_to_video: np.ndarray) -> np.ndarray:
    """1-based rank of each captioned video's best text among all texts (strictly-higher count + 1)."""
    is_positive_TV = np.zeros(similarity_TV.shape, dtype=bool)
    is_positive_TV[np.arange(len(similarity_TV)), text_to_video] = True
    best_positive_V = np.where(is_positive_TV, similarity_TV, -np.inf).max(axis=0)
    captioned_V = is_positive_TV.any(axis=0)
    ranks_V = (similarity_TV > best_positive_V[None, :]).sum(axis=0) + 1
    return ranks_V[captioned_V]


def summarize_ranks(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent), median rank and mean rank, keyed "<prefix>_r1" ... "<prefix>_meanr"."""
    if len(ranks) == 0:
        raise ValueError(f"{prefix}: no queries")
    summary = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks <= k)) for k in RECALL_AT}
    summary[f"{prefix}_medr"] = float(np.median(ranks))
    summary[f"{prefix}_meanr"] = float(np.mean(ranks))
    return summary


def dual_softmax(similarity_TV: np.ndarray, temperature: float = DSL_TEMPERATURE) -> np.ndarray:
    """S * softmax(temperature * S) over the text axis (axis 0). Transductive."""
    logits_TV = temperature * similarity_TV
    logits_TV = logits_TV - logits_TV.max(axis=0, keepdims=True)
    prior_TV = np.exp(logits_TV)
    return similarity_TV * prior_TV / prior_TV.sum(axis=0, keepdims=True)


def metrics_for(matrix_TV: np.ndarray, index_T: np.ndarray, prefix: str) -> dict[str, float]:
    """t2v and v2t summaries of one matrix, keys prefixed with `prefix`."""
    return {
        **summarize_ranks(t2v_ranks(matrix_TV, index_T), f"{prefix}t2v"),
        **summarize_ranks(v2t_ranks(matrix_TV, index_T), f"{prefix}v2t"),
    }


def retrieval_metrics(similarity_TV, text_to_video: Sequence[int], *, dsl: bool = False) -> dict[str, float]:
    """t2v_* and v2t_* metrics; with dsl=True also the same keys prefixed "dsl/" from the DSL matrix."""
    matrix_TV = as_matrix(similarity_TV)
    index_T = check_text_to_video(text_to_video, *matrix_TV.shape)
    results = metrics_for(matrix_TV, index_T, prefix="")
    if dsl:
        results.update(metrics_for(dual_softmax(matrix_TV), index_T, prefix="dsl/"))
    return results
