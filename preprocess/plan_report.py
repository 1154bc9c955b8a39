"""``--plan-only``: validate every input at full scale without decoding, and estimate what the job will cost.

The metadata is planned and each shard's slice read exactly as the shard tasks will read it (preprocess/plan.py),
so the problem counts are the ones the job will record. Text files are read through once, as a stream (their
duplicates are found by the join, not here); an LMDB is opened and counted. Per text, the report says where it
comes from and what share of the clips to decode will have one: a file's share is counted on the planned clip
ids, or past 200k clips on an even sample of them by hash (`ClipSample`); a JSON list's is not estimated. The
videos folder is listed once and every planned video looked up in it (preprocess/input_checks.py). Memory stays
that of one shard, plus the clip sample and the names the videos folder holds.

`PlanReport.refusals` are the one-line reasons the job would not start (a required text without a source, too
many videos missing): ``--plan-only`` prints them and exits 2.

The cost estimate multiplies the plan's clips and seconds of video by the per-clip figures of `CostModel`,
measured on this project's benchmarks (docs/scale.md says how to measure them again on your machines).
"""

from __future__ import annotations

import collections
import urllib.parse
import zlib
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.manifest import ManifestError, read_manifest
from pipeline.scores import table
from preprocess.config import TEXT_FIELDS, PreprocessConfig
from preprocess.fetching import js_runtime
from preprocess.fetching.fetch import is_storage_uri
from preprocess.fetching.formats import LADDER
from preprocess.input_checks import (
    MODEL_FLAGS,
    STAGE_NAMES,
    VideoCheck,
    inline_texts,
    text_file,
    text_model,
    unmatched_message,
    unsourced,
    unsourced_message,
)
from preprocess.inputs import json_line, open_lmdb, text_format
from preprocess.plan import metadata_files, plan_shards, read_slice
from preprocess.scoring.similarity import check_score_model


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
    source_bits_per_second: tuple[tuple[int, float], ...] = ((360, 0.55e6), (480, 0.85e6), (720, 2e6), (1080, 3e6))
    """Bitrate of a fetched source by its short side (assumed: YouTube's H.264 at 24-30 fps, docs/scale.md
    "Downloads" says where the figures come from); a larger source counts as the largest listed."""
    decode_cpu_vs_720p: tuple[tuple[int, float], ...] = ((360, 0.29), (480, 0.47), (720, 1.0))
    """Decoding CPU of a source of this short side relative to 720p, to the same 224 frames
    (bench/fetch_quality.py: 0.138, 0.223 and 0.473 CPU-s per 10 s clip); larger ones count as 720p."""

    def bits_per_second(self, side: int | None) -> float:
        """The assumed bitrate of a source of this short side (None: 720p)."""
        return _at_least(self.source_bits_per_second, side)

    def decode_share(self, side: int | None) -> float:
        """The decoding CPU of a source of this short side relative to 720p (None: 720p)."""
        return _at_least(self.decode_cpu_vs_720p, side)


def _at_least(table: tuple[tuple[int, float], ...], side: int | None) -> float:
    """The value of the first row whose side is >= ``side`` (720 for None), else the last row's."""
    side = 720 if side is None else side
    return next((value for rung, value in table if rung >= side), table[-1][1])


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
    """Text field -> where its texts come from and the coverage to expect."""
    fetches: collections.Counter = field(default_factory=collections.Counter)
    """With ``--fetch``: source videos to download per route (one per shard that needs it), and ``no url``."""
    found_videos: str = ""
    """The video check's line (preprocess/input_checks.py), when it ran."""
    refusals: list[str] = field(default_factory=list)
    """Why the job would stop before any work (one line each): a required text without a source, videos missing."""

    @property
    def ok(self) -> int:
        """Clips the metadata does not rule out."""
        return self.clips - sum(n for key, n in self.problems.items() if key.startswith("clip:"))

    def lines(self, cfg: PreprocessConfig, cost: CostModel = CostModel()) -> list[str]:
        frames = cfg.decode.num_frames if cfg.decode.fps is None else cfg.decode.max_frames
        core_hours = self.seconds * cost.cpu_seconds_per_video_second / 3600
        out_bytes = self.ok * frames * cost.bytes_per_frame
        requests = self.shards * cost.requests_per_shard + self.videos * cost.requests_per_video
        problems = ", ".join(f"{k}: {n}" for k, n in sorted(self.problems.items())) or "none"
        return [
            f"metadata: {self.files} file(s), {self.bytes / 1e9:.3f} GB",
            f"videos: {self.videos} records; clips: {self.clips} ({self.seconds / 3600:.1f} hours of video); "
            f"shards: {self.shards} of up to {cfg.sharding.clips_per_shard} clips",
            *([self.found_videos] if self.found_videos else []),
            f"problems: {problems}",
            *(f"{name}: {what}" for name, what in self.texts.items()),
            f"estimate: {core_hours:,.1f} core-hours of decoding ({cost.cpu_seconds_per_video_second} s per second of "
            f"video), {out_bytes / 1e12:.3f} TB of shards ({self.ok} clips x {frames} frames x {cost.bytes_per_frame} "
            f"B), {requests:,} S3 requests (docs/scale.md); downloads not included",
            *self._fetch_lines(cfg, cost, core_hours),
        ]

    def _fetch_lines(self, cfg: PreprocessConfig, cost: CostModel, core_hours: float) -> list[str]:
        if not self.fetches:
            return []
        routes = ", ".join(f"{k}: {n}" for k, n in sorted(self.fetches.items()))
        return [
            f"fetch: {sum(n for k, n in self.fetches.items() if k != 'no url')} source videos to download ({routes})",
            _download_line(cfg, cost, self.seconds, core_hours),
            *js_runtime.report_lines(self.fetches["youtube"]),  # versions; a warning: line if YouTube lacks them
        ]


