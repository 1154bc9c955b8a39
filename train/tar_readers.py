"""Which tar parser reads training and held-out shards (``data.tar_reader``).

* ``ours`` (the default): :func:`pipeline.shards.iter_shard`, a streaming parser of the POSIX tar subset shards
  use (ustar headers, PAX and GNU long names, regular files) with webdataset's grouping rule. It is 6x faster than
  webdataset's at reading alone and 1.25x in the full loader (bench/loader.py --webdataset; docs/design.md,
  "The tar reader").
* ``webdataset``: webdataset's ``tar_file_expander`` and ``group_by_keys`` over the same checked byte stream
  (train/wds_shards.py), for a tar written by another tool that ours refuses.

Both give the same sample dicts in the same order and the same checks (tests/train/test_wds_shards.py); every error
of a shard or its storage arrives as one ShardError ``<uri>: <cause>`` (train/shard_errors.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.manifest import ShardEntry
from pipeline.shards import iter_shard
from train.shard_errors import SHARD_ERRORS, as_shard_error
from train.wds_shards import iter_wds_shard


def iter_our_shard(uri: str, entry: ShardEntry | None = None) -> Iterator[dict]:
    """pipeline.shards.iter_shard, its storage errors too as one ShardError naming the shard."""
    try:
        yield from iter_shard(uri, entry)
    except SHARD_ERRORS as exc:
        raise as_shard_error(uri, exc) from exc


READERS: dict[str, Callable[[str, ShardEntry | None], Iterator[dict]]] = {
    "ours": iter_our_shard,
    "webdataset": iter_wds_shard,
}
