"""The boundaries of docs/architecture.md, checked on the source: a change that crosses one fails here.

- pipeline/ (the contract) imports neither torch, ray nor deepspeed;
- train/ and preprocess/ never import each other (launch/ is the layer above both);
- one module imports ray (preprocess/job.py), one imports deepspeed (train/engine.py);
- train/model.py imports nothing else from train/;
- only pipeline/storage.py compares URI schemes;
- no two modules import each other, directly or round a longer circle (function-level imports too);
- preprocess/'s stages have folders: the fetcher, the text side and the scores are not back in the flat top level.
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


def project_imports(sources: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module path -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg/mod.py``)."""
    by_name = {path[:-3].replace("/", ".").removesuffix(".__init__"): path for path in sources}
    graph = {}
    for path, tree in sources.items():
        names = set(imported(tree))
        for node in ast.walk(tree):  # relative imports do not occur; ``from preprocess.fetching import http``
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
        graph[path] = {by_name[name] for name in names if name in by_name and by_name[name] != path}
        graph[path] = {dep for dep in graph[path] if not dep.endswith("__init__.py")}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports (its modules in order), or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circles(sources):
    assert import_cycle(project_imports(sources)) == []


@pytest.mark.parametrize(
    "module", ["fetch", "fetch_ytdlp", "host_gate", "sources", "texts", "text_join", "text_stages", "captions", "asr"]
)
def test_preprocess_stages_live_in_their_folders(module):
    assert not (REPO / "preprocess" / f"{module}.py").exists()


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
    circle = {"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}, "d.py": {"a.py"}}
    assert import_cycle(circle) == ["a.py", "b.py", "c.py", "a.py"]
    assert import_cycle({"a.py": {"b.py"}, "b.py": set()}) == []
    lazy = {"x/f.py": ast.parse("def g():\n    from x import h\n"), "x/h.py": ast.parse("from x.f import g\n")}
    assert import_cycle(project_imports(lazy)) == ["x/f.py", "x/h.py", "x/f.py"]
