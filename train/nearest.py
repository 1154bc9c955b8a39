"""The k rows nearest a query vector (inner product of L2-normalised vectors: cosine): exact by numpy, or
approximate by a FAISS inverted-file index (IVF) built at embed time.

numpy's brute force is one matrix-vector product and a partial sort; it is exact and, for one query, faster than
FAISS's exact search (``faiss.knn`` parallelises over queries, not over the rows of one). Above
``AnnConfig.ann_above`` rows of a kind, ``embed`` also builds an IVF index: k-means cells of the rows
(``ivf_lists``), each row kept as 8-bit scalar-quantised codes (``IndexIVFScalarQuantizer``, a quarter of the
float32 size); a query scans only the ``nprobe`` cells nearest it, takes `RERANK` times k candidates by the codes'
scores and orders them by their exact float32 inner products, so the scores shown are exact. It may miss some of
the true top k (bench/search.py measures recall@10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TRAIN_PER_LIST = 40
"""Rows sampled per IVF list to train its k-means (FAISS asks for at least 39)."""
RERANK = 4
"""Candidates per wanted hit an IVF search takes before ordering them by their exact scores."""
RECALL_QUERIES = 100
"""Queries `ivf_recall` measures an index with when it is built (each also searched exactly)."""


@dataclass(frozen=True, kw_only=True)
class AnnConfig:
    """When embed builds an approximate nearest-neighbour index beside the table."""

    ann_above: int = 1_000_000
    """Rows of a kind above which embed writes a FAISS IVF index for that kind beside the Parquet (0: always)."""

    def __post_init__(self) -> None:
        if self.ann_above < 0:
            raise ValueError(f"ann_above must be >= 0, got {self.ann_above}")


@dataclass(frozen=True, kw_only=True)
class NeighbourConfig:
    """How a query finds its nearest rows."""

    nprobe: int = 64
    """IVF cells a query scans where an approximate index is beside the table (more: slower, higher recall)."""
    exact: bool = False
    """Exact search by numpy even where an approximate index is beside the table."""

    def __post_init__(self) -> None:
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")


def nearest_numpy(block: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row indices) of the k best rows of ``block`` [N, E], best first (ties: the lower index first)."""
    return best_of(block @ query.astype(np.float32, copy=False), k)


def best_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices) of the k highest ``scores``, best first (ties: the lower index first)."""
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    order = best[np.lexsort((best, -scores[best]))]
    return scores[order], order


def ivf_lists(rows: int) -> int:
    """IVF lists for ``rows`` rows: 4·sqrt(rows), at most one per `TRAIN_PER_LIST` rows, at least 1."""
    return max(1, min(round(4 * math.sqrt(rows)), rows // TRAIN_PER_LIST))


def build_ivf(block: np.ndarray, seed: int = 0):
    """A trained and filled ``faiss.IndexIVFScalarQuantizer`` (8 bits a dimension, inner product) of ``block``'s
    rows, ids 0..N-1; k-means is trained on a random sample of at most `TRAIN_PER_LIST` rows per list."""
    import faiss

    rows, dim = block.shape
    lists = ivf_lists(rows)
    ivf = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    ivf.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(rows, min(rows, TRAIN_PER_LIST * lists), replace=False))
    ivf.train(np.ascontiguousarray(block[sample], dtype=np.float32))
    for at in range(0, rows, 262_144):  # in parts: no second copy of a non-float32 or strided block
        ivf.add(np.ascontiguousarray(block[at : at + 262_144], dtype=np.float32))
    return ivf


def nearest_ivf(
    ivf, vectors: Callable[[np.ndarray], np.ndarray], query: np.ndarray, k: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """As `nearest_numpy`, by an IVF index scanning its ``nprobe`` cells nearest the query; ``vectors(ids)`` gives
    the float32 rows of candidate ids, whose exact scores order the hits (fewer than k when the cells hold fewer)."""
    ivf.nprobe = nprobe
    xq = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
    _, found = ivf.search(xq, min(RERANK * k, ivf.ntotal))
    candidates = found[0][found[0] >= 0].astype(np.int64)
    if len(candidates) == 0:
        return np.zeros(0, np.float32), candidates
    scores, best = nearest_numpy(vectors(candidates), query, k)
    return scores, candidates[best]


def ivf_recall(ivf, block: np.ndarray, queries: np.ndarray, nprobe: int, own_rows=None, k: int = 10) -> float:
    """recall@k of ``ivf`` against exact search over ``block`` for ``queries`` [Q, E]: the share of each exact top k
    that the IVF search also returns. ``own_rows`` (Q row indices): the queries are these rows of ``block``, and
    each one's own row is left out of both results (any search finds it)."""
    found = 0
    for at, query in enumerate(queries):
        own = -1 if own_rows is None else int(own_rows[at])
        wanted = k + (own >= 0)
        _, exact = nearest_numpy(block, query, wanted)
        _, approx = nearest_ivf(ivf, lambda ids: block[ids], query, wanted, nprobe)
        exact_top = [row for row in exact.tolist() if row != own][:k]
        approx_top = [row for row in approx.tolist() if row != own][:k]
        found += len(set(exact_top) & set(approx_top))
    return found / max(1, k * len(queries))
