"""The search index: one Parquet file of rows (videos, windows of video files, texts), their embeddings and thumbnails.

Columns: ``kind`` (video or text), ``id``, ``video`` (the clip or file a row belongs to), ``text`` (a text row's
line), ``source`` (the file path or the clip's source URL), ``start`` and ``end`` (seconds on the source's
timeline), ``caption`` and ``subtitle`` (the clip's texts, empty when there are none), ``thumbnails`` (a video
row's frame strip: a few small JPEGs spread over its span; empty for text rows) and ``embedding`` (the row's
L2-normalised float32 vector as 4 x E little-endian bytes: a fixed-size binary column reads 4-5x faster than a
fixed-size list of floats, whose repetition levels Parquet decodes value by value; tables written with the list are
read too). The table's metadata records the checkpoint, embedding size and frame count.

Thumbnails live in the Parquet file as bytes, not as JPEG files in a folder beside it: the index stays one file
that can be copied or moved whole, nothing can dangle, and a query reads them for its hits only (the file is
written in row groups of `ROW_GROUP` rows; a query reads the thumbnail column of the groups its hits are in).
Embeddings are read the same way (`StoredEmbeddings`): a query through an approximate index (train/search_ann.py)
reads the groups of its candidates only, an exact one streams every group past the query and keeps none.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

META_KEY = b"vidproxy.search"
KINDS = ("video", "text")
TEXT_COLUMNS = ("kind", "id", "video", "text", "source", "caption", "subtitle")
SPAN_COLUMNS = ("start", "end")
COLUMNS = TEXT_COLUMNS + SPAN_COLUMNS
"""The row columns read for a query (the thumbnails and embeddings are read apart)."""
ROW_GROUP = 1024
"""Rows per Parquet row group: the unit a query reads its hits' thumbnails in."""


@dataclass(frozen=True, kw_only=True)
class ThumbConfig:
    """Thumbnails kept per video row: the frame strip a hit shows."""

    frames: int = 3
    """Frames per strip, spread over the row's span; an odd count puts the clip's middle frame in the middle."""
    height: int = 128
    """Pixel height of each thumbnail, at most the frame's own (the width keeps the frame's aspect)."""
    quality: int = 75
    """JPEG quality of the thumbnails, 1..95."""

    def __post_init__(self) -> None:
        if not 0 <= self.frames <= 16:
            raise ValueError(f"thumbnail frames must be in 0..16, got {self.frames}")
        if not 16 <= self.height <= 512:
            raise ValueError(f"thumbnail height must be in 16..512, got {self.height}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"thumbnail quality must be in 1..95, got {self.quality}")


def strip_picks(count: int, frames: int) -> list[int]:
    """Indices of ``frames`` of ``count`` frames, the centres of equal parts: with an odd number the middle one is
    ``count // 2`` (the schema's middle frame)."""
    k = min(frames, count)
    return [int((i + 0.5) * count / k) for i in range(k)]


def thumbnail_strip(jpegs: Sequence[bytes], cfg: ThumbConfig) -> list[bytes]:
    """Small JPEGs of a few of a clip's frames (JPEG bytes, time order), ``cfg.height`` pixels high."""
    from PIL import Image

    out = []
    for i in strip_picks(len(jpegs), cfg.frames):
        with Image.open(io.BytesIO(jpegs[i])) as image:
            height = min(cfg.height, image.height)  # never enlarged
            width = max(1, round(image.width * height / image.height))
            small = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC, reducing_gap=2.0)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=cfg.quality)
        out.append(buf.getvalue())
    return out


# ----------------------------------------------------------------------------- the table in memory


