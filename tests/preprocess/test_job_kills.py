"""Kills inside a shard's tar write and inside an S3 multipart upload, then the same command again; a shard given up
after its retries. Each run is the real command (``preprocess/shard.py``) with a local Ray cluster of its own, so
its workers get the environment the test sets: their temp folder (where the shard scratch folders live) and the S3
part size.

The first run of a kill test is killed whole (driver and cluster) once its worker has died at the fault; the second
run, the same command, kills a worker at the same point in another shard, which Ray retries within that run. After
it, every file is the one a run without faults writes, and nothing is left behind: no temp file, no scratch folder,
no S3 multipart upload in progress (docs/preprocessing.md, "Resume and fault tolerance").
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from pipeline import storage
from pipeline.layout import DatasetLayout
from preprocess.faults import FAULT_DELAY_ENV, FAULT_EXIT_UPLOAD_ENV, FAULT_EXIT_WRITE_ENV, FAULT_RAISE_ENV
from tests.preprocess.fixtures_job import PYTHON, REPO, cli_args, corpus, script_env  # noqa: F401
from tests.support.sessions import kill_session

pytestmark = pytest.mark.ray

RUN_TIMES = {"wall_seconds", "decode_seconds", "seconds"}
"""Fields of stats/*.json and texts/_joined.json that time a run (the only bytes two runs may differ in)."""
PART_BYTES = "4096"
"""The S3 part size of the upload test: every object above it (each tar) goes up as a multipart upload."""


@pytest.fixture(scope="module")
def ray_tmp():
    """A private RAY_TMPDIR (short: Ray's socket paths live under it) for the clusters the commands start."""
    root = tempfile.mkdtemp(prefix="vpk-", dir="/tmp")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(corpus, ray_tmp, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    code = _run(corpus, root / "out", _env(ray_tmp, root / "tmp"), root / "clean.log")
    assert code == 0, (root / "clean.log").read_text()[-3000:]
    return root / "out"


def test_killed_in_a_tar_write_then_rerun(corpus, clean, ray_tmp, tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    first, second = tmp_path / "exit-1", tmp_path / "exit-2"
    _run_until(first, corpus, out, _env(ray_tmp, tmp, **{FAULT_EXIT_WRITE_ENV: f"1:2:{first}"}), tmp_path / "1.log")
    scratch = Path(DatasetLayout(str(out)).scratch(str(tmp / "vidproxy-scratch"), 1))
    partial = [p for p in scratch.iterdir() if p.name.startswith(storage.TEMP_PREFIX) and p.suffix == ".tar"]
    assert len(partial) == 1 and partial[0].stat().st_size > 0, "no partly written tar in shard 1's scratch"
    assert not (out / "stats" / "shard-000001.json").exists()

    target = _uncommitted(out)
    code = _run(corpus, out, _env(ray_tmp, tmp, **{FAULT_EXIT_WRITE_ENV: f"{target}:1:{second}"}), tmp_path / "2.log")
    assert code == 0 and second.exists(), (tmp_path / "2.log").read_text()[-3000:]
    assert _files(out) == _files(clean)
    assert _left_behind(out, tmp) == []


def test_killed_in_a_multipart_upload_then_rerun(corpus, clean, ray_tmp, s3_bucket, tmp_path):
    out, tmp = f"{s3_bucket}/out", tmp_path / "tmp"
    first, second = tmp_path / "exit-1", tmp_path / "exit-2"
    env = _env(ray_tmp, tmp, **{storage.PART_BYTES_ENV: PART_BYTES})
    _run_until(first, corpus, out, {**env, FAULT_EXIT_UPLOAD_ENV: f"1:{first}"}, tmp_path / "1.log")
    s3, bucket = boto3.client("s3"), storage.parse(out).bucket
    uploads = {u["Key"]: u["UploadId"] for u in _uploads(s3, bucket)}  # shard 0's too, when the kill cut it
    assert "out/shard-000001-000.tar" in uploads, uploads
    parts = s3.list_parts(Bucket=bucket, Key="out/shard-000001-000.tar", UploadId=uploads["out/shard-000001-000.tar"])
    assert len(parts["Parts"]) == 1

    target = _uncommitted(out)
    code = _run(corpus, out, {**env, FAULT_EXIT_UPLOAD_ENV: f"{target}:{second}"}, tmp_path / "2.log")
    assert code == 0 and second.exists(), (tmp_path / "2.log").read_text()[-3000:]
    assert _uploads(s3, bucket) == []
    assert _files(out) == _files(clean)
    for k in range(4):
        etag = s3.head_object(Bucket=bucket, Key=f"out/shard-00000{k}-000.tar")["ETag"]
        assert etag.strip('"').endswith("-1"), f"shard {k} was not a multipart upload: ETag {etag}"
    assert _left_behind(None, tmp) == []


def test_a_shard_that_raises_every_time_is_given_up(corpus, ray_tmp, tmp_path):
    """The command exits 1 naming the shard, after 1 + --max-retries attempts; the other shards are committed."""
    out, tmp, attempts = tmp_path / "out", tmp_path / "tmp", tmp_path / "attempts"
    env = _env(ray_tmp, tmp, **{FAULT_RAISE_ENV: f"2:99:{attempts}"})
    code = _run(corpus, out, env, tmp_path / "run.log", "--max-retries", "2")
    text = (tmp_path / "run.log").read_text()
    assert code == 1, text[-3000:]
    assert len(attempts.read_text().splitlines()) == 3
    message = (
        "shard shard-000002 not committed: raised 3 times: RuntimeError: fault injection: shard 2 raises (attempt 3)"
    )
    assert message in text and text.count("); retrying") == 2, text[-3000:]
    assert "manifest: not written (rerun the same command to finish)" in text
    assert sorted(p.name for p in (out / "stats").iterdir()) == [f"shard-00000{k}.json" for k in (0, 1, 3)]
    assert not (out / "manifest.json").exists() and _left_behind(out, tmp) == []


# --------------------------------------------------------------------------- helpers


def _env(ray_tmp: str, tmp: Path, **extra: str) -> dict[str, str]:
    tmp.mkdir(exist_ok=True)
    return script_env(RAY_TMPDIR=ray_tmp, TMPDIR=str(tmp), **extra)


def _command(corpus: dict, out, *extra: str) -> list[str]:
    args = cli_args(corpus, out, "--ray-address", "local", "--num-cpus", "2", *extra)
    return [PYTHON, str(REPO / "preprocess/shard.py"), *args]


def _run(corpus: dict, out, env: dict, log: Path, *extra: str) -> int:
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _command(corpus, out, *extra), env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT
        )
        try:
            return proc.wait(180)
        finally:
            _kill_group(proc)


def _run_until(marker: Path, corpus: dict, out, env: dict, log: Path) -> None:
    """Run the command until a worker has died at the fault (``marker`` written), then SIGKILL it and its cluster.
    Every shard sleeps 1.5 s first, so Ray's retry of the dead task cannot have committed its shard by then."""
    with open(log, "w") as f:
        env = {**env, FAULT_DELAY_ENV: "1.5"}
        proc = subprocess.Popen(_command(corpus, out), env=env, start_new_session=True, stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert marker.exists(), "the fault never fired:\n" + log.read_text()[-3000:]
        finally:
            _kill_group(proc)


def _uncommitted(out) -> int:
    """A shard the rerun will run, other than the one the first run was killed in where there is one: Ray starts
    queued tasks in no promised order, so the first run may have committed shard 2 before shard 1 died."""
    committed = {k for k in range(4) if storage.exists(DatasetLayout(str(out)).stats(k))}
    return next((k for k in (2, 3, 0) if k not in committed), 1)


def _kill_group(proc: subprocess.Popen) -> None:
    """The command and the local Ray cluster it started, workers included (tests/support/sessions.py)."""
    kill_session(proc)


def _files(out) -> dict[str, object]:
    """Every file of a data set folder (local or S3) by relative name: its bytes, or for a file that times its run
    its JSON without those fields; the run logs (``logs/``, one per run) aside."""
    base = str(out).rstrip("/") + "/"
    found = {}
    for uri in storage.list_files(str(out)):
        name = uri[len(base) :]
        if name.startswith("logs/"):
            continue
        raw = storage.read_bytes(uri)
        found[name] = _untimed(json.loads(raw)) if name.startswith("stats/") or name == "texts/_joined.json" else raw
    return found


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in RUN_TIMES}
    return value


def _uploads(s3, bucket: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket, Prefix="out/").get("Uploads", [])


def _left_behind(out: Path | None, tmp: Path) -> list[str]:
    """Temp files in the output folder and the workers' temp folder, and anything in the shard scratch root."""
    found = [str(p) for root in (out, tmp) if root for p in root.rglob(f"{storage.TEMP_PREFIX}*")]
    scratch = tmp / "vidproxy-scratch"
    return found + [str(p) for p in scratch.iterdir()] if scratch.exists() else found
