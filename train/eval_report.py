"""The evaluation report page (``train.evaluate --html``, the demo's report.html): metric table, recall plot, and
what a sample of text queries retrieved, as thumbnails.

Queries shown: the failures first (the correct clip is not at rank 1), worst rank first, then the successes in
data-set order. Each shows its top-k clips best first, the correct one marked; a correct clip ranked below the
top k is shown after them with its rank. A clip's thumbnail is one small JPEG: a few of its frames side by
side (`clip_thumbnail`), made while the data set is embedded so that no frames are held.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from train.html_page import esc, img, table
from train.metrics import t2v_ranks
from train.run_layout import RunLayout

THUMB_FRAMES = 3
"""Frames side by side in a clip's thumbnail (first, middle, last)."""
THUMB_HEIGHT = 64
"""Pixels; the page scales a thumbnail to its column (6 per row: the top 5 and a correct clip ranked below)."""
THUMB_QUALITY = 80

REPORT_CSS = """
.query { border-top: 1px solid #ddd; padding: 0.6em 0; }
.query .text { font-size: 1.05em; font-weight: 600; }
.hits { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 0.5em; }
.hits .hit { margin: 0.3em 0; padding: 0.3em; font-size: 0.85em; overflow-wrap: anywhere; }
.hits .hit img { display: block; width: 100%; height: auto; }
.mark { color: #2a8a2a; font-weight: 700; }
.missed { border-style: dashed; }
.failure .rank { color: #b03030; font-weight: 600; } .success .rank { color: #2a8a2a; font-weight: 600; }
.plot { max-width: 100%; }
.note { color: #8a5a00; }
"""


@dataclass(frozen=True, kw_only=True)
class QueryResult:
    """One text query: what it retrieved and where its correct clip landed."""

    text: str
    correct: int
    """Index of its clip."""
    rank: int
    """1-based rank of the correct clip (metrics.py's optimistic tie rule)."""
    top: list[tuple[int, float]]
    """(clip index, similarity) of the best clips, best first."""


