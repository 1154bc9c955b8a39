"""The text join: every shard's subtitles and captions in one small file, without a dictionary of all texts.

The Ray-agnostic half; preprocess/job.py (``join_texts``, the only module that imports ray) wires these
functions into one Ray Data pipeline (docs/preprocessing.md, "How texts reach the shards")::

    byte ranges of each text file --parse_items--> rows --join on clip_id with the clip rows (full outer)-->
    --route--> groupby(group) --write_group--> per-shard files, and failure rows --sort--> failures table

- **Parse.** A jsonl source (``{clip_id, <field>}`` per line) is cut into byte ranges; a range owns the lines that
  start in it. Each line gives a text row (``kind`` TEXT), and each problem a failure row (``kind`` FAILURE): the
  same checks and messages as preprocess/inputs.py. A line number needs the lines of every earlier range, so
  failure rows carry the line within their range and each range adds one LINES row with its count; the driver
  numbers the lines while it streams the sorted failures. A JSON-list source (the original caption list, one
  array of ``{image_id, caption}``) is parsed whole by one worker (its memory is the list's). LMDB sources are not
  joined: each shard task reads its local LMDB itself.
- **Join.** The text rows meet the clip rows ``{shard, position, clip_id}`` on ``clip_id``; every clip row comes
  out (so a shard without texts still gets its file), texts of clips not in the metadata are dropped. Failure
  and LINES rows carry a key no clip has, so they spread over the partitions and match nothing.
- **Write.** Rows are grouped by shard (failure rows by source range, under negative group keys); a shard's group
  keeps, per clip position and stage, the text of the first line in file order (byte offset, or entry index)
  and reports the others as ``duplicate_text``, then writes ``texts/shard-<k>.jsonl`` (see :func:`shard_lines`).
- **Failures and marker.** The failure rows, sorted by (stage, offset), stream to the driver, which numbers
  their lines and writes ``failures/texts.parquet``; then ``texts/_joined.json`` (sources, max_chars), written
  last, lets a rerun skip the join.

A second text for a clip id that is not in the metadata is not reported (that text is never used); every other
problem is reported as preprocess/inputs.py reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.layout import DatasetLayout
from preprocess.failures import Failure, table_schema
from preprocess.inputs import TextEntry, text_format

STAGES = {"subtitles": "text", "captions": "caption"}
"""Stage name -> the jsonl field holding its text; a stage's index in this dict is its ``stage`` column."""
RANGE_BYTES = 16 << 20
"""Bytes of a jsonl source parsed by one task."""
PARTITION_BYTES = 32 << 20
"""Source bytes per join partition when the caller does not choose (a partition is joined in one worker)."""
LOCAL_JOIN_CLIPS = 200_000
"""Up to this many clips, and text files of at most one partition (``PARTITION_BYTES``), the join runs in the
driver (:func:`join_locally`: the same steps, the same files), skipping Ray Data's start-up of several seconds."""
MARKER_VERSION = 1

LINES, FAILURE, TEXT = 0, 1, 2
"""``kind`` of a row: a range's line count, a problem, a text. Clip rows without a text come out of the join
with ``kind`` null."""
UNREADABLE = "unreadable"
"""The ``error`` of a JSON-list source that is not a JSON list: the driver raises ValueError with its message (the
job stops before any shard, as preprocess/inputs.py does), since Ray Data does not hand a task's exception back."""
_NON_UTF8, _LINE_PROBLEM, _DUPLICATE = 0, 1, 2
"""``seq`` of a failure: the order of several failures of one line."""


def _schema(*names: str):
    import pyarrow as pa

    types = {
        "group": pa.int64(),
        "kind": pa.int8(),
        "stage": pa.int8(),
        "part": pa.int64(),
        "order": pa.int64(),
        "seq": pa.int8(),
        "line": pa.int64(),
        "count": pa.int64(),
        "position": pa.int64(),
        "clip_id": pa.string(),
        "text": pa.string(),
        "truncated": pa.bool_(),
        "error": pa.string(),
        "detail": pa.string(),
        "dropped": pa.bool_(),
    }
    return pa.schema([(name, types[name]) for name in names])


_PROBLEM = ("kind", "stage", "part", "order", "seq", "line", "count", "clip_id", "error", "detail", "dropped")
PARSED_COLUMNS = (*_PROBLEM, "text", "truncated")
"""Columns of the parsed rows (the left side of the join)."""
ROUTED_COLUMNS = ("group", "position", *PARSED_COLUMNS)
PROBLEM_COLUMNS = _PROBLEM
"""Columns of what ``write_group`` returns: failure and LINES rows, and one SHARD row per stage and shard."""
SORT_KEYS = ["stage", "order", "kind", "seq"]
SHARD = 3
"""``kind`` of a row that ``write_group`` returns per stage and written shard (``count``: its texts)."""


