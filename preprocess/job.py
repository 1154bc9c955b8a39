"""The Ray job: inputs -> shard tasks (bounded, retried, timed out) -> stats -> manifest last.

The only module that imports ray. One Ray task per shard runs :func:`process_shard`.

- Backpressure: at most ``max_in_flight`` shard tasks are submitted at once (a ``ray.wait`` loop).
- Worker death: Ray reruns the task up to ``max_retries`` times; a task that raised is
  resubmitted by the driver up to ``max_retries`` times. If the worker keeps dying on the
  same video, that video's clips are recorded as ``worker_died`` and the shard is rerun
  without it: when Ray's retries are spent, the driver submits the shard once more, and that
  attempt gives up the video its dead predecessors on the node were in (a marker file they left,
  preprocess/shard_task.py ``VideoDeaths``: their reports to the board may have died with them).
  Should it die too (on another node, no marker), the video on the board is given up, if any.
- Timeouts: each task reports the video it is working on to a small board actor; a video
  busy for longer than ``video_timeout_s`` gets its task killed (``ray.cancel(force=True)``)
  and the shard is rerun without that video, whose clips are recorded as ``timeout``. The
  shard's bytes are then exactly those of a run where that video was missing. A task waiting for a
  download reports no video (the fetch settings bound that wait). A report from a
  node that died is dropped: Ray reruns that task, whose clock starts again at its first video.
- Resume: shards whose stats JSON exists are skipped; ``retry_failed`` uncommits shards
  that recorded failures first. The manifest is written only when every shard is committed.
  Before and after its tasks run, the job removes what killed workers left in its output folder
  (local temp files; S3 multipart uploads in progress, aborted): it is that folder's one writer.
- Start checks (preprocess/input_checks.py): a required text with no source, or more source videos missing
  from their folder than ``max_missing_videos``, stops the job before anything is written (one line).
- Model stages (captions, ASR, frame-text scores): the models are checked before any work, then loaded once per
  actor of a small pool per stage (GPU actors when the cluster has GPUs); a shard task sends its
  batches to one actor of each pool. A model failure on a batch is a ``ModelError`` (retried
  per sample in the task); an actor that dies fails the task, which is rerun like any other.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from pipeline import storage
from pipeline.layout import DatasetLayout, shard_stem
from pipeline.manifest import Manifest, write_manifest
from preprocess.config import PreprocessConfig, RayConfig
from preprocess.failures import Failure, merge_tables
from preprocess.faults import Faults
from preprocess.fetching.config import PERMANENT
from preprocess.fetching.host_gate import HostGate
from preprocess.input_checks import (
    VideoCheck,
    inline_texts,
    text_file,
    text_model,
    unmatched_message,
    unsourced,
    unsourced_message,
)
from preprocess.plan import ShardSlice, metadata_files, plan_shards, read_slice
from preprocess.scoring.similarity import FrameTextScorer, check_score_model, guarded_scores
from preprocess.shard_task import ShardSettings, ShardStats, ShardTask, process_shard
from preprocess.text.asr import Transcriber, check_transcriber
from preprocess.text.captions import Captioner, check_captioner
from preprocess.text.join import LOCAL_JOIN_CLIPS
from preprocess.text.model_loading import torch_device
from preprocess.text.stages import ModelError, guarded
from preprocess.text.texts import TextSources

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class JobResult:
    """What a run did (also written to ``logs/run-<time>.json``)."""

    shards_total: int = 0
    shards_skipped: int = 0
    shards_run: int = 0
    shards_failed: dict[int, str] = field(default_factory=dict)
    clips: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    input_failures: dict[str, int] = field(default_factory=dict)
    texts: dict[str, int] = field(default_factory=dict)
    run_clips: int = 0
    run_clip_seconds: float = 0.0
    wall_seconds: float = 0.0
    manifest: str | None = None
    stopped: str = ""
    """Why the job stopped before submitting every shard (the totals above count the shards planned so far)."""
    videos: str = ""
    """The video check at the start: found and missing (or to fetch) in one listing of the videos folder."""
    score_errors: int = 0
    """Clips the frame-text score model failed on (kept without ``sim_*``; rows ``score_error`` in the failures)."""
    with_text: dict[str, int] = field(default_factory=dict)
    """Samples written with a non-empty text, per text (the manifest's coverage counts)."""
    required_texts: tuple[str, ...] = ()
    """``--require-texts``: a required text most samples lack gets a warning line in the summary."""

    def summary(self) -> str:
        rate = self.run_clips / self.wall_seconds if self.wall_seconds else 0.0
        hours = self.run_clip_seconds / 3600 / self.wall_seconds if self.wall_seconds else 0.0
        lines = [self.videos] if self.videos else []
        lines += [
            f"clips: {self.clips} total, {self.ok} ok, {sum(self.failed.values())} failed {_reasons(self.failed)}",
            f"input line problems: {sum(self.input_failures.values())} {_reasons(self.input_failures)}",
            f"shards: {self.shards_total} total, {self.shards_run} run now, {self.shards_skipped} already committed, "
            f"{len(self.shards_failed)} failed",
            f"speed: {rate:.2f} clips/s, {hours:.4f} hours of video/s, {self.wall_seconds:.1f} s wall",
        ]
        if self.texts:
            lines.append(f"texts: {_reasons(self.texts)}")
        lines += self._coverage_warnings()
        if self.score_errors:
            lines.append(f"frame-text scores: {self.score_errors} clips failed (kept without sim_*; failures table)")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}")
        for index, message in sorted(self.shards_failed.items()):
            lines.append(f"shard {shard_stem(index)} not committed: {message}")
        lines.append(
            f"manifest: {self.manifest}"
            if self.manifest
            else "manifest: not written (rerun the same command to finish)"
        )
        return "\n".join(lines)

    def _coverage_warnings(self) -> list[str]:
        """A required text that under half of the samples have (an LMDB or ASR that matched few clips): training's
        default data.min_text_coverage would refuse these shards."""
        return [
            f"warning: {name}: {self.with_text.get(name, 0)} of {self.ok} samples have one (required by "
            f"--require-texts; training refuses a loss term whose text is under data.min_text_coverage, 0.5 by default)"
            for name in self.required_texts
            if self.ok and self.with_text.get(name, 0) < self.ok / 2
        ]


