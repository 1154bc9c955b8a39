"""The k rows nearest a query vector (inner product of L2-normalised vectors: cosine), by numpy or by FAISS.

Up to ``NeighbourConfig.faiss_above`` rows numpy does it (one matrix-vector product and a partial sort); above,
FAISS's exact brute-force search (``faiss.knn``, inner product) does, on the same float32 array without copying
it into an index. Both are exact, so a query's hits do not depend on which one ran (bench/search.py times both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class NeighbourConfig:
    """How a query finds its nearest rows."""

    faiss_above: int = 1_000_000
    """Rows of the wanted kind above which a query runs FAISS's exact search instead of numpy's (0: always FAISS)."""

    def __post_init__(self) -> None:
        if self.faiss_above < 0:
            raise ValueError(f"faiss_above must be >= 0, got {self.faiss_above}")


def nearest_numpy(block: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row indices) of the k best rows of ``block`` [N, E], best first (ties: the lower index first)."""
    scores = block @ query.astype(np.float32, copy=False)
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    order = best[np.lexsort((best, -scores[best]))]
    return scores[order], order


def nearest_faiss(block: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As `nearest_numpy`, by ``faiss.knn`` (exact inner-product search)."""
    import faiss

    k = min(k, len(block))
    xq = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
    scores, rows = faiss.knn(xq, np.ascontiguousarray(block, dtype=np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores[0], rows[0].astype(np.int64)


def nearest(
    block: np.ndarray, query: np.ndarray, k: int, cfg: NeighbourConfig = NeighbourConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows of ``block`` by inner product with ``query``: numpy up to ``cfg.faiss_above`` rows, FAISS
    above."""
    search = nearest_faiss if len(block) > cfg.faiss_above else nearest_numpy
    return search(block, query, k)
