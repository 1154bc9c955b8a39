"""``--fetch`` end to end on a real local Ray cluster: source videos downloaded from a loopback HTTP server that
misbehaves per URL, from S3, and through yt-dlp; every missing video with its own code; scratch empty after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.layout import DatasetLayout
from pipeline.shards import iter_dataset
from preprocess.fetch import TRANSIENT
from preprocess.job import run_job
from tests.preprocess.fixtures_job import (  # noqa: F401
    PYTHON,
    REPO,
    cli_args,
    config,
    corpus,
    dataset_bytes,
    ray_local,
    script_env,
    write_jsonl,
)
from tests.preprocess.http_faults import Fault, FaultServer

pytestmark = pytest.mark.ray

FAST = (
    *("--fetch-timeout", "4", "--fetch-read-timeout", "1.5", "--fetch-retries", "3"),
    *("--fetch-backoff", "0.05", "--fetch-max-backoff", "0.3", "--fetch-host-rate", "50"),
    *("--max-video-bytes", "1000000"),
)
"""Short timeouts and backoffs: the faulty URLs fail in seconds. The corpus's videos are ~10-60 kB."""
PNG = b"\x89PNG\r\n\x1a\n" + bytes(2000)
EXPECTED = {
    "gone404": "http_404",
    "gone410": "http_410",
    "forbidden": "http_403",
    "trickle": "timeout",
    "page": "not_a_video",
    "picture": "not_a_video",
    "huge": "too_large",
    "youtube": ("network", "fetch_error"),
    "nourl": "no_url",
}
"""Bad sources (one clip each) -> the code of their clip's failure."""


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    """The corpus's videos on the loopback server; three of them misbehave on their first requests only."""
    with FaultServer(tmp_path_factory.mktemp("www")) as srv:
        for path in corpus["videos"].iterdir():
            srv.add(path.name, path.read_bytes())
        srv.fault("vid01.webm", Fault(status=429, times=1, headers={"Retry-After": "1"}))
        srv.fault("vid02.ts", Fault(status=503, times=2))
        srv.fault("vid03.mp4", Fault(cut_at=5000, times=1))
        srv.fault("gone410.mp4", Fault(status=410))
        srv.fault("forbidden.mp4", Fault(status=403))
        srv.add("trickle.mp4", (corpus["videos"] / "vid00.mp4").read_bytes())
        srv.fault("trickle.mp4", Fault(trickle=(500, 0.4)))
        srv.fault(
            "page.mp4", Fault(body=b"<!DOCTYPE html><html><body>Video removed</body></html>", content_type="text/html")
        )
        srv.add("picture.mp4", PNG)
        srv.add("huge.mp4", bytes(1_500_000))
        yield srv


def _fetch_inputs(corpus, server, folder: Path, bad: bool = True) -> dict:
    """The corpus's metadata with each video's url on the server, and (``bad``) one extra line per bad source."""
    videos = [json.loads(line) for line in corpus["metadata"].read_text().splitlines()]
    names = {p.stem: p.name for p in corpus["videos"].iterdir()}
    for video in videos:
        video["url"] = server.url(names[video["video_id"]])
    if bad:
        for name in EXPECTED:
            url = {"youtube": "https://www.youtube.com/watch?v=aqz-KE-bpKQ", "nourl": None}.get(
                name, server.url(f"{name}.mp4")
            )
            line = {"video_id": name, "clip": [{"clip_id": f"{name}.0.mp4", "span": ["00:00:00.000", "00:00:01.000"]}]}
            videos.append({**line, "url": url} if url else line)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "meta.jsonl", videos)
    return {**corpus, "metadata": folder / "meta.jsonl"}


def _fetch_config(inputs: dict, out, *extra: str):
    from preprocess.shard import build_config, build_parser

    args = [a for a in cli_args(inputs, out, *FAST, *extra) if a not in ("--videos", str(inputs["videos"]))]
    return build_config(build_parser().parse_args([*args, "--fetch"]))


def _content(out) -> dict:
    """clip id -> what the clip holds (its source's URI aside)."""
    return {s.meta.clip_id: (s.meta.frame_times, s.frames, s.subtitle, s.caption) for s in iter_dataset(str(out))}


def _scratch_left(out) -> list[str]:
    root = os.path.join(tempfile.gettempdir(), "vidproxy-scratch")
    return [p for k in range(8) if os.path.exists(p := DatasetLayout(str(out)).scratch(root, k))]


