"""Shard sample schema: tar member names, sample keys and the per-clip metadata.

One sample per clip. Its members inside a WebDataset tar are::

    <key>.f000.jpg, <key>.f001.jpg, ...   frames in time order (JPEG)
    <key>.subtitle.txt                     ASR subtitle (UTF-8, may be empty)
    <key>.caption.txt                      generated caption (UTF-8, may be empty)
    <key>.json                             ClipMeta as JSON (with the clip's quality scores, pipeline/scores.py)

``<key>`` is the clip id encoded by :func:`encode_key`: webdataset splits a member
name at the first dot of its base name, and HD-VILA clip ids look like
``<ytid>.<k>.mp4``, so every byte outside ``[A-Za-z0-9_-]`` is percent-encoded.
The encoding is reversible (:func:`decode_key`) and the result never contains a
``/`` or a ``.``, so no member can escape the archive.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field

from pipeline.scores import check_scores

SCHEMA_VERSION = 1

FRAME_MEMBER = "f{index:03d}.jpg"
SUBTITLE_MEMBER = "subtitle.txt"
CAPTION_MEMBER = "caption.txt"
META_MEMBER = "json"
MAX_FRAMES = 1000

_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_FRAME_RE = re.compile(r"^f(\d{3})\.jpg$")
_KEY_RE = re.compile(r"^(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+$")
_ASCII_KEY_TABLE = {b: chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in range(128)}


class SchemaError(ValueError):
    """A sample does not follow the shard schema."""


def encode_key(clip_id: str) -> str:
    """Encode a clip id into a tar-safe, dot-free, slash-free sample key."""
    if not isinstance(clip_id, str) or not clip_id:
        raise SchemaError(f"clip id must be a non-empty string, got {clip_id!r}")
    if clip_id.isascii():  # the usual case: one table lookup per character
        return clip_id.translate(_ASCII_KEY_TABLE)
    raw = clip_id.encode("utf-8", errors="strict")
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in raw)


def decode_key(key: str) -> str:
    """Invert :func:`encode_key`."""
    if not _KEY_RE.match(key):
        raise SchemaError(f"not an encoded sample key: {key!r}")
    out = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "%":
            out.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(key[i]))
            i += 1
    return out.decode("utf-8")


@dataclass(frozen=True, kw_only=True)
class TextSource:
    """Where a text came from: ``given`` (input file), ``generated`` or ``missing``."""

    kind: str
    """One of ``given``, ``generated``, ``missing``."""
    origin: str = ""
    """The input file or the model that produced it."""
    truncated: bool = False
    """True when the text was cut to the configured maximum length."""

    def __post_init__(self) -> None:
        if self.kind not in ("given", "generated", "missing"):
            raise SchemaError(f"text source kind must be given/generated/missing, got {self.kind!r}")


@dataclass(frozen=True, kw_only=True)
class ClipMeta:
    """Per-clip metadata stored as ``<key>.json``."""

    video_id: str
    """Source video id (YouTube id for HD-VILA)."""
    clip_id: str
    """Clip id as given in the metadata, e.g. ``<ytid>.<k>.mp4``."""
    span: tuple[float, float]
    """Clip start and end in seconds of the source video."""
    source_fps: float
    """Average frame rate of the source stream."""
    frame_times: tuple[float, ...]
    """Presentation time in seconds (source timeline) of each stored frame."""
    frame_size: tuple[int, int]
    """(width, height) of the stored frames."""
    middle_frame: int
    """Index of the stored frame used as the clip's middle frame (floor(n/2))."""
    source_uri: str
    """Where the video was read from."""
    subtitle_source: TextSource = TextSource(kind="missing")
    caption_source: TextSource = TextSource(kind="missing")
    scores: dict = field(default_factory=dict)
    """Quality scores, name -> number (pipeline/scores.py); a score not computed is absent. Older shards have
    none: the key is left out of the JSON when empty."""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        n = len(self.frame_times)
        if not 1 <= n <= MAX_FRAMES:
            raise SchemaError(f"clip {self.clip_id!r}: {n} frames, expected 1..{MAX_FRAMES}")
        if not 0 <= self.middle_frame < n:
            raise SchemaError(f"clip {self.clip_id!r}: middle_frame {self.middle_frame} outside 0..{n - 1}")
        if not self.span[0] < self.span[1]:
            raise SchemaError(f"clip {self.clip_id!r}: span {self.span} is not increasing")
        try:
            check_scores(self.scores, f"clip {self.clip_id!r}")
        except ValueError as exc:
            raise SchemaError(str(exc)) from None

    @property
    def num_frames(self) -> int:
        return len(self.frame_times)

    @property
    def duration(self) -> float:
        return self.span[1] - self.span[0]

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        if not data["scores"]:
            del data["scores"]  # no scores: the JSON of a sample written before they existed
        return json.dumps(data, sort_keys=True, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> ClipMeta:
        try:
            raw = json.loads(data)
            version = raw.get("schema_version")
            if version != SCHEMA_VERSION:
                raise SchemaError(f"schema version {version}, this reader knows {SCHEMA_VERSION}")
            raw["span"] = tuple(raw["span"])
            raw["frame_times"] = tuple(raw["frame_times"])
            raw["frame_size"] = tuple(raw["frame_size"])
            raw["subtitle_source"] = TextSource(**raw["subtitle_source"])
            raw["caption_source"] = TextSource(**raw["caption_source"])
            return cls(**raw)
        except SchemaError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SchemaError(f"bad clip metadata: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ClipSample:
    """One clip as stored in a shard: frames (JPEG bytes), texts and metadata."""

    meta: ClipMeta
    frames: tuple[bytes, ...]
    subtitle: str = ""
    caption: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.frames) != self.meta.num_frames:
            raise SchemaError(
                f"clip {self.meta.clip_id!r}: {len(self.frames)} frames but {self.meta.num_frames} frame times"
            )

    @property
    def key(self) -> str:
        return encode_key(self.meta.clip_id)

    def members(self) -> list[tuple[str, bytes]]:
        """Tar members (name, payload) in their canonical order."""
        key = self.key
        out = [(f"{key}.{FRAME_MEMBER.format(index=i)}", jpg) for i, jpg in enumerate(self.frames)]
        out.append((f"{key}.{SUBTITLE_MEMBER}", self.subtitle.encode("utf-8")))
        out.append((f"{key}.{CAPTION_MEMBER}", self.caption.encode("utf-8")))
        out.append((f"{key}.{META_MEMBER}", self.meta.to_json()))
        return out

    @classmethod
    def from_wds(cls, sample: dict) -> ClipSample:
        """Build from a webdataset sample dict (``__key__`` plus extension -> bytes)."""
        key = sample.get("__key__", "?")
        if META_MEMBER not in sample:
            raise SchemaError(f"sample {key!r} in {sample.get('__url__', '?')} has no {META_MEMBER} member")
        meta = ClipMeta.from_json(sample[META_MEMBER])
        frames = _ordered_frames(sample, meta.num_frames)
        return cls(
            meta=meta,
            frames=frames,
            subtitle=_text(sample, SUBTITLE_MEMBER),
            caption=_text(sample, CAPTION_MEMBER),
        )


def _ordered_frames(sample: dict, count: int) -> tuple[bytes, ...]:
    """The frame members in order. Their numbering must be 0..n-1 (SchemaError otherwise); a count
    other than the metadata's ``count`` is caught by `ClipSample`."""
    if len(sample) == count + len(_NOT_FRAMES & sample.keys()):
        try:  # exactly the announced frames and nothing else: no member name to inspect
            return tuple(map(sample.__getitem__, _frame_names(count)))
        except KeyError:
            pass
    indexed = []
    for name, payload in sample.items():
        match = _FRAME_RE.match(name)
        if match:
            indexed.append((int(match.group(1)), payload))
    indexed.sort()
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise SchemaError(f"sample {sample.get('__key__')!r}: frame members are not numbered 0..n-1")
    return tuple(payload for _, payload in indexed)


_NOT_FRAMES = frozenset(("__key__", "__url__", META_MEMBER, SUBTITLE_MEMBER, CAPTION_MEMBER))


@functools.lru_cache(maxsize=64)
def _frame_names(count: int) -> tuple[str, ...]:
    return tuple(FRAME_MEMBER.format(index=i) for i in range(count))


def _text(sample: dict, member: str) -> str:
    payload = sample.get(member, b"")
    return payload.decode("utf-8") if isinstance(payload, bytes) else str(payload)
