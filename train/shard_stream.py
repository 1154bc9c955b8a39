"""Which raw samples each stream of the training loader reads, in which order: sources (train/shard_sources.py)
-> shard sequences -> shuffled windows of raw tar samples.

* **Streams.** Each (rank, DataLoader worker) pair is one *stream* ``s`` of ``S = world * workers``.
  The shard sequence of a stream is infinite and a pure function of the seed: epoch ``e`` of the
  global order is a seeded permutation of all shards (or, with source weights, a seeded weighted
  draw); stream ``s`` takes every S-th entry of the concatenated epochs. A stream therefore never
  runs dry, also with fewer shards than streams or uneven shard sizes, and the training loop simply
  stops after the same number of steps on every rank: no rank can hang waiting for another.
* **Windows.** A stream reads ``shards_per_window`` shards at a time, interleaved at random in
  proportion to their remaining samples, through a raw-sample shuffle buffer that is drained at the
  end of the window. The order inside window ``k`` depends only on ``(seed, s, k)``. Shards whose
  sample count is unknown (a shard list without manifest or sizes.json) are interleaved evenly.
* **Randomness.** Window order and per-sample draws use `random.Random` seeded with a string
  (hashed with SHA-512 by the standard library, the same on every platform): 7 us a seed, where
  numpy's SeedSequence takes 50 us and a weighted ``Generator.choice`` 16 us, per sample.
* **Bad shards.** A shard that is missing, refused, unreachable or damaged (train/shard_errors.py) ends that
  shard only; it is counted and logged in one line naming it and the cause, and the stream goes on.
  `ErrorCounter` counts bad samples too (train/loader.py skips them).

Where a stream stands and how it resumes: train/loader.py.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from train.shard_errors import RECENT, SHARD_ERRORS
from train.shard_sources import ShardRef, Source
from train.tar_readers import iter_our_shard

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shard plan


@dataclass(frozen=True)
class Piece:
    """One item of a stream's shard sequence: the shard at a global position of the plan, whole or only some
    of its samples (a carry item after a resume at another stream count, train/stream_remap.py)."""

    position: int
    ref: ShardRef
    keep: tuple[int, ...] | None = None
    """Indices (ascending) of the shard's samples to read; None: all of them."""

    @property
    def samples(self) -> int | None:
        return len(self.keep) if self.keep is not None else self.ref.samples

    def indices(self) -> tuple[int, ...]:
        """The sample indices this piece reads (needs a known count when whole)."""
        if self.keep is not None:
            return self.keep
        if self.ref.samples is None:
            raise ValueError(f"{self.ref.uri}: no sample count (no manifest entry or sizes.json)")
        return tuple(range(self.ref.samples))

    def part(self, start: int, stop: int) -> Piece:
        """The piece's samples ``start:stop`` (in its own order) as a piece."""
        if start == 0 and stop == self.samples and self.keep is None:
            return self
        return Piece(self.position, self.ref, self.indices()[start:stop])


@dataclass(frozen=True)
class Carry:
    """Samples that streams read before the standard sequence: what a resume at another number of streams
    left of the interrupted epoch (train/stream_remap.py). ``base``: the global position where the standard
    sequence starts (an epoch boundary); ``items``: (position, sample indices or None for the whole shard),
    positions ascending, all below ``base``."""

    base: int = 0
    items: tuple[tuple[int, tuple[int, ...] | None], ...] = ()

    def state_dict(self) -> dict:
        return {"base": self.base, "items": [[pos, None if keep is None else list(keep)] for pos, keep in self.items]}

    @classmethod
    def from_state(cls, state: dict | None) -> Carry:
        if not state:
            return cls()
        items = tuple((int(pos), None if keep is None else tuple(keep)) for pos, keep in state["items"])
        return cls(base=int(state["base"]), items=items)


