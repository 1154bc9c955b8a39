"""The webdataset tar reader (``data.tar_reader=webdataset``; train/tar_readers.py): shards parsed by webdataset's
own code. Training reads through our reader by default (pipeline/shards.py: 1.25x faster in the full loader,
docs/design.md); this one stays for a tar written by another tool that ours refuses. :func:`iter_wds_shard` keeps
iter_shard's contract, so the two are interchangeable (tests/train/test_wds_shards.py checks it):
* the same sample dicts: ``__key__``, ``__url__`` (the shard's URI), then each member's lower-cased
  field -> bytes, in tar order;
* the same checks: the bytes come from :func:`pipeline.shards.open_shard`, and each sample is admitted by the
  shard's check (pipeline/shard_check.py: its digest in the shard's sample index) before it is yielded; the
  size and XXH3-64 of the whole shard are checked at EOF. A missing, truncated, altered or unreadable shard
  raises :class:`pipeline.shards.ShardError` naming the shard, after the samples before the bad one; so does
  one whose storage fails (refused, unreachable: train/shard_errors.py says which errors these are).

``group_by_keys`` emits a sample once the next one begins (its header was read) or at the end of the tar, so
its bytes are all in when it is admitted. ``tarfile`` stops quietly at a garbled header; the checks then
raise at the next sample or at EOF. With no manifest entry there is no check: a shard cut at a header ends
quietly here, where iter_shard raises.
"""

from __future__ import annotations

from collections.abc import Iterator

from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.manifest import ShardEntry
from pipeline.shards import ShardError, open_shard
from train.shard_errors import PARSE_ERRORS, SHARD_ERRORS, as_shard_error


class _WatchedStream:
    """The shard stream as ``tarfile`` reads it.

    webdataset appends to the message of an exception that passes through its loops. This wrapper keeps the
    read's own error (the check's ShardError, the storage's StorageError) and its message as it was raised. In
    webdataset's messages, ``str()`` names the shard.
    """

    def __init__(self, stream, uri: str):
        self._read, self.uri, self.error, self._args = stream.read, uri, None, ()

    def read(self, size: int = -1) -> bytes:
        try:
            return self._read(size)
        except OSError as exc:
            self.error, self._args = exc, exc.args
            raise

    def raised(self) -> OSError:
        """The read's error, its message restored."""
        self.error.args = self._args
        return self.error

    def __str__(self) -> str:
        return self.uri


def iter_wds_shard(uri: str, entry: ShardEntry | None = None) -> Iterator[dict]:
    """Yield webdataset sample dicts of one shard, as :func:`pipeline.shards.iter_shard` does; every error of the
    shard or its storage (train/shard_errors.py) as one ShardError ``<uri>: <cause>``."""
    try:
        yield from _samples(uri, entry)
    except SHARD_ERRORS as exc:  # opening the shard or its index, or the storage failing under a read
        raise as_shard_error(uri, exc) from exc


def _samples(uri: str, entry: ShardEntry | None) -> Iterator[dict]:
    with open_shard(uri, entry) as stream:
        watched = _WatchedStream(stream, uri)
        files = tar_file_expander([{"url": uri, "stream": watched}], handler=reraise_exception)
        i = 0
        try:
            for sample in group_by_keys(files, handler=reraise_exception):
                stream.admit(i, sample["__key__"])
                i += 1
                yield sample
        except PARSE_ERRORS as exc:  # the checks', the storage's, tarfile's, or webdataset's duplicate-field one
            if watched.error is not None:  # as raised, before webdataset added to its message
                raise watched.raised()  # noqa: B904 (its own cause stays: the storage's error under it)
            if isinstance(exc, OSError):  # admit's ShardError, or the storage failing under admit's read
                raise
            raise _unreadable(uri, exc) from exc
        stream.finish()  # the rest after the tar's end: the size and hash are checked at EOF


def _unreadable(uri: str, exc: Exception) -> ShardError:
    detail = exc.args[0] if exc.args else type(exc).__name__
    return ShardError(f"{uri}: unreadable tar: {detail}")
