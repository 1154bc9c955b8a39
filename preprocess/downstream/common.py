"""What every retrieval converter shares: annotation errors, text collection, split files, the job run.

A converter turns a benchmark's annotation files into :class:`SplitAnnotations` (one entry per video:
its annotation id and its texts). :func:`write_split_inputs` turns one split into the inputs of the
sharding job (metadata jsonl with one whole-video clip per entry, texts jsonl) and
:func:`run_split` runs the job on it, so every split becomes its own data set.

Text layout in the shards (see docs/datasets.md):

* ``<key>.subtitle.txt``: every text of the video, one per line (a paragraph data set has one line);
* ``<key>.caption.txt``: the first text only (the single query the trainer's zero-shot eval uses).

Newlines, tabs and runs of spaces inside a text are collapsed to one space, so a line is a text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline import storage
from preprocess.config import InputConfig, PreprocessConfig, RayConfig, ShardingConfig
from preprocess.decode import DecodeConfig
from preprocess.inputs import list_source_videos

log = logging.getLogger(__name__)

WHOLE_VIDEO_END = 86400.0
"""Span end given for a whole video; the decoder clamps it to the video's duration."""
MAX_TEXT_CHARS = 100_000
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv", ".flv", ".ts")
SPLITS = ("train", "val", "test")
_SPACE_RE = re.compile(r"\s+")


class AnnotationError(ValueError):
    """An annotation file is unknown, missing or malformed; the message names the file, line and field."""


def where(path: str, line: int | None = None, field_name: str | None = None) -> str:
    """``<file> line <n> field '<f>'`` for messages."""
    out = path
    if line is not None:
        out += f" line {line}"
    if field_name is not None:
        out += f" field {field_name!r}"
    return out


def clean_text(text: str) -> str:
    """One line: whitespace runs (newlines, tabs) become one space; stripped."""
    return _SPACE_RE.sub(" ", text).strip()


def strip_video_extension(name: str) -> str:
    """``abc.mp4`` -> ``abc``; ids without a known video extension are kept whole (LSMDC ids have dots)."""
    lower = name.lower()
    for ext in VIDEO_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


# --------------------------------------------------------------------------- collected annotations


@dataclass(frozen=True, kw_only=True)
class Annotated:
    """One video of a split: its annotation id and its texts (non-empty, in file order)."""

    clip_id: str
    texts: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SplitAnnotations:
    """One split of a data set."""

    name: str
    items: tuple[Annotated, ...]
    empty_texts: tuple[tuple[str, str], ...] = ()
    """(id, ``file line n``) of every empty text; the text is dropped, the video kept."""
    sources: tuple[str, ...] = ()
    """The annotation files read."""


class TextCollector:
    """Accumulates texts per id in first-seen order; ``join`` makes one paragraph per id."""

    def __init__(self, name: str, join: bool = False):
        self.name, self.join = name, join
        self._texts: dict[str, list[str]] = {}
        self._empty: list[tuple[str, str]] = []
        self._sources: list[str] = []

    def source(self, path: str) -> None:
        if path not in self._sources:
            self._sources.append(path)

    def add(self, clip_id: str, text: str, location: str) -> None:
        texts = self._texts.setdefault(clip_id, [])
        cleaned = clean_text(text)
        if cleaned:
            texts.append(cleaned)
        else:
            self._empty.append((clip_id, location))

    def ids(self) -> list[str]:
        return list(self._texts)

    def build(self, keep: list[str] | None = None) -> SplitAnnotations:
        ids = self.ids() if keep is None else keep
        wanted = set(ids)
        items = []
        for clip_id in ids:
            texts = self._texts.get(clip_id, [])
            if self.join and texts:
                texts = [" ".join(texts)]
            items.append(Annotated(clip_id=clip_id, texts=tuple(texts)))
        empty = tuple(note for note in self._empty if note[0] in wanted)
        return SplitAnnotations(name=self.name, items=tuple(items), empty_texts=empty, sources=tuple(self._sources))


def hold_out(ids: list[str], count: int) -> tuple[list[str], list[str]]:
    """Split ids into (kept, held out): the ``count`` ids with the smallest SHA-1 are held out (stable)."""
    if count <= 0:
        return list(ids), []
    if count >= len(ids):
        raise ValueError(f"val_count={count} would hold out all {len(ids)} training videos")
    ranked = sorted(ids, key=lambda i: hashlib.sha1(i.encode("utf-8")).hexdigest())
    held = set(ranked[:count])
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def subset(split: SplitAnnotations, ids: list[str], name: str) -> SplitAnnotations:
    """The entries of ``split`` with the given ids, as split ``name``."""
    by_id = {item.clip_id: item for item in split.items}
    wanted = set(ids)
    return SplitAnnotations(
        name=name,
        items=tuple(by_id[i] for i in ids),
        sources=split.sources,
        empty_texts=tuple(note for note in split.empty_texts if note[0] in wanted),
    )


