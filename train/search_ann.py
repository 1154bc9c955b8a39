"""The approximate index of a search table's rows of one kind: a FAISS IVF file beside the Parquet.

``embed`` writes ``<index>.parquet.<kind>.faiss`` for each kind with more than ``--ann-above`` rows. The file
is one header line (``vidproxy-ann 1``), one JSON line (kind, rows, dims, lists, fingerprint) and the index as
``faiss.write_index`` writes it. The fingerprint is the SHA-256 of that kind's float32 embeddings in row order;
the Parquet's metadata records the same fingerprint (``ann``: {kind: {rows, fingerprint}}), written in the same
``embed``, so a query compares two short strings, not 2 GB of rows.

A side file, not a Parquet column: the index is one opaque blob of a quarter of the embeddings' size (528 MB at
1M x 512), which a Parquet cell would hold whole in Arrow memory before FAISS copied it again (and a binary cell
stops at 2 GB, 4M rows), while FAISS reads the file as a stream; an ``--exact`` query and a reader without FAISS
never touch it, and it can be rebuilt without rewriting the table.

A side file that does not match its table (the Parquet was rewritten with other rows) is refused with one line
naming it, rather than searched or silently skipped: its hits would be another table's rows, and falling back to
numpy would turn a 1 ms query over millions of rows into a second with only a warning to say why. ``--exact``
queries the table anyway; embedding again rewrites (or, under ``--ann-above`` rows, deletes) the file. A table
whose metadata names a side file that is missing is searched exactly, with a warning (copying only the Parquet
is a fair way to move an index).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from train.nearest import RECALL_QUERIES, AnnConfig, NeighbourConfig, build_ivf, ivf_recall

logger = logging.getLogger(__name__)

MAGIC = b"vidproxy-ann 1\n"
LOW_RECALL = 0.9
"""Below this recall@10, measured when the index is built, embed warns (raise --nprobe, or query --exact)."""


def ann_path(index_path: str, kind: str) -> str:
    return f"{index_path}.{kind}.faiss"


def fingerprint(block: np.ndarray) -> str:
    """SHA-256 of the rows' float32 bytes, in row order, a part at a time (no copy of the whole block)."""
    digest = hashlib.sha256()
    for at in range(0, len(block), 65536):
        digest.update(np.ascontiguousarray(block[at : at + 65536], dtype=np.float32).tobytes())
    return digest.hexdigest()


def plan_ann(embeddings: np.ndarray, kinds: dict[str, np.ndarray], cfg: AnnConfig) -> dict[str, dict]:
    """{kind: {rows, fingerprint}} for each kind with more than ``cfg.ann_above`` rows (the table's ``ann``)."""
    return {
        kind: {"rows": len(rows), "fingerprint": fingerprint(embeddings[rows])}
        for kind, rows in kinds.items()
        if len(rows) > cfg.ann_above
    }


def write_ann(index_path: str, kind: str, block: np.ndarray, planned: dict, others: np.ndarray) -> str:
    """Build and write the IVF index of one kind's rows beside the table, with its recall measured on this
    table's own rows (`measure_recall`); returns the file's path."""
    import faiss

    ivf = build_ivf(block)
    head = {"kind": kind, "rows": len(block), "dim": block.shape[1], "lists": ivf.nlist, **planned}
    head |= measure_recall(ivf, block, others)
    path = ann_path(index_path, kind)
    with open(path + ".part", "wb") as out:
        out.write(MAGIC + json.dumps(head).encode() + b"\n")
        faiss.write_index(ivf, faiss.PyCallbackIOWriter(out.write))
    os.replace(path + ".part", path)
    return path


def measure_recall(ivf, block: np.ndarray, others: np.ndarray, seed: int = 0) -> dict:
    """recall@10 of ``ivf`` at the default ``--nprobe`` on this table's data, for the header and the embed log.

    Queries: up to `RECALL_QUERIES` rows of the other kind (a text row queries the video rows: the search people
    run) where the table has them, else rows of ``block`` itself, each leaving its own row out. Random vectors
    have no neighbourhoods and real embeddings do, so a bench on synthetic rows cannot say this for a user's data.
    """
    rng = np.random.default_rng(seed)
    nprobe = NeighbourConfig().nprobe
    if len(others):
        picks = rng.choice(len(others), min(RECALL_QUERIES, len(others)), replace=False)
        recall = ivf_recall(ivf, block, others[np.sort(picks)], nprobe)
        by = "rows of the other kind"
    else:
        picks = np.sort(rng.choice(len(block), min(RECALL_QUERIES, len(block)), replace=False))
        recall = ivf_recall(ivf, block, block[picks], nprobe, own_rows=picks)
        by = "rows of its own kind"
    return {"recall_at_10": round(recall, 4), "recall_nprobe": nprobe, "recall_queries": len(picks), "recall_by": by}


def write_side_files(index_path: str, embeddings: np.ndarray, kinds: dict[str, np.ndarray], ann: dict) -> list[str]:
    """Write the planned side files of a table just written, and delete its old ones of the other kinds."""
    written = []
    for kind, rows in kinds.items():
        if kind in ann:
            other = np.concatenate([r for k, r in kinds.items() if k != kind] or [np.zeros(0, np.int64)])
            written.append(write_ann(index_path, kind, embeddings[rows], ann[kind], embeddings[other]))
        elif os.path.exists(ann_path(index_path, kind)):
            os.remove(ann_path(index_path, kind))
    return written


def read_ann(index_path: str, kind: str, meta: dict, rows: int):
    """The IVF index of ``kind``'s rows beside the table, or None where there is none; raises ValueError for a
    side file that does not belong to the table."""
    import faiss

    path = ann_path(index_path, kind)
    wanted = (meta.get("ann") or {}).get(kind)
    if not os.path.exists(path):
        if wanted:
            logger.warning("index %s: its approximate index %s is missing; searching exactly", index_path, path)
        return None
    with open(path, "rb") as f:
        head = read_head(f)
        if (
            head is None
            or wanted is None
            or head.get("fingerprint") != wanted.get("fingerprint")
            or head["rows"] != rows
        ):
            raise ValueError(
                f"{path}: approximate index of other rows than {index_path} ({kind} rows: {rows} in the table, "
                f"{head.get('rows') if head else '?'} in the file); embed again, delete it, or query with --exact"
            )
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))


def side_head(path: str) -> dict:
    """The header of a side file (empty where it is not one)."""
    with open(path, "rb") as f:
        return read_head(f) or {}


def side_file_note(path: str, head: dict) -> str:
    """The embed log's line for a side file just written: its cells, size and measured recall."""
    note = f"approximate index (FAISS IVF, {head.get('lists')} cells), {os.path.getsize(path) / 1e6:.2f} MB"
    if "recall_at_10" in head:
        note += (
            f", recall@10 {head['recall_at_10']:.3f} at --nprobe {head['recall_nprobe']} "
            f"({head['recall_queries']} queries by {head['recall_by']})"
        )
    return note


def read_head(f) -> dict | None:
    """The JSON header of an open side file, or None where it is not one."""
    if f.readline() != MAGIC:
        return None
    try:
        head = json.loads(f.readline())
    except ValueError:
        return None
    return head if isinstance(head, dict) and "rows" in head else None
