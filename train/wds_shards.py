"""The training read path: shards parsed by webdataset's own code (train/shard_stream.py, train/eval_data.py).

Our own tar reader (:func:`pipeline.shards.iter_shard`) made the full loader only 1.17-1.18x faster
(bench/loader.py --webdataset; docs/design.md), under the 1.2x that would justify hand-written code, so
training reads through webdataset. :func:`iter_wds_shard` keeps iter_shard's contract, so the two are
interchangeable (tests/train/test_wds_shards.py checks it):
* the same sample dicts: ``__key__``, ``__url__`` (the shard's URI), then each member's lower-cased
  field -> bytes, in tar order;
* the same checks: the bytes come from :func:`pipeline.shards.open_shard`, which checks the size and
  the XXH3-64 (or SHA-256) against the manifest entry at EOF. A missing, truncated, altered or
  unreadable shard raises :class:`pipeline.shards.ShardError` naming the shard.

The parsing is webdataset 1.0.2's, as ``webdataset.WebDataset`` does it once a URL is open:
``tar_file_expander`` (``tarfile`` in stream mode) lists the members, and ``group_by_keys`` groups
them into samples. The module lives in train/ because ``import webdataset`` imports torch, which
pipeline/ must not import.

On a shard that fails its check, this reader raises the same ShardError as iter_shard. It may
yield fewer samples first, never others:
* ``tarfile`` reads ahead in 10 KiB records, so the check at EOF can fire a few members earlier.
* ``tarfile`` stops quietly at a garbled header, and ``group_by_keys`` then hands on the sample it
  was building. So the last sample goes out only once the check has passed. A garbled header
  therefore shows up as a hash mismatch here.
With no manifest entry there is no check: a shard cut at a header ends quietly here, where
iter_shard raises.
"""

from __future__ import annotations

from collections.abc import Iterator

from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.manifest import ShardEntry
from pipeline.shards import ShardError, open_shard


class _WatchedStream:
    """The shard stream as ``tarfile`` reads it.

    webdataset appends to the message of an exception that passes through its loops. This wrapper
    keeps a copy of the check's ShardError as it was raised. In webdataset's messages, ``str()``
    names the shard.
    """

    def __init__(self, stream, uri: str):
        self._read, self.uri, self.error = stream.read, uri, None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._read(size)
        except ShardError as exc:
            self.error = ShardError(*exc.args)
            raise

    def __str__(self) -> str:
        return self.uri


def iter_wds_shard(uri: str, entry: ShardEntry | None = None) -> Iterator[dict]:
    """Yield webdataset sample dicts of one shard, as :func:`pipeline.shards.iter_shard` does."""
    with open_shard(uri, entry) as stream:
        watched = _WatchedStream(stream, uri)
        files = tar_file_expander([{"url": uri, "stream": watched}], handler=reraise_exception)
        held = None  # group_by_keys emits a sample once the next one begins, or at the end of the tar
        try:
            for sample in group_by_keys(files, handler=reraise_exception):
                if held is not None:
                    yield held
                held = sample
        except Exception as exc:  # tarfile's, webdataset's duplicate-field ValueError, or the check's
            if held is not None:
                yield held  # complete: a later member began the next sample
            raise watched.error or _unreadable(uri, exc) from exc
        stream.read()  # the rest after the tar's end: the size and hash are checked at EOF
        if held is not None:
            yield held


def _unreadable(uri: str, exc: Exception) -> ShardError:
    detail = exc.args[0] if exc.args else type(exc).__name__
    return ShardError(f"{uri}: unreadable tar: {detail}")