def _reasons(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + ")" if counts else ""


# --------------------------------------------------------------------------- driver


def run_job(cfg: PreprocessConfig) -> JobResult:
    """Run (or resume) the whole job; returns what happened. Writes the manifest last.

    The metadata is planned as a stream (preprocess/plan.py): shard tasks are submitted while the plan goes on,
    and the driver holds the shards in flight, never the clips.
    """
    started = time.monotonic()
    out = DatasetLayout(cfg.sharding.output)
    _check_models(cfg)
    settings = _settings(cfg)
    _check_texts(cfg, settings)
    plan, videos = _checked_plan(cfg, settings)
    _check_config(out, cfg.manifest_config())
    if videos:
        log.info("%s", videos)
    _clean_up(out)
    committed = set(out.list_stats())
    if cfg.retry_failed:
        _uncommit_failed(out, committed)
    result = JobResult(shards_skipped=len(committed), videos=videos, required_texts=cfg.inputs.require_texts)
    slices = _counted(plan, result)
    result.shards_failed = _dispatch(slices, settings, cfg, committed, result, started)
    _clean_up(out)  # a worker killed and retried in this run may have left a temp file or an upload
    result.shards_skipped = sum(1 for k in committed if k < result.shards_total) - result.shards_run
    stats = _read_stats(out, committed, result.shards_total)
    _tally(result, stats)
    if len(stats) == result.shards_total:
        result.manifest = _finalize(cfg, out, stats)
    result.wall_seconds = round(time.monotonic() - started, 3)
    _write_run_log(cfg, result)
    return result


def _clean_up(out: DatasetLayout) -> None:
    removed = storage.cleanup_temp(out.root)
    if removed:
        log.info("removed %d temp files or unfinished uploads that killed workers left under %s", removed, out.root)


def _counted(slices: Iterator[ShardSlice], result: JobResult) -> Iterator[ShardSlice]:
    """The plan's slices, counting shards and clips into ``result`` as they go by."""
    for piece in slices:
        result.shards_total += 1
        result.clips += piece.clips
        yield piece


def _check_models(cfg: PreprocessConfig) -> None:
    """A missing model folder, or one that holds the wrong kind of model, stops the job before any work."""
    if cfg.captioner is not None:
        check_captioner(cfg.captioner)
    if cfg.asr is not None:
        check_transcriber(cfg.asr)
    if cfg.scores.model is not None:
        check_score_model(cfg.scores.model)


def _check_texts(cfg: PreprocessConfig, settings: ShardSettings) -> None:
    """A required text needs a file, a model stage or inline texts (preprocess/input_checks.py): for the last, the
    clips of the first shard must carry some (one ranged read; the whole metadata is not read for this)."""
    inline = collections.Counter()
    if any(not text_file(cfg, f) and not text_model(cfg, f) for f in cfg.inputs.require_texts):
        files, layout = list(settings.metadata), cfg.inputs.layout
        with contextlib.closing(plan_shards(files, cfg.sharding.clips_per_shard, layout)) as plan:
            first = next(plan, None)
        if first is None:  # no clip at all: nothing to refuse
            return
        inline = inline_texts(read_slice(files, first, layout).clips)
    missing = unsourced(cfg, inline)
    if missing:
        raise ValueError(unsourced_message(cfg, missing))


def _checked_plan(cfg: PreprocessConfig, settings: ShardSettings) -> tuple[Iterator[ShardSlice], str]:
    """The plan, and the video check's line ("" when it is off). The plan is read through before the first task
    when the videos are checked (their count comes with it, preprocess/input_checks.py) or the texts are joined
    (the join needs every slice); its slices are a few cursors each. ValueError: too many videos missing."""
    videos = VideoCheck.listing(cfg.inputs)
    files, per_shard = list(settings.metadata), cfg.sharding.clips_per_shard
    plan = plan_shards(files, per_shard, cfg.inputs.layout, videos.add_line if videos is not None else None)
    if videos is None and not settings.texts.joined():
        return plan, ""
    slices = list(plan)
    if videos is None:
        return iter(slices), ""
    refusal = videos.refusal()
    if refusal:
        raise ValueError(refusal)
    return iter(slices), videos.line()


def _check_config(out: DatasetLayout, config: dict) -> None:
    """An output folder holds one data set: refuse to mix shards made with another config."""
    uri = out.config
    encoded = (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()
    try:
        existing = storage.read_bytes(uri)
    except storage.StorageNotFound:
        storage.write_bytes(uri, encoded)
        return
    if existing != encoded:
        old = json.loads(existing)
        diff = sorted(f"{s}.{k}" for s in config for k in config[s] if old.get(s, {}).get(k) != config[s][k])
        diff += sorted(set(config) ^ set(old))
        hint = ""
        if "scores" in config and "scores" not in old:  # made before the quality scores existed
            hint = ", or --no-score-quality to finish it as it was begun (without scores)"
        raise ValueError(
            f"{out.root} holds shards made with another config (differs in {', '.join(diff) or 'layout'}); "
            f"use a new --output{hint}"
        )


STATS_READERS = 16
"""Threads reading the committed shards' stats at the end (one small GET each)."""


def _read_stats(out: DatasetLayout, committed: set[int], num_shards: int) -> dict[int, ShardStats]:
    """The stats of the committed shards of this plan (read in parallel; stats beyond the plan are ignored)."""
    from concurrent.futures import ThreadPoolExecutor

    beyond = sorted(k for k in committed if k >= num_shards)
    if beyond:
        log.warning(
            "%d stats files name shards beyond this metadata's %d (first: %s); ignored",
            len(beyond),
            num_shards,
            out.stats(beyond[0]),
        )
    indices = sorted(k for k in committed if k < num_shards)

    def read(index: int) -> ShardStats:
        uri = out.stats(index)
        return ShardStats.from_json(storage.read_bytes(uri), uri)

    with ThreadPoolExecutor(STATS_READERS) as pool:
        return dict(zip(indices, pool.map(read, indices)))


def _uncommit_failed(out: DatasetLayout, committed: set[int]) -> None:
    """Uncommit the shards with a failure worth retrying: any but a permanent fetch failure (a video that is
    private, removed, 404...: it will not come back)."""
    stats = _read_stats(out, committed, max(committed, default=-1) + 1)
    failed = [k for k, s in stats.items() if set(s.failed) - PERMANENT]
    if failed:
        storage.delete(out.manifest)
    for index in failed:
        storage.delete(out.stats(index))
        committed.discard(index)
    log.info("retry-failed: redoing %d shards that had failed clips (permanent fetch failures aside)", len(failed))


def _settings(cfg: PreprocessConfig) -> ShardSettings:
    inputs = cfg.inputs
    return ShardSettings(
        output=cfg.sharding.output,
        metadata=tuple(metadata_files(inputs.metadata)),
        texts=TextSources.of(inputs.subtitles, inputs.captions, inputs.max_text_chars),
        videos=cfg.inputs.videos,
        keep_sources=inputs.keep_sources,
        fetch=cfg.fetch_settings() if inputs.fetch else None,
        layout=cfg.inputs.layout,
        decode=cfg.decode,
        max_shard_bytes=cfg.sharding.max_shard_bytes,
        faults=Faults.from_env(),
        max_video_deaths=cfg.ray.max_retries + 1,
        captioner=cfg.captioner,
        asr=cfg.asr,
        scores=cfg.scores,
    )


# --------------------------------------------------------------------------- Ray dispatch


@ray.remote
class _Board:
    """Which video each running shard task is on, since when (one clock: this actor's), and on which node."""

    def __init__(self):
        self._current: dict[str, tuple[str, float, str]] = {}

    def report(self, token: str, video_id: str | None, node: str) -> None:
        """The task is on ``video_id`` from now (None: on no video, e.g. waiting for a download)."""
        self._current[token] = (video_id, time.monotonic(), node)

    def forget(self, token: str, node: str | None = None) -> None:
        """Drop the token's entry (only if it was reported from ``node``, when given)."""
        if node is None or self._current.get(token, (None, 0.0, None))[2] == node:
            self._current.pop(token, None)

    def current(self, token: str) -> str | None:
        return self._current.get(token, (None, 0.0, None))[0]

    def busy(self) -> dict[str, tuple[str, float, str]]:
        """token -> (video id, seconds on it so far, node id)."""
        now = time.monotonic()
        return {t: (v, now - since, node) for t, (v, since, node) in self._current.items()}


@ray.remote
class _ModelActor:
    """One loaded model of a stage (caption, ASR or score); ``run`` maps a batch of inputs to texts (scores)."""

    def __init__(self, kind: str, cfg, threads: int):
        device = torch_device(bool(ray.get_gpu_ids()), threads)
        self.guard = guarded_scores if kind == "score" else guarded
        if kind == "caption":
            self.fn = Captioner(cfg, device).from_jpegs
        elif kind == "score":
            self.fn = FrameTextScorer(cfg.model, device)
        else:
            self.fn = Transcriber(cfg, device)

    def run(self, batch: list) -> list:
        return self.guard(self.fn, batch)


def _model_fn(actors: list, index: int):
    """The task side of a stage: a batch goes to one actor of the pool (chosen by shard index)."""
    if not actors:
        return None
    actor = actors[index % len(actors)]

    def call(batch: list) -> list[str]:
        try:
            return ray.get(actor.run.remote(batch))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ModelError):
                raise ModelError(str(exc.cause)) from None
            raise

    return call


class _GateClient:
    """The shard task's side of the job-wide host gate (a ``HostGate`` in one actor): the same methods."""

    def __init__(self, actor):
        self.actor = actor

    def try_acquire(self, host: str) -> float:
        return ray.get(self.actor.try_acquire.remote(host))

    def release(self, host: str) -> None:
        self.actor.release.remote(host)

    def back_off(self, host: str, seconds: float) -> None:
        self.actor.back_off.remote(host, seconds)


def _run_shard(
    task: ShardTask,
    settings: ShardSettings,
    board,
    token: str,
    captioners: list,
    transcribers: list,
    scorers: list,
    gate,
) -> ShardStats:
    node = ray.get_runtime_context().get_node_id()
    return process_shard(
        task,
        settings,
        on_video=lambda video_id: board.report.remote(token, video_id, node),
        caption=_model_fn(captioners, task.index),
        transcribe=_model_fn(transcribers, task.index),
        gate=_GateClient(gate) if gate is not None else None,
        score=_model_fn(scorers, task.index),
    )


def _model_pools(cfg: PreprocessConfig) -> dict[str, list]:
    """Actor pools of the configured stages: one actor per GPU (a share of it per stage), else ``model_actors``
    CPU actors."""
    stages = (("caption", cfg.captioner), ("asr", cfg.asr), ("score", cfg.scores if cfg.scores.model else None))
    stages = {name: c for name, c in stages if c is not None}
    if not stages:
        return {}
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = cfg.ray.model_actors or max(1, gpus)
    share = 1.0 / len(stages) if gpus else 0
    pools = {}
    for name, stage_cfg in stages.items():
        options = _ModelActor.options(num_cpus=cfg.ray.model_cpus, num_gpus=share, max_restarts=3)
        pools[name] = [options.remote(name, stage_cfg, int(cfg.ray.model_cpus)) for _ in range(count)]
    log.info("model stages: %s, %d actor(s) each, %s GPU each", ", ".join(stages), count, share)
    return pools


@dataclass
class _Attempt:
    task: ShardTask
    token: str
    errors: int = 0
    rechecked: bool = False
    """Submitted again after Ray's retries of a dying worker ran out (``_Dispatcher._died``)."""


class _Dispatcher:
    """Keeps at most ``max_in_flight`` shard tasks running; handles results, deaths and timeouts."""

    def __init__(
        self,
        settings: ShardSettings,
        cfg: PreprocessConfig,
        committed: set[int],
        progress,
        result: JobResult,
        started: float,
    ):
        rc = cfg.ray
        self.rc, self.committed, self.progress, self.result = rc, committed, progress, result
        self.started = started
        self.remote = ray.remote(_run_shard).options(
            num_cpus=rc.task_cpus, max_retries=rc.max_retries, retry_exceptions=False
        )
        # On the driver's node: a board on a worker node dies with that node, and the job with it (ActorUnavailable).
        here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
        self.board = _Board.options(num_cpus=0, scheduling_strategy=here).remote()
        self.gate = None
        if settings.fetch is not None:  # one gate for the whole job: per-host concurrency and rate
            fetch = settings.fetch
            gate = ray.remote(HostGate).options(num_cpus=0, scheduling_strategy=here, max_concurrency=64)
            # a slot of a task killed mid-download comes back after the longest a download may take
            self.gate = gate.remote(fetch.host_concurrency, fetch.host_rate, lease_s=fetch.timeout_s + 60.0)
        self.settings_ref = ray.put(settings)
        self.pools = _model_pools(cfg)
        self.max_in_flight = rc.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        self.pending: dict[ray.ObjectRef, _Attempt] = {}
        self.failed: dict[int, str] = {}
        self.given_up: dict[str, Failure] = {}
        """Videos that timed out or killed workers: later shards skip them at once (same outcome, no second wait)."""
        self._generation = 0
        self._seen: set[tuple[str, str]] = set()
        """(token, video) pairs on the board at the last look: a new one is progress."""
        self._progress_at = time.monotonic()
        self.stalled = False

    def submit(self, task: ShardTask, errors: int = 0, rechecked: bool = False) -> None:
        if any(v not in task.excluded for v in self.given_up):  # few: videos that timed out or killed workers
            task = dataclasses.replace(task, excluded={**self.given_up, **task.excluded})
        if self._generation == 0:
            log.info("first shard task submitted after %.2f s", time.monotonic() - self.started)
        self._generation += 1
        token = f"{task.index}.{self._generation}"
        models = (self.pools.get("caption", []), self.pools.get("asr", []), self.pools.get("score", []))
        ref = self.remote.remote(task, self.settings_ref, self.board, token, *models, self.gate)
        self.pending[ref] = _Attempt(task=task, token=token, errors=errors, rechecked=rechecked)

    def run(self, tasks: Iterator[ShardTask]) -> dict[int, str]:
        """Submit the tasks as room frees up (the iterator is read lazily: the plan streams in)."""
        tasks = iter(tasks)
        more = True
        while (more or self.pending) and not self.stalled:
            while more and len(self.pending) < self.max_in_flight:
                task = next(tasks, None)
                if task is None:
                    more = False
                    break
                self.submit(task)
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                self._finished(ref, self.pending.pop(ref))
                self._progress_at = time.monotonic()
            self._cancel_stuck()
        for actor in (a for pool in self.pools.values() for a in pool):
            ray.kill(actor)
        return self.failed

    def _finished(self, ref, attempt: _Attempt) -> None:
        try:
            stats = ray.get(ref)
        except ray.exceptions.WorkerCrashedError as exc:
            self._died(attempt, exc)
            return
        except (ray.exceptions.RayTaskError, ray.exceptions.RayError) as exc:
            self._raised(attempt, exc)
            return
        finally:
            self.board.forget.remote(attempt.token)
        self.committed.add(attempt.task.index)
        self.result.shards_run += 1
        self.result.run_clips += stats.clips
        self.result.run_clip_seconds += stats.clip_seconds
        self.progress.update(stats.clips)

    def _died(self, attempt: _Attempt, exc: Exception) -> None:
        task, deaths = attempt.task, self.rc.max_retries + 1
        if not attempt.rechecked:
            log.warning(
                "shard %s: worker died %d times; one more attempt, which gives up a video they all died in",
                shard_stem(task.index),
                deaths,
            )
            self.submit(task, attempt.errors, rechecked=True)
            return
        video = ray.get(self.board.current.remote(attempt.token))
        if video is None or video in task.excluded:
            self._give_up(task, f"worker died {2 * deaths} times: {_first_line(exc)}")
            return
        log.warning(
            "shard %s: worker died %d times, last on video %s; rerunning the shard without it",
            shard_stem(task.index),
            2 * deaths,
            video,
        )
        message = f"the worker process died {2 * deaths} times while decoding video {video}"
        self.submit(self._exclude(task, video, Failure(stage="task", error="worker_died", message=message)))

    def _raised(self, attempt: _Attempt, exc: Exception) -> None:
        if attempt.errors < self.rc.max_retries:
            log.warning("shard %s raised (%s); retrying", shard_stem(attempt.task.index), _first_line(exc))
            self.submit(attempt.task, attempt.errors + 1)
            return
        self._give_up(attempt.task, f"raised {attempt.errors + 1} times: {_first_line(exc)}")

    def _give_up(self, task: ShardTask, message: str) -> None:
        log.error("shard %s not committed: %s", shard_stem(task.index), message)
        self.failed[task.index] = message
        self.progress.update(task.slice.clips)

    def _cancel_stuck(self) -> None:
        if not self.pending:
            return
        busy = ray.get(self.board.busy.remote())
        self._check_stall(busy)
        dead = None
        for ref, attempt in list(self.pending.items()):
            video, seconds, node = busy.get(attempt.token, (None, 0.0, None))
            if video is None or video in attempt.task.excluded:  # an excluded video's clips fail at once
                continue
            if seconds <= self.rc.video_timeout_s and video not in self.given_up:
                continue
            dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]} if dead is None else dead
            if node in dead:  # Ray reruns the task, maybe after a long wait for a CPU: its clock restarts then
                self.board.forget.remote(attempt.token, node)
                continue
            log.warning(
                "shard %s: video %s busy for over %.0f s; cancelling the task",
                shard_stem(attempt.task.index),
                video,
                self.rc.video_timeout_s,
            )
            ray.cancel(ref, force=True)
            del self.pending[ref]
            self.board.forget.remote(attempt.token)
            message = (
                f"video {video} was still being read or decoded after {self.rc.video_timeout_s:g} s "
                "(the task was cancelled)"
            )
            failure = self.given_up.get(video, Failure(stage="task", error="timeout", message=message))
            self.submit(self._exclude(attempt.task, video, failure), attempt.errors)

    def _check_stall(self, busy: dict) -> None:
        """Stop when no task has started a video or ended for ``stall_limit_s``: none can run (a running task
        starts a new video, ends, or is timed out within ``video_timeout_s``)."""
        seen = {(token, video) for token, (video, _, _) in busy.items()}
        if seen - self._seen:
            self._progress_at = time.monotonic()
        self._seen = seen
        waited = time.monotonic() - self._progress_at
        if waited <= self.rc.stall_limit_s:
            return
        cpus = ray.cluster_resources().get("CPU", 0)
        message = (
            f"not run: no shard task made progress for {waited:.0f} s (stall timeout; the cluster has {cpus:g} "
            f"CPUs, a task needs {self.rc.task_cpus:g})"
        )
        log.error(
            "no shard task made progress for %.0f s; stopping with %d shards in flight", waited, len(self.pending)
        )
        for ref, attempt in self.pending.items():
            ray.cancel(ref, force=True)
            self.board.forget.remote(attempt.token)
            self._give_up(attempt.task, message)
        self.pending.clear()
        self.stalled = True

    def _exclude(self, task: ShardTask, video: str, failure: Failure) -> ShardTask:
        self.given_up[video] = failure
        return dataclasses.replace(task, excluded={**task.excluded, video: failure})


