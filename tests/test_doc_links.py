"""Every relative link of the README and docs/*.md names a file of the repository, and its #anchor a heading there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.markdown import REPO, anchors, doc_files, fenced_blocks, links, prose_lines


def _problem(path: Path, target: str) -> str | None:
    """Why a link target does not resolve (None: it does, or it is not relative)."""
    if "://" in target or target.startswith("mailto:"):
        return None
    name, _, anchor = target.partition("#")
    file = (path.parent / name).resolve() if name else path
    if REPO not in file.parents and file != REPO:
        return f"{target}: outside the repository"
    if not file.exists():
        return f"{target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{target}: {file.relative_to(REPO)} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path):
    problems = [f"{path.relative_to(REPO)}:{line}: {why}" for line, t in links(path) if (why := _problem(path, t))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_path_points_outside_the_repository(path: Path):
    """A path in a code span that climbs out of the checkout (``../shared/...``) names nothing in a clone. The
    pages write paths from the repository root (`launch/pretrain.sh`), so that is what it is resolved against."""
    problems = [
        f"{path.relative_to(REPO)}:{line}: `{name}` is outside the repository"
        for line, text in prose_lines(path)
        for name in re.findall(r"`(\.\./[^`\s]*)`", text)
        if REPO not in (REPO / name).resolve().parents
    ]
    assert not problems, "\n".join(problems)


def test_link_checker_sees_bad_links(tmp_path: Path):
    """The checker itself: a missing file, a missing anchor and a path outside the repository are found."""
    page = REPO / "docs" / "training.md"
    assert _problem(page, "nothing-here.md") == "nothing-here.md: no such file"
    assert _problem(page, "model.md#no-such-heading").endswith("has no heading with the anchor #no-such-heading")
    assert _problem(page, "../../outside.md") == "../../outside.md: outside the repository"
    assert _problem(page, "model.md#pretrained-weights-trainpretrainedpy") is None
    assert _problem(page, "#resume") is None
    assert _problem(page, "https://example.com/x") is None


def test_readme_how_do_i_links_every_question():
    """The README's "How do I" list: one line per question, each linking into the docs."""
    text = (REPO / "README.md").read_text()
    section = text.split("## How do I", 1)[1].split("\n## ", 1)[0]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    wanted = ["resume", "MSR-VTT", "2 nodes", "search a folder", "verify a data set", "held-out set"]
    for word in wanted:
        assert any(word.lower() in item.lower() and "](" in item for item in items), f"no linked item for {word!r}"


def test_every_fence_is_closed():
    """A fence left open would swallow the rest of a page (and the markers in it)."""
    for path in doc_files():
        fenced_blocks(path)  # raises naming the line
