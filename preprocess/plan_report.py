"""``--plan-only``: validate every input at full scale without decoding, and estimate what the job will cost.

The metadata is planned and each shard's slice read exactly as the shard tasks will read it (preprocess/plan.py),
so the problem counts are the ones the job will record. Text files are read through once, as a stream (their
duplicates are found by the join, not here); an LMDB is opened and counted. Memory stays that of one shard.

The cost estimate multiplies the plan's clips and seconds of video by the per-clip figures of `CostModel`,
measured on this project's benchmarks (docs/scale.md says how to measure them again on your machines).
"""

from __future__ import annotations

import collections
import urllib.parse
from dataclasses import dataclass, field

from pipeline import storage
from preprocess.config import PreprocessConfig
from preprocess.fetching import js_runtime
from preprocess.fetching.fetch import is_storage_uri
from preprocess.inputs import json_line, open_lmdb, text_format
from preprocess.plan import metadata_files, plan_shards, read_slice


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Per-clip costs measured here (docs/scale.md): override them with your own measurements."""

    cpu_seconds_per_video_second: float = 0.051
    """Decoding, resizing and JPEG-encoding 12 frames of 720p H.264, per second of clip, one core: 0.51 s per
    10 s clip (bench/preprocess.py; docs/scale.md)."""
    bytes_per_frame: int = 19_700
    """One stored 224x224 JPEG at quality 90 of real footage, with its share of the sample's other members and
    tar headers: 236.8 KB per 12-frame clip (bench/shard_costs.py)."""
    requests_per_shard: int = 9
    """S3 requests of a shard besides its videos: metadata slice, texts, tar listing, tar, failures, stats, and
    at the end one stats and one failures read (a tar over 64 MiB adds a multipart upload's few)."""
    requests_per_video: int = 2
    """The lookup of a source video (one prefix listing) and its download (one GET, resumed if cut)."""
    source_bits_per_second: float = 2e6
    """Bitrate of a fetched source (assumed: YouTube's 720p H.264, docs/scale.md "Downloads")."""


@dataclass
class PlanReport:
    files: int = 0
    bytes: int = 0
    videos: int = 0
    clips: int = 0
    shards: int = 0
    seconds: float = 0.0
    problems: collections.Counter = field(default_factory=collections.Counter)
    texts: dict[str, str] = field(default_factory=dict)
    fetches: collections.Counter = field(default_factory=collections.Counter)
    """With ``--fetch``: source videos to download per route (one per shard that needs it), and ``no url``."""

    def lines(self, cfg: PreprocessConfig, cost: CostModel = CostModel()) -> list[str]:
        frames = cfg.decode.num_frames if cfg.decode.fps is None else cfg.decode.max_frames
        ok = self.clips - sum(n for key, n in self.problems.items() if key.startswith("clip:"))
        core_hours = self.seconds * cost.cpu_seconds_per_video_second / 3600
        out_bytes = ok * frames * cost.bytes_per_frame
        requests = self.shards * cost.requests_per_shard + self.videos * cost.requests_per_video
        problems = ", ".join(f"{k}: {n}" for k, n in sorted(self.problems.items())) or "none"
        return [
            f"metadata: {self.files} file(s), {self.bytes / 1e9:.3f} GB",
            f"videos: {self.videos} records; clips: {self.clips} ({self.seconds / 3600:.1f} hours of video); "
            f"shards: {self.shards} of up to {cfg.sharding.clips_per_shard} clips",
            f"problems: {problems}",
            *(f"{stage}: {what}" for stage, what in self.texts.items()),
            f"estimate: {core_hours:,.1f} core-hours of decoding ({cost.cpu_seconds_per_video_second} s per second of "
            f"video), {out_bytes / 1e12:.3f} TB of shards ({ok} clips x {frames} frames x {cost.bytes_per_frame} B), "
            f"{requests:,} S3 requests (docs/scale.md); downloads not included",
            *self._fetch_lines(cost),
        ]

    def _fetch_lines(self, cost: CostModel) -> list[str]:
        if not self.fetches:
            return []
        routes = ", ".join(f"{k}: {n}" for k, n in sorted(self.fetches.items()))
        tb = self.seconds * cost.source_bits_per_second / 8 / 1e12
        return [
            f"fetch: {sum(n for k, n in self.fetches.items() if k != 'no url')} source videos to download ({routes}); "
            f"at least {tb:.3f} TB at {cost.source_bits_per_second / 1e6:g} Mbit/s (the clips' seconds; a source "
            "is longer than its clips)",
            *js_runtime.report_lines(self.fetches["youtube"]),  # versions; a warning: line if YouTube lacks them
        ]


def plan_report(cfg: PreprocessConfig) -> PlanReport:
    """Read every input as the job would, decode nothing; ValueError if an input cannot be read at all."""
    report = PlanReport()
    files = metadata_files(cfg.inputs.metadata)
    report.files = len(files)
    report.bytes = sum(storage.size(f) for f in files)
    for piece in plan_shards(files, cfg.sharding.clips_per_shard, cfg.inputs.layout):
        contents = read_slice(files, piece, cfg.inputs.layout)
        report.shards += 1
        report.clips += len(contents.clips)
        report.videos += contents.videos
        report.problems.update(f"line:{f.error}" for f in contents.failures)
        report.problems.update(f"clip:{c.problem.error}" for c in contents.clips if c.problem)
        report.seconds += sum(c.span[1] - c.span[0] for c in contents.clips if c.span and not c.problem)
        if cfg.inputs.fetch:
            report.fetches.update(
                _route(c.url) for c in {c.video_id: c for c in contents.clips if not c.problem}.values()
            )
    for stage, uri in (("subtitles", cfg.inputs.subtitles), ("captions", cfg.inputs.captions)):
        if uri:
            report.texts[stage] = _check_texts(uri, stage, report.problems)
    return report


def _route(url: str | None) -> str:
    if not url:
        return "no url"
    if is_storage_uri(url):
        return "s3" if storage.is_remote(url) else "file"
    host = urllib.parse.urlsplit(url).hostname or ""
    return "youtube" if host == "youtu.be" or host.endswith("youtube.com") else "http(s)"


TEXT_FIELDS = {"subtitles": "text", "captions": "caption"}


def _text_record(record: object, field: str) -> bool:
    return isinstance(record, dict) and isinstance(record.get("clip_id"), str) and isinstance(record.get(field), str)


def _check_texts(uri: str, stage: str, problems: collections.Counter) -> str:
    try:
        kind = text_format(uri)
    except storage.StorageNotFound as exc:
        raise ValueError(f"{stage} {uri}: not found ({exc})") from exc
    if kind == "lmdb":
        with open_lmdb(uri, stage) as env:
            return f"LMDB {uri}, {env.stat()['entries']} entries (looked up by each shard task)"
    if kind == "list":
        return f"JSON list {uri}, {storage.size(uri) / 1e9:.3f} GB (converted and joined before the shard tasks)"
    records = 0
    with storage.open_read(uri) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            record, notes = json_line(uri, number, raw.strip(), stage)
            problems.update(f"{stage}:{n.error}" for n in notes)
            if record is not None and not _text_record(record, TEXT_FIELDS[stage]):
                problems[f"{stage}:bad_record"] += 1
            records += record is not None
    return f"jsonl {uri}, {records} records (joined before the shard tasks; duplicates are found by the join)"
