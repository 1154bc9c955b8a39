"""The Ray job end to end on a real local cluster: determinism, resume after SIGKILL, retries, timeouts, S3."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.manifest import read_manifest
from pipeline.shards import iter_dataset
from preprocess.faults import FAULT_DELAY_ENV, FAULT_EXIT_ENV, FAULT_EXIT_VIDEO_ENV, FAULT_HANG_ENV, FAULT_RAISE_ENV
from preprocess.job import run_job
from tests.preprocess.fixtures_job import PYTHON, REPO, cli_args, config, corpus, dataset_bytes, ray_local, script_env  # noqa: F401

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def clean(corpus, ray_local, tmp_path_factory) -> Path:
    """An uninterrupted run with one task in flight (one worker at a time)."""
    out = tmp_path_factory.mktemp("clean")
    result = run_job(config(corpus, out, "--max-in-flight", "1"))
    assert result.manifest and result.ok == 12 and not result.failed, result.summary()
    return out


def test_output_content(clean, corpus):
    manifest = read_manifest(str(clean))
    assert [s.url for s in manifest.shards] == [f"shard-{k:06d}-000.tar" for k in range(4)]
    samples = list(iter_dataset(str(clean)))
    assert [s.meta.clip_id for s in samples] == [f"vid{v:02d}.{c}.mp4" for v in range(6) for c in range(2)]
    first = samples[0]
    assert first.subtitle == "subtitle vid00 0" and first.caption.startswith("a testsrc2 pattern")
    assert len(first.frames) == 4 and first.meta.frame_size == (85, 64)
    assert first.meta.source_uri.endswith("vid00.mp4") and samples[2].meta.source_uri.endswith("vid01.webm")
    assert all(s.meta.span[0] <= t <= s.meta.span[1] for s in samples for t in s.meta.frame_times)
    assert manifest.config["decode"]["num_frames"] == 4 and "output" not in manifest.config["sharding"]
    assert "frame_size" not in manifest.config["decode"]  # unset options leave the manifest as before
    assert pq.read_table(clean / "failures.parquet").num_rows == 0
    assert list(clean.glob("logs/run-*.json")), "the run log is missing"


def test_one_vs_many_workers_byte_identical(clean, corpus, tmp_path):
    result = run_job(config(corpus, tmp_path, "--max-in-flight", "4"))
    assert result.shards_run == 4
    assert dataset_bytes(tmp_path) == dataset_bytes(clean)


def test_rerun_skips_committed_shards(clean, corpus):
    before = dataset_bytes(clean)
    result = run_job(config(corpus, clean))
    assert result.shards_run == 0 and result.shards_skipped == 4 and result.manifest
    assert dataset_bytes(clean) == before


def test_other_config_into_same_output_is_refused(clean, corpus):
    with pytest.raises(ValueError, match="decode.num_frames"):
        run_job(config(corpus, clean, "--num-frames", "5"))
    with pytest.raises(ValueError, match="decode.short_side"):
        run_job(config(corpus, clean, "--short-side", "48"))


def test_worker_death_is_retried(clean, corpus, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_EXIT_ENV, f"2:{marker}")
    out = tmp_path / "out"
    result = run_job(config(corpus, out))
    assert marker.exists(), "the fault injection did not kill a worker"
    assert result.manifest and not result.shards_failed
    assert dataset_bytes(out) == dataset_bytes(clean)


def test_a_task_that_raised_is_resubmitted(clean, corpus, tmp_path, monkeypatch):
    """The driver resubmits a task that raised (here after writing its first sample); the job then finishes (the
    command's exit 0: the manifest written) with the bytes of a run without the fault."""
    attempts = tmp_path / "attempts"
    monkeypatch.setenv(FAULT_RAISE_ENV, f"1:1:{attempts}")
    result = run_job(config(corpus, tmp_path / "out"))
    assert len(attempts.read_text().splitlines()) == 1
    assert result.manifest and not result.shards_failed and result.shards_run == 4, result.summary()
    assert dataset_bytes(tmp_path / "out") == dataset_bytes(clean)


def test_stuck_video_times_out_and_the_job_finishes(corpus, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_HANG_ENV, "vid01")
    started = time.monotonic()
    result = run_job(config(corpus, tmp_path, "--video-timeout", "3"))
    assert time.monotonic() - started < 600  # the hang sleeps 3600 s: the 3 s timeout cut it, with room for load
    assert result.manifest and result.failed == {"timeout": 2} and result.ok == 10
    rows = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    assert [(r["clip_id"], r["error"], r["stage"], r["shard"]) for r in rows] == [
        ("vid01.0.mp4", "timeout", "task", 0),
        ("vid01.1.mp4", "timeout", "task", 1),
    ]
    assert "vid01 was still being read or decoded after 3 s" in rows[0]["message"]
    assert [s.meta.clip_id for s in iter_dataset(str(tmp_path))][:2] == ["vid00.0.mp4", "vid00.1.mp4"]


@pytest.fixture(scope="module")
def without_vid01(corpus, ray_local, tmp_path_factory) -> tuple[Path, dict]:
    """The reference for a video the job gives up on: the same job with vid01's file missing. Its videos folder,
    vid01 put back afterwards, is the one the faulted runs read (the samples name their source file)."""
    root = tmp_path_factory.mktemp("without_vid01")
    shutil.copytree(corpus["videos"], root / "videos", ignore=shutil.ignore_patterns("vid01.*"))
    inputs = {**corpus, "videos": root / "videos"}
    result = run_job(config(inputs, root / "out", "--max-missing-videos", "1"))
    assert result.failed == {"missing_file": 2}
    for path in corpus["videos"].glob("vid01.*"):
        shutil.copy(path, root / "videos")
    return root / "out", inputs


def _shard_files(out: Path) -> dict[str, bytes]:
    """The tars, their sample indexes and the manifest."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))} | dataset_bytes(out)


@pytest.mark.parametrize("fault, error", [(FAULT_HANG_ENV, "timeout"), (FAULT_EXIT_VIDEO_ENV, "worker_died")])
def test_a_video_given_up_leaves_the_shards_of_a_run_without_it(without_vid01, tmp_path, monkeypatch, fault, error):
    """A video that hangs every attempt (timed out) or kills its worker every attempt, at once, before the task's
    report of the video can reach the driver (the attempt after Ray's retries finds it in the marker the dead ones
    left): its clips are recorded, the job finishes (exit 0), and the shards are byte-identical to a run without
    the video's file."""
    reference, inputs = without_vid01
    monkeypatch.setenv(fault, "vid01")
    # 3 s cuts the hang; a dying worker needs no tight timeout, and on a loaded machine (the suite's other worker, a
    # load average of 10) a good video's decode once took over 3 s and timed out too
    timeout = "3" if error == "timeout" else "60"
    result = run_job(config(inputs, tmp_path, "--video-timeout", timeout, "--max-retries", "1"))
    assert result.manifest and result.failed == {error: 2} and result.ok == 10 and not result.shards_failed
    rows = pq.read_table(tmp_path / "failures.parquet").to_pylist()
    assert [(r["clip_id"], r["error"], r["stage"]) for r in rows] == [
        ("vid01.0.mp4", error, "task"),
        ("vid01.1.mp4", error, "task"),
    ]
    if error == "worker_died":
        assert rows[0]["message"] == "the worker process died 2 times while decoding video vid01"
    assert _shard_files(tmp_path) == _shard_files(reference)


def test_retry_failed_redoes_only_failed_shards(clean, corpus, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(corpus["videos"], videos)
    held_back = videos / "vid03.mp4"
    held_back.rename(tmp_path / "vid03.mp4")
    inputs = {**corpus, "videos": videos}
    out = tmp_path / "out"
    first = run_job(config(inputs, out, "--max-missing-videos", "0.2"))  # 1 of 6 videos missing: let it run
    assert first.failed == {"missing_file": 2}
    stats_before = {k: (out / "stats" / f"shard-00000{k}.json").stat().st_mtime_ns for k in range(4)}
    (tmp_path / "vid03.mp4").rename(held_back)
    second = run_job(config(inputs, out, "--retry-failed"))
    assert second.shards_run == 1 and second.ok == 12 and not second.failed
    stats_after = {k: (out / "stats" / f"shard-00000{k}.json").stat().st_mtime_ns for k in range(4)}
    assert [k for k in range(4) if stats_before[k] != stats_after[k]] == [2]
    assert pq.read_table(out / "failures.parquet").num_rows == 0
    assert _content(out) == _content(clean)  # source_uri differs: another videos folder


def _content(out) -> list:
    return [(s.meta.clip_id, s.meta.frame_times, s.frames, s.subtitle, s.caption) for s in iter_dataset(str(out))]


def test_driver_sigkill_then_rerun_gives_identical_output(clean, corpus, tmp_path):
    out = tmp_path / "out"
    cmd = [
        PYTHON,
        str(REPO / "preprocess/shard.py"),
        *cli_args(corpus, out, "--ray-address", "local", "--num-cpus", "1", "--max-in-flight", "1"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=script_env(**{FAULT_DELAY_ENV: "1.5"}),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.log", "w"),
    )
    try:
        first = out / "stats" / "shard-000000.json"
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the first shard was never committed: " + (tmp_path / "killed.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        _kill_group(proc)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "stats").glob("*.json"))) < 4, "the job had finished before the kill"
    rerun = run_job(config(corpus, out))
    assert rerun.manifest and 1 <= rerun.shards_skipped < 4 and rerun.ok == 12, rerun.summary()
    assert dataset_bytes(out) == dataset_bytes(clean)
    assert not [p for p in out.rglob("*") if p.name.startswith(storage.TEMP_PREFIX)]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop what the killed driver left behind (its own local Ray processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_s3_videos_in_and_shards_out(clean, corpus, ray_local, s3_bucket):
    for path in sorted(corpus["videos"].iterdir()):
        storage.put_file(str(path), f"{s3_bucket}/videos/{path.name}")
    for name in ("metadata", "subtitles", "captions"):
        storage.put_file(str(corpus[name]), f"{s3_bucket}/{name}.jsonl")
    inputs = {name: f"{s3_bucket}/{name}.jsonl" for name in ("metadata", "subtitles", "captions")}
    inputs["videos"] = f"{s3_bucket}/videos"
    out = f"{s3_bucket}/out"
    result = run_job(config(inputs, out))
    assert result.manifest == f"{out}/manifest.json" and result.ok == 12
    assert next(iter_dataset(out)).meta.source_uri == f"{s3_bucket}/videos/vid00.mp4"
    assert _content(out) == _content(clean)
    assert storage.exists(f"{out}/failures.parquet") and storage.exists(f"{out}/stats/shard-000003.json")
