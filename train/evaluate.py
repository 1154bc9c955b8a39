"""Retrieval evaluation of a checkpoint on a test data set: t2v and v2t R@1/5/10, MdR, MnR, with and without DSL.

    python -m train.evaluate --checkpoint runs/ft-msrvtt --data shards/msrvtt/test [--out results.json]
        [--html report.html]

One ordered pass over the data set (manifest order, no distributed padding or truncation). Every
non-empty line of a sample's text member is a query, so a video may have several texts (the
downstream converters store a video's texts one per line in ``subtitle.txt``; ``--text caption``
uses the single caption). DSL numbers use the whole test query set at once (transductive) and are
reported under ``dsl/`` keys, never mixed with the plain ones.

Checkpoints (``--checkpoint``): a training run folder, its ``checkpoints/`` folder or one tag
folder of it, or a weights file of ours or a released CLIP-ViP one, loaded strictly by
train/checkpoint.py. The model shape comes from ``--config`` (a training YAML), else from the run's
``config.yaml``. A checkpoint that does not fit that shape is refused with the list of mismatched tensors.

``--html``: one self-contained page (train/eval_report.py): the metric table, the run's recall plot, and a
sample of text queries with their top-5 clips as thumbnails, the correct one marked, failures first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import HelpFormatter, prog
from pipeline.logs import setup_logging
from pipeline.schema import ClipSample
from pipeline.shards import iter_dataset
from train.checkpoint import LoadedModel, load_model
from train.eval_report import (
    REPORT_CSS,
    clip_thumbnail,
    metrics_section,
    pick_queries,
    queries_section,
    recall_section,
)
from train.frames import normalize_frames
from train.html_page import esc, write_page
from train.metrics import retrieval_metrics
from train.sample_transform import SampleTransform, decode_batch
from train.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("subtitle", "caption")


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_frames(loaded: LoadedModel, frames_BTCHW_uint8: np.ndarray | Tensor) -> Tensor:
    """uint8 frames [B, T, 3, S, S] -> L2-normalised video embeddings [B, E] (float32, CPU)."""
    frames = torch.as_tensor(frames_BTCHW_uint8).to(loaded.device)
    return loaded.model.encode_video(normalize_frames(frames)).float().cpu()


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: list[str], batch_size: int = 256) -> Tensor:
    """Texts -> L2-normalised embeddings [N, E] (tokenised to the training context length)."""
    tokenizer = get_tokenizer(loaded.context_length)
    context = loaded.model.clip.context_length
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size])
        tokens = F.pad(tokens, (0, context - tokens.shape[1])).to(loaded.device)
        out.append(loaded.model.encode_text(tokens).float().cpu())
    return torch.cat(out) if out else torch.empty(0, loaded.model.clip.text_projection.shape[1])


def sample_texts(sample: ClipSample, text_field: str) -> list[str]:
    """The queries of a sample: each non-empty line of its text member."""
    raw = sample.subtitle if text_field == "subtitle" else sample.caption
    return [line.strip() for line in raw.splitlines() if line.strip()]


@dataclass(frozen=True, kw_only=True)
class Embedded:
    """Embeddings of a data set in manifest order."""

    clip_ids: list[str]
    videos: Tensor
    """[V, E]"""
    texts: list[str]
    text_embeddings: Tensor
    """[T, E]"""
    text_to_video: list[int]
    """Index of each text's video."""
    thumbnails: list[bytes] | None = None
    """One small JPEG per video (train/eval_report.py's clip_thumbnail), when asked for."""


