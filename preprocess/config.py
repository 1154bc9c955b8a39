"""Configuration of the preprocessing job: one dataclass per concern, composed into PreprocessConfig.

``DecodeConfig`` (what to decode per clip) lives next to the decoder in
:mod:`preprocess.decode`. Only the parts that decide the output's bytes go into the
manifest (:meth:`PreprocessConfig.manifest_config`); where the output goes and how the
cluster runs it (Ray settings, retries, timeouts) do not, so a 1-worker and an N-worker
run, or a resumed run, write the same manifest.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from pipeline.manifest import TEXT_FIELDS
from preprocess.decode import DecodeConfig
from preprocess.fetching import formats
from preprocess.fetching.config import FetchConfig
from preprocess.scoring.config import ScoreConfig
from preprocess.text.asr import AsrConfig
from preprocess.text.captions import CaptionConfig


class Layout(str, enum.Enum):
    """How videos are laid out under the videos folder."""

    SOURCE = "source"
    """Whole source videos ``<video_id>.<ext>``, cut by each clip's span."""
    CLIPS = "clips"
    """Pre-cut clip files ``<video_id>/<clip_id>`` (HD-VILA's released layout)."""


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """Where the metadata, videos and texts come from."""

    metadata: str
    """HD-VILA metadata jsonl (local path, file:// or s3://)."""
    videos: str | None = None
    """Folder or s3:// prefix holding the videos (optional with ``fetch``: looked up first)."""
    layout: Layout = Layout.SOURCE
    """``source`` (whole videos cut by span) or ``clips`` (pre-cut clip files)."""
    subtitles: str | None = None
    """Optional jsonl of ``{clip_id, text}``."""
    captions: str | None = None
    """Optional jsonl of ``{clip_id, caption}``."""
    max_text_chars: int = 2000
    """Subtitles and captions longer than this are truncated (and counted in the stats)."""
    fetch: bool = False
    """Download each source video found in neither ``videos`` nor ``keep_sources`` from its metadata line's
    ``url`` (YouTube through yt-dlp, http(s), s3://), inside the shard task; settings: the fetch section."""
    keep_sources: str | None = None
    """With ``fetch``: folder or s3:// prefix where every fetched source is archived as ``<video_id>.<ext>``
    and looked up before downloading, so a rerun (another decode config) downloads nothing again."""
    require_texts: tuple[str, ...] = TEXT_FIELDS
    """Texts that must have a source (a file, inline in the metadata, or a model stage), else the job and
    ``plan_only`` stop: ``subtitle,caption`` (what training's default loss d reads), a subset, or ``none``."""
    max_missing_videos: float = 0.01
    """Largest fraction of the planned source videos (``clips`` layout: clip files) that may be absent from
    ``videos`` before the job and ``plan_only`` stop (with ``fetch`` they are downloaded instead); 1: no check."""

    def __post_init__(self) -> None:
        if not isinstance(self.metadata, str) or not self.metadata:
            raise ValueError("metadata must be a non-empty path or URI")
        if self.videos is None and not self.fetch:
            raise ValueError("videos must be given (a folder or s3:// prefix), unless fetch is on")
        if self.videos is not None and (not isinstance(self.videos, str) or not self.videos):
            raise ValueError("videos must be a non-empty path or URI")
        object.__setattr__(self, "layout", Layout(self.layout))
        if self.fetch and self.layout is not Layout.SOURCE:
            raise ValueError("fetch downloads whole source videos: it needs layout source")
        if self.keep_sources is not None and not self.fetch:
            raise ValueError("keep_sources archives fetched videos: it needs fetch")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {self.max_text_chars}")
        object.__setattr__(self, "require_texts", _text_fields(self.require_texts))
        if not 0 <= self.max_missing_videos <= 1:
            raise ValueError(f"max_missing_videos must be a fraction in [0, 1], got {self.max_missing_videos}")


