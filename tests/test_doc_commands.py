"""The commands the README and docs/*.md mark as runnable on the demo's outputs run, and exit 0.

A fenced block marked ``<!-- runs-on-demo -->`` (tests/support/markdown.py says why an HTML comment) is run as one
bash script (``set -euo pipefail``), from a folder where ``demo_out`` is the demo's output folder and every top-level
entry of the repository is a link to it: the commands read as a newcomer types them at the repository root after
``make demo``, and what they write goes to that folder or into the demo's outputs, never into the checkout.

The demo's outputs are made once per session (``python -m launch.demo`` with .ci/run's sizes); set
``VIDPROXY_DEMO_OUT`` to an existing demo output folder to reuse it instead (it is then left as it is).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.markdown import REPO, doc_files, fenced_blocks
from tests.support.tiers import marks_users

DEMO_ARGS = ["--videos", "8", "--heldout-videos", "4", "--steps", "6"]  # .ci/run's short demo
BLOCKS = [block for path in doc_files() for block in fenced_blocks(path) if block.runnable]


@pytest.fixture(scope="session")
@marks_users("slow", "ray", "deepspeed")
def demo_out(tmp_path_factory) -> Path:
    """The demo's output folder: made once (a local Ray cluster, 2 DeepSpeed CPU ranks) and removed at the end, or
    VIDPROXY_DEMO_OUT's."""
    given = os.environ.get("VIDPROXY_DEMO_OUT")
    if given:
        out = Path(given).resolve()
        assert (out / "run").is_dir() and (out / "shards" / "heldout" / "manifest.json").exists(), (
            f"VIDPROXY_DEMO_OUT={given}: not a demo output folder (no run/ or shards/heldout/manifest.json)"
        )
        yield out
        return
    folder = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "launch.demo", "--out", str(folder / "demo_out"), *DEMO_ARGS]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, f"the demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        yield folder / "demo_out"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir(demo_out: Path, tmp_path_factory) -> Path:
    """A stand-in for the repository root: its top-level entries linked, and demo_out the demo's outputs."""
    root = tmp_path_factory.mktemp("docs-cwd")
    for entry in REPO.iterdir():
        if entry.name not in {".git", "demo_out", "runs"}:
            (root / entry.name).symlink_to(entry)
    (root / "demo_out").symlink_to(demo_out)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # the links and what the commands wrote beside them


def _env() -> dict[str, str]:
    """The Makefile's environment; this interpreter's venv first on PATH (``python`` is the venv's) and the
    launchers' interpreter; the checkout's packages first on sys.path (installed commands included); a free
    rendezvous port for launch/pretrain.sh (its default 29500 may be another run's on a shared machine)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHON=sys.executable, VENV=sys.prefix, MASTER_PORT=str(_free_port()))
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_docs_mark_the_commands_a_newcomer_runs_after_the_demo():
    """The marked blocks cover evaluation, search (embed, query), verify, export and the plan."""
    text = "\n".join(block.text for block in BLOCKS)
    for command in ("train.evaluate", "launch.search embed", "launch.search query", "verify", "train.export"):
        assert command in text, f"no runnable block runs {command}"
    assert "--plan-only" in text, "no runnable block runs preprocess/shard.py --plan-only"


@pytest.mark.timeout(1800)  # the first one waits for the demo (a few minutes on 2 idle cores)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.where)
def test_marked_command_runs_on_the_demo_outputs(block, workdir: Path):
    proc = _run(block, workdir)
    failed_at = re.findall(r"^doc-command-failed-at (\d+)$", proc.stderr, re.MULTILINE)
    where = f"{block.path.relative_to(REPO)}:{block.line + int(failed_at[-1]) - 2}" if failed_at else block.where
    assert proc.returncode == 0, (
        f"{where}: a command of the block marked runnable exits {proc.returncode}\n{block.text}\n"
        f"--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
    )


def _run(block, cwd: Path) -> subprocess.CompletedProcess:
    """The block as one bash script; the ERR trap prints the script line of a failing command (two lines of
    header, so script line n is the block's line n - 2 after its fence)."""
    script = "set -euo pipefail\ntrap 'echo doc-command-failed-at $LINENO >&2' ERR\n" + block.text
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1500)


def test_a_failing_command_is_named_by_its_line(tmp_path: Path):
    """The failure message points at the doc line of the command that failed, not only at the block."""
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- runs-on-demo -->\n```bash\ntrue\nls no-such-file \\\n    --all\ntrue\n```\n")
    block = fenced_blocks(page)[0]
    assert block.runnable and block.line == 3
    proc = _run(block, tmp_path)
    assert proc.returncode != 0
    assert re.findall(r"^doc-command-failed-at (\d+)$", proc.stderr, re.MULTILINE) == ["4"]  # doc line 3 + 4 - 2 = 5
