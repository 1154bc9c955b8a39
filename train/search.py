"""Text/video search over a Parquet table of embeddings: shard data sets indexed, text queries.

    python -m train.search embed --checkpoint RUN --data shards/msrvtt/test --out index.parquet
    python -m train.search query --checkpoint RUN --index index.parquet --text "a dog runs" -k 5

``embed`` writes one row per video (``kind = video``) and, for a shard data set, one row per text
(``kind = text``, every line of the text member); each row keeps its clip's id, span, source URL, caption
and subtitle, and a video row a strip of small thumbnails (train/search_index.py). ``query`` embeds the query
with the same checkpoint and prints the top-k rows of the wanted kind by cosine similarity (train/nearest.py:
numpy's exact search, or the FAISS IVF index that ``embed`` writes beside the table for a kind with more than
``--ann-above`` rows, train/search_ann.py), as text, ``--json`` or a ``--html`` page (train/search_hits.py).
Runs on CPU or GPU (``--device``); checkpoints are read by train/checkpoint.py.

Raw video files (a folder to index, a file as the query) need preprocessing's decoder, so they are
handled one layer up, by launch/search.py: ``python -m launch.search`` is the search command that
takes every input, shard data sets and text queries through the functions here.

The table's columns are train/search_index.py's; a query with a checkpoint of another embedding size
is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import HelpFormatter, add_flags, flag_values
from pipeline.logs import setup_logging
from pipeline.schema import ClipSample
from train.checkpoint import LoadedModel, load_model
from train.evaluate import embed_dataset, encode_texts
from train.nearest import AnnConfig, NeighbourConfig, best_of, nearest_ivf, nearest_numpy
from train.search_ann import LOW_RECALL, plan_ann, read_ann, side_file_note, side_head, write_side_files
from train.search_hits import Hit, format_hits, hits_json, make_hits, strips, write_hits_page
from train.search_index import (
    COLUMNS,
    KINDS,
    Index,
    StoredEmbeddings,
    ThumbConfig,
    read_index,
    rows_table,
    thumbnail_strip,
    write_index,
)

logger = logging.getLogger(__name__)

__all__ = ["Hit", "Index", "KINDS", "format_hits", "read_index", "top_k", "write_index"]


def index_meta(loaded: LoadedModel, source: str) -> dict:
    return {
        "checkpoint": loaded.checkpoint,
        "embed_dim": int(loaded.model.clip.text_projection.shape[1]),
        "num_frames": loaded.num_frames,
        "image_size": loaded.image_size,
        "source": source,
    }


# ----------------------------------------------------------------------------- embedding a data set


@dataclass
class ClipRows:
    """The columns of a data set's clips, gathered as `embed_dataset` passes them (manifest order)."""

    thumbs: ThumbConfig
    clips: list[dict] = field(default_factory=list)
    strips: list[list[bytes]] = field(default_factory=list)

    def visit(self, sample: ClipSample) -> None:
        meta = sample.meta
        self.clips.append(
            {
                "id": meta.clip_id,
                "video": meta.clip_id,
                "source": meta.source_uri,
                "start": float(meta.span[0]),
                "end": float(meta.span[1]),
                "caption": sample.caption.strip(),
                "subtitle": sample.subtitle.strip(),
            }
        )
        self.strips.append(thumbnail_strip(sample.frames, self.thumbs) if self.thumbs.frames else [])


def dataset_rows(clips: list[dict], texts: list[str], text_ids: list[str], owners: list[int]) -> dict[str, list]:
    """Index columns: one video row per clip, then one text row per text (its clip's span, source and texts)."""
    rows = [{**c, "kind": "video", "text": ""} for c in clips]
    rows += [{**clips[v], "kind": "text", "id": tid, "text": t} for t, tid, v in zip(texts, text_ids, owners)]
    return {name: [r[name] for r in rows] for name in COLUMNS}


def index_from_dataset(
    loaded: LoadedModel,
    location: str,
    text_field: str,
    batch_size: int,
    progress: bool,
    thumbs: ThumbConfig | None = None,
) -> Index:
    gathered = ClipRows(thumbs=thumbs or ThumbConfig())
    emb = embed_dataset(loaded, location, text_field, batch_size, progress, visit=gathered.visit)
    seen: dict[int, int] = {}
    text_ids = []
    for v in emb.text_to_video:
        text_ids.append(f"{emb.clip_ids[v]}#{seen.get(v, 0)}")
        seen[v] = seen.get(v, 0) + 1
    return Index(
        rows=rows_table(dataset_rows(gathered.clips, emb.texts, text_ids, emb.text_to_video)),
        embeddings=torch.cat([emb.videos, emb.text_embeddings]).numpy().astype(np.float32),
        meta=index_meta(loaded, location),
        thumbnails=gathered.strips + [[] for _ in emb.texts],
    )