def _text_fields(value) -> tuple[str, ...]:
    """``require_texts`` as given (a tuple, or ``a,b`` / ``none`` as text) -> the fields in sample order."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = {str(n).strip() for n in names} - {""}
    if not names or names == {"none"}:
        return ()
    unknown = sorted(names - set(TEXT_FIELDS))
    if unknown:
        raise ValueError(f"require_texts must be a subset of {','.join(TEXT_FIELDS)}, or none; got {value!r}")
    return tuple(f for f in TEXT_FIELDS if f in names)


@dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How clips are grouped into shards and where the shards go."""

    output: str
    """Output folder or s3:// prefix (shards, stats, failures, manifest)."""
    clips_per_shard: int = 1000
    """Clips of the metadata (in order) per shard; shard k holds clip positions [k*n, (k+1)*n)."""
    max_shard_bytes: int = 1 << 30
    """A shard's tar is split into ``-001``, ``-002``... once it reaches this size."""

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output:
            raise ValueError("output must be a non-empty path or URI")
        if self.clips_per_shard < 1:
            raise ValueError(f"clips_per_shard must be >= 1, got {self.clips_per_shard}")
        if self.max_shard_bytes < 1024:
            raise ValueError(f"max_shard_bytes must be >= 1024, got {self.max_shard_bytes}")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """How the job runs on Ray (never part of the manifest)."""

    address: str | None = None
    """None: RAY_ADDRESS or a running cluster, else a new local one; ``local``: always a new local one."""
    num_cpus: int | None = None
    """CPUs of a new local cluster (only with ``address`` None/``local``)."""
    max_in_flight: int | None = None
    """Shard tasks submitted but not finished at once; default 2x the cluster's CPUs."""
    max_retries: int = 3
    """Reruns of a shard task whose worker died or that raised."""
    video_timeout_s: float = 600.0
    """A video decoding for longer than this is cancelled and its clips fail with ``timeout``."""
    stall_timeout_s: float | None = None
    """Longest the job waits while none of its shard tasks makes progress (no task starts a video or ends; e.g. a
    cluster left without a node that can run one): then the shards in flight are left uncommitted and the job
    stops (exit 1; rerun the same command to finish). Must be longer than ``video_timeout_s``, so a slow video is
    timed out before it counts as a stall; None: the longer of 30 minutes and twice ``video_timeout_s``."""
    task_cpus: float = 1.0
    """CPUs reserved per shard task."""
    model_actors: int | None = None
    """Actors per model stage (caption, ASR); default: one per GPU of the cluster, or 1 without GPUs."""
    model_cpus: float = 1.0
    """CPUs reserved per model actor (its torch threads)."""

    @property
    def stall_limit_s(self) -> float:
        """``stall_timeout_s``, or its default."""
        return self.stall_timeout_s if self.stall_timeout_s is not None else max(1800.0, 2 * self.video_timeout_s)

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.video_timeout_s > 0:
            raise ValueError(f"video_timeout_s must be > 0, got {self.video_timeout_s}")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > self.video_timeout_s:
            raise ValueError(
                f"stall_timeout_s ({self.stall_timeout_s:g}) must be longer than video_timeout_s "
                f"({self.video_timeout_s:g})"
            )
        if not self.task_cpus > 0:
            raise ValueError(f"task_cpus must be > 0, got {self.task_cpus}")
        if self.model_actors is not None and self.model_actors < 1:
            raise ValueError(f"model_actors must be >= 1, got {self.model_actors}")
        if not self.model_cpus > 0:
            raise ValueError(f"model_cpus must be > 0, got {self.model_cpus}")
        if self.num_cpus is not None and self.address not in (None, "local"):
            raise ValueError(f"num_cpus applies to a new local cluster, not to address {self.address!r}")


