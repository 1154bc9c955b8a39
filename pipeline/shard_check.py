"""Checking a shard against its manifest entry while it streams, so that no sample of a bad shard is handed on.

:func:`open_shard` returns a :class:`ShardStream`: the shard's bytes, and ``admit(i, key)``, which a reader
calls before it hands on its ``i``-th sample. Three cases, by what the manifest entry offers:

* **Sample index** (``entry.index_xxh3_64``, pipeline/sample_index.py). The index is fetched and checked
  against the entry first. As the tar streams, each sample's byte range is hashed; ``admit`` passes only a
  sample whose key is the index's ``i``-th and whose range has been read and matches its digest. A
  flipped byte in sample ``k`` stops the shard at ``k``: samples ``0..k-1`` went on, each byte for byte
  the one the manifest's shard holds. The last sample goes on only after the whole shard's size and
  XXH3-64 (which also cover the end-of-archive blocks) have passed.
* **No index** (manifests written before it existed, or an index file that is missing or does not match
  its entry): verify, then stream. The shard is read whole into a spool (memory up to
  :data:`SPOOL_MEMORY`, then an unlinked local temp file) while its size and hash are checked, and
  only a shard that passes is parsed. Safe, but the first sample waits for the whole shard.
* **No entry** (a shard list without manifest): nothing to check against; every sample is admitted.

Readers must parse the tar far enough to know a sample is complete (its next header, or the end of
the archive) before they admit it: both readers do (pipeline/shards.py, train/wds_shards.py). Cost:
bench/loader.py --integrity.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile

import xxhash

from pipeline import storage
from pipeline.layout import index_name
from pipeline.manifest import ShardEntry
from pipeline.sample_index import RangeHasher, SampleIndex, SampleIndexError

log = logging.getLogger(__name__)

SPOOL_MEMORY = 64 << 20
"""A shard checked whole before it streams is held in memory up to this size, then in a local temp file."""


class ShardError(IOError):
    """A shard is missing, truncated or does not match its manifest entry."""


class _CheckedBytes(io.RawIOBase):
    """Counts and hashes bytes as they stream past, whole and per sample; checks the whole at EOF.

    The whole-shard hash is the entry's XXH3-64 when it has one (~11 us per 300 KB clip here, against
    ~220 us for SHA-256: a twentieth of the JPEG decoding), else its SHA-256.
    """

    def __init__(self, raw, uri: str, entry: ShardEntry | None, index: SampleIndex | None = None):
        self._raw, self.uri, self._entry, self._count = raw, uri, entry, 0
        fast = entry is not None and bool(entry.xxh3_64)
        self._field, self._hash = ("xxh3_64", xxhash.xxh3_64()) if fast else ("sha256", hashlib.sha256())
        self.index = index
        self.ranges = RangeHasher(index.offsets) if index is not None else None
        self.failed: ShardError | None = None
        """The whole-shard check's error, met at the end of a read and raised at the next one."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.failed is not None:
            raise self.failed
        n = self._raw.readinto(buffer)
        if n:
            chunk = memoryview(buffer)[:n]
            self._hash.update(chunk)
            if self.ranges is not None:
                self.ranges.update(chunk)
            self._count += n
        elif self._entry is not None:
            try:
                self._check()
            except ShardError as exc:
                if self.index is None:
                    raise
                # Raised at the next read: the bytes the reader asked for along with the end go on to it first,
                # so each sample they hold is admitted or refused by its own digest (ShardStream.admit), and the
                # last one waits for this check (`ShardStream.finish`).
                self.failed = exc
        return n

    def _check(self) -> None:
        entry = self._entry
        self._entry = None
        if self._count != entry.bytes:
            raise ShardError(
                f"{self.uri}: truncated or altered shard: {self._count} bytes, manifest says {entry.bytes}"
            )
        if self._hash.hexdigest() != getattr(entry, self._field):
            raise ShardError(f"{self.uri}: {self._field} mismatch with the manifest (corrupt shard)")

    def read_through(self, i: int) -> bool:
        """Whether sample ``i``'s bytes (or all the bytes the index lists, for ``i`` past its end) were read."""
        return len(self.ranges.digests) > min(i, len(self.index.keys)) + 1

    def admit(self, i: int, key: str) -> None:
        index = self.index
        if i >= len(index.keys):
            raise ShardError(f"{self.uri}: more samples than the {len(index.keys)} its index lists (altered shard)")
        if key != index.keys[i]:
            raise ShardError(f"{self.uri}: sample {i} is {key!r} where its index lists {index.keys[i]!r}")
        if self.ranges.digests[i + 1] != index.xxh3_64[i]:
            raise ShardError(f"{self.uri}: sample {key!r} does not match its digest in the shard's index (corrupt)")

    def close(self) -> None:
        self._raw.close()
        super().close()


