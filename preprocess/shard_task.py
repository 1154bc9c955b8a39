"""The work of one shard, with no Ray in sight: clips -> decode -> ClipSample -> tars -> stats.

Shard ``k`` holds the clips at input positions ``[k*n, (k+1)*n)``. Its outputs, written in
this order, are the tars ``shard-<k>-000.tar`` (``-001``... when the byte limit splits
it), the failures table ``failures/shard-<k>.parquet`` and, last, the stats
``stats/shard-<k>.json`` (names from :mod:`pipeline.layout`); a shard is committed once its stats
exist. The stats carry the shards' manifest entries, so the manifest is built without re-reading any tar. Every write
is atomic (:mod:`pipeline.storage`), so a killed worker leaves no partial file under a
final name, and a rerun writes the same bytes again.

Consecutive clips of the same video are decoded from one open file. A video on S3 is
streamed to a local scratch file first (bounded disk, constant RAM) and deleted after.

With a caption or ASR stage, samples pass through :class:`preprocess.text.stages.TextStages`
(batched model calls, input order kept) on their way to the writer; the models themselves are
callables handed in by the caller (Ray actors in :mod:`preprocess.job`). Clips without a given
subtitle ask the decoder for their audio, read in the same pass as their frames.

Quality scores (preprocess/scoring/): motion, static, black and cuts come from small copies of the frames the
decoder keeps in the same pass; the frame-text similarity, when a score model is given, is one more batched
stage after the text stages (its model a callable handed in, like theirs), so generated texts are scored too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.layout import DatasetLayout, index_name, shard_stem
from pipeline.manifest import ShardEntry
from pipeline.schema import ClipMeta, ClipSample, SchemaError, TextSource
from pipeline.shards import ShardLimits, ShardWriter
from preprocess.config import Layout
from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
from preprocess.failures import Failure, failures_table, write_table
from preprocess.faults import Faults
from preprocess.fetching.config import FetchConfig
from preprocess.fetching.sources import LocalVideo, ShardSources, SourceSettings, local_video, prefetched
from preprocess.inputs import ClipItem, TextEntry, clip_file
from preprocess.plan import ShardSlice, SliceContents, read_slice
from preprocess.scoring.config import ScoreConfig
from preprocess.scoring.quality import quality_scores
from preprocess.scoring.stage import SimilarityStage
from preprocess.text.asr import AsrConfig
from preprocess.text.captions import CaptionConfig
from preprocess.text.stages import ModelFn, StageModel, TextStages
from preprocess.text.texts import TextSources, with_texts

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ShardSettings:
    """What every shard task needs besides its slice of the metadata."""

    output: str
    metadata: tuple[str, ...]
    """The metadata files, in input order (preprocess/plan.py)."""
    videos: str | None
    """Folder or s3:// prefix of the videos (None: every source video is fetched)."""
    layout: Layout
    decode: DecodeConfig
    max_shard_bytes: int
    texts: TextSources = TextSources()
    faults: Faults = Faults()
    captioner: CaptionConfig | None = None
    """Generate captions of the clips that have none given (the model is passed to process_shard)."""
    asr: AsrConfig | None = None
    """Transcribe the audio of the clips that have no subtitle given."""
    scores: ScoreConfig = ScoreConfig()
    """The quality scores to compute (the similarity model, if any, is passed to process_shard)."""
    keep_sources: str | None = None
    """Archive of fetched source videos (looked up after ``videos``)."""
    fetch: FetchConfig | None = None
    """Download source videos found nowhere from their metadata ``url``."""
    max_video_deaths: int = 4
    """A video in which this many attempts at a shard died (on one node) is given up by the next attempt there:
    its clips fail as ``worker_died`` (the job sets ``max_retries + 1``, the attempts Ray gives a task)."""

    def source_settings(self) -> SourceSettings:
        return SourceSettings(videos=self.videos, keep_sources=self.keep_sources, fetch=self.fetch)


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """One shard: where its clips lie in the metadata, plus what the driver learned about videos."""

    index: int
    slice: ShardSlice
    excluded: dict[str, Failure] = field(default_factory=dict)
    """video id -> why the driver gave up on it (stage ``task``: timeout, worker death); its clips fail so."""