@dataclass(frozen=True)
class TextSource:
    """One text file to join."""

    stage: str
    uri: str
    kind: str
    """``jsonl`` or ``list`` (see preprocess/inputs.py ``text_format``)."""

    @property
    def index(self) -> int:
        return list(STAGES).index(self.stage)

    @property
    def field(self) -> str:
        return STAGES[self.stage]


@dataclass(frozen=True)
class JoinSpec:
    """What decides the per-shard files' bytes: the sources and the cut."""

    sources: tuple[TextSource, ...]
    max_chars: int

    @classmethod
    def of(cls, sources: dict[str, str], max_chars: int) -> JoinSpec:
        """Check the sources (stage name -> URI); ValueError for an unknown stage, a missing file or an LMDB."""
        if not sources:
            raise ValueError("the text join needs at least one subtitle or caption file")
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive (got {max_chars})")
        found = []
        for stage in STAGES:
            if stage not in sources:
                continue
            uri = sources[stage]
            try:
                kind = text_format(uri)
            except storage.StorageNotFound as exc:
                raise ValueError(f"{stage} {uri}: not found ({exc})") from exc
            if kind == "lmdb":
                raise ValueError(f"{stage} {uri}: an LMDB is read by each shard task, not joined")
            found.append(TextSource(stage, uri, kind))
        unknown = sorted(set(sources) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown text stage(s) {unknown}: expected {sorted(STAGES)}")
        return cls(tuple(found), max_chars)

    def marker(self) -> dict:
        return {
            "version": MARKER_VERSION,
            "sources": {s.stage: s.uri for s in self.sources},
            "max_chars": self.max_chars,
        }

    def source(self, stage_index: int) -> TextSource:
        return next(s for s in self.sources if s.index == stage_index)

    def read_items(self, range_bytes: int = RANGE_BYTES) -> list[dict]:
        """One item per parse task: a byte range of a jsonl source, or a whole list source."""
        items = []
        for source in self.sources:
            if source.kind == "list":
                items.append({"stage": source.index, "part": 0, "start": 0, "end": -1})
                continue
            size = storage.size(source.uri)
            starts = range(0, max(size, 1), range_bytes)  # an empty file: one empty range
            items += [
                {"stage": source.index, "part": k, "start": s, "end": min(s + range_bytes, size)}
                for k, s in enumerate(starts)
            ]
        return items

    def text_bytes(self) -> int:
        return sum(storage.size(s.uri) for s in self.sources)

    def local(self, clips: int) -> bool:
        """Small enough to join in the driver (see ``LOCAL_JOIN_CLIPS``)."""
        return clips <= LOCAL_JOIN_CLIPS and self.text_bytes() <= PARTITION_BYTES

    def default_partitions(self, min_partitions: int = 2) -> int:
        total = sum(storage.size(s.uri) for s in self.sources)
        return max(min_partitions, math.ceil(total / PARTITION_BYTES))


@dataclass(kw_only=True)
class TextJoinResult:
    """What the join did: shard files written, texts per stage, failure rows; or skipped (marker found)."""

    skipped: bool = False
    shards: int = 0
    texts: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- parse


class _Rows:
    """Parsed rows of one task, column by column."""

    def __init__(self):
        self.columns: dict[str, list] = {name: [] for name in PARSED_COLUMNS}

    def add(self, **values) -> None:
        for name, column in self.columns.items():
            column.append(values.get(name))

    def problem(self, stage: int, part: int, order: int, seq: int, line: int, error: str, detail: str, **extra):
        key = f"\0{stage}:{order}:{seq}"
        dropped = extra.pop("dropped", True)
        self.add(
            kind=FAILURE,
            stage=stage,
            part=part,
            order=order,
            seq=seq,
            line=line,
            clip_id=key,
            error=error,
            detail=detail,
            dropped=dropped,
            **extra,
        )

    def table(self):
        import pyarrow as pa

        return pa.table(self.columns, schema=_schema(*PARSED_COLUMNS))


def parse_items(batch, *, spec: JoinSpec):
    """Parse the read items of a batch (``batch_size=1`` in job.py: one range per task) into rows."""
    import pyarrow as pa

    tables = []
    for item in batch.to_pylist():
        source = spec.source(item["stage"])
        rows = _Rows()
        if source.kind == "list":
            _parse_list(source, spec.max_chars, rows)
        else:
            _parse_range(source, item["part"], item["start"], item["end"], spec.max_chars, rows)
        tables.append(rows.table())
    return pa.concat_tables(tables)


def _range_lines(uri: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) of every line that starts in ``[start, end)``."""
    begin = max(start - 1, 0)
    with storage.open_read(uri, start=begin) as stream:
        offset = begin
        if start > 0:
            offset += len(stream.readline())  # the end of the line that started before this range
        while offset < end:
            raw = stream.readline()
            if not raw:
                return
            yield offset, raw
            offset += len(raw)


def _parse_range(source: TextSource, part: int, start: int, end: int, max_chars: int, rows: _Rows) -> None:
    number = 0
    for number, (offset, raw) in enumerate(_range_lines(source.uri, start, end), start=1):
        raw = raw.strip()
        if raw:
            _parse_line(source, part, offset, number, raw, max_chars, rows)
    rows.add(
        kind=LINES,
        stage=source.index,
        part=part,
        order=start,
        seq=0,
        line=0,
        count=number,
        clip_id=f"\0{source.index}:lines:{part}",
    )


def _parse_line(source: TextSource, part: int, offset: int, number: int, raw: bytes, max_chars: int, rows) -> None:
    """One jsonl line: a text row, or a failure; ``number`` is the line within the range."""
    stage, where = source.index, {"part": part, "order": offset, "line": number}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        detail = f"not UTF-8 ({exc.reason}); bad bytes replaced"
        rows.problem(stage, seq=_NON_UTF8, error="non_utf8", detail=detail, dropped=False, **where)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"malformed JSON ({exc.msg} at column {exc.colno})"
        rows.problem(stage, seq=_LINE_PROBLEM, error="malformed_json", detail=detail, **where)
        return
    clip_id = record.get("clip_id") if isinstance(record, dict) else None
    value = record.get(source.field) if isinstance(record, dict) else None
    if not isinstance(clip_id, str) or not clip_id or not isinstance(value, str):
        detail = f'expected {{"clip_id": str, "{source.field}": str}}'
        rows.problem(stage, seq=_LINE_PROBLEM, error="bad_record", detail=detail, **where)
        return
    rows.add(kind=TEXT, stage=stage, clip_id=clip_id, text=value[:max_chars], truncated=len(value) > max_chars, **where)


def _parse_list(source: TextSource, max_chars: int, rows: _Rows) -> None:
    """A JSON list of ``{image_id (or clip_id), caption (or <field>)}``, as preprocess/inputs.py reads it; a
    failure's ``detail`` is its whole message (``line`` 0)."""
    uri, stage = source.uri, source.index
    raw = storage.read_bytes(uri)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        detail = f"{uri}: not UTF-8 ({exc.reason}); bad bytes replaced"
        rows.problem(stage, 0, -1, _NON_UTF8, 0, "non_utf8", detail, dropped=False)
    del raw
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        detail = f"{source.stage} {uri}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        rows.problem(stage, 0, -1, _LINE_PROBLEM, 0, UNREADABLE, detail)
        return
    if not isinstance(records, list):
        detail = f'{source.stage} {uri}: expected a JSON list of {{"image_id", "caption"}} records'
        rows.problem(stage, 0, -1, _LINE_PROBLEM, 0, UNREADABLE, detail)
        return
    for index, record in enumerate(records):
        clip_id = value = None
        if isinstance(record, dict):
            clip_id = record.get("image_id", record.get("clip_id"))
            value = record.get("caption", record.get(source.field))
        if not isinstance(clip_id, str) or not clip_id or not isinstance(value, str):
            detail = f'{uri} entry {index}: expected {{"image_id": str, "caption": str}}'
            rows.problem(stage, 0, index, _LINE_PROBLEM, 0, "bad_record", detail)
            continue
        rows.add(
            kind=TEXT,
            stage=stage,
            part=0,
            order=index,
            line=0,
            clip_id=clip_id,
            text=value[:max_chars],
            truncated=len(value) > max_chars,
        )


def clip_table(rows: Iterable[dict]):
    """The clip rows ``{shard, position, clip_id}`` as an Arrow table (the right side of the join)."""
    import pyarrow as pa

    rows = list(rows)
    schema = pa.schema([("shard", pa.int64()), ("position", pa.int64()), ("clip_id", pa.string())])
    return pa.table({name: [r[name] for r in rows] for name in schema.names}, schema=schema)


# --------------------------------------------------------------------------- route and write


def route(table):
    """After the join: the group of each row (its shard; ``-1 - (stage << 40 | part)`` for failure and LINES rows),
    texts of clips not in the metadata dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind, shard = table["kind"], pc.cast(table["shard"], pa.int64())
    problem = pc.fill_null(pc.less(kind, TEXT), False)
    keep = pc.or_(problem, pc.is_valid(shard))
    range_key = pc.subtract(
        pa.scalar(-1, pa.int64()), pc.add(pc.shift_left(pc.cast(table["stage"], pa.int64()), 40), table["part"])
    )
    group = pc.if_else(problem, range_key, shard)
    routed = table.append_column("group", group).filter(keep)
    return routed.select(list(ROUTED_COLUMNS)).cast(_schema(*ROUTED_COLUMNS))


def write_group(table, *, root: str, spec: JoinSpec):
    """One group: a shard's texts (write its file; return its duplicates and per-stage counts), or a source range's
    failure and LINES rows (returned as they are)."""
    import pyarrow as pa

    group = table["group"][0].as_py()
    if group < 0:
        return table.select(list(PROBLEM_COLUMNS))
    texts = table.filter(pa.compute.equal(table["kind"], TEXT)).to_pylist()
    chosen, duplicates = _first_texts(texts)
    entries: dict[int, dict] = {}
    for (position, stage), row in sorted(chosen.items()):
        source = spec.source(stage)
        entry = {"text": row["text"], "truncated": row["truncated"], "origin": source.uri}
        entries.setdefault(position, {"position": position})[source.stage] = entry
    storage.write_bytes(DatasetLayout(root).texts(group), shard_lines(entries.values()))
    rows = _Rows()
    for row in duplicates:
        rows.add(**_duplicate(spec.source(row["stage"]), row))
    for source in spec.sources:
        count = sum(1 for position, stage in chosen if stage == source.index)
        rows.add(kind=SHARD, stage=source.index, part=group, order=-1, seq=0, line=0, count=count)
    return rows.table().select(list(PROBLEM_COLUMNS))


def _first_texts(texts: list[dict]) -> tuple[dict[tuple[int, int], dict], list[dict]]:
    """Per (position, stage) the text row first in file order, and the later ones (each source line once)."""
    chosen: dict[tuple[int, int], dict] = {}
    later: dict[tuple[int, int], dict] = {}
    for row in sorted(texts, key=lambda r: (r["position"], r["stage"], r["order"])):
        key = (row["position"], row["stage"])
        if key not in chosen:
            chosen[key] = row
        elif row["order"] != chosen[key]["order"]:
            later[(row["stage"], row["order"])] = row
    return chosen, [later[k] for k in sorted(later)]


def _duplicate(source: TextSource, row: dict) -> dict:
    if source.kind == "list":
        detail = f"{source.uri} entry {row['order']}: second text for clip {row['clip_id']!r} ignored"
    else:
        detail = f"second {source.field} for clip {row['clip_id']!r} ignored"
    return {
        "kind": FAILURE,
        "stage": row["stage"],
        "part": row["part"],
        "order": row["order"],
        "seq": _DUPLICATE,
        "line": row["line"],
        "clip_id": row["clip_id"],
        "error": "duplicate_text",
        "detail": detail,
        "dropped": False,
    }


def shard_lines(entries: Iterable[dict]) -> bytes:
    """A shard's text file: one JSON line per clip position that has a text, in position order::

        {"captions": {"origin": URI, "text": "...", "truncated": false}, "position": 12, "subtitles": {...}}

    A stage without a text for that clip is left out; keys sorted, so the bytes depend on the content only."""
    lines = (json.dumps(e, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
    return "".join(lines).encode("utf-8")


def shard_texts(out: DatasetLayout, index: int) -> dict[int, tuple[TextEntry | None, TextEntry | None]]:
    """Clip position -> (subtitle, caption) of shard ``index``, read back from its text file."""
    uri = out.texts(index)
    try:
        data = storage.read_bytes(uri)
    except storage.StorageNotFound as exc:
        raise ValueError(f"{uri}: no text file for shard {index} (has the text join run? {exc})") from exc
    found = {}
    for line in data.decode("utf-8").splitlines():
        record = json.loads(line)
        found[record["position"]] = tuple(TextEntry(**record[stage]) if stage in record else None for stage in STAGES)
    return found


def join_locally(clip_rows: Iterable[dict], spec: JoinSpec, root: str, range_bytes: int = RANGE_BYTES):
    """The pipeline of preprocess/job.py ``_text_join_dataset`` in this process, for small inputs: the same parse,
    full outer join on clip id, route, per-group write, and the failure rows sorted by ``SORT_KEYS`` (returned as
    one Arrow table). Its files and failures are byte-identical to the distributed join's
    (tests/preprocess/test_text_join.py)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    items = pa.Table.from_pylist(spec.read_items(range_bytes))
    parsed = pa.concat_tables([parse_items(items.slice(k, 1), spec=spec) for k in range(items.num_rows)])
    joined = parsed.join(clip_table(clip_rows), keys="clip_id", join_type="full outer")
    routed = route(joined).sort_by("group")
    groups = routed["group"].to_numpy()
    starts = [0, *(k for k in range(1, len(groups)) if groups[k] != groups[k - 1])]
    ends = [*starts[1:], len(groups)]
    written = [write_group(routed.slice(a, b - a), root=root, spec=spec) for a, b in zip(starts, ends) if b > a]
    problems = pa.concat_tables(written) if written else _schema(*PROBLEM_COLUMNS).empty_table()
    order = pc.sort_indices(problems, sort_keys=[(key, "ascending") for key in SORT_KEYS])
    return problems.take(order)


# --------------------------------------------------------------------------- failures and marker


class FailureStream:
    """Turns the sorted failure rows into Failures (lines numbered, repeats dropped) and sums the SHARD rows."""

    def __init__(self, spec: JoinSpec):
        self.spec = spec
        self.result = TextJoinResult(texts={s.stage: 0 for s in spec.sources})
        self._seen_lines: dict[int, int] = {}
        self._base = 0
        self._last = None

    def failures(self, batches: Iterable) -> Iterator[Failure]:
        first_stage = self.spec.sources[0].index
        for batch in batches:
            for row in batch.to_pylist():
                if row["kind"] == SHARD:
                    self.result.texts[self.spec.source(row["stage"]).stage] += row["count"]
                    self.result.shards += row["stage"] == first_stage
                elif row["kind"] == LINES:
                    self._base = self._seen_lines.get(row["stage"], 0)
                    self._seen_lines[row["stage"]] = self._base + row["count"]
                elif row["error"] == UNREADABLE:
                    raise ValueError(row["detail"])
                else:
                    failure = self._failure(row)
                    if failure is not None:
                        self.result.failures += 1
                        yield failure

    def _failure(self, row: dict) -> Failure | None:
        key = (row["stage"], row["order"], row["seq"], row["error"])
        if key == self._last:
            return None  # one source line joined to a clip id that the metadata holds twice
        self._last = key
        source = self.spec.source(row["stage"])
        line = self._base + row["line"] if row["line"] else 0
        message = f"{source.uri} line {line}: {row['detail']}" if line else row["detail"]
        return Failure(
            line=line,
            clip_id=row["clip_id"] if row["error"] == "duplicate_text" else "",
            stage=source.stage,
            error=row["error"],
            message=message,
            dropped=row["dropped"],
        )


def write_failures(uri: str, failures: Iterable[Failure], rows_per_group: int = 65536) -> None:
    """Stream failures into a failures table (shard and position -1: input-level rows), atomically."""
    import pyarrow.parquet as pq

    from preprocess.failures import failures_table

    with (
        storage.open_write(uri) as stream,
        contextlib.closing(pq.ParquetWriter(stream, table_schema(), compression="zstd")) as writer,
    ):
        chunk: list[Failure] = []
        for failure in failures:
            chunk.append(failure)
            if len(chunk) == rows_per_group:
                writer.write_table(failures_table((-1, -1, f) for f in chunk))
                chunk = []
        writer.write_table(failures_table((-1, -1, f) for f in chunk))


def read_marker(out: DatasetLayout) -> dict | None:
    try:
        return json.loads(storage.read_bytes(out.texts_marker))
    except storage.StorageNotFound:
        return None


def write_marker(out: DatasetLayout, spec: JoinSpec, result: TextJoinResult) -> None:
    """Written last: the join's files are complete for these sources and this cut."""
    record = {**spec.marker(), "result": dataclasses.asdict(result)}
    storage.write_bytes(out.texts_marker, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def finished_join(out: DatasetLayout, spec: JoinSpec) -> TextJoinResult | None:
    """What a finished join with the same sources and cut recorded in its marker (``skipped`` set); None when
    there is no such marker."""
    found = read_marker(out)
    if found is None or {k: found.get(k) for k in spec.marker()} != spec.marker():
        return None
    return dataclasses.replace(TextJoinResult(**found["result"]), skipped=True)
