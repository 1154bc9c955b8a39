"""What a search hit shows, as text, as JSON and as a self-contained HTML page.

A hit carries its score, row kind and id, the clip or file it belongs to (``video``), its source (file path
or the clip's source URL), its span (start and end seconds, shown as ``hh:mm:ss.mmm``), the clip's caption and
subtitle (when there are any), a text row's own text, and ``row``: its row in the index, whose ``thumbnails``
column holds its frame strip (a text row shows its clip's video row's strip). The JSON record has these fields
and ``span``, and ``thumbnails``: the strip's JPEGs as ``data:`` URIs (an ``<img src>`` as it is, the page's own
images), so a JSON consumer shows what the page shows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from train import html_page
from train.search_index import Index, thumbnails_of


@dataclass(frozen=True, kw_only=True)
class Hit:
    rank: int
    score: float
    kind: str
    id: str
    video: str
    source: str
    start: float
    end: float
    text: str
    caption: str
    subtitle: str
    row: int
    """The hit's row in the index."""


def clock(seconds: float) -> str:
    """Seconds -> ``hh:mm:ss.mmm``."""
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def span_text(hit: Hit) -> str:
    return f"{clock(hit.start)}-{clock(hit.end)}"


def make_hits(index: Index, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    """Hits for index rows (best first) and their scores."""
    return [
        Hit(rank=rank + 1, score=float(score), row=int(row), **index.row(int(row)))
        for rank, (row, score) in enumerate(zip(rows, scores))
    ]


def strips(index: Index, hits: list[Hit]) -> dict[int, list[bytes]]:
    """{hit row: frame strip}; a text row's strip is its clip's video row's."""
    shown = {h.row: (index.video_row(h.video) if h.kind == "text" else h.row) for h in hits}
    found = thumbnails_of(index, sorted({r for r in shown.values() if r is not None}))
    return {row: found.get(source, []) if source is not None else [] for row, source in shown.items()}


# ----------------------------------------------------------------------------- text and JSON


def format_hits(hits: list[Hit]) -> str:
    """Two to four lines per hit: rank, score, what and where; then its texts."""
    lines = []
    for hit in hits:
        what = hit.id if hit.kind == "video" else f"{hit.text!r} ({hit.video})"
        lines.append(f"{hit.rank:3d}  {hit.score:+.4f}  {what}  {span_text(hit)}")
        lines.append(f"{'':15}source: {hit.source}")
        lines += [f"{'':15}{name}: {value}" for name, value in texts_of(hit)]
    return "\n".join(lines)


def texts_of(hit: Hit) -> list[tuple[str, str]]:
    """(name, text) of the caption and subtitle a hit's clip has (one line each)."""
    named = (("caption", hit.caption), ("subtitle", hit.subtitle))
    return [(name, " / ".join(value.split("\n"))) for name, value in named if value]


def hits_json(hits: list[Hit], shown: dict[int, list[bytes]]) -> str:
    """The hits as a JSON list; ``shown``: {hit row: its frame strip} (`strips`)."""
    records = [
        {**dataclasses.asdict(h), "span": span_text(h), "thumbnails": thumbnail_uris(shown.get(h.row, []))}
        for h in hits
    ]
    return json.dumps(records, indent=1, ensure_ascii=False)


def thumbnail_uris(strip: list[bytes]) -> list[str]:
    return [html_page.data_uri(jpeg, "image/jpeg") for jpeg in strip]


# ----------------------------------------------------------------------------- the page


def hit_html(hit: Hit, strip: list[bytes]) -> str:
    esc = html_page.esc
    label = f"hit {hit.rank}: {hit.id}"
    pictures = html_page.frame_strip(strip, label) if strip else '<div class="meta">(no thumbnails)</div>'
    head = (
        f'<div class="meta">#{hit.rank} <span class="score">{hit.score:+.4f}</span> '
        f'<span class="span">{esc(span_text(hit))}</span> {esc(hit.kind)} {esc(hit.id)}</div>'
    )
    texts = [("text", hit.text)] if hit.kind == "text" else []
    body = "".join(f'<div class="text"><b>{esc(name)}</b>: {esc(value)}</div>' for name, value in texts + texts_of(hit))
    return f'<div class="hit">{head}{pictures}<div class="meta">source: {esc(hit.source)}</div>{body}</div>'


def write_hits_page(path: str, query: str, index: Index, hits: list[Hit]) -> str:
    """One self-contained HTML page of a query's hits (frame strips inline); returns ``path``."""
    shown = strips(index, hits)
    where = html_page.esc(index.path or "an index in memory")
    intro = f'<p class="meta">{len(hits)} hits for {html_page.esc(query)} in {where}</p>'
    body = intro + "\n".join(hit_html(h, shown[h.row]) for h in hits)
    return html_page.write_page(path, f"Search: {query}", body)
