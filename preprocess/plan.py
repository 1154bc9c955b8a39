"""The shard plan: where each shard's clips lie in the metadata, found by one streaming pass.

Shard ``k`` holds the clips at input positions ``[k*n, (k+1)*n)``: every clip entry with a clip id takes the next
position, in the order of the metadata files, their lines and their entries. The driver never builds the clips.
`plan_shards` reads the metadata once, as a stream, and yields one `ShardSlice` per shard as soon as the first clip
of the next shard shows where it ends; its memory is one line and one slice, whatever the corpus. Each shard task
reads its own slice (`read_slice`: a ranged read from the slice's start) and builds its clips there.

A slice runs from its start `Cursor` to the next shard's start. A line whose clips straddle two shards is read by
both; each takes its own clips. Everything else a line yields belongs to exactly one shard, so nothing is recorded
twice or lost: a line's own problems (malformed JSON, a record that is not a video) and the clip entries before its
first positioned clip go to the shard that owns the line's start, and an entry without a clip id goes to the shard
of the clip before it. Lines with no clip before the next shard starts belong to the shard before.

A clip id seen earlier in the same metadata record, or earlier in the same shard, is a duplicate
(``duplicate_clip_id``). Duplicates in different shards are not detected: that would need a set of every clip id
in the driver (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline import storage
from preprocess.config import Layout
from preprocess.failures import Failure
from preprocess.inputs import ClipItem, ParsedLine, duplicate_of, parse_line


@dataclass(frozen=True)
class Cursor:
    """A point in the metadata: the start of a line, and how many of its positioned clips came before."""

    file: int
    """Index into the metadata file list; ``len(files)`` is the end of the last file."""
    offset: int
    """Byte offset of the line's start in that file."""
    line: int
    """1-based line number of that line."""
    skip: int
    """Positioned clips of the line that belong to earlier shards."""
    position: int
    """Input position of the line's first clip not skipped."""


@dataclass(frozen=True)
class ShardSlice:
    """Shard ``index``: the metadata from ``start`` up to ``end`` (the next shard's start), ``clips`` positions."""

    index: int
    start: Cursor
    end: Cursor
    clips: int

    def to_json(self) -> str:
        """Plain text for a table column (Ray Data rows hold it without pickling)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardSlice:
        data = json.loads(text)
        return cls(data["index"], Cursor(**data["start"]), Cursor(**data["end"]), data["clips"])


def metadata_files(spec: str) -> list[str]:
    """The metadata files of ``--metadata``: a comma-separated list of files or globs, in that order (a glob's
    matches in name order). ValueError if something names no file."""
    files = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matched = storage.expand(part)
        if not matched:
            raise ValueError(f"metadata {part}: no file matches")
        missing = [uri for uri in matched if not storage.exists(uri)]
        if missing:
            raise ValueError(f"metadata {missing[0]}: not found")
        files += matched
    if not files:
        raise ValueError(f"metadata {spec!r}: no file given")
    return files


def _lines(files: list[str], start: Cursor) -> Iterator[tuple[int, int, int, bytes]]:
    """(file index, byte offset, line number, raw line) from ``start`` on, across files; blank lines skipped."""
    for index in range(start.file, len(files)):
        offset, number = (start.offset, start.line) if index == start.file else (0, 1)
        try:
            stream = storage.open_read(files[index], start=offset)
        except storage.StorageNotFound as exc:
            raise ValueError(f"metadata {files[index]}: not found ({exc})") from exc
        with stream:
            for raw in stream:
                if raw.strip():
                    yield index, offset, number, raw.strip()
                offset += len(raw)
                number += 1


# --------------------------------------------------------------------------- planning


def plan_shards(
    files: list[str], clips_per_shard: int, layout: Layout, on_line: Callable[[ParsedLine], None] | None = None
) -> Iterator[ShardSlice]:
    """Every shard's slice, in order, from one streaming pass over ``files``; ``on_line`` sees each parsed line
    (the video check of preprocess/input_checks.py counts on it, with no second pass)."""
    start: Cursor | None = None
    position = 0
    taken = 0  # clips of the current shard so far
    index = 0
    for file, offset, number, raw in _lines(files, Cursor(0, 0, 1, 0, 0)):
        parsed = parse_line(files[file], number, raw, layout, position)
        if on_line is not None:
            on_line(parsed)
        count = parsed.num_positions
        if start is None:
            start = Cursor(0, 0, 1, 0, 0)
        used = 0
        while used < count:
            if taken == clips_per_shard:  # this line holds the next shard's first clip
                here = Cursor(file, offset, number, used, position)
                yield ShardSlice(index, start, here, taken)
                start, index, taken = here, index + 1, 0
            step = min(count - used, clips_per_shard - taken)
            used, taken, position = used + step, taken + step, position + step
    if start is not None and taken:
        yield ShardSlice(index, start, Cursor(len(files), 0, 1, 0, position), taken)


# --------------------------------------------------------------------------- one shard's clips


@dataclass
class SliceContents:
    """What a shard's slice holds: its clips in position order, and the problems of lines and entries that
    yielded no clip (position -1 in the failures table)."""

    clips: list[ClipItem] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    videos: int = 0
    """Metadata records (video lines) that start in the slice."""


def read_slice(files: list[str], piece: ShardSlice, layout: Layout) -> SliceContents:
    """The clips and problems of one shard's slice (see the module docstring for who owns what)."""
    out, seen = SliceContents(), set()
    position = piece.start.position
    for file, offset, number, raw in _lines(files, piece.start):
        at_end = (file, offset) == (piece.end.file, piece.end.offset)
        if at_end and piece.end.skip == 0 or (file, offset) > (piece.end.file, piece.end.offset):
            break
        first = (file, offset) == (piece.start.file, piece.start.offset)
        lo = piece.start.skip if first else 0
        hi = piece.end.skip if at_end else None
        parsed = parse_line(files[file], number, raw, layout, position - lo)
        _take_line(parsed, lo, hi, f"{files[file]} line {number}", seen, out)
        position += parsed.num_positions - lo
        if at_end:
            break
    return out


def _take_line(parsed, lo: int, hi: int | None, where: str, seen: set[str], out: SliceContents) -> None:
    """The part of one parsed line that belongs to this shard: positioned entries ``[lo, hi)``."""
    if lo == 0:
        out.failures += parsed.notes
        out.videos += parsed.video_id is not None
    line_seen: set[str] = set()
    g = 0  # positioned entries before the current entry
    for entry in parsed.entries:
        if isinstance(entry, Failure):
            owned = lo == 0 if g == 0 else lo <= g - 1 and (hi is None or g - 1 < hi)
            if owned:
                out.failures.append(entry)
            continue
        owned = lo <= g and (hi is None or g < hi)
        if owned:
            duplicate = entry.clip_id in line_seen or entry.clip_id in seen
            out.clips.append(duplicate_of(entry, where) if duplicate else entry)
            seen.add(entry.clip_id)
        line_seen.add(entry.clip_id)
        g += 1
