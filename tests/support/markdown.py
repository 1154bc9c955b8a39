"""What the doc tests read from the README and docs/*.md: fenced blocks (with the runnable marker), relative links
and the anchors GitHub gives headings.

The runnable marker is an HTML comment alone on the line right before a fenced block::

    <!-- runs-on-demo -->
    ```bash
    python -m train.evaluate --checkpoint demo_out/run --data demo_out/shards/heldout
    ```

GitHub (and every CommonMark renderer) shows nothing for the comment and renders the block as any other ``bash``
block; an extra word in the info string (```` ```bash runnable ````) would also be hidden by GitHub, which reads
only the first word, but not by every renderer or editor, and the comment says what the block needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- runs-on-demo -->"
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True, kw_only=True)
class Block:
    """One fenced block of a markdown file."""

    path: Path
    """the file"""
    line: int
    """1-based line of the opening fence"""
    info: str
    """the info string (``bash``, empty, ...)"""
    text: str
    """the block's content, without the fences"""
    runnable: bool
    """marked with MARKER on the line before the fence"""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    """The README and every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in order; an unclosed fence is an error naming its line."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group(1), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        if end is None:
            raise ValueError(f"{path}:{start + 1}: fenced block never closed")
        marked = start > 0 and lines[start - 1].strip() == MARKER
        text = "\n".join(lines[start + 1 : end]) + "\n"
        blocks.append(Block(path=path, line=start + 1, info=match.group(2).strip(), text=text, runnable=marked))
        i = end + 1
    return blocks


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, line) of the lines outside fenced blocks."""
    inside, fence, out = False, "", []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _FENCE.match(line)
        if match and not inside:
            inside, fence = True, match.group(1)
        elif inside and line.strip().startswith(fence):
            inside = False
        elif not inside:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link outside code (spans and blocks), images left out."""
    found = []
    for number, line in prose_lines(path):
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
            found.append((number, target))
    return found


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of the file's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated one suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(2).strip().lower()).replace(" ", "-")
        count = seen.get(slug)
        seen[slug] = 0 if count is None else count + 1
        if count is not None:
            seen[f"{slug}-{count + 1}"] = 0
    return set(seen)