class ShardStream(io.BufferedReader):
    """A shard's bytes (buffered) with ``admit(i, key)``: raises ShardError unless sample ``i`` may go on.

    Before the last sample goes on, the rest of the shard (the end-of-archive blocks) is read and the whole
    shard checked: a consumer sees all of a shard's samples only when the shard matches its entry whole.
    """

    def __init__(self, raw: io.RawIOBase):
        super().__init__(raw, buffer_size=storage.READ_CHUNK)
        self._checked = raw if isinstance(raw, _CheckedBytes) and raw.index is not None else None

    @property
    def checks_samples(self) -> bool:
        """Whether each sample is checked against its digest in the shard's index (`admit`)."""
        return self._checked is not None

    def admit(self, i: int, key: str) -> None:
        checked = self._checked
        if checked is None:
            return
        # A reader has read a sample's bytes once it saw the next header, unless the tar parser stopped early
        # at a garbled header (tarfile does, quietly): then read on to the end of the sample's range.
        while not checked.read_through(i) and self.read(storage.READ_CHUNK):
            pass
        checked.admit(i, key)
        if i == len(checked.index.keys) - 1:
            self.finish()

    def finish(self) -> None:
        """Read to the end of the shard, so its size and hash are checked; raises their error also when an earlier
        read met the end and deferred it (`_CheckedBytes.readinto`)."""
        self.read()
        failed = getattr(self.raw, "failed", None)
        if failed is not None:
            raise failed


def open_shard(uri: str, entry: ShardEntry | None = None) -> ShardStream:
    """Open a shard for streaming, checked against ``entry`` as the module docstring says."""
    index = _sample_index(uri, entry) if entry is not None and entry.index_xxh3_64 else None
    raw = _open(uri)
    if entry is None:
        return ShardStream(raw)
    if index is None:
        return ShardStream(_verified_whole(raw, uri, entry))
    return ShardStream(_CheckedBytes(raw, uri, entry, index))


def _open(uri: str):
    try:
        return storage.open_read(uri, buffer_size=0)  # buffered once, by ShardStream
    except storage.StorageNotFound as exc:
        raise ShardError(f"{uri}: shard missing ({exc})") from exc


def _sample_index(uri: str, entry: ShardEntry) -> SampleIndex | None:
    """The shard's index if it is there and matches its entry; else None (with a warning), to check it whole."""
    index_uri = index_name(uri)
    try:
        raw = storage.read_bytes(index_uri)
        if xxhash.xxh3_64_hexdigest(raw) != entry.index_xxh3_64:
            raise SampleIndexError("xxh3_64 mismatch with the manifest")
        index = SampleIndex.parse(raw)
        if len(index.keys) != entry.samples or index.offsets[-1] > entry.bytes:
            raise SampleIndexError(f"{len(index.keys)} samples in {index.offsets[-1]} bytes, the manifest differs")
        return index
    except (storage.StorageNotFound, SampleIndexError) as exc:
        log.warning("%s: sample index unusable (%s); checking the whole shard before reading it", index_uri, exc)
        return None


def _verified_whole(raw, uri: str, entry: ShardEntry) -> io.RawIOBase:
    """The shard's bytes, read whole through the size and hash check first (ShardError if they fail)."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, prefix=storage.TEMP_PREFIX)
    try:
        with _CheckedBytes(raw, uri, entry) as checked:
            shutil.copyfileobj(io.BufferedReader(checked, storage.READ_CHUNK), spool, storage.READ_CHUNK)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return _SpoolReader(spool)


class _SpoolReader(io.RawIOBase):
    def __init__(self, spool):
        self._spool = spool

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._spool.readinto(buffer)

    def close(self) -> None:
        self._spool.close()
        super().close()