@pytest.fixture(scope="module")
def local_run(corpus, ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    assert run_job(config(corpus, out)).manifest
    return out


def test_fetched_videos_match_local_files_and_every_bad_one_has_its_code(corpus, server, local_run, tmp_path):
    inputs = _fetch_inputs(corpus, server, tmp_path / "in")
    out = tmp_path / "out"
    result = run_job(_fetch_config(inputs, out))
    assert result.manifest and result.ok == 12, result.summary()
    assert _content(out) == _content(local_run)
    assert {s.meta.source_uri for s in iter_dataset(str(out))} == {
        server.url(p.name) for p in corpus["videos"].iterdir()
    }
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    codes = {row["video_id"]: row["error"] for row in failures}
    for name, expected in EXPECTED.items():
        assert codes.get(name) in (expected if isinstance(expected, tuple) else (expected,)), (name, failures)
    assert set(codes) == set(EXPECTED), failures
    retry_after = server.requests("vid01.webm")
    assert retry_after[0].status == 429 and retry_after[1].start - retry_after[0].start >= 0.9
    assert [r.status for r in server.requests("vid02.ts")] == [503, 503, 200]
    resumed = server.requests("vid03.mp4")
    assert resumed[-1].header("Range") == "bytes=5000-", [r.headers for r in resumed]
    assert _scratch_left(out) == []


def test_kept_sources_are_used_by_a_rerun_with_another_decode_config(corpus, server, tmp_path):
    inputs = _fetch_inputs(corpus, server, tmp_path / "in", bad=False)
    archive = tmp_path / "archive"
    first = run_job(_fetch_config(inputs, tmp_path / "a", "--keep-sources", str(archive)))
    assert first.manifest and first.ok == 12
    assert sorted(p.name for p in archive.iterdir()) == sorted(p.name for p in corpus["videos"].iterdir())
    server.clear_log()
    second = run_job(_fetch_config(inputs, tmp_path / "b", "--keep-sources", str(archive), "--num-frames", "2"))
    assert second.manifest and second.ok == 12
    assert server.requests() == [], "a kept source was downloaded again"
    assert next(iter_dataset(str(tmp_path / "b"))).meta.source_uri.startswith(str(archive))


def test_s3_urls_are_fetched_through_storage(corpus, local_run, ray_local, s3_bucket, tmp_path):
    videos = [json.loads(line) for line in corpus["metadata"].read_text().splitlines()]
    for path in corpus["videos"].iterdir():
        storage.put_file(str(path), f"{s3_bucket}/sources/{path.name}")
    names = {p.stem: p.name for p in corpus["videos"].iterdir()}
    for video in videos:
        video["url"] = f"{s3_bucket}/sources/{names[video['video_id']]}"
    write_jsonl(tmp_path / "meta.jsonl", videos)
    inputs = {**corpus, "metadata": tmp_path / "meta.jsonl"}
    result = run_job(_fetch_config(inputs, tmp_path / "out"))
    assert result.manifest and result.ok == 12, result.summary()
    assert _content(tmp_path / "out") == _content(local_run)


def test_retry_failed_retries_only_transient_fetch_failures(corpus, server, tmp_path):
    inputs = _fetch_inputs(corpus, server, tmp_path / "in")
    out = tmp_path / "out"
    first = run_job(_fetch_config(inputs, out, "--clips-per-shard", "1"))
    assert first.failed.get("http_404") == 1 and first.failed.get("timeout") == 1
    transient = sum(n for code, n in first.failed.items() if code in TRANSIENT)  # timeout; the YouTube URL's network
    server.fault("trickle.mp4", None)  # the slow host is fast again: its video arrives now
    try:
        again = run_job(_fetch_config(inputs, out, "--clips-per-shard", "1", "--retry-failed"))
    finally:
        server.fault("trickle.mp4", Fault(trickle=(500, 0.4)))
    assert again.shards_run == transient, again.summary()  # not the 404, 410, 403, HTML, PNG, too large, no url
    assert again.ok == 13 and "timeout" not in again.failed, again.summary()


def test_killed_during_downloads_then_rerun_gives_identical_shards_and_no_scratch(corpus, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="vpf-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        _kill_and_rerun(corpus, tmp_path, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert dataset_bytes(tmp_path / "out") == dataset_bytes(tmp_path / "clean")
    scratch = tmp_path / "tmp" / "vidproxy-scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == []


def _kill_and_rerun(corpus, tmp_path: Path, ray_tmp: str) -> None:
    """The CLI on a slow server, SIGKILLed (with its local cluster) once downloads run; then the same command, and
    the same command into a clean output for reference."""
    with FaultServer(tmp_path / "www", bandwidth=40_000) as slow:  # each video takes ~0.3-1.5 s to arrive
        for path in corpus["videos"].iterdir():
            slow.add(path.name, path.read_bytes())
        inputs = _fetch_inputs(corpus, slow, tmp_path / "in", bad=False)
        (tmp_path / "tmp").mkdir()
        env = script_env(TMPDIR=str(tmp_path / "tmp"), RAY_TMPDIR=ray_tmp)
        args = [a for a in cli_args(inputs, tmp_path / "out", *FAST) if a not in ("--videos", str(inputs["videos"]))]
        cmd = [PYTHON, str(REPO / "preprocess/shard.py"), *args, "--fetch", "--ray-address", "local", "--num-cpus", "2"]
        with open(tmp_path / "killed.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=log)
            try:
                deadline = time.monotonic() + 120
                while len(slow.requests()) < 2 and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert len(slow.requests()) >= 2, (tmp_path / "killed.log").read_text()[-3000:]
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            finally:
                _kill_group(proc)
        assert not (tmp_path / "out" / "manifest.json").exists()
        for out in ("out", "clean"):
            run = [*cmd[: cmd.index("--output") + 1], str(tmp_path / out), *cmd[cmd.index("--output") + 2 :]]
            done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
