"""Parsing the job's inputs: HD-VILA metadata lines, spans, text files, the video folder.

Deterministic: the same bytes give the same clips, problems and texts. A metadata line is parsed by
`parse_line` wherever it is read: in the driver's streaming plan, which only counts its clips, and in the
shard task that owns it (preprocess/plan.py). A clip that cannot be processed because of its metadata (bad
span, unsafe id, duplicate) keeps its position and carries its problem, so the task records it in its shard's
failures; a line or entry that yields no clip (malformed JSON, a record without a video id, an entry without a
clip id) is recorded as a :class:`preprocess.failures.Failure` at position -1.

Text files are read as UTF-8; a line that is not valid UTF-8 is decoded with ``errors="replace"``, kept, and
recorded as a ``non_utf8`` row (``dropped=False``). Texts come in three forms (:func:`text_format` tells which):
jsonl of ``{clip_id, <field>}``, a JSON list of ``{image_id, caption}`` (the original release's caption list;
``image_id`` is the clip id) and a local LMDB folder of clip id -> UTF-8 text. The job never reads a whole text
source into one process (preprocess/text/texts.py); :func:`read_text_source` does, for small inputs and as the
reference the distributed join is tested against (tests/preprocess/test_text_join.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import storage
from preprocess.config import Layout
from preprocess.failures import Failure

log = logging.getLogger(__name__)

_SPAN_RE = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


@dataclass(frozen=True, kw_only=True)
class TextEntry:
    """A subtitle or caption for one clip."""

    text: str
    truncated: bool
    origin: str


@dataclass(frozen=True, kw_only=True)
class ClipItem:
    """One clip entry of the metadata, at its input position."""

    position: int
    line: int
    video_id: str
    clip_id: str
    span: tuple[float, float] | None
    problem: Failure | None = None
    """Set when the metadata already rules the clip out."""
    subtitle: TextEntry | None = None
    caption: TextEntry | None = None
    url: str | None = None
    """The metadata line's ``url`` (where ``--fetch`` downloads the source video from)."""

    def fail(self, stage: str, error: str, message: str, dropped: bool = True) -> Failure:
        """A failure of this clip (its ids and metadata line filled in)."""
        return Failure(
            video_id=self.video_id,
            clip_id=self.clip_id,
            line=self.line,
            stage=stage,
            error=error,
            message=message,
            dropped=dropped,
        )


class SpanError(ValueError):
    """A span value cannot be parsed."""


def parse_time(value) -> float:
    """``HH:MM:SS.mmm`` (or ``MM:SS.mmm``, or a number of seconds) to seconds."""
    if isinstance(value, bool):
        raise SpanError(f"time {value!r} is not a timestamp")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise SpanError(f"time {value!r} is not a string or number")
    text = value.strip()
    negative = text.startswith("-")
    match = _SPAN_RE.match(text.lstrip("-"))
    if not match:
        raise SpanError(f"time {value!r} is not HH:MM:SS.mmm")
    hours, minutes, seconds = match.group(1) or "0", match.group(2), match.group(3)
    total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return -total if negative else total


def check_span(raw) -> tuple[tuple[float, float] | None, Failure | None]:
    """Parse a ``[start, end]`` span; returns (span, None) or (None, the failure, stage ``span``)."""

    def bad(error: str, why: str) -> tuple[None, Failure]:
        return None, Failure(stage="span", error=error, message=f"span {raw!r}{why}")

    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        return bad("span_invalid", " is not a [start, end] pair")
    try:
        start, end = parse_time(raw[0]), parse_time(raw[1])
    except SpanError as exc:
        return bad("span_invalid", f": {exc}")
    if start < 0 or end < 0:
        return bad("span_negative", " has a negative time")
    if end < start:
        return bad("span_reversed", " ends before it starts")
    if end == start:
        return bad("span_empty", " has zero length")
    return (round(start, 6), round(end, 6)), None


# --------------------------------------------------------------------------- lines


