"""A storage problem (endpoint unreachable, credentials refused) ends the CLI with one line naming the URI, exit 2.

The real S3 server of the suite (moto, credentials checked) and a closed loopback port; the CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.s3server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _shard(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, str(ROOT / "preprocess" / "shard.py"), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _check_one_line(result: subprocess.CompletedProcess, uri: str, reason: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("preprocess/shard.py: error: ") and uri in lines[0] and reason in lines[0], lines[0]


@pytest.fixture
def inputs(s3_server, s3_bucket, tmp_path) -> dict[str, str]:
    bucket = s3_bucket.removeprefix("s3://")
    s3_server.client().put_object(Bucket=bucket, Key="meta.jsonl", Body=b'{"video_id": "v", "clip": []}\n')
    local = tmp_path / "meta.jsonl"
    local.write_text('{"video_id": "v", "clip": []}\n')
    return {"s3_meta": f"{s3_bucket}/meta.jsonl", "videos": f"{s3_bucket}/videos/", "local_meta": str(local)}


@pytest.mark.parametrize("key", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_reading_metadata(s3_server, inputs, tmp_path, key):
    wrong = dict(s3_server.env(), **{key: "AKIAWRONGWRONGWRONG0"})
    argv = ["--metadata", inputs["s3_meta"], "--videos", inputs["videos"], "--output", str(tmp_path / "out")]
    _check_one_line(_shard(argv, wrong), inputs["s3_meta"], "access denied by S3")
    assert not (tmp_path / "out").exists()


def test_wrong_credentials_writing_output(s3_server, s3_bucket, inputs, tmp_path):
    wrong = dict(s3_server.env(), AWS_SECRET_ACCESS_KEY="wrong")
    argv = ["--metadata", inputs["local_meta"], "--videos", str(tmp_path), "--output", f"{s3_bucket}/out"]
    _check_one_line(_shard(argv, wrong), f"{s3_bucket}/out/config.json", "SignatureDoesNotMatch")


@pytest.mark.parametrize("output", ["local", "s3"])
def test_unreachable_endpoint(s3_server, inputs, tmp_path, output):
    # two attempts, not the default six: botocore's back-off between them at a closed port was 10-25 s of sleep
    closed = dict(s3_server.env(), AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="2")
    if output == "s3":
        argv = ["--metadata", inputs["local_meta"], "--videos", str(tmp_path), "--output", "s3://somewhere/out"]
        uri = "s3://somewhere/out/config.json"
    else:
        argv = ["--metadata", inputs["s3_meta"], "--videos", inputs["videos"], "--output", str(tmp_path / "out")]
        uri = inputs["s3_meta"]
    _check_one_line(_shard(argv, closed), uri, "cannot reach the S3 endpoint")
