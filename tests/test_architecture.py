"""The boundaries of docs/architecture.md, checked on the source: a change that crosses one fails here.

- pipeline/ (the contract) imports neither torch, ray nor deepspeed;
- train/ and preprocess/ never import each other (launch/ is the layer above both);
- one module imports ray (preprocess/job.py), one imports deepspeed (train/engine.py);
- train/model.py imports nothing else from train/;
- only pipeline/storage.py compares URI schemes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "preprocess", "train", "launch")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")
SCHEME_NAMES = {"s3", "file", "http", "https", "gs"}


def modules() -> dict[str, ast.Module]:
    """Every Python module of the packages, by path relative to the repository."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[str(path.relative_to(REPO))] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module) -> set[str]:
    """Dotted names of everything a module imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def scheme_checks(tree: ast.Module) -> list[int]:
    """Line numbers that compare a URI scheme: ``x == "s3"``, ``.startswith("s3://")``, ``.scheme``."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            if any(isinstance(v, str) and (v in SCHEME_NAMES or SCHEME.match(v)) for v in consts):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith", "removeprefix", "partition", "split"):
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                if any(isinstance(v, str) and (SCHEME.match(v) or v == "://") for v in args):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "scheme":
            lines.append(node.lineno)
    return lines


@pytest.fixture(scope="module")
def sources() -> dict[str, ast.Module]:
    return modules()


def test_pipeline_imports_no_framework(sources):
    bad = {
        path: sorted(top_level(imported(tree)) & {"torch", "ray", "deepspeed"})
        for path, tree in sources.items()
        if path.startswith("pipeline/")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_train_and_preprocess_meet_only_in_pipeline(sources):
    crossings = []
    for path, tree in sources.items():
        side = path.split("/")[0]
        other = {"train": "preprocess", "preprocess": "train"}.get(side)
        if other and other in top_level(imported(tree)):
            crossings.append(path)
    assert not crossings


@pytest.mark.parametrize("framework, owner", [("ray", "preprocess/job.py"), ("deepspeed", "train/engine.py")])
def test_one_module_imports_each_framework(sources, framework, owner):
    importers = sorted(path for path, tree in sources.items() if framework in top_level(imported(tree)))
    assert importers == [owner]


def test_model_imports_nothing_else_from_train(sources):
    assert not [name for name in imported(sources["train/model.py"]) if name.split(".")[0] == "train"]


def test_only_storage_knows_uri_schemes(sources):
    found = {path: scheme_checks(tree) for path, tree in sources.items() if path != "pipeline/storage.py"}
    assert not {path: lines for path, lines in found.items() if lines}


def test_the_checks_see_violations():
    """The detectors themselves: each finds what it is meant to find (so the tests above can fail)."""
    tree = ast.parse(
        "import ray\n"
        "def f(uri, loc):\n"
        "    from train.model import VideoCLIP\n"
        "    import torch.nn\n"
        "    if loc.scheme == 's3': pass\n"
        "    if uri.startswith('file://'): pass\n"
        "    return 'x' != 'gs'\n"
    )
    assert top_level(imported(tree)) == {"ray", "train", "torch"}
    assert "train.model.VideoCLIP" in imported(tree)
    assert sorted(scheme_checks(tree)) == [5, 5, 6, 7]
