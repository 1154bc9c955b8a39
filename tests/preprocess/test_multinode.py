"""The job on a 2-node Ray cluster on one machine that loses its worker node while shard tasks run on it.

``ray.cluster_utils.Cluster`` starts a head node with no CPUs, so every shard task lands on the worker
node (2 CPUs); the driver is its own process (``preprocess/shard.py --ray-address``), as on a real
cluster. The first two shards start on a video that takes a moment (~0.3 s) to reach its clips. The test
removes the worker node while both tasks are inside that video and two more tasks wait to be scheduled,
leaves the cluster without a worker until Ray has resubmitted the two lost tasks and for longer than the
per-video timeout, then adds a fresh worker node. Nothing may be timed out (the lost tasks' last reports to
the timeout board are stale, and the waiting tasks never reported), and the data set must come out
byte-identical to the one a plain one-node cluster writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline import storage
from pipeline.layout import DatasetLayout
from pipeline.shards import iter_dataset
from tests.preprocess.fixtures_job import PYTHON, REPO, cli_args, dataset_bytes, make_corpus, script_env, write_jsonl
from tests.support.sessions import kill_session

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SLOW = "vid00"
"""Made 30 s long with a single keyframe, its 6 clips near the end: shards 0 and 1 each decode ~0.3 s before a frame
(on an idle machine), the window in which the test catches them inside the video."""
VIDEO_TIMEOUT_S = 15.0
"""Well above a video's time in a task: ~0.5 s on an idle machine, over 10 s with 4 busy processes on its 2 cores."""
NO_WORKER_S = 17.0
"""The least time the cluster has no worker node: longer than the per-video timeout."""
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
"""The head declares a silent node dead after ~1.5 s (Ray's default: ~15 s); a check fails on an error or after
``health_check_timeout_ms`` (10 s), not on a slow answer, so a busy machine does not lose its head node."""
RETRIED = "so the task will be retried"
"""Ray's message (in the driver's log) when it resubmits a task whose node died."""
CLIP_IDS = [f"{SLOW}.{c}.mp4" for c in range(6)] + [f"vid{v:02d}.{c}.mp4" for v in range(1, 4) for c in range(2)]


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A private RAY_TMPDIR: the clusters' session folders and address file stay out of /tmp/ray.

    Other sessions' ``ray.init()`` must never find these clusters. Every process the clusters start
    inherits the variable, which is how the test finds what is left of them.
    """
    root = Path(tempfile.mkdtemp(prefix="vpmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(root))
        yield root
    _kill(_processes_of(root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """4 of make_corpus's videos, the first one made slow (``SLOW``); subtitles and captions inline in the metadata.

    Inline texts need no text-join pass before the shard tasks (preprocess/text/texts.py), which keeps the test short.
    """
    paths = make_corpus(tmp_path_factory.mktemp("corpus"), videos=4)
    del paths["subtitles"], paths["captions"]
    one_keyframe = "-g 100000 -keyint_min 100000 -sc_threshold 0 -bf 0"
    args = f"-f lavfi -i testsrc2=size=640x360:rate=50 -t 30 -c:v libx264 -preset ultrafast -crf 30 {one_keyframe}"
    out = paths["videos"] / f"{SLOW}.mp4"
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", *args.split(), "-pix_fmt", "yuv420p", str(out)]
    subprocess.run(cmd, check=True, timeout=120)
    videos = [json.loads(line) for line in paths["metadata"].read_text().splitlines()]
    videos[0]["clip"] = [{"clip_id": f"{SLOW}.{c}.mp4", "span": _span(20 + 1.5 * c, 21 + 1.5 * c)} for c in range(6)]
    for video in videos:
        for c, clip in enumerate(video["clip"]):
            clip.update(subtitle=f"subtitle {video['video_id']} {c}", caption=f"clip {c} of {video['video_id']}")
    write_jsonl(paths["metadata"], videos)
    return paths


def _span(start: float, end: float) -> list[str]:
    return [time.strftime("%H:%M:%S", time.gmtime(t)) + f"{t % 1:.3f}"[1:] for t in (start, end)]


@pytest.fixture(scope="module")
def one_node(corpus, ray_tmpdir, tmp_path_factory) -> Path:
    """The reference: the same job on a plain one-node, 2-CPU local cluster."""
    out = tmp_path_factory.mktemp("one_node") / "out"
    log = out.parent / "driver.log"
    proc = _start_driver(corpus, out, log, "--ray-address", "local", "--num-cpus", "2")
    try:
        _exits_cleanly(proc, log, timeout=180)
    finally:
        _kill_group(proc)
    return out


def test_worker_node_removed_mid_job(corpus, one_node, ray_tmpdir, tmp_path):
    from ray.cluster_utils import Cluster

    out, log = tmp_path / "out", tmp_path / "driver.log"
    clock = {"start": time.monotonic()}  # when each step ended, printed at the end (pytest -s)
    head_args = {"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECKS}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        worker = cluster.add_node(num_cpus=2)
        clock["cluster up"] = time.monotonic()
        proc = _start_driver(corpus, out, log, "--ray-address", cluster.address)
        try:
            slow = str(corpus["videos"] / f"{SLOW}.mp4")
            caught = lambda: _suspend_inside(worker, slow)  # noqa: E731
            _wait_for(f"2 shard tasks inside {SLOW} on the worker node", caught, proc, log)
            assert not _ray_processes(worker, "ray::_Board"), "the timeout board would die with the worker node"
            clock["tasks inside a video"] = time.monotonic()
            _lose(cluster, worker)
            _wait_for("Ray to resubmit the 2 lost tasks", lambda: log.read_text().count(RETRIED), proc, log)
            clock["lost tasks resubmitted"] = time.monotonic()
            time.sleep(max(0.0, clock["tasks inside a video"] + NO_WORKER_S - time.monotonic()))
            assert proc.poll() is None, "the driver stopped while the cluster had no worker:\n" + _tail(log)
            assert not list(out.glob("stats/*.json")), "a shard was committed with no worker node"
            cluster.add_node(num_cpus=2)
            clock["new worker up"] = time.monotonic()
            _exits_cleanly(proc, log, timeout=120)
            clock["job done"] = time.monotonic()
        finally:
            _kill_group(proc)
    finally:
        cluster.shutdown()
    print(", ".join(f"{step} {at - clock['start']:.1f} s" for step, at in clock.items()))
    _, leftovers = psutil.wait_procs(_processes_of(ray_tmpdir), timeout=15)
    assert not leftovers, f"processes left behind: {leftovers}"

    result = _run_result(out)
    assert result["manifest"] and result["shards_run"] == 4 and not result["shards_failed"], result
    assert result["ok"] == 12 and not result["failed"], "a task lost with its node, or waiting for one, was timed out"
    assert dataset_bytes(out) == dataset_bytes(one_node)
    samples = list(iter_dataset(str(out)))
    assert [s.meta.clip_id for s in samples] == CLIP_IDS
    assert samples[7].subtitle == "subtitle vid01 1" and samples[7].caption == "clip 1 of vid01"
    assert not [p for p in out.rglob("*") if p.name.startswith(storage.TEMP_PREFIX)]
    scratch = os.path.join(tempfile.gettempdir(), "vidproxy-scratch")
    assert not [k for k in range(4) if os.path.exists(DatasetLayout(str(out)).scratch(scratch, k))]
    text = log.read_text()
    assert text.count(RETRIED) == 2, "Ray did not retry exactly the two lost tasks:\n" + _tail(log)
    assert "cancelling the task" not in text and "); retrying" not in text, _tail(log)


def test_no_node_to_run_on_stops_at_the_stall_timeout(corpus, one_node, ray_tmpdir, tmp_path):
    """A cluster without a CPU: the tasks wait to be scheduled, the job stops after ``--stall-timeout`` (exit 1,
    nothing committed, every shard named); the same command (default timeouts: a video may be slow on a loaded
    machine) on the cluster with a worker node then finishes it."""
    from ray.cluster_utils import Cluster

    out, log = tmp_path / "out", tmp_path / "driver.log"
    head_args = {"num_cpus": 0, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    timeouts = ("--video-timeout", "2", "--stall-timeout", "4")
    try:
        proc = _start_driver(corpus, out, log, "--ray-address", cluster.address, *timeouts)
        try:
            code = proc.wait(timeout=90)
        finally:
            _kill_group(proc)
        text = log.read_text()
        assert code == 1, f"exit {code}:\n" + _tail(log)
        assert "stopped early: no shard task made progress for 4 s" in text, _tail(log)
        assert [
            f"shard shard-{k:06d} not committed: not run: no shard task made progress" in text for k in range(4)
        ] == [True] * 4, _tail(log)
        assert not list(out.glob("stats/*.json")) and not (out / "manifest.json").exists()
        cluster.add_node(num_cpus=2)
        proc = _start_driver(corpus, out, log, "--ray-address", cluster.address)
        try:
            _exits_cleanly(proc, log, timeout=120)
        finally:
            _kill_group(proc)
    finally:
        cluster.shutdown()
    assert dataset_bytes(out) == dataset_bytes(one_node)


def _start_driver(corpus, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """preprocess/shard.py on ``corpus`` (texts inline), at most 4 tasks in flight, output to ``log``."""
    args = cli_args({**corpus, "subtitles": "", "captions": ""}, out, "--max-in-flight", "4", *extra)
    text_flags = {i for i, arg in enumerate(args) if arg in ("--subtitles", "--captions")}
    args = [arg for i, arg in enumerate(args) if i not in text_flags and i - 1 not in text_flags]  # texts inline
    if "--video-timeout" not in extra:
        args += ["--video-timeout", str(VIDEO_TIMEOUT_S)]
    with open(log, "w") as sink:
        return subprocess.Popen(
            [PYTHON, str(REPO / "preprocess/shard.py"), *args],
            cwd=out.parent,
            env=script_env(RAY_DEDUP_LOGS="0"),  # every one of Ray's messages in the log
            start_new_session=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _lose(cluster, node) -> None:
    """``node`` goes as a machine would: its raylet and agents, then its workers, killed at once.

    (Removed alone, a raylet leaves its workers running for a few seconds; those would go on with their tasks.)
    """
    workers = psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    _kill(workers)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _suspend_inside(node, video: str) -> list[psutil.Process]:
    """Suspend (SIGSTOP) the shard tasks of ``node`` that have ``video`` open; returns all suspended so far."""
    for proc in _ray_processes(node, "ray::_run_shard"):
        try:
            if proc.status() != psutil.STATUS_STOPPED and video in {f.path for f in proc.open_files()}:
                proc.suspend()
        except psutil.Error:
            continue
    return [p for p in _ray_processes(node, "ray::_run_shard") if p.status() == psutil.STATUS_STOPPED]


def _ray_processes(node, title: str) -> list[psutil.Process]:
    """The processes of ``node`` (its raylet's descendants) whose title starts with ``title``."""
    found = []
    for child in psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.Error:
            continue
    return found


def _wait_for(what: str, find, driver: subprocess.Popen, log: Path, count: int = 2, timeout: float = 90):
    """``find()`` once it holds (or is) ``count`` or more; AssertionError after ``timeout`` s or if the driver stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        found = find()
        if (found if isinstance(found, int) else len(found)) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"waited in vain for {what}; the driver's log:\n" + _tail(log))


def _exits_cleanly(driver: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        code = driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the driver did not finish in {timeout:g} s:\n" + _tail(log)) from None
    assert code == 0, f"the driver exited with {code}:\n" + _tail(log)


def _run_result(out: Path) -> dict:
    (run_log,) = out.glob("logs/run-*.json")
    return json.loads(run_log.read_text())["result"]


def _processes_of(ray_tmpdir: Path) -> list[psutil.Process]:
    """Live processes whose environment carries this test's RAY_TMPDIR (the clusters' and drivers')."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("RAY_TMPDIR") == str(ray_tmpdir):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _kill_group(proc: subprocess.Popen) -> None:
    """The driver and anything it started in its session (a one-node run's local cluster, workers included)."""
    kill_session(proc)


def _tail(log: Path) -> str:
    """The end of the driver's log, without the raylet state dumps Ray prints when a raylet dies."""
    lines = [line for line in log.read_text().splitlines() if "[state-dump]" not in line] if log.exists() else []
    return "\n".join(lines)[-4000:]