def _download_line(cfg: PreprocessConfig, cost: CostModel, seconds: float, core_hours: float) -> str:
    """The downloads' bytes (and the decoding they cost) at the chosen source size, next to 720p's."""
    fetch = cfg.fetch_settings()
    side = None if fetch.overridden else fetch.target_short_side
    if fetch.overridden:
        what = "the --fetch-format given, counted as 720p"
    elif side is None:
        what = "the default choice for the decoded size kept: at most 720p"
    else:
        what = f"the default choice: {side}p" if side in LADDER else f"the default choice: short side {side}"

    def estimate(at: int | None) -> str:
        bits = cost.bits_per_second(at)
        size = seconds * bits / 8
        amount = f"{size / 1e12:.3g} TB" if size >= 1e12 else f"{size / 1e9:.3g} GB"
        return f"{amount} at {bits / 1e6:g} Mbit/s, {core_hours * cost.decode_share(at):,.1f} core-hours of decoding"

    return (
        f"downloads ({what}): at least {estimate(side)}; at 720p: {estimate(720)} (the clips' seconds, a source is "
        "longer than its clips; bitrates assumed, docs/scale.md)"
    )


def plan_report(cfg: PreprocessConfig) -> PlanReport:
    """Read every input as the job would, decode nothing; ValueError if an input cannot be read at all. The
    report's ``refusals`` say why the job would not start."""
    report = PlanReport()
    files = metadata_files(cfg.inputs.metadata)
    report.files = len(files)
    report.bytes = sum(storage.size(f) for f in files)
    videos = VideoCheck.listing(cfg.inputs)
    sample, inline = ClipSample(), collections.Counter()
    on_line = videos.add_line if videos is not None else None
    for piece in plan_shards(files, cfg.sharding.clips_per_shard, cfg.inputs.layout, on_line):
        contents = read_slice(files, piece, cfg.inputs.layout)
        report.shards += 1
        report.clips += len(contents.clips)
        report.videos += contents.videos
        report.problems.update(f"line:{f.error}" for f in contents.failures)
        report.problems.update(f"clip:{c.problem.error}" for c in contents.clips if c.problem)
        report.seconds += sum(c.span[1] - c.span[0] for c in contents.clips if c.span and not c.problem)
        ok = [c for c in contents.clips if not c.problem]
        inline.update(inline_texts(ok))
        for clip in ok:
            sample.add(clip.clip_id)
        if cfg.inputs.fetch:
            report.fetches.update(_route(c.url) for c in {c.video_id: c for c in ok}.values())
    if videos is not None:
        report.found_videos = videos.line()
        report.refusals += [r for r in [videos.refusal()] if r]
    _text_section(cfg, report, sample, inline)
    return report


def _text_section(cfg: PreprocessConfig, report: PlanReport, sample: ClipSample, inline: collections.Counter) -> None:
    """Per text: where it comes from, and the coverage to expect; a refusal when a required one has no source."""
    for name in TEXT_FIELDS:
        parts, uri, model = [], text_file(cfg, name), text_model(cfg, name)
        if uri:
            described, records, hits = _check_texts(uri, f"{name}s", report.problems, sample)
            parts.append(f"file {described}")
            unmatched = unmatched_message(cfg, name, uri, records) if hits == 0 and sample.ids else None
            report.refusals += [unmatched] if unmatched else []
        elif inline[name]:
            parts.append(f"inline in the metadata, {_share(inline[name], report.ok)} of the clips to decode")
        if model:
            flag = MODEL_FLAGS[name]
            parts.append(f"{STAGE_NAMES[name]} stage ({flag} {model}) for every clip without a given {name}")
        needed = "required" if name in cfg.inputs.require_texts else "not required (--require-texts)"
        report.texts[f"{name} texts"] = f"{'; '.join(parts) or 'none'} [{needed}]"
    missing = unsourced(cfg, inline)
    if missing:
        report.refusals.append(unsourced_message(cfg, missing))