def split_from(collector: TextCollector, ids: list[str], name: str) -> SplitAnnotations:
    built = collector.build(ids)
    return dataclasses.replace(built, name=name)


# --------------------------------------------------------------------------- reading files


def read_text(path: str) -> str:
    """A whole annotation file as UTF-8 text (storage URI or local path)."""
    try:
        data = storage.read_bytes(path)
    except storage.StorageNotFound as exc:
        raise AnnotationError(f"{path}: annotation file not found") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AnnotationError(f"{where(path, line)}: not UTF-8 ({exc.reason})") from exc


def find_file(folder: str, names: tuple[str, ...], what: str, required: bool = True) -> str | None:
    """The first of ``names`` that exists in ``folder``."""
    for name in names:
        uri = storage.join(folder, name)
        if storage.exists(uri):
            return uri
    if required:
        raise AnnotationError(f"{folder}: no {what} file; expected one of {list(names)}")
    return None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def json_entries(path: str, text: str, start: int = 0) -> Iterator[tuple[str | int, object, int, int]]:
    """Entries of the JSON list or object at ``start``: (index or key, value, line, value offset).

    Line numbers come for free this way, so a bad record is reported with the line it starts on.
    """
    decoder = json.JSONDecoder()
    pos = _skip_space(text, start)
    if pos >= len(text) or text[pos] not in "[{":
        raise AnnotationError(f"{where(path, _line_of(text, pos))}: expected a JSON list or object")
    is_list, pos, index = text[pos] == "[", _skip_space(text, pos + 1), 0
    closer = "]" if is_list else "}"
    try:
        while text[pos] != closer:
            key: str | int = index
            if not is_list:
                key, pos = decoder.raw_decode(text, pos)
                pos = _skip_space(text, pos)
                if text[pos] != ":":
                    raise json.JSONDecodeError("expected ':'", text, pos)
                pos = _skip_space(text, pos + 1)
            value, end = decoder.raw_decode(text, pos)
            yield key, value, _line_of(text, pos), pos
            index, pos = index + 1, _skip_space(text, end)
            if text[pos] == ",":
                pos = _skip_space(text, pos + 1)
            elif text[pos] != closer:
                raise json.JSONDecodeError(f"expected ',' or '{closer}'", text, pos)
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{where(path, exc.lineno)}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    except IndexError as exc:
        raise AnnotationError(f"{where(path, _line_of(text, len(text)))}: JSON ends early") from exc