def _first_line(exc: Exception) -> str:
    """``Type: message`` of what a task raised (its own exception, not Ray's wrapper), on one line."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception):
        exc = exc.cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _dispatch(
    slices: Iterator[ShardSlice],
    settings: ShardSettings,
    cfg: PreprocessConfig,
    committed: set[int],
    result: JobResult,
    started: float,
) -> dict[int, str]:
    """Run the shard tasks of the uncommitted slices (no cluster is started when there are none)."""
    todo = (ShardTask(index=piece.index, slice=piece) for piece in slices if piece.index not in committed)
    first = next(todo, None)
    if first is None:
        return {}
    storage.delete(DatasetLayout(settings.output).manifest)  # the data set is incomplete until the last shard
    from tqdm import tqdm

    with ray_session(cfg.ray):
        with tqdm(unit="clip", disable=not cfg.progress, file=sys.stderr, desc="preprocess") as bar:
            tasks = itertools.chain([first], todo)
            if settings.texts.joined():
                tasks = [first, *todo]
                _check_joined(cfg, settings, _join_texts(tasks, settings))
            dispatcher = _Dispatcher(settings, cfg, committed, bar, result, started)
            failed = dispatcher.run(tasks)
            if dispatcher.stalled:
                result.stopped = f"no shard task made progress for {cfg.ray.stall_limit_s:g} s (--stall-timeout)"
            return failed


def _check_joined(cfg: PreprocessConfig, settings: ShardSettings, result) -> None:
    """ValueError (one line) when a required text's file gave no clip of the plan a text and no stage fills it in:
    the shards would all lack it (the join's counts; a resumed join's come from its marker)."""
    for stage, uri in settings.texts.joined().items():
        name = stage.removesuffix("s")
        problem = unmatched_message(cfg, name, uri, None) if not result.texts.get(stage) else None
        if problem:
            raise ValueError(problem)


def _join_texts(tasks: list[ShardTask], settings: ShardSettings):
    """Each shard's texts into a file of its own (preprocess/text/join.py), read by the shard task: a join on Ray
    Data over the clip ids of the shards to run, which each worker reads from its slices of the metadata."""
    files, layout = list(settings.metadata), settings.layout

    def clip_rows(row: dict) -> list[dict]:
        piece = ShardSlice.from_json(row["slice"])
        return [
            {"shard": piece.index, "position": c.position, "clip_id": c.clip_id}
            for c in read_slice(files, piece, layout).clips
        ]

    if sum(t.slice.clips for t in tasks) <= LOCAL_JOIN_CLIPS:  # small: the rows here, and maybe joined here
        clips = [row for t in tasks for row in clip_rows({"slice": t.slice.to_json()})]
    else:
        clips = ray.data.from_items([{"slice": t.slice.to_json()} for t in tasks]).flat_map(clip_rows)
    return join_texts(clips, settings.texts.joined(), settings.texts.max_chars, DatasetLayout(settings.output), None)


@contextlib.contextmanager
def ray_session(rc: RayConfig):
    """Connect to (or start) a cluster for the block; jobs run inside reuse it. Closed only if opened here."""
    owns = _init_ray(rc)
    try:
        yield
    finally:
        if owns:
            ray.shutdown()


def _init_ray(rc: RayConfig) -> bool:
    """Connect to (or start) a cluster; True when this call started the connection."""
    if ray.is_initialized():
        return False
    runtime_env = None if os.environ.get(_JOBS_API_ENV) else {"py_modules": _code_packages()}
    if rc.address == "local" or rc.num_cpus is not None:
        ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(address=rc.address, runtime_env=runtime_env)
    log.info("ray cluster: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "memory")})
    return True


_JOBS_API_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set in a driver started by ``ray job submit``, whose runtime env (working dir) already ships the code."""


