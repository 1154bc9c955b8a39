"""Self-contained HTML pages (search hits, evaluation reports): escaping, inline images, one page shell.

Every image is a ``data:`` URI, so a page is one file that opens anywhere with no network and no
folder beside it. Pages are built from strings; the callers (train/search.py, train/evaluate.py)
choose what goes in them.
"""

from __future__ import annotations

import base64
import html

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.hit { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }
.hit.correct { border-color: #2a8a2a; background: #f2fbf2; }
.strip img { height: 96px; margin-right: 3px; border-radius: 3px; }
.meta { color: #555; font-size: 0.9em; } .text { margin: 0.3em 0; }
.score { font-weight: 600; }
"""


def esc(value: object) -> str:
    """Text -> HTML-safe text (quotes included, for attributes)."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(data: bytes, alt: str, mime: str = "image/jpeg", css_class: str = "") -> str:
    """An <img> whose pixels are inline; ``alt`` says what it shows when it cannot be drawn."""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f'<img{cls} src="{data_uri(data, mime)}" alt="{esc(alt)}">'


def frame_strip(jpegs: list[bytes], alt: str) -> str:
    """A row of JPEG frames (a clip's frames, or one thumbnail)."""
    images = "".join(img(data, f"{alt}, frame {i + 1} of {len(jpegs)}") for i, data in enumerate(jpegs))
    return f'<div class="strip">{images}</div>'


def table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, css: str = "") -> str:
    """A whole HTML document: ``body`` is trusted HTML built with the helpers above; ``css`` adds to PAGE_CSS."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{PAGE_CSS}{css}</style></head>\n"
        f"<body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def write_page(path: str, title: str, body: str, css: str = "") -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(page(title, body, css))
    return path
