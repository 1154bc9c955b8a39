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
* **Bad shards.** A missing or corrupt shard (`ShardError`) ends that shard only; it is counted and
  logged, and the stream goes on. `ErrorCounter` counts bad samples too (train/loader.py skips them).

Where a stream stands and how it resumes: train/loader.py.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterator

import numpy as np

from pipeline.shards import ShardError
from train.shard_sources import ShardRef, Source
from train.wds_shards import iter_wds_shard

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shard plan


class ShardPlan:
    """The infinite, seeded shard sequence of every stream."""

    def __init__(self, sources: list[Source], weights: list[float] | None, seed: int, num_streams: int):
        self.shards = [ref for source in sources for ref in source.shards]
        self._source_of = [i for i, source in enumerate(sources) for _ in source.shards]
        self._offsets = np.cumsum([0] + [len(s.shards) for s in sources])
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
        self.seed, self.num_streams = seed, num_streams

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one plan per loader, kept for its whole life)
    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 17])
        if self.weights is None:
            return rng.permutation(len(self.shards))
        picks = rng.choice(len(self.weights), size=len(self.shards), p=self.weights)
        sizes = np.diff(self._offsets)
        return self._offsets[picks] + rng.integers(0, sizes[picks])

    def shard_at(self, stream: int, position: int) -> ShardRef:
        index = stream + position * self.num_streams
        epoch, slot = divmod(index, len(self.shards))
        return self.shards[int(self.epoch_order(epoch)[slot])]

    def window(self, stream: int, window: int, size: int) -> list[ShardRef]:
        return [self.shard_at(stream, window * size + j) for j in range(size)]


# ----------------------------------------------------------------------------- raw window stream


class ErrorCounter:
    """Counts skipped shards and samples; logs each one (never silent). Also counts the samples ``data.filter``
    left out (not errors: the metrics report them, train/loader.py)."""

    def __init__(self, shard_errors: int = 0, sample_errors: int = 0, filtered: int = 0):
        self.shard_errors, self.sample_errors, self.filtered = shard_errors, sample_errors, filtered

    def shard(self, exc: Exception) -> None:
        self.shard_errors += 1
        logger.warning("skipping the rest of a shard: %s", exc)

    def sample(self, key: str, exc: Exception) -> None:
        self.sample_errors += 1
        logger.warning("skipping sample %s: %s", key, exc)


def _safe_next(iterator: Iterator[dict], errors: ErrorCounter) -> dict | None:
    try:
        return next(iterator)
    except StopIteration:
        return None
    except ShardError as exc:
        errors.shard(exc)
        return None


def seeded(*parts: int) -> random.Random:
    """A generator that is a pure function of ``parts`` (see Randomness in the module docstring)."""
    return random.Random(":".join(map(str, parts)))


def window_samples(
    shards: list[ShardRef], rng: random.Random, buffer_size: int, errors: ErrorCounter
) -> Iterator[dict]:
    """Raw webdataset samples of a window: random interleave of its shards, then a shuffle buffer."""
    readers = [iter_wds_shard(ref.uri, ref.entry) for ref in shards]
    remaining = [ref.samples or 1 for ref in shards]  # unknown counts interleave evenly
    buffer: list[dict] = []
    while readers:
        j = rng.choices(range(len(readers)), weights=remaining)[0]
        sample = _safe_next(readers[j], errors)
        if sample is None:
            del readers[j], remaining[j]
            continue
        remaining[j] = max(remaining[j] - 1, 1)
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list, rng: random.Random):
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()
