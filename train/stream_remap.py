"""Resume at another number of streams (world size x data.num_workers): what the interrupted epoch has left,
read exactly once by the new streams.

A stream's position ``(window, offset)`` (train/loader.py) says that it has read every sample of its windows
before ``window`` and the first ``offset`` raw samples of window ``window``. Which samples those are follows
from the seeds and the shards' sample counts alone: `read_in_window` replays the window's interleave and
shuffle buffer (train/shard_stream.py `window_samples`, the same code) over sample indices instead of tar
files, also where a shard ended early on an error (the position lists those). `remap` collects, over every old
stream, the samples not read yet at global positions below the end of the newest epoch any stream has entered:
the *carry*. The new streams read the carry first, cut into equal runs of samples in position order
(`split_carry`), then the standard sequence from that epoch boundary on (`ShardPlan`). Within the interrupted
epoch no sample is read twice and none is skipped; tests/train/test_stream_remap.py counts them.

The replay reads no data: its cost is one Python step per sample of each stream's current window (about 1 s
for 512 streams of 4 x 1,000-sample windows). Shards without a sample count cannot be replayed: the resume
then stops with one line saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pipeline.shards import ShardError
from train.shard_stream import Carry, ErrorCounter, Piece, ShardPlan, seeded, window_samples

logger = logging.getLogger(__name__)


class _Quiet(ErrorCounter):
    """Counts the replay's simulated shard ends without logging them."""

    def shard(self, exc: Exception) -> None:
        self.shard_errors += 1


def _indices(ends: dict[int, int]):
    """A `window_samples` reader over sample indices: a piece yields (position, index) pairs; one that ended on
    a shard error in the run ends there again."""

    def read(piece: Piece) -> Iterator[tuple[int, int]]:
        stop = ends.get(piece.position)
        for count, index in enumerate(piece.indices()):
            if stop is not None and count >= stop:
                raise ShardError(f"replayed end of {piece.ref.uri}")
            yield piece.position, index

    return read


def read_in_window(plan: ShardPlan, stream: int, position: dict, size: int, buffer: int, seed: int) -> set:
    """The (global position, sample index) pairs that a stream at ``position`` has read of its current window."""
    window, offset = position["window"], position["offset"]
    pieces = plan.window(stream, window, size)
    ends = {int(pos): int(count) for pos, count in position.get("ended", [])}
    replay = window_samples(pieces, seeded(seed, stream, window, 1), buffer, _Quiet(), read=_indices(ends))
    read = set()
    for _ in range(offset):
        read.add(next(replay))
    return read


def remap(plan: ShardPlan, positions: list[dict], size: int, buffer: int, seed: int) -> Carry:
    """The carry for new streams: every sample the old streams (``plan``, one position each) have not read, at
    global positions below the end of the newest epoch they entered. A piece that ended on a shard error is
    done (its rest was unreadable in this epoch, and counted)."""
    left: dict[int, tuple[Piece, set[int]]] = {}

    def add(piece: Piece, indices) -> None:
        _, kept = left.setdefault(piece.position, (piece, set()))
        kept.update(indices)

    newest = -1
    for stream, position in enumerate(positions):
        read = read_in_window(plan, stream, position, size, buffer, seed)
        ended = {int(pos) for pos, _ in position.get("ended", [])}
        for piece in plan.window(stream, position["window"], size):
            newest = max(newest, piece.position)
            if piece.position not in ended:
                add(piece, (i for i in piece.indices() if (piece.position, i) not in read))
    base = plan.carry.base
    if newest >= base:
        base = (newest // plan.epoch_positions + 1) * plan.epoch_positions
    for stream, position in enumerate(positions):
        for piece in _after(plan, stream, position["window"], size):
            if piece.position >= base:
                break
            add(piece, piece.indices())
    items = tuple(_item(pos, *left[pos]) for pos in sorted(left) if left[pos][1])
    carry = Carry(base=base, items=items)
    logger.info(
        "data: %d streams -> new streams: %d samples of the interrupted epoch left in %d shards (%d partly read); "
        "the standard order goes on from position %d",
        len(positions),
        sum(len(kept) for _, kept in left.values()),
        len(items),
        sum(keep is not None for _, keep in items),
        base,
    )
    return carry


def _after(plan: ShardPlan, stream: int, window: int, size: int) -> Iterator[Piece]:
    """A stream's pieces after its window ``window``, in order (without end: the caller stops)."""
    while True:
        window += 1
        yield from plan.window(stream, window, size)


def _item(position: int, piece: Piece, kept: set[int]) -> tuple[int, tuple[int, ...] | None]:
    keep = tuple(sorted(kept))
    return position, None if piece.ref.samples == len(keep) else keep