@dataclass(frozen=True, kw_only=True)
class Index:
    """An index in memory: its rows (``COLUMNS``, a pyarrow table), embeddings and metadata.

    A built index holds its thumbnails (one list per row); a read one leaves them in its file (``path``), read
    per hit by `thumbnails_of`.
    """

    rows: pa.Table
    embeddings: np.ndarray | StoredEmbeddings
    """[rows, E] float32, L2-normalised (of an index read from a file: read when indexed, `StoredEmbeddings`)."""
    meta: dict
    thumbnails: list[list[bytes]] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        kinds = self.rows.column("kind").to_numpy(zero_copy_only=False)
        object.__setattr__(self, "_kinds", kinds)  # one conversion, not one per query

    def __len__(self) -> int:
        return self.rows.num_rows

    def rows_of(self, kind: str) -> np.ndarray:
        return np.flatnonzero(self._kinds == kind)

    def count(self, kind: str) -> int:
        return int(np.count_nonzero(self._kinds == kind))

    def row(self, i: int) -> dict:
        """One row's columns as plain values."""
        return {name: self.rows.column(name)[i].as_py() for name in COLUMNS}

    def video_row(self, video: str) -> int | None:
        """The first video row of a clip or file (where a text row's thumbnails are), or None."""
        mask = pc.and_(pc.equal(self.rows.column("kind"), "video"), pc.equal(self.rows.column("video"), video))
        found = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        return int(found[0]) if len(found) else None


def rows_table(columns: dict[str, list]) -> pa.Table:
    """The rows of an index from column lists (``COLUMNS``: strings, and seconds for start and end)."""
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"index rows lack the columns {missing}")
    arrays = {c: pa.array(columns[c], type=pa.string()) for c in TEXT_COLUMNS}
    arrays |= {c: pa.array(columns[c], type=pa.float64()) for c in SPAN_COLUMNS}
    return pa.table(arrays)


def write_index(index: Index, path: str, ann: dict | None = None) -> None:
    """Write the table; its metadata's ``ann`` (the fingerprints of the approximate indexes beside it,
    train/search_ann.py) is ``ann``, never the one ``index.meta`` was read with, which may describe other rows."""
    rows, dim = len(index), index.embeddings.shape[1]
    vectors = np.ascontiguousarray(index.embeddings, dtype="<f4")
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * dim), rows, [None, pa.py_buffer(vectors)])
    thumbs = index.thumbnails if index.thumbnails is not None else [[] for _ in range(rows)]
    table = index.rows.append_column("thumbnails", pa.array(thumbs, type=pa.list_(pa.binary())))
    table = table.append_column("embedding", column)
    meta = {key: value for key, value in index.meta.items() if key != "ann"} | ({"ann": ann} if ann else {})
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP)