def _lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a text file, blank lines skipped."""
    with storage.open_read(uri) as stream:
        for number, raw in enumerate(stream, start=1):
            raw = raw.strip()
            if raw:
                yield number, raw


def json_line(uri: str, number: int, raw: bytes, stage: str) -> tuple[object, list[Failure]]:
    """Decode one JSON line; non-UTF-8 is replaced (and reported), bad JSON is a failure."""
    notes = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        message = f"{uri} line {number}: not UTF-8 ({exc.reason}); bad bytes replaced"
        notes.append(Failure(stage=stage, error="non_utf8", message=message, line=number, dropped=False))
    try:
        return json.loads(text), notes
    except json.JSONDecodeError as exc:
        message = f"{uri} line {number}: malformed JSON ({exc.msg} at column {exc.colno})"
        notes.append(Failure(stage=stage, error="malformed_json", message=message, line=number))
        return None, notes


# --------------------------------------------------------------------------- texts


def read_texts(uri: str, field: str, stage: str, max_chars: int) -> tuple[dict[str, TextEntry], list[Failure]]:
    """Read a ``{clip_id, <field>}`` jsonl into clip id -> text."""
    texts: dict[str, TextEntry] = {}
    failures: list[Failure] = []
    for number, raw in _lines(uri):
        record, notes = json_line(uri, number, raw, stage)
        failures += notes
        if record is None:
            continue
        clip_id = record.get("clip_id") if isinstance(record, dict) else None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(clip_id, str) or not clip_id or not isinstance(text, str):
            message = f'{uri} line {number}: expected {{"clip_id": str, "{field}": str}}'
            failures.append(Failure(stage=stage, error="bad_record", message=message, line=number))
            continue
        if clip_id in texts:
            message = f"{uri} line {number}: second {field} for clip {clip_id!r} ignored"
            failures.append(
                Failure(
                    stage=stage, error="duplicate_text", message=message, line=number, clip_id=clip_id, dropped=False
                )
            )
            continue
        texts[clip_id] = TextEntry(text=text[:max_chars], truncated=len(text) > max_chars, origin=uri)
    return texts, failures


def read_text_list(uri: str, field: str, stage: str, max_chars: int) -> tuple[dict[str, TextEntry], list[Failure]]:
    """Read a JSON list of ``{image_id (or clip_id), caption (or <field>)}`` into clip id -> text."""
    raw = storage.read_bytes(uri)
    failures: list[Failure] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        message = f"{uri}: not UTF-8 ({exc.reason}); bad bytes replaced"
        failures.append(Failure(stage=stage, error="non_utf8", message=message, dropped=False))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{stage} {uri}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(records, list):
        raise ValueError(f'{stage} {uri}: expected a JSON list of {{"image_id", "caption"}} records')
    texts: dict[str, TextEntry] = {}
    for index, record in enumerate(records):
        where = f"{uri} entry {index}"
        expected = f'{where}: expected {{"image_id": str, "caption": str}}'
        if not isinstance(record, dict):
            failures.append(Failure(stage=stage, error="bad_record", message=expected))
            continue
        clip_id = record.get("image_id", record.get("clip_id"))
        value = record.get("caption", record.get(field))
        if not isinstance(clip_id, str) or not clip_id or not isinstance(value, str):
            failures.append(Failure(stage=stage, error="bad_record", message=expected))
            continue
        if clip_id in texts:
            message = f"{where}: second text for clip {clip_id!r} ignored"
            failures.append(
                Failure(stage=stage, error="duplicate_text", message=message, clip_id=clip_id, dropped=False)
            )
            continue
        texts[clip_id] = TextEntry(text=value[:max_chars], truncated=len(value) > max_chars, origin=uri)
    return texts, failures


def open_lmdb(uri: str, stage: str):
    """A local LMDB (folder or file) opened read-only without a lock, or a ValueError naming it."""
    try:
        import lmdb
    except ImportError as exc:
        raise ValueError(f"{stage} {uri}: an LMDB input needs the 'lmdb' package (pip install lmdb)") from exc
    path = storage.parse(uri).path
    try:
        return lmdb.open(path, readonly=True, lock=False, subdir=os.path.isdir(path), max_dbs=0)
    except lmdb.Error as exc:
        raise ValueError(f"{stage} {uri}: not a readable LMDB ({exc})") from exc


def read_lmdb_texts(uri: str, stage: str, max_chars: int) -> tuple[dict[str, TextEntry], list[Failure]]:
    """Read a local LMDB (folder or file) of UTF-8 clip id -> UTF-8 text."""
    env = open_lmdb(uri, stage)
    texts: dict[str, TextEntry] = {}
    failures: list[Failure] = []
    with env, env.begin() as txn:
        for number, (key, value) in enumerate(txn.cursor(), start=1):
            try:
                clip_id, text = key.decode("utf-8"), value.decode("utf-8")
            except UnicodeDecodeError as exc:
                clip_id, text = key.decode("utf-8", errors="replace"), value.decode("utf-8", errors="replace")
                message = f"{uri} record {number} ({clip_id!r}): not UTF-8 ({exc.reason}); bad bytes replaced"
                failures.append(Failure(stage=stage, error="non_utf8", message=message, clip_id=clip_id, dropped=False))
            texts[clip_id] = TextEntry(text=text[:max_chars], truncated=len(text) > max_chars, origin=uri)
    return texts, failures


def text_format(uri: str) -> str:
    """``lmdb`` (a local folder, or a ``.lmdb``/``.mdb`` file), ``list`` (JSON list) or ``jsonl``, by content."""
    if not storage.is_remote(uri):
        path = storage.parse(uri).path
        if os.path.isdir(path) or path.endswith((".lmdb", ".mdb")):
            return "lmdb"
    with storage.open_read(uri) as stream:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "list" if head.startswith(b"[") else "jsonl"


def read_text_source(uri: str, field: str, stage: str, max_chars: int) -> tuple[dict[str, TextEntry], list[Failure]]:
    """Texts from any of the three forms (see the module docstring)."""
    kind = text_format(uri)
    if kind == "lmdb":
        return read_lmdb_texts(uri, stage, max_chars)
    if kind == "list":
        return read_text_list(uri, field, stage, max_chars)
    return read_texts(uri, field, stage, max_chars)


# --------------------------------------------------------------------------- metadata


def _unsafe_video_id(video_id: str) -> str | None:
    if "/" in video_id or "\\" in video_id or "\0" in video_id or video_id in (".", ".."):
        return f"video id {video_id!r} contains a path separator or is . or .."
    return None


def _unsafe_clip_id(clip_id: str, layout: Layout) -> str | None:
    try:
        clip_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"clip id {clip_id!r} is not valid Unicode text"
    if "\0" in clip_id:
        return f"clip id {clip_id!r} contains a NUL byte"
    if layout is Layout.CLIPS:
        norm = posixpath.normpath(clip_id.replace("\\", "/"))
        if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
            return f"clip id {clip_id!r} would point outside its video's folder"
    return None


@dataclass(frozen=True, kw_only=True)
class ParsedLine:
    """One metadata line: its clip entries in order, and what went wrong with the line as a whole."""

    video_id: str | None
    entries: tuple[ClipItem | Failure, ...] = ()
    """A ClipItem for each entry with a clip id (it takes the next input position; ``problem`` set when its span or
    ids rule it out), a Failure (stage ``metadata``) for an entry without one."""
    notes: tuple[Failure, ...] = ()
    """Line-level problems: malformed JSON, a record that is not a video, non-UTF-8 bytes."""

    @property
    def num_positions(self) -> int:
        return sum(isinstance(e, ClipItem) for e in self.entries)


def parse_line(uri: str, number: int, raw: bytes, layout: Layout, first_position: int) -> ParsedLine:
    """Parse metadata line ``number`` of ``uri``; its clips take positions from ``first_position`` on.

    Duplicate clip ids are not decided here: they depend on which shard reads the line (preprocess/plan.py).
    """
    record, notes = json_line(uri, number, raw, "metadata")
    if record is None:
        return ParsedLine(video_id=None, notes=tuple(n for n in notes if n.error != "non_utf8"))
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("video_id"), str)
        or not record["video_id"]
        or not isinstance(record.get("clip"), list)
    ):
        message = f'{uri} line {number}: expected {{"video_id": str, "clip": [...]}}'
        notes.append(Failure(stage="metadata", error="bad_record", message=message, line=number))
        return ParsedLine(video_id=None, notes=tuple(notes))
    entries = _clip_entries(record, uri, number, layout, first_position)
    return ParsedLine(video_id=record["video_id"], entries=entries, notes=tuple(notes))


def _clip_entries(record: dict, uri: str, number: int, layout: Layout, position: int) -> tuple:
    video_id, where = record["video_id"], f"{uri} line {number}"
    url = record.get("url") if isinstance(record.get("url"), str) and record.get("url") else None
    video_problem = _unsafe_video_id(video_id)
    entries: list[ClipItem | Failure] = []
    for raw in record["clip"]:
        clip_id = raw.get("clip_id") if isinstance(raw, dict) else None
        if not isinstance(clip_id, str) or not clip_id:
            message = f"{where}: clip entry {raw!r} has no clip_id"
            entries.append(
                Failure(stage="metadata", error="bad_record", message=message, line=number, video_id=video_id)
            )
            continue
        item = ClipItem(position=position, line=number, video_id=video_id, clip_id=clip_id, span=None, url=url)
        position += 1
        span, problem = check_span(raw.get("span"))
        if problem:
            problem = item.fail(problem.stage, problem.error, f"{where}: clip {clip_id!r}: {problem.message}")
        unsafe = video_problem or _unsafe_clip_id(clip_id, layout)
        if unsafe:
            problem = item.fail("metadata", "unsafe_id", f"{where}: {unsafe}")
        subtitle, caption = (_inline_text(raw, name, uri) for name in ("subtitle", "caption"))
        entries.append(dataclasses.replace(item, span=span, problem=problem, subtitle=subtitle, caption=caption))
    return tuple(entries)


def _inline_text(entry: dict, name: str, uri: str) -> TextEntry | None:
    """A text carried in the clip entry itself (``"subtitle"`` / ``"caption"``), not yet cut to length."""
    text = entry.get(name)
    return TextEntry(text=text, truncated=False, origin=uri) if isinstance(text, str) else None


def duplicate_of(item: ClipItem, where: str) -> ClipItem:
    """The item marked as a duplicate (an unsafe id keeps its own problem)."""
    if item.problem is not None and item.problem.error == "unsafe_id":
        return item
    problem = item.fail("metadata", "duplicate_clip_id", f"{where}: clip id {item.clip_id!r} already appeared earlier")
    return dataclasses.replace(item, problem=problem)


# --------------------------------------------------------------------------- videos


def list_source_videos(videos: str) -> dict[str, str]:
    """video id -> URI of ``<video_id>.<ext>`` directly under the videos folder (listed once)."""
    found: dict[str, str] = {}
    for name, uri in storage.list_children(videos):
        if "." not in name.lstrip("."):
            continue
        video_id = name.rsplit(".", 1)[0]
        if video_id in found:
            log.warning(
                "video %s: several files (%s, %s); using the first in name order", video_id, found[video_id], uri
            )
            continue
        found[video_id] = uri
    return found


def clip_file(videos: str, video_id: str, clip_id: str) -> str:
    """URI of a pre-cut clip ``<videos>/<video_id>/<clip_id>`` (ids already checked safe)."""
    return storage.join(videos, video_id, posixpath.normpath(clip_id.replace("\\", "/")))
