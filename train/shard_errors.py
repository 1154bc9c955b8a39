"""Shard errors in the training stream: which exceptions they are, the line that reports each, and the run's limit.

* **What counts.** Anything that keeps one shard from being read whole: it is missing (a deleted object, a
  directory where the tar should be), refused (an S3 403, a local permission), unreachable (S3 still failing
  after the storage's retries and resumes, pipeline/storage.py), or damaged (cut, altered, not a tar; a sample
  that does not match the shard's index). These arrive as `OSError` (``ShardError`` and ``StorageError`` are
  OSErrors), ``tarfile.TarError`` or ``EOFError``, and while the tar is parsed also as ``ValueError``
  (webdataset's duplicate member, a member name that does not decode): :data:`SHARD_ERRORS`,
  :data:`PARSE_ERRORS`. train/wds_shards.py turns each into one :class:`ShardError` reading
  ``<shard URI>: <cause>``; the stream logs it once, counts it in its position and goes on with its other shards
  (train/shard_stream.py). Anything else (a TypeError, a KeyError, an AttributeError) is a bug and stops the run.
* **The limit.** ``data.max_shard_errors`` is a count (``"10"``) or a percentage of the shards in one epoch
  (``"5%"``, the default; rounded up to whole shards) allowed per epoch begun: a shard that stays bad is met
  once per epoch. The loop
  compares the errors of all ranks with it at every logged step (train/loop.py); past it every rank raises
  :class:`TooManyShardErrors` at the same step, its message naming the count, the limit and the last errors.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Callable

from pipeline.shard_check import ShardError
from pipeline.storage import StorageError

SHARD_ERRORS: tuple[type[BaseException], ...] = (OSError, tarfile.TarError, EOFError)
"""What opening or reading a shard raises when the shard (or its storage), not our code, is at fault."""
PARSE_ERRORS = SHARD_ERRORS + (ValueError,)
"""While a tar is parsed: also webdataset's duplicate-member ValueError and a name that does not decode."""
RECENT = 5
"""How many of the last shard errors the limit's message names."""


def as_shard_error(uri: str, exc: BaseException) -> ShardError:
    """One ShardError line ``<uri>: <cause>`` for an error reading shard ``uri`` (a ShardError stays as it is)."""
    if isinstance(exc, ShardError):
        return exc
    cause = " ".join(str(exc).split())
    if not isinstance(exc, StorageError):  # the storage's own messages name the object and the reason
        cause = f"{type(exc).__name__}: {cause}" if cause else type(exc).__name__
    return ShardError(cause if cause.startswith(f"{uri}: ") else f"{uri}: {cause}")


def parse_limit(text: str) -> tuple[int | None, float | None]:
    """``data.max_shard_errors`` as (count, percent), one of them None; ValueError if it is neither."""
    text = str(text).strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if 0 <= percent <= 100:
                return None, percent
        elif int(text) >= 0:
            return int(text), None
    except ValueError:
        pass
    raise ValueError(f"data.max_shard_errors: a count (10) or a percentage of an epoch's shards (5%), got {text!r}")


def per_epoch(limit: str, shards_per_epoch: int) -> int:
    """Shard errors allowed per epoch begun; a percentage rounds up to whole shards (5% of 6 shards: 1)."""
    count, percent = parse_limit(limit)
    return count if count is not None else math.ceil(round(percent * shards_per_epoch / 100, 9))


def epochs_begun(shards_per_epoch: int, shards_begun: int) -> int:
    """Epochs of the shard plan begun once the streams of all ranks have begun ``shards_begun`` shards."""
    return max(1, math.ceil(shards_begun / shards_per_epoch))


class TooManyShardErrors(RuntimeError):
    """More shard errors than ``data.max_shard_errors`` allows."""


def limit_message(errors: int, limit: str, shards_per_epoch: int, epochs: int, recent: list[str]) -> str:
    """One line: the count, the limit and what it came to, and the last errors (shard URI: cause)."""
    return (
        f"{errors} shard errors over all ranks, more than data.max_shard_errors={limit} allows "
        f"({per_epoch(limit, shards_per_epoch) * epochs}: {limit} of {shards_per_epoch} shards per epoch, "
        f"{epochs} epoch(s) begun); the last: " + " | ".join(recent[-RECENT:])
    )


def check_limit(
    errors: int,
    limit: str,
    shards_per_epoch: int,
    shards_begun: Callable[[], int],
    recent: Callable[[], list[list[str]]],
) -> None:
    """Raise TooManyShardErrors when ``errors`` (of all ranks) pass the limit. Called on every rank with the same
    ``errors``: ``shards_begun`` (one past the newest global position begun, over all ranks) and ``recent`` (each
    rank's last errors) are collectives that every rank then makes alike, and only past one epoch's allowance."""
    if errors <= per_epoch(limit, shards_per_epoch):
        return
    epochs = epochs_begun(shards_per_epoch, shards_begun())
    if errors <= per_epoch(limit, shards_per_epoch) * epochs:
        return
    per_rank = recent()
    share = math.ceil(RECENT / max(len(per_rank), 1))
    lines = [line for lines in per_rank for line in lines[-share:]]
    raise TooManyShardErrors(limit_message(errors, limit, shards_per_epoch, epochs, lines))
