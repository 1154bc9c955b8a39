"""Shared fixtures: environment hygiene, one temporary folder per session, the test tiers, and a real S3 server on
loopback."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid

import pytest

from tests.support.tiers import by_weight, fixture_markers, ray_running

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the venv's bin first, as train/engine.py's use_own_ninja does in every rank: one ninja builds DeepSpeed's ops for
# the test process and the processes it starts (two versions rebuild the shared ops for each other)
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

_RAY_BEFORE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test using a fixture decorated with tests/support/tiers.py's ``marks_users`` gets its markers. In a
    pytest-xdist worker the test files are then ordered heaviest first (tests/support/tiers.py's ``by_weight``)."""
    for item in items:
        for marker in sorted(fixture_markers(item)):
            item.add_marker(marker)
    if hasattr(config, "workerinput"):
        items[:] = by_weight(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_RAY_BEFORE] = ray_running()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    if not item.stash.get(_RAY_BEFORE, True) and ray_running() and item.get_closest_marker("ray") is None:
        pytest.fail(
            f"{item.nodeid} started a Ray cluster but is not marked ray: mark it, or decorate the fixture that "
            "starts the cluster with tests.support.tiers.marks_users('ray')",
            pytrace=False,
        )
    return result


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory) -> str:
    """TMPDIR of the session and of every process it starts (they inherit it): Ray's session folders, W&B's
    media and artifact folders, multiprocessing's pymp-* and whatever else goes to the temp folder end up in one
    short folder, removed at the end. pytest's own tmp_path folders stay where pytest keeps them."""
    tmp_path_factory.getbasetemp()  # fixed before TMPDIR moves
    root = tempfile.mkdtemp(prefix="vpt-")  # short: Ray's socket paths live under it and must fit 107 bytes
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = root
    yield root
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    for _ in range(5):  # a process that outlived its test may still be writing there
        shutil.rmtree(root, ignore_errors=True)
        if not os.path.exists(root):
            break
        time.sleep(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on loopback that checks credentials; the AWS env points at it."""
    from pipeline import storage
    from tests.support.s3server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    storage.reset_clients()
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.reset_clients()
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}"