def _code_packages() -> list:
    """Ship our packages to the workers, so any cluster can import them, whatever its folders."""
    import pipeline
    import preprocess

    return [pipeline, preprocess]


# --------------------------------------------------------------------------- results


def _tally(result: JobResult, stats: dict[int, ShardStats]) -> None:
    for shard in stats.values():
        result.ok += shard.ok
        result.score_errors += shard.score_errors
        for entry in shard.entries:
            for name, n in entry.texts.items():
                result.with_text[name] = result.with_text.get(name, 0) + n
        for into, counts in (
            (result.failed, shard.failed),
            (result.texts, shard.texts),
            (result.input_failures, shard.input_failures),
        ):
            for reason, n in counts.items():
                into[reason] = into.get(reason, 0) + n


def _finalize(cfg: PreprocessConfig, out: DatasetLayout, stats: dict[int, ShardStats]) -> str:
    """Merge the failures tables (shard by shard: memory of one shard's table), then write the manifest (last)."""
    tables = [out.shard_failures(k) for k in sorted(stats)]
    if storage.exists(out.text_failures):
        tables.insert(0, out.text_failures)
    merge_tables(tables, out.failures)
    entries = tuple(e for k in sorted(stats) for e in stats[k].entries)
    return write_manifest(out.root, Manifest(shards=entries, config=cfg.manifest_config()))