# ----------------------------------------------------------------------------- querying


def top_k(index: Index, query: np.ndarray, kind: str, k: int, cfg: NeighbourConfig | None = None) -> list[Hit]:
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
    cfg = cfg or NeighbourConfig()
    ivf = None if cfg.exact or index.path is None else read_ann(index.path, kind, index.meta, len(rows))
    contiguous = rows[-1] - rows[0] + 1 == len(rows)  # embed writes each kind as one block
    if ivf is not None:
        scores, best = nearest_ivf(ivf, lambda ids: index.embeddings[rows[ids]], query, k, cfg.nprobe)
    elif contiguous and isinstance(index.embeddings, StoredEmbeddings):  # streamed past the query, group by group
        scores, best = best_of(index.embeddings.scores(rows[0], rows[-1] + 1, query.astype(np.float32)), k)
    else:
        block = index.embeddings[rows[0] : rows[-1] + 1] if contiguous else index.embeddings[rows]
        scores, best = nearest_numpy(block, query, k)
    return make_hits(index, rows[best], scores)


def text_vector(loaded: LoadedModel, text: str) -> np.ndarray:
    """The L2-normalised embedding of a text query."""
    if not text.strip():
        raise ValueError("--text: empty query")
    return encode_texts(loaded, [text])[0].numpy()


# ----------------------------------------------------------------------------- CLI

Option = tuple[str, str]
"""One more input flag for the command line: (flag, help)."""


def build_parser(
    prog: str = "python -m train.search",
    description: str | None = None,
    more_sources: tuple[Option, ...] = (),
    more_queries: tuple[Option, ...] = (),
    more_embed: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """The embed and query commands; ``more_sources`` and ``more_queries`` are further inputs
    (launch/search.py: video files), each exclusive with the ones here; ``more_embed`` adds embed flags."""
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
    add_flags(embed, ThumbConfig, dest="thumbs", prefix="thumb-")
    add_flags(embed, AnnConfig, dest="ann")
    if more_embed is not None:
        more_embed(embed)
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
    shown = query.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the hits as JSON")
    shown.add_argument("--html", metavar="OUT.html", help="write the hits as one self-contained HTML page")
    add_flags(query, NeighbourConfig, dest="neighbours")
    return p


def save_index(index: Index, path: str, ann: AnnConfig | None = None) -> None:
    """Write the table and, for each kind above ``ann.ann_above`` rows, its approximate index; say what they hold."""
    kinds = {kind: index.rows_of(kind) for kind in KINDS}
    planned = plan_ann(index.embeddings, kinds, ann or AnnConfig())
    write_index(index, path, planned)
    size = os.path.getsize(path)
    print(
        f"wrote {path}: {index.count('video')} videos, {index.count('text')} texts, "
        f"{index.embeddings.shape[1]} dims, {size / 1e6:.2f} MB"
    )
    for side in write_side_files(path, index.embeddings, kinds, planned):
        head = side_head(side)
        print(f"wrote {side}: {side_file_note(side, head)}")
        if head.get("recall_at_10", 1.0) < LOW_RECALL:
            logger.warning(
                "%s: recall@10 %.3f on this table's own rows, below %.2f: query with a higher --nprobe, or --exact",
                side,
                head["recall_at_10"],
                LOW_RECALL,
            )


def run_embed(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
    thumbs = ThumbConfig(**flag_values(args, "thumbs"))
    index = index_from_dataset(loaded, args.data, args.text, args.batch_size, not args.no_progress, thumbs)
    save_index(index, args.out, AnnConfig(**flag_values(args, "ann")))
    return 0


def run_query(args: argparse.Namespace, query_vector: Callable[[LoadedModel], np.ndarray] | None = None) -> int:
    """Print the top-k hits (or write them as a page); ``query_vector`` embeds the query (default: ``--text``)."""
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    neighbours = NeighbourConfig(**flag_values(args, "neighbours"))
    index = read_index(args.index)
    loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames or index.meta.get("num_frames"))
    vector = query_vector(loaded) if query_vector is not None else text_vector(loaded, args.text)
    hits = top_k(index, vector, args.target or "video", args.k, neighbours)
    if args.html:
        query = f"text {args.text!r}" if args.text is not None else f"{getattr(args, 'query_name', 'query')}"
        print(f"wrote {write_hits_page(args.html, query, index, hits)}: {len(hits)} hits")
    elif args.json:
        print(hits_json(hits, strips(index, hits)))
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
