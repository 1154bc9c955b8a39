"""Text/video search over a Parquet table of embeddings: shard data sets indexed, text queries.

    python -m train.search embed --checkpoint RUN --data shards/msrvtt/test --out index.parquet
    python -m train.search query --checkpoint RUN --index index.parquet --text "a dog runs" -k 5

``embed`` writes one row per video (``kind = video``) and, for a shard data set, one row per text
(``kind = text``, every line of the text member). ``query`` embeds the query with the same
checkpoint and prints the top-k rows of the wanted kind by cosine similarity. Runs on CPU or GPU
(``--device``); checkpoints are read by train/checkpoint.py.

Raw video files (a folder to index, a file as the query) need preprocessing's decoder, so they are
handled one layer up, by launch/search.py: ``python -m launch.search`` is the search command that
takes every input, shard data sets and text queries through the functions here.

Table columns: kind, id, video (the clip id a row belongs to), text, source, embedding
(float32 list). The table's metadata records the checkpoint, embedding size and frame count,
and a query with a checkpoint of another embedding size is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import HelpFormatter
from pipeline.logs import setup_logging
from train.checkpoint import LoadedModel, load_model
from train.evaluate import embed_dataset, encode_texts

logger = logging.getLogger(__name__)

META_KEY = b"vidproxy.search"
KINDS = ("video", "text")


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True, kw_only=True)
class Index:
    """An embeddings table in memory."""

    kind: list[str]
    id: list[str]
    video: list[str]
    text: list[str]
    source: list[str]
    embeddings: np.ndarray
    """[rows, E] float32, L2-normalised."""
    meta: dict

    def __post_init__(self) -> None:
        object.__setattr__(self, "_kinds", np.asarray(self.kind))  # one conversion, not one per query

    def rows_of(self, kind: str) -> np.ndarray:
        return np.flatnonzero(self._kinds == kind)


def write_index(index: Index, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = index.embeddings.shape[1]
    flat = pa.array(index.embeddings.astype(np.float32).reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "kind": index.kind,
            "id": index.id,
            "video": index.video,
            "text": index.text,
            "source": index.source,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(index.meta).encode()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path)


def read_index(path: str) -> Index:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"index {path}: not a readable Parquet file ({exc})") from exc
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    missing = [c for c in ("kind", "id", "video", "text", "source", "embedding") if c not in table.column_names]
    if raw_meta is None or missing:
        raise ValueError(
            f"index {path}: not a table written by the search `embed` command (missing {missing or 'metadata'})"
        )
    column = table.column("embedding").combine_chunks()
    embeddings = column.values.to_numpy(zero_copy_only=False).reshape(len(table), -1).astype(np.float32)
    return Index(
        kind=table.column("kind").to_pylist(),
        id=table.column("id").to_pylist(),
        video=table.column("video").to_pylist(),
        text=table.column("text").to_pylist(),
        source=table.column("source").to_pylist(),
        embeddings=embeddings,
        meta=json.loads(raw_meta),
    )


def index_meta(loaded: LoadedModel, source: str) -> dict:
    return {
        "checkpoint": loaded.checkpoint,
        "embed_dim": int(loaded.model.clip.text_projection.shape[1]),
        "num_frames": loaded.num_frames,
        "image_size": loaded.image_size,
        "source": source,
    }


# ----------------------------------------------------------------------------- embedding a data set


def index_from_dataset(loaded: LoadedModel, location: str, text_field: str, batch_size: int, progress: bool) -> Index:
    emb = embed_dataset(loaded, location, text_field, batch_size, progress)
    n_videos = len(emb.clip_ids)
    seen: dict[int, int] = {}
    text_ids = []
    for v in emb.text_to_video:
        text_ids.append(f"{emb.clip_ids[v]}#{seen.get(v, 0)}")
        seen[v] = seen.get(v, 0) + 1
    return Index(
        kind=["video"] * n_videos + ["text"] * len(emb.texts),
        id=emb.clip_ids + text_ids,
        video=emb.clip_ids + [emb.clip_ids[v] for v in emb.text_to_video],
        text=[""] * n_videos + emb.texts,
        source=[location] * (n_videos + len(emb.texts)),
        embeddings=torch.cat([emb.videos, emb.text_embeddings]).numpy().astype(np.float32),
        meta=index_meta(loaded, location),
    )


# ----------------------------------------------------------------------------- querying


@dataclass(frozen=True, kw_only=True)
class Hit:
    rank: int
    score: float
    kind: str
    id: str
    video: str
    text: str


def top_k(index: Index, query: np.ndarray, kind: str, k: int) -> list[Hit]:
    """The k rows of ``kind`` most similar (cosine) to the L2-normalised query vector."""
    if query.shape[-1] != index.embeddings.shape[1]:
        raise ValueError(
            f"the query embedding has {query.shape[-1]} dims, the index {index.embeddings.shape[1]}: "
            f"embed and query with the same checkpoint (index made with {index.meta.get('checkpoint')})"
        )
    rows = index.rows_of(kind)
    if len(rows) == 0:
        hint = " (embed a shard data set to get texts)" if kind == "text" else ""
        raise ValueError(f"the index has no {kind} rows{hint}")
    contiguous = rows[-1] - rows[0] + 1 == len(rows)  # embed writes each kind as one block: no copy
    block = index.embeddings[rows[0] : rows[-1] + 1] if contiguous else index.embeddings[rows]
    scores = block @ query.astype(np.float32)
    k = min(k, len(scores))
    best = np.argpartition(-scores, k - 1)[:k]
    order = best[np.argsort(-scores[best], kind="stable")]
    return [
        Hit(
            rank=r + 1,
            score=float(scores[i]),
            kind=kind,
            id=index.id[rows[i]],
            video=index.video[rows[i]],
            text=index.text[rows[i]],
        )
        for r, i in enumerate(order)
    ]


def text_vector(loaded: LoadedModel, text: str) -> np.ndarray:
    """The L2-normalised embedding of a text query."""
    if not text.strip():
        raise ValueError("--text: empty query")
    return encode_texts(loaded, [text])[0].numpy()


def format_hits(hits: list[Hit]) -> str:
    lines = []
    for hit in hits:
        what = hit.id if hit.kind == "video" else f"{hit.text!r} ({hit.video})"
        lines.append(f"{hit.rank:3d}  {hit.score:+.4f}  {what}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

Option = tuple[str, str]
"""One more input flag for the command line: (flag, help)."""


def build_parser(
    prog: str = "python -m train.search",
    description: str | None = None,
    more_sources: tuple[Option, ...] = (),
    more_queries: tuple[Option, ...] = (),
) -> argparse.ArgumentParser:
    """The embed and query commands; ``more_sources`` and ``more_queries`` are further inputs
    (launch/search.py: video files), each exclusive with the ones here."""
    p = argparse.ArgumentParser(
        prog=prog, description=description or __doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("embed", "query"):
        s = sub.add_parser(name, formatter_class=HelpFormatter)
        s.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or weights file")
        s.add_argument("--config", help="training YAML (default: the run's config.yaml)")
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
        s.add_argument("--num-frames", type=int, help="frames per video (default: the training config's)")
    embed = sub.choices["embed"]
    src = embed.add_mutually_exclusive_group(required=True)
    for flag, help_text in more_sources:
        src.add_argument(flag, help=help_text)
    src.add_argument("--data", help="shard data set (folder or s3:// prefix): its videos and texts")
    embed.add_argument("--text", choices=("subtitle", "caption"), default="subtitle", help="text member of --data")
    embed.add_argument("--out", required=True, help="Parquet file to write")
    embed.add_argument("--batch-size", type=int, default=8, help="videos per forward pass")
    embed.add_argument("--no-progress", action="store_true", help="no progress bar")
    query = sub.choices["query"]
    query.add_argument("--index", required=True, help="Parquet table from `embed`")
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text query: returns videos")
    for flag, help_text in more_queries:
        what.add_argument(flag, help=help_text)
    query.add_argument(
        "--target", choices=KINDS, default=None, help="rows to return (text query: video; video query: video)"
    )
    query.add_argument("-k", type=int, default=5, help="results")
    query.add_argument("--json", action="store_true", help="print the hits as JSON")
    return p


def save_index(index: Index, path: str) -> None:
    """Write the table and say what it holds."""
    write_index(index, path)
    counts = {kind: index.kind.count(kind) for kind in KINDS}
    print(f"wrote {path}: {counts['video']} videos, {counts['text']} texts, {index.embeddings.shape[1]} dims")


def run_embed(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
    save_index(index_from_dataset(loaded, args.data, args.text, args.batch_size, not args.no_progress), args.out)
    return 0


def run_query(args: argparse.Namespace, query_vector: Callable[[LoadedModel], np.ndarray] | None = None) -> int:
    """Print the top-k hits; ``query_vector`` embeds the query (default: the ``--text`` query)."""
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    index = read_index(args.index)
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames or index.meta.get("num_frames"))
    vector = query_vector(loaded) if query_vector is not None else text_vector(loaded, args.text)
    hits = top_k(index, vector, args.target or "video", args.k)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], indent=1))
    else:
        print(format_hits(hits))
    return 0


def run_command(
    args: argparse.Namespace,
    embed: Callable[[argparse.Namespace], int] = run_embed,
    query: Callable[[argparse.Namespace], int] = run_query,
    name: str = "train.search",
) -> int:
    """Run the parsed command; a ValueError or OSError is printed as one line, exit status 2."""
    setup_logging("WARNING")
    try:
        return embed(args) if args.command == "embed" else query(args)
    except (ValueError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
