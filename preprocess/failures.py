"""Why a clip, or an input line, gave no sample (or lost a text): one :class:`Failure` type, one table.

Every part of the job records what went wrong as a ``Failure``: the inputs (a bad metadata line, a bad
span, an unsafe id), the decoder (a file or clip it cannot read), the shard task (a missing video, a
timeout) and the text stages (a model that failed on a clip). A shard writes its failures as a table,
``failures/shard-<k>.parquet``; the job merges them into ``failures.parquet`` (docs/preprocessing.md,
"The failures table"). The table's columns are ``shard``, ``position`` (the clip's input position; -1 for
an input line that gave no clip) and the fields of ``Failure`` in order.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline import storage


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One row of the failures table (without its shard and position)."""

    line: int = 0
    """1-based line of the metadata or text file, 0 when not from a line."""
    video_id: str = ""
    clip_id: str = ""
    stage: str
    """Where it failed: metadata, subtitles, captions, span, open, probe, fetch, decode, encode, sample, task,
    caption, asr."""
    error: str
    """Short machine-readable class, e.g. ``malformed_json``, ``missing_file``, ``timeout``."""
    message: str
    """Human-readable reason naming the input."""
    dropped: bool = True
    """True when the clip is not in the shards (False for a repaired text, for instance)."""


_ARROW_TYPES = {"int": "int64", "str": "string", "bool": "bool_"}
"""pyarrow type of each ``Failure`` field's annotation."""


def table_schema():
    """The pyarrow schema of the failures table."""
    import pyarrow as pa

    columns = [("shard", pa.int64()), ("position", pa.int64())]
    columns += [(f.name, getattr(pa, _ARROW_TYPES[f.type])()) for f in dataclasses.fields(Failure)]
    return pa.schema(columns)


def failures_table(rows: Iterable[tuple[int, int, Failure]]):
    """The failures table of (shard, position, failure) rows, in the given order."""
    import pyarrow as pa

    schema = table_schema()
    columns: list[list] = [[] for _ in schema.names]
    for shard, position, failure in rows:
        values = (shard, position, *(getattr(failure, f.name) for f in dataclasses.fields(Failure)))
        for column, value in zip(columns, values):
            column.append(value)
    return pa.table(dict(zip(schema.names, columns)), schema=schema)


def write_table(uri: str, table) -> None:
    """Write a failures table as zstd-compressed parquet (atomically, through :mod:`pipeline.storage`)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def merge_tables(uris: list[str], out: str) -> None:
    """Concatenate failures tables into one file, one input table in memory at a time."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table_schema(), compression="zstd") as writer:
        for uri in uris:
            writer.write_table(read_table(uri))
    storage.write_bytes(out, buf.getvalue())


def read_table(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