def jsonl_records(path: str, text: str) -> Iterator[tuple[int, dict]]:
    """(line, record) of a jsonl file; blank lines skipped; a non-object line is an error."""
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{where(path, number)}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise AnnotationError(f"{where(path, number)}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def need_str(record: dict, name: str, path: str, line: int, allow_empty: bool = False) -> str:
    value = record.get(name)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        state = "missing" if name not in record else f"not a non-empty string ({value!r:.60})"
        raise AnnotationError(f"{where(path, line, name)}: {state}")
    return value


def text_list(value, path: str, line: int, name: str) -> list[str]:
    """A text field that is a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AnnotationError(f"{where(path, line, name)}: expected a string or a list of strings, got {value!r:.60}")


# --------------------------------------------------------------------------- split -> job inputs


@dataclass(frozen=True, kw_only=True)
class SplitReport:
    """What conversion did to one split (written to ``inputs/<split>/report.json``)."""

    split: str
    annotated: int
    converted: int
    missing_videos: list[str] = field(default_factory=list)
    empty_texts: list[str] = field(default_factory=list)
    videos_without_text: list[str] = field(default_factory=list)
    texts: int = 0
    sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.split}: {self.converted}/{self.annotated} videos converted, {self.texts} texts"]
        if self.missing_videos:
            parts.append(f"{len(self.missing_videos)} annotated videos missing (e.g. {self.missing_videos[:3]})")
        if self.empty_texts:
            parts.append(f"{len(self.empty_texts)} empty texts dropped")
        if self.videos_without_text:
            parts.append(f"{len(self.videos_without_text)} videos without any text (gallery only)")
        return "; ".join(parts)


@dataclass(frozen=True, kw_only=True)
class SplitInputs:
    """Where one split's job inputs were written."""

    metadata: str
    subtitles: str
    captions: str
    report: SplitReport


def match_video(clip_id: str, videos: dict[str, str]) -> str | None:
    """The file stem (video id) for an annotation id: itself, or without ActivityNet's ``v_`` prefix."""
    if clip_id in videos:
        return clip_id
    if clip_id.startswith("v_") and clip_id[2:] in videos:
        return clip_id[2:]
    return None


def write_split_inputs(split: SplitAnnotations, videos: dict[str, str], folder: str) -> SplitInputs:
    """metadata.jsonl, subtitles.jsonl, captions.jsonl and report.json for one split."""
    meta, subs, caps, missing, textless = [], [], [], [], []
    for item in split.items:
        video_id = match_video(item.clip_id, videos)
        if video_id is None:
            missing.append(item.clip_id)
            continue
        if not item.texts:
            textless.append(item.clip_id)
        meta.append({"video_id": video_id, "clip": [{"clip_id": item.clip_id, "span": [0.0, WHOLE_VIDEO_END]}]})
        subs.append({"clip_id": item.clip_id, "text": "\n".join(item.texts)})
        caps.append({"clip_id": item.clip_id, "caption": item.texts[0] if item.texts else ""})
    report = SplitReport(
        split=split.name,
        annotated=len(split.items),
        converted=len(meta),
        missing_videos=missing,
        empty_texts=[f"{loc}: {clip_id}" for clip_id, loc in split.empty_texts],
        videos_without_text=textless,
        texts=sum(len(s["text"].splitlines()) for s in subs),
        sources=list(split.sources),
    )
    paths = {name: storage.join(folder, f"{name}.jsonl") for name in ("metadata", "subtitles", "captions")}
    for name, rows in (("metadata", meta), ("subtitles", subs), ("captions", caps)):
        storage.write_bytes(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    storage.write_bytes(
        storage.join(folder, "report.json"),
        (json.dumps(dataclasses.asdict(report), indent=1, ensure_ascii=False) + "\n").encode(),
    )
    if missing:
        log.warning(
            "%s: %d of %d annotated videos are missing from the videos folder (first: %s); converting the rest",
            split.name,
            len(missing),
            len(split.items),
            missing[:5],
        )
    return SplitInputs(
        metadata=paths["metadata"], subtitles=paths["subtitles"], captions=paths["captions"], report=report
    )


# --------------------------------------------------------------------------- the sharding job


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """How a data set's splits are turned into shards."""

    annotations: str
    """Folder holding the data set's annotation files (layout in docs/datasets.md)."""
    videos: str
    """Folder (or s3:// prefix) of whole videos ``<video_id>.<ext>``."""
    out: str
    """Output root: ``<out>/<split>/`` data sets and ``<out>/inputs/<split>/`` job inputs."""
    splits: tuple[str, ...] = SPLITS
    """Which splits to convert."""
    frames: int | None = None
    """Frames per video for val/test (None: the data set's default, 12 or 32 for ActivityNet)."""
    train_frames: int | None = None
    """Frames per video stored for train (None: 2x frames, so training can jitter its picks)."""
    short_side: int | None = None
    """Keep the aspect ratio: stored frames' short side in pixels (excludes frame_size)."""
    frame_size: tuple[int, int] | None = None
    """Exact stored (width, height), aspect not kept; with neither set 224x224 (see DecodeConfig)."""
    val_count: int | None = None
    """Videos held out of train as the validation split where a data set has none (None: its default)."""
    clips_per_shard: int = 1000
    """Videos per shard."""
    convert_only: bool = False
    """Write the job inputs and reports, run no job."""

    def __post_init__(self) -> None:
        for name in ("annotations", "videos", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path or URI")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {list(self.splits)}")
        for name in ("frames", "train_frames", "val_count"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "val_count" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'val_count' else 1}, got {value}")
        DecodeConfig(short_side=self.short_side, frame_size=self.frame_size)  # the same checks as the jobs'
        if self.clips_per_shard < 1:
            raise ValueError(f"clips_per_shard must be >= 1, got {self.clips_per_shard}")


def split_frames(cfg: ConvertConfig, split: str, default_frames: int) -> int:
    frames = cfg.frames or default_frames
    if split == "train":
        return cfg.train_frames or 2 * frames
    return frames


def job_config(
    cfg: ConvertConfig, inputs: SplitInputs, split: str, frames: int, ray_cfg: RayConfig, progress: bool
) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=InputConfig(
            metadata=inputs.metadata,
            videos=cfg.videos,
            subtitles=inputs.subtitles,
            captions=inputs.captions,
            max_text_chars=MAX_TEXT_CHARS,
        ),
        sharding=ShardingConfig(output=storage.join(cfg.out, split), clips_per_shard=cfg.clips_per_shard),
        decode=DecodeConfig(num_frames=frames, short_side=cfg.short_side, frame_size=cfg.frame_size),
        ray=ray_cfg,
        progress=progress,
    )


def list_videos(videos: str) -> dict[str, str]:
    try:
        found = list_source_videos(videos)
    except storage.StorageError as exc:
        raise ValueError(f"videos {videos}: cannot be listed ({exc})") from exc
    if not found:
        raise ValueError(f"videos {videos}: no <video_id>.<ext> files directly in this folder")
    return found


def split_folder(out: str, split: str) -> str:
    return storage.join(out, "inputs", split)
