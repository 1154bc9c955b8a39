"""The installed commands (setup.cfg's console scripts) are the module CLIs, and every --help shows defaults.

`make setup` installs the package (pip install -e), so the commands are in the venv's bin folder
next to this interpreter; after an edit of setup.cfg, `make setup` installs them again.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "vidproxy-shard": "preprocess.shard",
    "vidproxy-train": "train.main",
    "vidproxy-evaluate": "train.evaluate",
    "vidproxy-search": "launch.search",
    "vidproxy-export": "train.export",
    "vidproxy-downstream": "preprocess.downstream.__main__",
    "vidproxy-verify": "pipeline.verify",
}


def declared() -> dict[str, str]:
    """console_scripts of setup.cfg: name -> "module:function"."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines)


def test_each_command_is_its_module_cli():
    scripts = declared()
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.distribution("vidproxy").entry_points
        if ep.group == "console_scripts"
    }
    assert installed == scripts, "the installed commands differ from setup.cfg: run `make setup` (pip install -e .)"


@pytest.mark.slow  # eight commands start at once, each importing torch: ~25 s on 2 cores
def test_installed_commands_show_defaults(tmp_path):
    """Each command's --help from the venv's bin folder, started outside the repository."""
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cases = [[name, "--help"] for name in COMMANDS] + [["vidproxy-search", "embed", "--help"]]
    procs = [
        subprocess.Popen(
            [os.path.join(bin_dir, cmd[0]), *cmd[1:]],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for cmd in cases
    ]
    helps = {" ".join(cmd): proc.communicate(timeout=120)[0] for cmd, proc in zip(cases, procs)}
    for cmd, proc in zip(cases, procs):
        assert proc.returncode == 0, helps[" ".join(cmd)][-3000:]
    assert "usage: vidproxy-train" in helps["vidproxy-train --help"]
    assert "zero.extra (dict | str | None, default None)" in helps["vidproxy-train --help"]
    assert "--jpeg-quality INT    JPEG quality, 1..95. (default: 90)" in helps["vidproxy-shard --help"]
    assert "videos per forward pass (default: 8)" in helps["vidproxy-search embed --help"]
    for cmd in ("vidproxy-evaluate --help", "vidproxy-export --help", "vidproxy-downstream --help"):
        assert "(default: " in helps[cmd], cmd