def read_index(path: str) -> Index:
    """The rows and embeddings of an index file (its thumbnails stay in the file)."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"index {path}: not a readable Parquet file ({exc})") from exc
    schema = parquet.schema_arrow
    raw_meta = (schema.metadata or {}).get(META_KEY)
    missing = [c for c in (*COLUMNS, "thumbnails", "embedding") if c not in schema.names]
    if raw_meta is None or missing:
        raise ValueError(
            f"index {path}: not a table written by this version's search `embed` command "
            f"(missing {missing or 'metadata'}); embed again"
        )
    rows = parquet.read(columns=list(COLUMNS))
    return Index(rows=rows, embeddings=StoredEmbeddings(parquet, path), meta=json.loads(raw_meta), path=path)


class StoredEmbeddings:
    """An index file's [rows, E] float32 embeddings, read when they are indexed: all of them (cached) for a slice,
    a mask or ``np.asarray``; for an array of row numbers, only the row groups that hold those rows (not cached);
    `scores` streams a block of rows past a query.

    At 1M rows the whole column is 2 GB and takes seconds to read into memory; an approximate search's candidates are
    a few dozen rows, a few MB of row groups, and an exact search needs each row once.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, parquet: pq.ParquetFile, path: str):
        self._parquet = parquet
        self.shape = (parquet.metadata.num_rows, _embedding_dim(parquet.schema_arrow.field("embedding").type, path))
        self._starts = row_group_starts(parquet)
        self._all: np.ndarray | None = None

    @property
    def whole_read(self) -> bool:
        """Whether every row has been read (and is kept)."""
        return self._all is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.all() if dtype is None else self.all().astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        if self._all is None and isinstance(key, np.ndarray) and key.dtype.kind in "iu" and key.ndim == 1:
            return self.rows(key)
        return self.all()[key]

    def all(self) -> np.ndarray:
        if self._all is None:
            self._all = np.empty(self.shape, dtype=np.float32)
            for group in range(len(self._starts) - 1):
                self._all[self._starts[group] : self._starts[group + 1]] = self._group(group)
        return self._all

    def scores(self, start: int, stop: int, query: np.ndarray) -> np.ndarray:
        """Inner products of rows ``start..stop-1`` with ``query``, read one row group at a time and not kept: an
        exact search over a stored table holds one group of vectors at a time, not all of them."""
        if self._all is not None:
            return self._all[start:stop] @ query
        out = np.empty(stop - start, dtype=np.float32)
        first, last = np.searchsorted(self._starts, [start, stop - 1], side="right") - 1
        for group in range(int(first), int(last) + 1):
            lo, hi = max(start, self._starts[group]), min(stop, self._starts[group + 1])
            vectors = self._group(group)[lo - self._starts[group] : hi - self._starts[group]]
            # einsum, not BLAS: a BLAS call per row group wakes its threads each time, and on a busy machine that
            # costs more than the arithmetic (977 groups of 1024 x 512: 6.2 s by `@`, 0.47 s by einsum, load 8)
            out[lo - start : hi - start] = np.einsum("ij,j->i", vectors, query)
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), E]: the embeddings of ``rows``, reading only their row groups."""
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for group in np.unique(groups):
            picked = np.flatnonzero(groups == group)
            out[picked] = self._group(int(group))[rows[picked] - self._starts[group]]
        return out

    def _group(self, group: int) -> np.ndarray:
        chunks = self._parquet.read_row_group(group, columns=["embedding"]).column("embedding").chunks
        parts = [_vectors(chunk, self.shape[1]) for chunk in chunks]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _embedding_dim(kind: pa.DataType, path: str) -> int:
    """E of the embedding column's type: 4 x E bytes, or (tables written before) a fixed-size list of E floats."""
    if pa.types.is_fixed_size_binary(kind) and kind.byte_width % 4 == 0:
        return kind.byte_width // 4
    if pa.types.is_fixed_size_list(kind) and pa.types.is_float32(kind.value_type):
        return kind.list_size
    raise ValueError(f"index {path}: its embedding column is {kind}, not float32 vectors; embed again")


def row_group_starts(parquet: pq.ParquetFile) -> np.ndarray:
    """The first row of each row group, and the row count last: group g holds rows starts[g]..starts[g+1]-1."""
    return np.cumsum([0, *(parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups))])


def _vectors(chunk: pa.Array, dim: int) -> np.ndarray:
    """[len(chunk), dim] float32 of one chunk of the embedding column (fixed-size binary, or the older list)."""
    if pa.types.is_fixed_size_binary(chunk.type):
        data = np.frombuffer(chunk.buffers()[1], dtype="<f4", count=len(chunk) * dim, offset=chunk.offset * 4 * dim)
        return data.reshape(len(chunk), dim)
    return chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), dim)


def thumbnails_of(index: Index, rows: Sequence[int]) -> dict[int, list[bytes]]:
    """{row: its thumbnail JPEGs} for some rows: from memory, or read from the file's row groups that hold them."""
    if index.thumbnails is not None:
        return {r: index.thumbnails[r] for r in rows}
    if index.path is None:
        return {r: [] for r in rows}
    parquet = pq.ParquetFile(index.path)
    starts = row_group_starts(parquet)
    out: dict[int, list[bytes]] = {}
    for group in sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}):
        column = parquet.read_row_group(group, columns=["thumbnails"]).column("thumbnails")
        for r in rows:
            if starts[group] <= r < starts[group + 1]:
                out[r] = column[r - int(starts[group])].as_py()
    return out
