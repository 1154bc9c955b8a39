"""``--fetch`` end to end on a real local Ray cluster: source videos downloaded from a loopback HTTP server that
misbehaves per URL, from S3, and through yt-dlp; every missing video with its own code; scratch empty after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.layout import DatasetLayout
from pipeline.shards import iter_dataset
from preprocess.fetching.config import TRANSIENT
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
from tests.support.sessions import kill_session

pytestmark = pytest.mark.ray

FAST = (
    *("--fetch-timeout", "4", "--fetch-read-timeout", "1.5", "--fetch-retries", "3"),
    *("--fetch-backoff", "0.05", "--fetch-max-backoff", "0.3", "--fetch-host-rate", "50"),
    *("--max-video-bytes", "1000000"),
    *("--require-texts", "none"),
)
"""Short timeouts and backoffs: the faulty URLs fail in seconds. The corpus's videos are ~10-60 kB. No text
(see ``bare``)."""
PNG = b"\x89PNG\r\n\x1a\n" + bytes(2000)
EXPECTED = {
    "gone404": "http_404",
    "gone410": "http_410",
    "forbidden": "http_403",
    "trickle": "timeout",
    "page": "not_a_video",
    "picture": "not_a_video",
    "huge": "too_large",
    "youtube": "network",  # no DNS on a test machine: transient, retried by --retry-failed
    "nourl": "no_url",
}
"""Bad sources (one clip each) -> the code of their clip's failure."""


@pytest.fixture(scope="module")
def bare(corpus) -> dict:
    """The corpus without subtitle and caption files: no text join before the shard tasks (texts are not what
    these tests are about, and the join's Ray Data start-up would add seconds to every run)."""
    return {**corpus, "subtitles": None, "captions": None}


@pytest.fixture(scope="module")
def server(bare, tmp_path_factory):
    """The bare's videos on the loopback server; three of them misbehave on their first requests only."""
    with FaultServer(tmp_path_factory.mktemp("www")) as srv:
        for path in bare["videos"].iterdir():
            srv.add(path.name, path.read_bytes())
        srv.fault("vid01.webm", Fault(status=429, times=1, headers={"Retry-After": "1"}))
        srv.fault("vid02.ts", Fault(status=503, times=2))
        srv.fault("vid03.mp4", Fault(cut_at=5000, times=1))
        srv.fault("gone410.mp4", Fault(status=410))
        srv.fault("forbidden.mp4", Fault(status=403))
        srv.add("trickle.mp4", (bare["videos"] / "vid00.mp4").read_bytes())
        srv.fault("trickle.mp4", Fault(trickle=(500, 0.4)))
        srv.fault(
            "page.mp4", Fault(body=b"<!DOCTYPE html><html><body>Video removed</body></html>", content_type="text/html")
        )
        srv.add("picture.mp4", PNG)
        srv.add("huge.mp4", bytes(1_500_000))
        yield srv