def clip_thumbnail(frames: Sequence[bytes], count: int = THUMB_FRAMES, height: int = THUMB_HEIGHT) -> bytes:
    """A clip's JPEG frames -> one small JPEG of ``count`` of them (evenly spread) side by side, ``height`` px."""
    from PIL import Image

    picks = sorted({int(i) for i in np.linspace(0, len(frames) - 1, count).round()})
    scaled = []
    for i in picks:
        with Image.open(io.BytesIO(frames[i])) as frame:
            rgb = frame.convert("RGB")
        scaled.append(rgb.resize((max(1, round(rgb.width * height / rgb.height)), height)))
    gap = 2
    strip = Image.new("RGB", (sum(s.width for s in scaled) + gap * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for frame in scaled:
        strip.paste(frame, (x, 0))
        x += frame.width + gap
    out = io.BytesIO()
    strip.save(out, format="JPEG", quality=THUMB_QUALITY)
    return out.getvalue()


def pick_queries(
    similarity_TV: np.ndarray, text_to_video: Sequence[int], texts: Sequence[str], count: int = 12, top_k: int = 5
) -> list[QueryResult]:
    """Up to ``count`` queries: failures worst rank first, then successes, each with its ``top_k`` clips."""
    similarity_TV = np.asarray(similarity_TV, dtype=np.float64)
    owners = np.asarray(text_to_video, dtype=np.int64)
    ranks = t2v_ranks(similarity_TV, owners)
    order = sorted(range(len(texts)), key=lambda t: (ranks[t] == 1, -ranks[t], t))[:count]
    picked = []
    for t in order:
        best = np.argsort(-similarity_TV[t], kind="stable")[:top_k]
        picked.append(
            QueryResult(
                text=texts[t],
                correct=int(owners[t]),
                rank=int(ranks[t]),
                top=[(int(v), float(similarity_TV[t, v])) for v in best],
            )
        )
    return picked


def run_folder(checkpoint: str) -> str | None:
    """The training run folder a checkpoint path lies in (the run folder itself, its checkpoints folder, a tag
    folder or a file inside one), or None for a checkpoint outside any run (a bare weights file)."""
    path = os.path.abspath(checkpoint)
    candidate = path
    for _ in range(4):  # a weights file is at most three levels below its run folder
        checkpoints = RunLayout(candidate).checkpoints.path
        inside = path in (candidate, checkpoints) or path.startswith(checkpoints + os.sep)
        if inside and os.path.isdir(checkpoints):
            return candidate
        candidate = os.path.dirname(candidate)
    return None


def metrics_table(results: dict) -> str:
    rows = []
    for prefix, suffix in (("", ""), ("dsl/", " (DSL)")):
        for direction, name in (("t2v", "text → video"), ("v2t", "video → text")):
            key = f"{prefix}{direction}"
            values = [results[f"{key}_r{k}"] for k in (1, 5, 10)] + [results[f"{key}_medr"], results[f"{key}_meanr"]]
            rows.append([name + suffix] + [f"{v:.1f}" for v in values])
    return table(["", "R@1", "R@5", "R@10", "MdR", "MnR"], rows)


def metrics_section(results: dict) -> str:
    counts = (
        f"{results['videos']} clips, {results['texts']} text queries, "
        f"{results['videos_without_text']} clips without text (gallery only)."
    )
    return (
        "<h2>Retrieval metrics</h2>\n"
        f"{metrics_table(results)}\n"
        f'<p class="meta">{esc(counts)} R@k in percent; MdR / MnR: median / mean rank. DSL (dual softmax) uses '
        "the whole test query set at once (transductive).</p>"
    )


def plot_section(title: str, png: str | None, missing: str) -> str:
    """A PNG plot inlined, or the reason there is none (``missing``)."""
    if png and os.path.isfile(png):
        with open(png, "rb") as f:
            data = f.read()
        picture = img(data, f"{title} ({os.path.basename(png)})", mime="image/png", css_class="plot")
        return f"<h2>{esc(title)}</h2>\n{picture}"
    return f'<h2>{esc(title)}</h2>\n<p class="note">{esc(missing)}</p>'


def recall_section(checkpoint: str) -> str:
    run = run_folder(checkpoint)
    if run is None:
        missing = (
            f"No recall plot: {checkpoint} is a bare checkpoint with no training run folder around it, "
            "so there is no run history to plot."
        )
        return plot_section("Recall during training", None, missing)
    plot = RunLayout(run).recall_plot
    missing = f"No recall plot: the run folder {run} has no {os.path.basename(plot)} (written when a run ends)."
    return plot_section("Recall during training", plot, missing)


def hit_html(clip_id: str, thumbnail: bytes, caption: str, correct: bool, missed: bool = False) -> str:
    classes = "hit" + (" correct" if correct else "") + (" missed" if missed else "")
    mark = ' <span class="mark">✓ correct</span>' if correct else ""
    picture = img(thumbnail, f"clip {clip_id}")
    label = f'<div>{esc(caption)}{mark}</div><div class="meta">{esc(clip_id)}</div>'
    return f'<div class="{classes}">{picture}{label}</div>'


def query_html(query: QueryResult, clip_ids: Sequence[str], thumbnails: Sequence[bytes]) -> str:
    status = "success" if query.rank == 1 else "failure"
    hits = [
        hit_html(clip_ids[v], thumbnails[v], f"#{i + 1} · {score:.3f}", v == query.correct)
        for i, (v, score) in enumerate(query.top)
    ]
    if query.rank > len(query.top):
        hits.append(
            hit_html(clip_ids[query.correct], thumbnails[query.correct], f"rank {query.rank}", True, missed=True)
        )
    rank = f"correct clip {clip_ids[query.correct]} at rank {query.rank} of {len(clip_ids)}"
    return (
        f'<div class="query {status}"><div class="text">{esc(query.text)}</div>'
        f'<div class="rank">{esc(rank)}</div><div class="hits">{"".join(hits)}</div></div>'
    )


def queries_section(
    queries: Sequence[QueryResult], clip_ids: Sequence[str], thumbnails: Sequence[bytes], total: int
) -> str:
    failures = sum(q.rank > 1 for q in queries)
    intro = (
        f"{len(queries)} of {total} text queries: {failures} failures first (correct clip not at rank 1, worst "
        "first), then successes. Each row: the top clips, best first, with their similarity; thumbnails show the "
        "first, middle and last frame. A correct clip below the top is shown last, dashed, with its rank."
    )
    rows = "\n".join(query_html(q, clip_ids, thumbnails) for q in queries)
    return f'<h2>Queries</h2>\n<p class="meta">{esc(intro)}</p>\n{rows}'