@dataclass(kw_only=True)
class ShardStats:
    """Per-shard counts, written as ``stats/shard-<k>.json`` after the shard's tars."""

    shard: int
    clips: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    input_failures: dict[str, int] = field(default_factory=dict)
    """Problems of metadata lines and entries that gave no clip, by error."""
    texts: dict[str, int] = field(default_factory=dict)
    score_errors: int = 0
    """Clips the similarity model failed on (kept without those scores; each has a failure row)."""
    clip_seconds: float = 0.0
    bytes: int = 0
    decode_seconds: float = 0.0
    wall_seconds: float = 0.0
    entries: list[ShardEntry] = field(default_factory=list)
    fetched: list[dict] = field(default_factory=list)
    """One row per source video this task downloaded: ``video_id``, the stream yt-dlp chose (``format_id``,
    ``width``, ``height``, ``vcodec``, ``acodec``, announced ``filesize``; None on other routes) and ``bytes``."""

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, uri: str) -> ShardStats:
        try:
            data = json.loads(raw)
            data["entries"] = [ShardEntry(**e) for e in data["entries"]]
            return cls(**data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{uri}: unreadable shard stats ({exc})") from exc


# --------------------------------------------------------------------------- the shard


class _Shard:
    """Collects the outcome of each clip of one shard."""

    def __init__(self, task: ShardTask, writer: ShardWriter, contents: SliceContents, faults: Faults):
        self.task, self.writer, self.faults = task, writer, faults
        self.stats = ShardStats(shard=task.index, clips=len(contents.clips))
        self.failures: list[tuple[int, int, Failure]] = [(task.index, -1, f) for f in contents.failures]
        for failure in contents.failures:
            self.stats.input_failures[failure.error] = self.stats.input_failures.get(failure.error, 0) + 1

    def add(self, item: ClipItem, outcome: ClipSample | Failure) -> None:
        if isinstance(outcome, Failure):
            self.failures.append((self.task.index, item.position, outcome))
            self.stats.failed[outcome.error] = self.stats.failed.get(outcome.error, 0) + 1
            return
        self.writer.write(outcome)
        self.stats.ok += 1
        self.faults.in_write(self.task.index, self.stats.ok)
        self.stats.clip_seconds = round(self.stats.clip_seconds + outcome.meta.duration, 6)
        for name, text, source in (
            ("subtitle", outcome.subtitle, outcome.meta.subtitle_source),
            ("caption", outcome.caption, outcome.meta.caption_source),
        ):
            _count_text(self.stats.texts, name, text, source)

    def note(self, item: ClipItem, what: Failure | str) -> None:
        """A text stage's failure (the clip is kept) or a counter such as ``subtitle_no_audio``."""
        key = what if isinstance(what, str) else what.error
        self.stats.texts[key] = self.stats.texts.get(key, 0) + 1
        if isinstance(what, Failure):
            self.failures.append((self.task.index, item.position, what))

    def score_failed(self, item: ClipItem, failure: Failure) -> None:
        """The similarity model failed on a clip: kept without those scores, with a failure row."""
        self.stats.score_errors += 1
        self.failures.append((self.task.index, item.position, failure))


def _count_text(counts: dict[str, int], name: str, text: str, source: TextSource) -> None:
    keys = {"missing": [f"{name}_missing"], "generated": [f"{name}_generated"]}.get(
        source.kind, [f"{name}_empty"] if not text else []
    )
    if source.truncated:
        keys.append(f"{name}_truncated")
    for key in keys:
        counts[key] = counts.get(key, 0) + 1


def _stage_models(
    settings: ShardSettings, caption: ModelFn | None, transcribe: ModelFn | None, score: ModelFn | None = None
) -> dict[str, StageModel]:
    out = {}
    for name, cfg, fn in (
        ("caption", settings.captioner, caption),
        ("asr", settings.asr, transcribe),
        ("score", settings.scores if settings.scores.model else None, score),
    ):
        if cfg is None:
            continue
        if fn is None:
            raise ValueError(f"the {name} stage is configured ({cfg.model}) but no model was given to process_shard")
        out[name] = StageModel(fn=fn, origin=cfg.model, batch_size=cfg.batch_size)
    return out


def process_shard(
    task: ShardTask,
    settings: ShardSettings,
    on_video: Callable[[str | None], None] = lambda _: None,
    caption: ModelFn | None = None,
    transcribe: ModelFn | None = None,
    gate=None,
    score: ModelFn | None = None,
) -> ShardStats:
    """Decode, write and commit one shard; returns its stats (also written as its commit marker).

    ``caption`` (middle-frame JPEGs -> captions) and ``transcribe`` (16 kHz audio -> subtitles)
    are the models of the stages configured in ``settings``; they raise
    :class:`preprocess.text.stages.ModelError` when the model fails on its inputs; so does ``score`` ((middle frame
    JPEG, subtitle, caption) -> their similarities, preprocess/scoring/similarity.py). ``gate`` spaces the
    downloads of each host job-wide (preprocess/fetching/host_gate.py; needed with ``settings.fetch``).
    """
    models = _stage_models(settings, caption, transcribe, score)
    settings.faults.at_start(task.index)
    started = time.monotonic()
    out = DatasetLayout(settings.output)
    stale = out.shard_files(task.index)
    contents = read_slice(list(settings.metadata), task.slice, settings.layout)
    clips, text_failures = with_texts(contents.clips, settings.texts, out, task.index)
    contents.failures += text_failures
    scratch, deaths = _fresh_scratch(settings, task.index)
    task = deaths.give_up_killers(task, settings.max_video_deaths)
    on_video = deaths.reporting(on_video, lambda video_id: settings.faults.at_video(video_id, task.excluded))
    try:
        limits = ShardLimits(max_samples=max(1, len(clips)), max_bytes=settings.max_shard_bytes)
        with (
            settings.faults.in_upload(task.index),
            ShardWriter(settings.output, shard_stem(task.index), limits, tmp_dir=scratch) as writer,
        ):
            shard = _Shard(task, writer, contents, settings.faults)
            scoring = SimilarityStage(shard.add, shard.score_failed, models["score"]) if "score" in models else None
            stages = TextStages(
                scoring.add if scoring else shard.add, shard.note, caption=models.get("caption"), asr=models.get("asr")
            )
            for run, video in _with_videos(video_runs(clips), task, settings, scratch, on_video, gate):
                for item, outcome, audio in _process_run(run, task, settings, video, scratch, shard.stats):
                    stages.add(item, outcome, audio)
            stages.finish()
            if scoring:
                scoring.finish()
        shard.stats.entries = list(writer.entries)
        shard.stats.bytes = sum(e.bytes for e in writer.entries)
        shard.stats.wall_seconds = round(time.monotonic() - started, 3)
        _commit(task, out, shard, stale)
        return shard.stats
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _commit(task: ShardTask, out: DatasetLayout, shard: _Shard, stale: list[str]) -> None:
    shard.failures.sort(key=lambda row: row[1])
    write_table(out.shard_failures(task.index), failures_table(shard.failures))
    storage.write_bytes(out.stats(task.index), shard.stats.to_json())
    written = {name for e in shard.stats.entries for name in (e.url, index_name(e.url))}
    for name in stale:
        if name not in written:
            storage.delete(out.path(name))


def video_runs(clips: Sequence[ClipItem]) -> Iterator[list[ClipItem]]:
    """Consecutive clips of the same video, in input order."""
    run: list[ClipItem] = []
    for item in clips:
        if run and item.video_id != run[0].video_id:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _with_videos(runs, task: ShardTask, settings: ShardSettings, scratch: str, on_video, gate):
    """Each run with its source video (source layout: got ahead of the decoder, preprocess/fetching/sources.py), or
    None."""
    if settings.layout is Layout.CLIPS:
        for run in runs:
            on_video(run[0].video_id)
            yield run, None
        return
    runs = list(runs)
    urls = {run[0].video_id: run[0].url for run in runs if _needs_video(run, task)}
    sources = ShardSources(settings.source_settings(), urls, scratch, gate)
    depth = settings.fetch.prefetch if settings.fetch else 1
    key = lambda run: run[0].video_id if _needs_video(run, task) else None  # noqa: E731
    # While a task waits for a video it is on no video (the fetch settings bound a download, and the queue for a
    # host's slot is no video's fault); the video timeout runs from the moment the video is here.
    for run, video in prefetched(runs, key, sources.get, depth, before=lambda _: on_video(None)):
        on_video(run[0].video_id)
        yield run, video


def _needs_video(run: list[ClipItem], task: ShardTask) -> bool:
    """Some clip of the run is to be decoded (not ruled out by the metadata or by the driver)."""
    return run[0].video_id not in task.excluded and any(item.problem is None for item in run)


def _process_run(run, task: ShardTask, settings: ShardSettings, video, scratch: str, stats):
    if isinstance(video, LocalVideo) and video.fetched is not None:
        stats.fetched.append(video.fetched)
    todo = []
    for item in run:
        if item.problem:
            yield item, item.problem, None
        elif item.video_id in task.excluded:
            excluded = task.excluded[item.video_id]
            yield item, item.fail(excluded.stage, excluded.error, excluded.message), None
        else:
            todo.append(item)
    if not todo:
        return
    if settings.layout is Layout.CLIPS:
        for item in todo:
            yield from _decode_clip_file(item, settings, scratch, stats)
        return
    if isinstance(video, Failure):
        yield from ((item, item.fail(video.stage, video.error, video.message), None) for item in todo)
        return
    yield from _decode_file(video, todo, settings, stats)


def _decode_clip_file(item: ClipItem, settings: ShardSettings, scratch: str, stats: ShardStats):
    """A pre-cut clip file (copied into scratch when it is stored remotely)."""
    uri = clip_file(settings.videos, item.video_id, item.clip_id)
    try:
        video = local_video(uri, scratch)
    except storage.StorageNotFound as exc:
        yield item, item.fail("open", "missing_file", str(exc)), None
        return
    except storage.StorageError as exc:
        yield item, item.fail("fetch", "read_error", str(exc)), None
        return
    try:
        yield from _decode_file(video, [item], settings, stats)
    finally:
        video.discard()


def _decode_file(video: LocalVideo, items: list[ClipItem], settings: ShardSettings, stats: ShardStats):
    """Open one video file once and turn each requested clip into (item, sample or failure, audio or None)."""
    whole = settings.layout is Layout.CLIPS
    uri, path = video.uri, video.path
    done = 0
    try:
        settings.faults.in_decode(items[0].video_id)
        asr = settings.asr is not None
        requests = [
            ClipRequest(
                clip_id=i.clip_id,
                start=0.0 if whole else i.span[0],
                end=None if whole else i.span[1],
                audio=asr and i.subtitle is None,
            )
            for i in items
        ]
        decode = dataclasses.replace(settings.decode, thumbnails=settings.scores.quality)
        results = decode_clips(path, requests, decode)
        while done < len(items):
            t0 = time.monotonic()
            result = next(results, None)
            stats.decode_seconds = round(stats.decode_seconds + time.monotonic() - t0, 6)
            if result is None:
                break
            audio = result.audio if isinstance(result, DecodedClip) else None
            yield items[done], _outcome(items[done], result, uri, path, whole), audio
            done += 1
    except Exception as exc:  # the decoder promises not to raise; if it does, record it per clip
        log.exception("%s: decoder raised", uri)
        yield from ((i, i.fail("decode", type(exc).__name__, f"{uri}: {exc}"), None) for i in items[done:])
        return
    message = f"{uri}: the decoder returned no result for this clip"
    yield from ((i, i.fail("decode", "missing_result", message), None) for i in items[done:])


def _outcome(item: ClipItem, result: DecodedClip | Failure, uri: str, path: str, whole: bool) -> ClipSample | Failure:
    if isinstance(result, Failure):
        message = result.message.replace(path, uri) if path != uri else result.message
        message = message if uri in message else f"{uri}: {message}"
        return item.fail(result.stage, result.error, message)
    try:
        return _sample(item, result, uri, whole)
    except SchemaError as exc:
        return item.fail("sample", "bad_sample", f"{uri}: {exc}")


def _text(entry: TextEntry | None) -> tuple[str, TextSource]:
    if entry is None:
        return "", TextSource(kind="missing")
    return entry.text, TextSource(kind="given", origin=entry.origin, truncated=entry.truncated)


def _sample(item: ClipItem, clip: DecodedClip, uri: str, whole: bool) -> ClipSample:
    """A pre-cut clip's times are shifted by the metadata start onto the source timeline."""
    offset = item.span[0] if whole else 0.0
    times = tuple(round(t + offset, 6) for t in clip.frame_times)
    subtitle, subtitle_source = _text(item.subtitle)
    caption, caption_source = _text(item.caption)
    meta = ClipMeta(
        video_id=item.video_id,
        clip_id=item.clip_id,
        span=(round(clip.span[0] + offset, 6), round(clip.span[1] + offset, 6)),
        source_fps=float(clip.source_fps),
        frame_times=times,
        frame_size=tuple(clip.frame_size),
        middle_frame=len(times) // 2,
        source_uri=uri,
        subtitle_source=subtitle_source,
        caption_source=caption_source,
        scores=quality_scores(clip.thumbnails, clip.frame_times) if clip.thumbnails is not None else {},
    )
    return ClipSample(meta=meta, frames=tuple(clip.frames), subtitle=subtitle, caption=caption)


# --------------------------------------------------------------------------- local files


def _fresh_scratch(settings: ShardSettings, index: int) -> tuple[str, VideoDeaths]:
    """An empty per-shard scratch folder (what a killed earlier attempt left is removed), and the deaths of the
    earlier attempts at the shard on this node that its marker recorded (written back into the new folder)."""
    root = os.path.join(tempfile.gettempdir(), "vidproxy-scratch")
    path = DatasetLayout(settings.output).scratch(root, index)
    deaths = VideoDeaths.left_in(path)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    deaths.enter(None)
    return path, deaths


VIDEO_MARKER = "video.json"
"""The marker file of :class:`VideoDeaths` in a shard's scratch folder."""


class VideoDeaths:
    """The video an attempt at a shard is on, in a marker file of the shard's scratch folder, and the attempts at
    the shard that died in each video so far (on this node).

    The marker is written before the attempt touches a video, so a worker that dies at once leaves it behind;
    the task's report to the driver's board (preprocess/job.py) is sent asynchronously and may die with the
    worker, or be the previous video's. An attempt that ends (committed or raising) removes its scratch folder
    and the marker with it, so a marker found at the start names the video the previous attempt died in. A
    video that killed ``max_video_deaths`` attempts is given up by the next one (``worker_died``), which then
    writes the same bytes as a run without that video. A synchronous report (``ray.get`` in the task) would
    release the task's CPU while it waits and oversubscribe the node (tests/preprocess/test_multinode.py).
    """

    def __init__(self, path: str, deaths: dict[str, int]):
        self.path, self.deaths = path, deaths

    @classmethod
    def left_in(cls, scratch: str) -> VideoDeaths:
        path = os.path.join(scratch, VIDEO_MARKER)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return cls(path, {})
        except ValueError as exc:  # written by rename: only a disk fault makes it unreadable
            log.warning("%s: unreadable (%s); earlier deaths in videos not counted", path, exc)
            return cls(path, {})
        deaths = dict(data["deaths"])
        if data["video"] is not None:
            deaths[data["video"]] = deaths.get(data["video"], 0) + 1
        return cls(path, deaths)

    def enter(self, video_id: str | None) -> None:
        """The attempt is on ``video_id`` from now (None: on no video)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"video": video_id, "deaths": self.deaths}, f)
        os.replace(tmp, self.path)

    def reporting(self, on_video: Callable[[str | None], None], then: Callable[[str], None]):
        """``on_video`` that records the video here first, then calls ``then`` (a fault hook) with it."""

        def report(video_id: str | None) -> None:
            self.enter(video_id)
            if video_id is not None:
                then(video_id)
            on_video(video_id)

        return report

    def give_up_killers(self, task: ShardTask, limit: int) -> ShardTask:
        """``task`` with the videos that killed ``limit`` attempts excluded (``worker_died``)."""
        killers = {v: n for v, n in sorted(self.deaths.items()) if n >= limit and v not in task.excluded}
        if not killers:
            return task
        excluded = dict(task.excluded)
        for video, n in killers.items():
            log.warning("shard %s: %d attempts died in video %s; giving it up", shard_stem(task.index), n, video)
            message = f"the worker process died {n} times while decoding video {video}"
            excluded[video] = Failure(stage="task", error="worker_died", message=message)
        return dataclasses.replace(task, excluded=excluded)