def _share(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f}%)" if total else f"{count}"


def _route(url: str | None) -> str:
    if not url:
        return "no url"
    if is_storage_uri(url):
        return "s3" if storage.is_remote(url) else "file"
    host = urllib.parse.urlsplit(url).hostname or ""
    return "youtube" if host == "youtu.be" or host.endswith("youtube.com") else "http(s)"


TEXT_KEYS = {"subtitles": "text", "captions": "caption"}


class ClipSample:
    """The planned clip ids, or an even sample of them by hash once there are more than ``cap``: what a text
    file's coverage is estimated on, in bounded memory."""

    def __init__(self, cap: int = 200_000):
        self.cap, self.level, self.ids = cap, 0, set()

    def keeps(self, clip_id: str) -> bool:
        return zlib.crc32(clip_id.encode("utf-8", "replace")) & ((1 << self.level) - 1) == 0

    def add(self, clip_id: str) -> None:
        if not self.keeps(clip_id):
            return
        self.ids.add(clip_id)
        if len(self.ids) > self.cap:
            self.level += 1
            self.ids = {i for i in self.ids if self.keeps(i)}

    def coverage(self, hits: int) -> str:
        """``hits`` of the sampled ids have a text: the share, said as exact or as a sample's estimate."""
        if not self.ids:
            return "no clip to decode"
        share = f"{100 * hits / len(self.ids):.1f}% of the clips to decode have one"
        return share if self.level == 0 else f"~{share} (estimated on {len(self.ids)} of them)"


def _text_record(record: object, field: str) -> bool:
    return isinstance(record, dict) and isinstance(record.get("clip_id"), str) and isinstance(record.get(field), str)


def _check_texts(
    uri: str, stage: str, problems: collections.Counter, sample: ClipSample
) -> tuple[str, int | None, int | None]:
    """(what the file is and the coverage to expect, its records (None: not counted), the sampled clips it gives a
    text (None: not estimated))."""
    try:
        kind = text_format(uri)
    except storage.StorageNotFound as exc:
        raise ValueError(f"{stage} {uri}: not found ({exc})") from exc
    if kind == "lmdb":
        with open_lmdb(uri, stage) as env, env.begin() as txn:
            hits = sum(bool(txn.get(i.encode("utf-8", "replace"))) for i in sample.ids)
            entries = env.stat()["entries"]
            return f"LMDB {uri}, {entries} entries (looked up by each shard task): {sample.coverage(hits)}", None, hits
    if kind == "list":
        described = f"JSON list {uri}, {storage.size(uri) / 1e9:.3f} GB (converted and joined before the shard tasks"
        return f"{described}; coverage not estimated)", None, None
    records, hits = 0, set()
    with storage.open_read(uri) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            record, notes = json_line(uri, number, raw.strip(), stage)
            problems.update(f"{stage}:{n.error}" for n in notes)
            if record is not None and not _text_record(record, TEXT_KEYS[stage]):
                problems[f"{stage}:bad_record"] += 1
            elif record is not None and record[TEXT_KEYS[stage]] and record["clip_id"] in sample.ids:
                hits.add(record["clip_id"])
            records += record is not None
    described = (
        f"jsonl {uri}, {records} records (joined before the shard tasks; duplicates are found by the join): "
        f"{sample.coverage(len(hits))}"
    )
    return described, records, len(hits)


def score_lines(cfg: PreprocessConfig) -> list[str]:
    """Which quality scores the job computes, and the distribution already in the output's manifest, if any."""
    scores = cfg.scores
    quality = "motion, static, black, cuts (thumbnails of the stored frames, in the decode pass)"
    lines = [f"scores: {quality if scores.quality else 'quality scores off'}"]
    if scores.model:
        how = "middle frame vs each non-empty text, after the text stages"
        lines.append(f"scores: sim_subtitle, sim_caption with {scores.model} ({score_refusal(cfg) or how})")
    else:
        lines.append("scores: no frame-text similarity (no --score-model)")
    try:
        summary = read_manifest(cfg.sharding.output).scores
    except ManifestError:
        return lines
    return lines + [f"scores in {cfg.sharding.output} (its manifest):", *(f"  {line}" for line in table(summary))]


def score_refusal(cfg: PreprocessConfig) -> str | None:
    """Why the job would not start for its score model (the check it makes first), or None."""
    if cfg.scores.model is None:
        return None
    try:
        check_score_model(cfg.scores.model)
    except ValueError as exc:
        return str(exc)
    return None