def _write_run_log(cfg: PreprocessConfig, result: JobResult) -> None:
    """Run-specific facts (wall time, host) go here, never into the manifest."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    record = {
        "config": cfg.run_config(),
        "result": dataclasses.asdict(result),
        "host": os.uname().nodename,
        "pid": os.getpid(),
    }
    uri = DatasetLayout(cfg.sharding.output).run_log(stamp, os.getpid())
    storage.write_bytes(uri, (json.dumps(record, indent=1, sort_keys=True, default=str) + "\n").encode())


# ---- text join (Ray Data)
# The per-shard text files of preprocess/text/join.py, made by one Ray Data pipeline (docs/preprocessing.md,
# "How texts reach the shards"). Imports are local to this section.


def join_texts(
    clip_rows,
    sources: dict[str, str],
    max_chars: int,
    out: DatasetLayout,
    num_partitions: int | None = None,
    *,
    range_bytes: int | None = None,
):
    """Write ``texts/shard-<k>.jsonl`` for every shard of ``clip_rows`` (a Ray Dataset, or a list of dicts, of
    ``{shard, position, clip_id}``), ``failures/texts.parquet``, then the marker; skipped when the marker of the
    same sources and cut is there. ``sources``: stage name -> jsonl or JSON-list URI (no LMDB). Returns a
    ``TextJoinResult``. Needs a Ray connection (``ray_session``). A small join (a list of rows, no
    ``num_partitions``, preprocess/text/join.py ``LOCAL_JOIN_CLIPS``) runs in this process instead of on Ray Data:
    the same files."""
    from preprocess.text import join as text_join

    started = time.monotonic()
    spec = text_join.JoinSpec.of(sources, max_chars)
    finished = text_join.finished_join(out, spec)
    if finished is not None:
        log.info("text join: %s already holds the texts of %s; skipped", out.root, spec.marker()["sources"])
        return finished
    storage.delete(out.texts_marker)
    range_bytes = range_bytes or text_join.RANGE_BYTES
    stream = text_join.FailureStream(spec)
    import ray.data

    if not isinstance(clip_rows, ray.data.Dataset) and num_partitions is None and spec.local(len(clip_rows)):
        batches = text_join.join_locally(clip_rows, spec, out.root, range_bytes).to_batches()
    else:
        partitions = num_partitions or spec.default_partitions(int(ray.cluster_resources().get("CPU", 1)))
        failures = _text_join_dataset(clip_rows, spec, range_bytes, partitions, out)
        batches = failures.iter_batches(batch_format="pyarrow")
    text_join.write_failures(out.text_failures, stream.failures(batches))
    result = stream.result
    result.seconds = round(time.monotonic() - started, 3)
    text_join.write_marker(out, spec, result)
    summary = (result.shards, result.texts, result.failures, result.seconds)
    log.info("text join: %d shard files, %s texts, %d failures, %.1f s", *summary)
    return result


def _text_join_dataset(clip_rows, spec, range_bytes: int, partitions: int, out: DatasetLayout):
    """The lazy pipeline: parse -> join with the clips -> group by shard (write) -> the failure rows, sorted."""
    import ray.data

    from preprocess.text import join as text_join

    context = ray.data.DataContext.get_current()
    saved = context.shuffle_input_batch_bytes
    # A shuffle map task coalesces its input up to this many bytes (1 GiB by default): one range's rows at most.
    context.shuffle_input_batch_bytes = min(saved, range_bytes)
    items = spec.read_items(range_bytes)
    try:
        items_ds = ray.data.from_items(items, override_num_blocks=len(items))  # takes the context as it is now
    finally:
        context.shuffle_input_batch_bytes = saved
    parsed = items_ds.map_batches(text_join.parse_items, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec})
    if not isinstance(clip_rows, ray.data.Dataset):
        clip_rows = ray.data.from_arrow(text_join.clip_table(clip_rows))
    joined = parsed.join(clip_rows, join_type="full_outer", num_partitions=partitions, on=("clip_id",))
    written = (
        joined.map_batches(text_join.route, batch_format="pyarrow")
        .groupby("group", num_partitions=partitions)
        .map_groups(text_join.write_group, batch_format="pyarrow", fn_kwargs={"root": out.root, "spec": spec})
    )
    return written.sort(text_join.SORT_KEYS)