def video_batches(samples: Iterator[ClipSample], transform: SampleTransform, batch_size: int):
    """(samples, uint8 frames [B, T, 3, S, S]) batches in order."""
    batch: list[ClipSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch, decode_batch(batch, transform)[0].views()[0]
            batch = []
    if batch:
        yield batch, decode_batch(batch, transform)[0].views()[0]


def embed_dataset(
    loaded: LoadedModel,
    location: str,
    text_field: str = "subtitle",
    batch_size: int = 16,
    progress: bool = True,
    max_videos: int | None = None,
    thumbnails: bool = False,
    visit: Callable[[ClipSample], None] | None = None,
) -> Embedded:
    """One ordered pass: every video and its texts, embedded; with ``thumbnails``, one small JPEG per video too
    (made from the sample's frames as it passes: no frames are held); ``visit`` sees each sample, in order."""
    from tqdm import tqdm

    transform = SampleTransform(loaded.num_frames, loaded.image_size)
    samples = iter_dataset(location)
    if max_videos is not None:
        samples = (s for i, s in zip(range(max_videos), samples))
    clip_ids, videos, texts, owners, thumbs = [], [], [], [], []
    with tqdm(desc="videos", unit="video", disable=not progress, file=sys.stderr) as bar:
        for batch, frames in video_batches(samples, transform, batch_size):
            videos.append(encode_frames(loaded, frames))
            for sample in batch:
                if visit is not None:
                    visit(sample)
                lines = sample_texts(sample, text_field)
                owners += [len(clip_ids)] * len(lines)
                texts += lines
                clip_ids.append(sample.meta.clip_id)
                if thumbnails:
                    thumbs.append(clip_thumbnail(sample.frames))
            bar.update(len(batch))
    if not clip_ids:
        raise ValueError(f"{location}: the data set has no samples")
    return Embedded(
        clip_ids=clip_ids,
        videos=torch.cat(videos),
        texts=texts,
        text_embeddings=encode_texts(loaded, texts),
        text_to_video=owners,
        thumbnails=thumbs if thumbnails else None,
    )


# ----------------------------------------------------------------------------- evaluation


def similarity(embedded: Embedded) -> np.ndarray:
    """Cosine similarity [texts, videos]."""
    return (embedded.text_embeddings @ embedded.videos.T).numpy()


def evaluate(embedded: Embedded) -> dict:
    """retrieval_metrics (plain and dsl/) plus counts."""
    if not embedded.texts:
        raise ValueError("no query texts: every sample's text member is empty (try --text caption or subtitle)")
    results = retrieval_metrics(similarity(embedded), embedded.text_to_video, dsl=True)
    results.update(
        {
            "videos": len(embedded.clip_ids),
            "texts": len(embedded.texts),
            "videos_without_text": len(embedded.clip_ids) - len(set(embedded.text_to_video)),
        }
    )
    return results


def format_results(results: dict) -> str:
    rows = ["                         R@1    R@5   R@10    MdR     MnR"]
    for prefix, title in (("", ""), ("dsl/", "DSL (uses the whole test query set at once: transductive)")):
        if title:
            rows.append(title)
        for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
            key = f"{prefix}{direction}"
            values = [results[f"{key}_r{k}"] for k in (1, 5, 10)] + [results[f"{key}_medr"], results[f"{key}_meanr"]]
            rows.append(f"  {name:<20}" + "".join(f"{v:7.1f}" for v in values))
    rows.append(
        f"{results['videos']} videos, {results['texts']} texts, {results['videos_without_text']} videos without text"
    )
    return "\n".join(rows)


def report_body(
    results: dict, embedded: Embedded, checkpoint: str, queries: int = 12, extra: tuple[str, ...] = ()
) -> str:
    """The HTML report's body: what was evaluated, the metrics, the recall plot, ``extra`` sections (trusted
    HTML), then ``queries`` sampled queries with thumbnails (the embedding must hold them)."""
    if embedded.thumbnails is None:
        raise ValueError("the HTML report needs thumbnails: embed_dataset(..., thumbnails=True)")
    about = f"Checkpoint {checkpoint}; data {results.get('data', '?')}; queries: the {results.get('text', '?')}"
    picked = pick_queries(similarity(embedded), embedded.text_to_video, embedded.texts, queries)
    sections = [
        f'<p class="meta">{esc(about)}</p>',
        metrics_section(results),
        recall_section(checkpoint),
        *extra,
        queries_section(picked, embedded.clip_ids, embedded.thumbnails, len(embedded.texts)),
    ]
    return "\n".join(sections)


def write_report(path: str, title: str, body: str) -> str:
    return write_page(path, title, body, css=REPORT_CSS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("python -m train.evaluate"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run folder, checkpoints folder, tag folder or weights file")
    p.add_argument("--data", required=True, help="test data set (folder or s3:// prefix with manifest.json)")
    p.add_argument("--config", help="training YAML giving the model shape (default: the run's config.yaml)")
    p.add_argument(
        "--text",
        choices=TEXT_FIELDS,
        default="subtitle",
        help="member holding the queries, one per line (downstream shards: subtitle)",
    )
    p.add_argument("--num-frames", type=int, help="frames per video (default: the training config's)")
    p.add_argument("--batch-size", type=int, default=16, help="videos per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--max-videos", type=int, help="only the first N videos (smoke tests)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--html", help="also write a self-contained HTML report here (metrics, recall plot, queries)")
    p.add_argument("--html-queries", type=int, default=12, help="text queries shown in the HTML report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.html_queries < 1:
        parser.error(f"--html-queries must be >= 1, got {args.html_queries}")
    for flag, path in (("--out", args.out), ("--html", args.html)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{flag} {path}: its folder does not exist")
    setup_logging("INFO")
    try:
        loaded = load_model(args.checkpoint, args.config, args.device, args.num_frames)
        embedded = embed_dataset(
            loaded, args.data, args.text, args.batch_size, not args.no_progress, args.max_videos, bool(args.html)
        )
        results = evaluate(embedded)
    except (ValueError, OSError) as exc:
        print(f"train.evaluate: error: {exc}", file=sys.stderr)
        return 2
    results.update(
        {"checkpoint": loaded.checkpoint, "data": args.data, "text": args.text, "num_frames": loaded.num_frames}
    )
    print(format_results(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if args.html:
        body = report_body(results, embedded, args.checkpoint, args.html_queries)
        print(f"wrote {write_report(args.html, 'Retrieval evaluation', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