def _fetch_inputs(bare, server, folder: Path, bad: bool = True) -> dict:
    """The bare's metadata with each video's url on the server, and (``bad``) one extra line per bad source."""
    videos = [json.loads(line) for line in bare["metadata"].read_text().splitlines()]
    names = {p.stem: p.name for p in bare["videos"].iterdir()}
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
    return {**bare, "metadata": folder / "meta.jsonl"}


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
def local_run(bare, ray_local, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    assert run_job(config(bare, out, "--require-texts", "none")).manifest
    return out


def test_fetched_videos_match_local_files_and_every_bad_one_has_its_code(bare, server, local_run, tmp_path):
    inputs = _fetch_inputs(bare, server, tmp_path / "in")
    out = tmp_path / "out"
    result = run_job(_fetch_config(inputs, out))
    assert result.manifest and result.ok == 12, result.summary()
    assert _content(out) == _content(local_run)
    assert {s.meta.source_uri for s in iter_dataset(str(out))} == {server.url(p.name) for p in bare["videos"].iterdir()}
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    codes = {row["video_id"]: row["error"] for row in failures}
    assert codes == EXPECTED, failures
    retry_after = server.requests("vid01.webm")
    assert retry_after[0].status == 429 and retry_after[1].start - retry_after[0].start >= 0.9
    assert [r.status for r in server.requests("vid02.ts")] == [503, 503, 200]
    resumed = server.requests("vid03.mp4")
    assert resumed[-1].header("Range") == "bytes=5000-", [r.headers for r in resumed]
    assert _scratch_left(out) == []


def test_kept_sources_are_used_by_a_rerun_with_another_decode_config(bare, server, tmp_path):
    inputs = _fetch_inputs(bare, server, tmp_path / "in", bad=False)
    archive = tmp_path / "archive"
    first = run_job(_fetch_config(inputs, tmp_path / "a", "--keep-sources", str(archive)))
    assert first.manifest and first.ok == 12
    assert sorted(p.name for p in archive.iterdir()) == sorted(p.name for p in bare["videos"].iterdir())
    server.clear_log()
    second = run_job(_fetch_config(inputs, tmp_path / "b", "--keep-sources", str(archive), "--num-frames", "2"))
    assert second.manifest and second.ok == 12
    assert server.requests() == [], "a kept source was downloaded again"
    assert next(iter_dataset(str(tmp_path / "b"))).meta.source_uri.startswith(str(archive))


def test_s3_urls_are_fetched_through_storage(bare, local_run, ray_local, s3_bucket, tmp_path):
    videos = [json.loads(line) for line in bare["metadata"].read_text().splitlines()]
    for path in bare["videos"].iterdir():
        storage.put_file(str(path), f"{s3_bucket}/sources/{path.name}")
    names = {p.stem: p.name for p in bare["videos"].iterdir()}
    for video in videos:
        video["url"] = f"{s3_bucket}/sources/{names[video['video_id']]}"
    write_jsonl(tmp_path / "meta.jsonl", videos)
    inputs = {**bare, "metadata": tmp_path / "meta.jsonl"}
    result = run_job(_fetch_config(inputs, tmp_path / "out"))
    assert result.manifest and result.ok == 12, result.summary()
    assert _content(tmp_path / "out") == _content(local_run)


def test_retry_failed_retries_only_transient_fetch_failures(bare, server, tmp_path):
    inputs = _fetch_inputs(bare, server, tmp_path / "in")
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


def test_killed_during_downloads_then_rerun_gives_identical_shards_and_no_scratch(bare, ray_local, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="vpf-", dir="/tmp")  # short: Ray's socket paths live under it
    with FaultServer(tmp_path / "www", bandwidth=40_000) as slow:  # each video takes ~0.3-1.5 s to arrive
        for path in bare["videos"].iterdir():
            slow.add(path.name, path.read_bytes())
        inputs = _fetch_inputs(bare, slow, tmp_path / "in", bad=False)
        try:
            _kill_during_downloads(inputs, slow, tmp_path, ray_tmp)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not (tmp_path / "out" / "manifest.json").exists()
        rerun = run_job(_fetch_config(inputs, tmp_path / "out"))
        clean = run_job(_fetch_config(inputs, tmp_path / "clean"))
    assert rerun.manifest and clean.manifest and rerun.shards_skipped < 4
    assert dataset_bytes(tmp_path / "out") == dataset_bytes(tmp_path / "clean")
    assert _scratch_left(tmp_path / "out") == []


def _kill_during_downloads(inputs: dict, slow: FaultServer, tmp_path: Path, ray_tmp: str) -> None:
    """The CLI (with its own local cluster) SIGKILLed with its cluster once two downloads have started; the
    scratch folders of its tasks stay behind, in the place a rerun's tasks use (this machine's temp folder)."""
    env = script_env(RAY_TMPDIR=ray_tmp)
    args = [a for a in cli_args(inputs, tmp_path / "out", *FAST) if a not in ("--videos", str(inputs["videos"]))]
    cmd = [PYTHON, str(REPO / "preprocess/shard.py"), *args, "--fetch", "--ray-address", "local", "--num-cpus", "2"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 120
            while len(slow.requests()) < 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(slow.requests()) >= 2, (tmp_path / "killed.log").read_text()[-3000:]
            kill_session(proc)  # workers too: one left alive could finish its shard and remove its scratch
        finally:
            kill_session(proc)
    assert _scratch_left(tmp_path / "out"), "the kill left no scratch folder: no download was under way"


@pytest.mark.parametrize("limit", [1, 2])
def test_host_concurrency_holds_job_wide_across_two_shard_tasks(bare, ray_local, tmp_path, limit):
    """Two shard tasks run at once (2 CPUs, 2 shards of 3 videos) and fetch every video from one loopback host:
    the server's own log never sees more than ``--fetch-host-concurrency`` downloads at once, and does see both
    shards' downloads interleaved (both tasks were running). With limit 2 it sees 2: the check can fail."""
    with FaultServer(tmp_path / "www", bandwidth=40_000) as slow:  # each video takes ~0.3-1.5 s to arrive
        for path in bare["videos"].iterdir():
            slow.add(path.name, path.read_bytes())
        inputs = _fetch_inputs(bare, slow, tmp_path / "in", bad=False)
        flags = ("--clips-per-shard", "6", "--fetch-host-concurrency", str(limit), "--fetch-prefetch", "0")
        result = run_job(_fetch_config(inputs, tmp_path / "out", *flags))
        requests, most = slow.requests(), slow.max_in_flight()
    assert result.manifest and result.ok == 12 and result.shards_run == 2, result.summary()
    assert sorted(r.path for r in requests) == [f"/{p.name}" for p in sorted(bare["videos"].iterdir())]
    assert most == limit, [(r.path, r.start, r.end) for r in requests]
    starts = {shard: [r.start for r in requests if int(r.path[4:6]) // 3 == shard] for shard in (0, 1)}
    assert len(starts[0]) == len(starts[1]) == 3
    assert min(starts[0]) < max(starts[1]) and min(starts[1]) < max(starts[0]), "the two shard tasks overlapped"