class ShardPlan:
    """The infinite, seeded shard sequence of every stream: its share of the carry, then every S-th global
    position from ``carry.base`` on."""

    def __init__(
        self,
        sources: list[Source],
        weights: list[float] | None,
        seed: int,
        num_streams: int,
        carry: Carry | None = None,
    ):
        self.shards = [ref for source in sources for ref in source.shards]
        self._source_of = [i for i, source in enumerate(sources) for _ in source.shards]
        self._offsets = np.cumsum([0] + [len(s.shards) for s in sources])
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
        self.seed, self.num_streams = seed, num_streams
        self.carry = carry or Carry()
        self._carried = split_carry([self.piece(pos, keep) for pos, keep in self.carry.items], num_streams)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one plan per loader, kept for its whole life)
    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 17])
        if self.weights is None:
            return rng.permutation(len(self.shards))
        picks = rng.choice(len(self.weights), size=len(self.shards), p=self.weights)
        sizes = np.diff(self._offsets)
        return self._offsets[picks] + rng.integers(0, sizes[picks])

    @property
    def epoch_positions(self) -> int:
        """Global positions per epoch (one per shard; a weighted epoch draws as many)."""
        return len(self.shards)

    def piece(self, position: int, keep: tuple[int, ...] | None = None) -> Piece:
        epoch, slot = divmod(position, len(self.shards))
        return Piece(position, self.shards[int(self.epoch_order(epoch)[slot])], keep)

    def window(self, stream: int, window: int, size: int) -> list[Piece]:
        """The pieces of a stream's window: its share of the carry in windows of its own (the last one may be
        short, so that no window mixes the carry with the next epoch), then the standard sequence."""
        carried = self._carried[stream] if stream < len(self._carried) else []
        carry_windows = -(-len(carried) // size)
        if window < carry_windows:
            return carried[window * size : (window + 1) * size]
        first = (window - carry_windows) * size
        return [self.piece(self.carry.base + stream + (first + j) * self.num_streams) for j in range(size)]


def split_carry(pieces: list[Piece], num_streams: int) -> list[list[Piece]]:
    """The pieces cut into ``num_streams`` consecutive runs of equal sample counts (+-1), in order."""
    counts = [piece.samples for piece in pieces]
    if None in counts:
        raise ValueError(f"{pieces[counts.index(None)].ref.uri}: a carried shard needs its sample count")
    total = sum(counts)
    bounds = [stream * total // num_streams for stream in range(num_streams + 1)]
    runs: list[list[Piece]] = [[] for _ in range(num_streams)]
    start = 0  # global sample index of the piece's first sample
    stream = 0
    for piece, count in zip(pieces, counts):
        done = 0
        while done < count:
            while bounds[stream + 1] <= start + done:
                stream += 1
            take = min(count, bounds[stream + 1] - start) - done
            runs[stream].append(piece.part(done, done + take))
            done += take
        start += count
    return runs


# ----------------------------------------------------------------------------- raw window stream


class ErrorCounter:
    """Counts skipped shards and samples; logs each one (never silent) and keeps the last shard errors for
    the limit's message (train/shard_errors.py). Also counts the samples ``data.filter`` left out (not errors: the
    metrics report them, train/loader.py)."""

    def __init__(self, shard_errors: int = 0, sample_errors: int = 0, filtered: int = 0):
        self.shard_errors, self.sample_errors, self.filtered = shard_errors, sample_errors, filtered
        self.recent: list[str] = []
        self.replaying = False
        """While a resumed stream re-reads its window up to its position (train/loader.py): the shard errors met
        then were logged before, and are in the position's count (`replayed`)."""

    def shard(self, exc: Exception) -> None:
        self.shard_errors += 1
        if self.replaying:
            return
        self.recent = [*self.recent[1 - RECENT :], str(exc)]
        logger.warning("skipping the rest of a shard: %s", exc)

    def sample(self, key: str, exc: Exception) -> None:
        self.sample_errors += 1
        logger.warning("skipping sample %s: %s", key, exc)

    def replayed(self, shard_errors: int) -> None:
        """A resumed stream is back at its position: its count is the position's again."""
        self.replaying, self.shard_errors = False, shard_errors

    def take_recent(self) -> list[str]:
        """The shard errors since the last call (at most the last RECENT)."""
        recent, self.recent = self.recent, []
        return recent


def _safe_next(iterator: Iterator[dict], errors: ErrorCounter) -> dict | None:
    """The shard's next sample; None at its end or at a shard error (train/shard_errors.py: counted, logged, and
    the shard left). Other exceptions are bugs and go on up."""
    try:
        return next(iterator)
    except StopIteration:
        return None
    except SHARD_ERRORS as exc:
        errors.shard(exc)
        return None


def seeded(*parts: int) -> random.Random:
    """A generator that is a pure function of ``parts`` (see Randomness in the module docstring)."""
    return random.Random(":".join(map(str, parts)))


def read_piece(piece: Piece, reader: Callable[..., Iterator[dict]] = iter_our_shard) -> Iterator[dict]:
    """Raw samples of a piece through ``reader`` (train/tar_readers.py): the whole shard, or only its kept samples
    (it stops after the last one)."""
    samples = reader(piece.ref.uri, piece.ref.entry)
    if piece.keep is None:
        yield from samples
        return
    wanted = iter(piece.keep)
    next_index = next(wanted, None)
    for index, sample in enumerate(samples):
        if next_index is None:
            break
        if index == next_index:
            yield sample
            next_index = next(wanted, None)
    samples.close()


def window_samples(
    pieces: list[Piece],
    rng: random.Random,
    buffer_size: int,
    errors: ErrorCounter,
    read: Callable[[Piece], Iterator] = read_piece,
    ended: list | None = None,
) -> Iterator:
    """Raw webdataset samples of a window: random interleave of its pieces, then a shuffle buffer.

    ``read`` opens a piece (train/stream_remap.py passes one that yields sample indices, to replay a window
    without reading it); a piece that ends on a shard error is appended to ``ended`` as
    ``[position, samples read from it]``.
    """
    readers = [read(piece) for piece in pieces]
    remaining = [piece.samples or 1 for piece in pieces]  # unknown counts interleave evenly
    taken = [0] * len(pieces)
    positions = [piece.position for piece in pieces]
    buffer: list = []
    while readers:
        j = rng.choices(range(len(readers)), weights=remaining)[0]
        before = errors.shard_errors
        sample = _safe_next(readers[j], errors)
        if sample is None:
            if ended is not None and errors.shard_errors > before:
                ended.append([positions[j], taken[j]])
            del readers[j], remaining[j], taken[j], positions[j]
            continue
        remaining[j] = max(remaining[j] - 1, 1)
        taken[j] += 1
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list, rng: random.Random):
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()