FETCH_OUTPUT_FIELDS = ("selector", "format_sort", "audio", "max_video_bytes", "max_video_seconds")
"""The fetch settings that decide which bytes are downloaded (so the shards' bytes): in the manifest, as in
effect (the default format follows the stored frame size and the ASR stage)."""


def _plain(value):
    """A tuple as a list (as JSON reads it back), anything else as it is."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """The whole job."""

    inputs: InputConfig
    """Metadata, videos, texts."""
    sharding: ShardingConfig
    """Shard grouping and output location."""
    decode: DecodeConfig = DecodeConfig()
    """Frames per clip, resize, JPEG quality, decoder threads."""
    ray: RayConfig = RayConfig()
    """Cluster connection, backpressure, retries, timeouts."""
    fetch: FetchConfig = FetchConfig()
    """How source videos are downloaded (with ``inputs.fetch``): format, caps, timeouts, retries, politeness."""
    captioner: CaptionConfig | None = None
    """Caption stage: generate the captions of clips that have none given."""
    asr: AsrConfig | None = None
    """ASR stage: transcribe the audio of clips that have no subtitle given."""
    scores: ScoreConfig = ScoreConfig()
    """Per-clip quality scores: motion, static, black, cuts; frame-text similarity with a score model."""
    retry_failed: bool = False
    """Redo committed shards that recorded failed clips (not those whose only failures are permanent fetch
    failures: a removed, private or 404 video does not come back)."""
    progress: bool = True
    """Show a progress bar."""
    plan_only: bool = False
    """Validate every input and print the plan (videos, clips, shards, problems) and its cost; decode nothing."""

    def fetch_settings(self) -> FetchConfig:
        """The fetch settings in effect: the audio track when the ASR stage runs, the default format choice measured
        on the stored frames' short side (preprocess/fetching/formats.py)."""
        stored = formats.stored_short_side(self.decode.frame_size, self.decode.short_side)
        return dataclasses.replace(self.fetch, audio=self.asr is not None, stored_short_side=stored)

    def manifest_config(self) -> dict:
        """The resolved config that decides the output bytes (goes into the manifest)."""
        inputs = dataclasses.asdict(self.inputs)
        inputs["layout"] = self.inputs.layout.value
        for name in ("keep_sources", "require_texts", "max_missing_videos"):  # checks and an archive: no byte
            inputs.pop(name)
        if inputs.pop("fetch"):  # only when enabled: a job without it keeps its old manifest
            fetch = self.fetch_settings()
            inputs["fetch"] = {name: _plain(getattr(fetch, name)) for name in FETCH_OUTPUT_FIELDS}
        sharding = dataclasses.asdict(self.sharding)
        sharding.pop("output")
        decode = dataclasses.asdict(self.decode)
        decode.pop("thumbnails")  # follows scores.quality
        if decode["frame_size"] is None:  # aspect kept: manifests as before the option existed
            decode.pop("frame_size")
        else:
            decode["frame_size"] = list(decode["frame_size"])
            decode.pop("short_side")
        out = {"inputs": inputs, "sharding": sharding, "decode": decode}
        for name in ("captioner", "asr"):  # only when enabled: a job without them keeps its old manifest
            if getattr(self, name) is not None:
                out[name] = dataclasses.asdict(getattr(self, name))
        if self.scores.quality or self.scores.model:  # scores off: the manifest of a job before they existed
            out["scores"] = {"quality": self.scores.quality, "model": self.scores.model}
        return out

    def run_config(self) -> dict:
        """Everything, for the run log."""
        out = self.manifest_config()
        out["sharding"]["output"] = self.sharding.output
        out["ray"] = dataclasses.asdict(self.ray)
        if self.inputs.fetch:  # cookies, proxy and extractor args may carry credentials: named as set, never shown
            out["fetch"] = {
                k: ("<set>" if k in FetchConfig.SECRET_FIELDS and v else v)
                for k, v in dataclasses.asdict(self.fetch_settings()).items()
            }
        out["retry_failed"] = self.retry_failed
        return out
