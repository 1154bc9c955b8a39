"""The Ray cluster YAMLs in launch/ boot what this repository needs, checked without a cloud account.

Every ``launch/*.yaml`` with a ``provider`` is read with ``yaml.safe_load`` and checked against Ray's own
cluster schema, and then:

* the image: every node type of a cloud provider names an image whose Python satisfies setup.cfg's
  ``python_requires`` (``IMAGE_PYTHON`` says which Python each known image has; an image it does not know
  fails until it is added with its source); a local provider's machines are the user's own, and there the
  interpreter check of launch/setup_env.sh, which every cluster YAML must run, is what refuses a wrong one;
* the paths: the file_mounts sources, ``.gitignore`` of rsync_filter, and every repository path the file
  names (scripts its commands run, the usage in its comments) exist here; the venv the setup commands
  make is the one ``~/.bashrc`` puts on PATH; the workers join the port the head listens on;
* launch/setup_env.sh itself: it reads the requirement from setup.cfg and refuses another interpreter in
  one line before it changes anything.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(p for p in (REPO / "launch").glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
CLOUD_PROVIDERS = ("aws", "gcp", "azure")

IMAGE_PYTHON = {
    # Canonical's public SSM parameters (resolve:ssm:/aws/service/canonical/ubuntu/server/<release>/...):
    # the python3 each Ubuntu release ships (packages.ubuntu.com, package python3).
    "/aws/service/canonical/ubuntu/server/20.04/": "3.8",
    "/aws/service/canonical/ubuntu/server/22.04/": "3.10",
    "/aws/service/canonical/ubuntu/server/24.04/": "3.12",
}
"""What Python an image has, by a prefix of how a cluster YAML names it (ImageId)."""
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:launch|preprocess|pipeline|train|tests|docs)/[\w.-]+(?:/[\w.-]+)*)")
"""A repository-relative path as the YAMLs write them (commands run in ~/vidproxy, the usage from the root)."""


def python_requires() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["options"]["python_requires"]


def image_problems(name: str, cfg: dict) -> list[str]:
    """Each cloud node type's image, against setup.cfg's python_requires."""
    provider = cfg["provider"]["type"]
    if provider not in CLOUD_PROVIDERS:
        return []
    problems, requires = [], python_requires()
    for node_type, spec in cfg["available_node_types"].items():
        image = spec["node_config"].get("ImageId", "")
        known = [
            python for prefix, python in IMAGE_PYTHON.items() if image.removeprefix("resolve:ssm:").startswith(prefix)
        ]
        if not known:
            problems.append(f"{name}: {node_type} boots {image!r}, an image of unknown Python (add it to IMAGE_PYTHON)")
        elif known[0] not in SpecifierSet(requires):
            problems.append(f"{name}: {node_type} boots {image} with Python {known[0]}; setup.cfg needs {requires}")
    return problems


def path_problems(name: str, cfg: dict, text: str) -> list[str]:
    """The repository paths the file uses or names, and the venv and port its commands agree on."""
    problems = [
        f"{name}: file_mounts source {src!r} is not in the repository"
        for src in cfg.get("file_mounts", {}).values()
        if not (REPO / src).exists()
    ]
    problems += [
        f"{name}: rsync_filter {f!r} is not in the repository"
        for f in cfg.get("rsync_filter", [])
        if not (REPO / f).exists()
    ]
    problems += [
        f"{name}: names {p}, which is not in the repository"
        for p in sorted(set(REPO_PATH.findall(text)))
        if not (REPO / p).exists()
    ]
    setup = " ; ".join(cfg.get("setup_commands", []))
    if "launch/setup_env.sh" not in setup:
        problems.append(f"{name}: setup_commands do not run launch/setup_env.sh (which checks the interpreter)")
    venv = re.search(r"\bVENV=(\S+)", setup)
    if not venv or f"vidproxy/{venv[1]}/bin" not in setup:
        problems.append(f"{name}: the venv setup_env.sh makes is not the one ~/.bashrc puts on PATH")
    head_port = re.search(r"ray start --head\b.*--port=(\d+)", " ; ".join(cfg["head_start_ray_commands"]))
    joins = re.findall(r"ray start --address=\$RAY_HEAD_IP:(\d+)", " ; ".join(cfg["worker_start_ray_commands"]))
    if not head_port or not joins or set(joins) != {head_port[1]}:
        problems.append(f"{name}: the workers do not join the port the head listens on")
    return problems


def cluster_problems(path: Path, text: str | None = None) -> list[str]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = path.read_text() if text is None else text
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(cfg))  # as `ray up` does: defaults filled in, then Ray's cluster schema
    return image_problems(path.name, cfg) + path_problems(path.name, cfg, text)


def test_there_are_cluster_files():
    assert [p.name for p in CLUSTER_FILES] == ["ray-aws.yaml", "ray-local.yaml"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_boots_what_the_repository_needs(path):
    assert cluster_problems(path) == []


def test_the_checks_fail_where_they_should():
    aws = REPO / "launch" / "ray-aws.yaml"
    ssm = "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    text = aws.read_text()
    assert text.count(ssm) == 2
    jammy = text.replace(ssm, ssm.replace("24.04", "22.04"), 1)
    assert cluster_problems(aws, jammy) == [
        f"ray-aws.yaml: head boots {ssm.replace('24.04', '22.04')} with Python 3.10; setup.cfg needs >=3.11"
    ]
    raw = text.replace(ssm, "ami-0aff18ec83b712f05")
    assert cluster_problems(aws, raw) == [
        f"ray-aws.yaml: {node} boots 'ami-0aff18ec83b712f05', an image of unknown Python (add it to IMAGE_PYTHON)"
        for node in ("head", "cpu_worker")
    ]
    broken = (
        text.replace("bash launch/setup_env.sh", "bash launch/setup.sh")
        .replace("~/vidproxy: .", "~/vidproxy: ./src")
        .replace("--address=$RAY_HEAD_IP:6379", "--address=$RAY_HEAD_IP:6380")
        .replace("preprocess/shard.py --", "preprocess/shards.py --", 1)
    )
    assert cluster_problems(aws, broken) == [
        "ray-aws.yaml: file_mounts source './src' is not in the repository",
        "ray-aws.yaml: names launch/setup.sh, which is not in the repository",
        "ray-aws.yaml: names preprocess/shards.py, which is not in the repository",
        "ray-aws.yaml: setup_commands do not run launch/setup_env.sh (which checks the interpreter)",
        "ray-aws.yaml: the workers do not join the port the head listens on",
    ]


def setup_env_copy(root: Path, requires: str) -> Path:
    """launch/setup_env.sh and setup.cfg (with ``requires`` as python_requires) in a folder of their own."""
    (root / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "setup_env.sh", root / "launch")
    cfg = re.sub(r"(?m)^python_requires\s*=.*$", f"python_requires = {requires}", (REPO / "setup.cfg").read_text())
    (root / "setup.cfg").write_text(cfg)
    return root / "launch" / "setup_env.sh"


def test_setup_env_checks_the_interpreter_against_setup_cfg_first(tmp_path):
    major, minor, micro = sys.version_info[:3]
    assert f"{major}.{minor}" in SpecifierSet(python_requires())
    later = f">={major}.{minor + 1}"
    script = setup_env_copy(tmp_path / "too_old", later)
    env = {**os.environ, "PYTHON": sys.executable, "VENV": str(tmp_path / "venv")}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (1, "")
    version = f"{major}.{minor}.{micro}"
    assert (
        out.stderr == f"setup_env.sh: {sys.executable} is Python {version}; setup.cfg needs python_requires {later}\n"
    )
    assert sorted(os.listdir(tmp_path / "too_old")) == ["launch", "setup.cfg"] and not (tmp_path / "venv").exists()

    missing = subprocess.run(["bash", str(script)], env={**env, "PYTHON": "python3.0"}, capture_output=True, text=True)
    assert (missing.returncode, missing.stderr) == (
        1,
        f"setup_env.sh: no python3.0 on PATH; setup.cfg needs Python {later} (set PYTHON=...)\n",
    )


def test_setup_env_with_everything_in_place_passes_the_check_and_does_nothing(tmp_path):
    """The real requirement and this interpreter, as a venv already set up: the script runs to its end, silently."""
    apt = re.search(r"(?m)^APT_PACKAGES=\((.*)\)$", (REPO / "launch" / "setup_env.sh").read_text())[1].split()
    missing = [p for p in apt if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        pytest.skip(f"apt packages {missing} are not installed (make setup installs them)")
    script = setup_env_copy(tmp_path / "repo", python_requires())
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256((tmp_path / "repo" / "setup.cfg").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if not list(Path(extensions).rglob("cpu_adam*.so")) or not list(Path(extensions).rglob("deepspeed_shm_comm*.so")):
        pytest.skip(f"DeepSpeed's CPU ops are not built in {extensions} (make setup builds them)")
    env = {**os.environ, "VENV": str(venv), "TORCH_EXTENSIONS_DIR": extensions}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
