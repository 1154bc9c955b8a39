"""The training loader: per-(rank, worker) shard streams -> decoded batches, and its resume state.

Design (every choice serves "same number of batches everywhere" and "exact resume"); which shards
a stream reads, in which order, is train/shard_stream.py's part:

* **Position.** A stream's position is ``(window, offset)``: the window index and the number of raw
  samples already emitted from it. Resuming regenerates that window and skips ``offset`` raw samples
  without decoding any JPEG (a bad shard met on the way is in the position's count already: not counted
  again). Frame jitter is seeded per sample from ``(seed, s, window, offset)``.
* **Workers.** The DataLoader takes batches from workers round-robin. After a resume at batch ``g``
  worker ``w`` serves logical stream ``(w + g) mod W`` so the global batch order is unchanged.
* **Bad samples.** A sample whose metadata or JPEGs do not decode is skipped, counted and logged;
  its batch row goes to the stream's next sample (bad shards: train/shard_stream.py).
* **Filter.** With ``data.filter`` (train/sample_filter.py) a sample whose scores do not pass is left out after
  its metadata is read, before any JPEG is decoded, and counted in the position (``filtered``). A left-out
  sample still advances ``offset`` (a raw sample), so a resume skips exactly what the run had read, filtered or
  not, and the count goes on from the checkpoint's.

Batches hold uint8 frames in pooled buffers (train/frames.py), normalised on the training device.
The data state (``StreamingLoader.state_dict``: batches served, each worker stream's position and
error counts) goes into the checkpoint's client_state.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Iterator
from typing import TypedDict

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.schema import ClipSample, SchemaError
from train.config import DataConfig
from train.device_decode import check_shipped, ship, unship
from train.frames import BatchFrames, FramePool
from train.sample_filter import SampleFilter, check_scored
from train.sample_transform import SampleTransform, decode_item
from train.shard_errors import RECENT
from train.shard_sources import Source, open_sources
from train.shard_stream import Carry, ErrorCounter, ShardPlan, read_piece, seeded, window_samples
from train.stream_remap import remap
from train.tar_readers import READERS
from train.tokenizer import get_tokenizer

MAX_EMPTY_WINDOWS = 64
logger = logging.getLogger(__name__)


class StreamPosition(TypedDict):
    """Where one stream stands, plus its error counters."""

    window: int
    offset: int
    shard_errors: int
    sample_errors: int
    filtered: int
    """Samples ``data.filter`` left out so far (absent in data states saved before the filter: 0)."""
    ended: list
    """Pieces of the current window that ended on a shard error: ``[position, samples read]`` (train/stream_remap.py
    replays the window with them; absent in older data states: none)."""


def collate(items: list[dict], context_length: int, filled: BatchFrames | None) -> dict:
    """Items -> batch; their frames already sit in ``filled`` (row i = item i), or with no ``filled`` their JPEGs
    go as bytes (train/device_decode.py). The batch's digest covers each item's key, frame indices and texts
    (with ``data.text_lines=sample``, the lines drawn)."""
    tokenizer = get_tokenizer(context_length)
    digest = hashlib.sha1()
    for item in items:
        digest.update(repr((item["key"], item["indices"], item["subtitle"], item["caption"])).encode())
    if filled is None:
        frames = ship(items)
    else:
        frames, images = filled.views()
        frames = {"frames": frames, "image": images, "pool_slot": filled.slot}
    return {
        **frames,
        "subtitle": tokenizer([it["subtitle"] for it in items]),
        "caption": tokenizer([it["caption"] for it in items]),
        "keys": [it["key"] for it in items],
        "digest": digest.hexdigest()[:16],
    }


# ----------------------------------------------------------------------------- the training stream


def stream_batches(
    plan: ShardPlan,
    stream: int,
    start: StreamPosition,
    cfg: DataConfig,
    transform: SampleTransform,
    seed: int,
    pool: FramePool | None,
    keep: SampleFilter | None = None,
) -> Iterator[dict]:
    """Infinite batches of one stream, starting at ``start``; each carries the position after it. With no ``pool``
    the batches carry their JPEGs as bytes, each checked by its header (train/device_decode.py).

    Rows are prepared sample by sample (metadata, frame and text draws) and decoded together once
    every row has a sample: the per-sample Python work and the JPEG decoding each stay warm in the
    caches (bench/loader.py). A sample that fails to decode, or that ``keep`` leaves out, is counted and its row
    goes to the next sample of the stream.
    """
    errors = ErrorCounter(start["shard_errors"], start["sample_errors"], start.get("filtered", 0))
    window, skip = start["window"], start["offset"]
    rows: list[dict | None] = [None] * cfg.batch_size
    filled: BatchFrames | None = None  # taken at a batch's first sample: by then the last one may be back
    empty_windows = 0
    read = functools.partial(read_piece, reader=READERS[cfg.tar_reader])
    while True:
        rng = seeded(seed, stream, window, 1)
        shards = plan.window(stream, window, cfg.shards_per_window)
        offset = kept = 0
        ended: list = []
        errors.replaying = skip > 0
        for raw in window_samples(shards, rng, cfg.shuffle_buffer, errors, read, ended):
            offset += 1
            if offset <= skip:
                kept += 1  # read before the resume: counts as progress
                if offset == skip:
                    errors.replayed(start["shard_errors"])
                continue
            row = rows.index(None)
            filled = filled or (pool.take() if pool is not None else None)
            rows[row] = _prepare(raw, transform, keep, seeded(seed, stream, window, offset, 2), errors)
            kept += rows[row] is not None
            if None in rows or not _decode_rows(rows, errors, filled):
                continue
            batch = collate(rows, cfg.context_length, filled)
            filled = None
            batch["position"] = _position(window, offset, errors, ended)
            batch["shard_errors_seen"] = errors.take_recent()  # for the limit's message (train/shard_errors.py)
            rows = [None] * cfg.batch_size
            yield batch
        empty_windows = empty_windows + 1 if kept == 0 else 0
        if empty_windows >= MAX_EMPTY_WINDOWS:
            raise RuntimeError(_no_samples(stream, offset, errors, keep))
        window, skip = window + 1, 0


def _position(window: int, offset: int, errors: ErrorCounter, ended: list) -> StreamPosition:
    return StreamPosition(
        window=window,
        offset=offset,
        shard_errors=errors.shard_errors,
        sample_errors=errors.sample_errors,
        filtered=errors.filtered,
        ended=[list(item) for item in ended],
    )


def _no_samples(stream: int, offset: int, errors: ErrorCounter, keep: SampleFilter | None) -> str:
    if offset and keep is not None:
        return (
            f"stream {stream}: {MAX_EMPTY_WINDOWS} windows in a row had no readable sample that passes data.filter "
            f"{keep.expression!r} ({errors.filtered} left out by it so far, {errors.sample_errors} sample errors)"
        )
    return (
        f"stream {stream}: {MAX_EMPTY_WINDOWS} windows in a row had no readable sample "
        f"({errors.shard_errors} shard errors, {errors.sample_errors} sample errors); is the data set reachable?"
    )


_SAMPLE_ERRORS = (SchemaError, OSError, ValueError, RuntimeError)


def _prepare(
    raw: dict,
    transform: SampleTransform,
    keep: SampleFilter | None,
    rng: random.Random,
    errors: ErrorCounter,
) -> dict | None:
    """The sample's item with its draws made, frames not decoded; None when it is bad (counted) or ``keep`` leaves
    it out (counted, before anything is decoded)."""
    try:
        sample = ClipSample.from_wds(raw)
        if keep is not None and not keep.keep(sample.meta.scores):
            errors.filtered += 1
            return None
        item = transform.prepare(sample, rng)
    except _SAMPLE_ERRORS as exc:
        errors.sample(f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", exc)
        return None
    item["url"] = raw.get("__url__", "?")
    return item


def _decode_rows(rows: list[dict], errors: ErrorCounter, filled: BatchFrames | None) -> bool:
    """Decode the rows not yet decoded into ``filled`` (with none: check their JPEG headers, train/device_decode.py);
    a row that fails is counted and emptied. True if none failed."""
    for row, item in enumerate(rows):
        if "pending" not in item:  # decoded by an earlier call
            continue
        try:
            check_shipped(item) if filled is None else decode_item(item, filled.row_arrays(row))
        except _SAMPLE_ERRORS as exc:
            errors.sample(f"{item['url']}:{item['key']}", exc)
            rows[row] = None
    return None not in rows


def initial_position(shard_errors: int = 0, sample_errors: int = 0, filtered: int = 0) -> StreamPosition:
    return StreamPosition(
        window=0, offset=0, shard_errors=shard_errors, sample_errors=sample_errors, filtered=filtered, ended=[]
    )


class StreamingDataset(IterableDataset):
    """One rank's view: its DataLoader workers each run one stream (train/shard_stream.py)."""

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None = None,
        carry: dict | None = None,
        saved: list[dict] | None = None,
    ):
        """``state``: this rank's data state of a checkpoint of the same world size and workers, ``carry`` the
        checkpoint's (`Carry.state_dict`); ``saved``: every rank's data state of a checkpoint saved by another
        number of streams, whose positions are remapped onto this run's streams (train/stream_remap.py)."""
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.num_workers = max(cfg.num_workers, 1)
        self.sources = open_sources(cfg.train, "data.train", log_warnings=rank == 0)
        self.keep = SampleFilter(cfg.filter) if cfg.filter.strip() else None
        if self.keep is not None:
            for source in self.sources:
                check_scored(self.keep, source.location, (ref.entry for ref in source.shards if ref.entry))
        self.samples_per_epoch = epoch_samples(self.sources, cfg.train_num_samples)
        streams = world_size * self.num_workers
        if saved is not None:
            carry, state = self._remapped(saved, Carry.from_state(carry)), None
            if rank == 0:
                state = fresh_state(self.num_workers, totals(saved))
        else:
            carry = Carry.from_state(carry)
        self.plan = ShardPlan(self.sources, cfg.weights, seed, streams, carry)
        self.transform = SampleTransform(
            cfg.num_frames, cfg.image_size, cfg.decoder, cfg.shuffle_frames, cfg.text_lines
        )
        self.state = state or fresh_state(self.num_workers)
        check_state(self.state, self.num_workers)
        # per worker, one flag per pooled batch buffer (see FramePool): enough for the batches in
        # flight (prefetch), the one being used, and one whose release is seen at the next fetch
        self.buffers_in_use = torch.zeros(self.num_workers, cfg.prefetch_factor + 4, dtype=torch.uint8).share_memory_()

    def _remapped(self, saved: list[dict], carry: Carry) -> Carry:
        old = ShardPlan(self.sources, self.cfg.weights, self.seed, sum(len(r["streams"]) for r in saved), carry)
        positions = [position for rank_state in saved for position in rank_state["streams"]]
        try:
            return remap(old, positions, self.cfg.shards_per_window, self.cfg.shuffle_buffer, self.seed)
        except ValueError as exc:
            raise ValueError(
                f"data.train: cannot resume at another number of streams (world size x data.num_workers): {exc}"
            ) from exc

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        logical = (worker + self.state["batches"]) % self.num_workers
        stream = self.rank * self.num_workers + logical
        start = self.state["streams"][logical]
        pool = None  # data.decode_device=cuda: the batches carry their JPEGs (train/device_decode.py)
        if self.cfg.decode_device == "cpu":
            pool = FramePool(self.buffers_in_use[worker], self.cfg.batch_size, self.cfg.num_frames, self.cfg.image_size)
        for batch in stream_batches(self.plan, stream, start, self.cfg, self.transform, self.seed, pool, self.keep):
            batch["stream"], batch["worker"] = logical, worker
            yield batch


def epoch_samples(sources: list[Source], override: int | None) -> int:
    """``data.train_num_samples`` if set, else the sources' total; ValueError when a count is unknown."""
    if override is not None:
        return override
    unknown = [f"{s.location} ({s.uncounted} shards)" for s in sources if s.num_samples is None]
    if unknown:
        raise ValueError(
            f"data.train: no sample count for the shards of {', '.join(unknown)} (no manifest or sizes.json next "
            "to them): set data.train_num_samples (open_clip's --train-num-samples)"
        )
    return sum(s.num_samples for s in sources)


def fresh_state(num_workers: int, counts: tuple[int, int, int] = (0, 0, 0)) -> dict:
    """A start at the beginning of the plan; ``counts`` (shard errors, sample errors, filtered so far) go to the
    first stream, so that the totals go on across a resume at another number of streams."""
    streams = [initial_position(*counts)] + [initial_position() for _ in range(num_workers - 1)]
    return {"batches": 0, "streams": streams}


def totals(saved: list[dict]) -> tuple[int, int, int]:
    """Shard errors, sample errors (frames that failed on the decoding device included) and filtered samples
    summed over every stream of every saved rank."""
    streams = [p for rank_state in saved for p in rank_state["streams"]]
    return (
        sum(p["shard_errors"] for p in streams),
        sum(p["sample_errors"] for p in streams) + sum(r.get("decode_errors", 0) for r in saved),
        sum(p.get("filtered", 0) for p in streams),
    )


def check_state(state: dict, num_workers: int) -> None:
    if len(state.get("streams", [])) != num_workers:
        raise ValueError(
            f"data state has {len(state.get('streams', []))} worker streams but data.num_workers "
            f"gives {num_workers}: resume with the same num_workers and world size"
        )


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate step: batches are already tensors (its default walks every field)."""
    return batch


class StreamingLoader:
    """Iterates batches of one rank and tracks its data state (what goes into client_state)."""

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None = None,
        carry: dict | None = None,
        saved: list[dict] | None = None,
        decode_on: torch.device | None = None,
    ):
        """``decode_on``: with ``data.decode_device=cuda``, the device that decodes the batches' JPEGs (the current
        CUDA device unless given; the tests give the CPU)."""
        self.dataset = StreamingDataset(cfg, seed, rank, world_size, state, carry, saved)
        self.decode_on = None
        if cfg.decode_device != "cpu":
            if decode_on is None and not torch.cuda.is_available():
                raise ValueError(
                    "data.decode_device=cuda: no CUDA device here (torch.cuda.is_available() is False); "
                    "use data.decode_device=cpu"
                )
            self.decode_on = decode_on or torch.device("cuda", torch.cuda.current_device())
        self.decode_errors = self.dataset.state.get("decode_errors", 0)
        """Frames that failed to decode on ``decode_on`` (logged; in the data state, so a resume goes on counting)."""
        get_tokenizer(cfg.context_length)  # import open_clip once here; forked workers inherit it
        self.state = {
            "batches": self.dataset.state["batches"],
            "streams": [dict(p) for p in self.dataset.state["streams"]],
        }
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        self._iter: Iterator[dict] | None = None
        self.recent_shard_errors: list[str] = []
        """The last shard errors of this rank's streams (not in the data state: only their counts are)."""
        self._lent: list[tuple[StorageWeakRef, int, int]] = []

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.samples_per_epoch

    def next(self) -> dict:
        """The next batch. Its frame tensors live in a pooled buffer that is refilled only after
        every reference to them (views included) is gone; keep a tensor to keep its data."""
        if self._iter is None:
            self._iter = iter(self.loader)
        self._return_buffers()
        batch = next(self._iter)
        self.state["streams"][batch.pop("stream")] = batch.pop("position")
        self.recent_shard_errors = [*self.recent_shard_errors, *batch.pop("shard_errors_seen")][-RECENT:]
        self.state["batches"] += 1
        if self.decode_on is not None:
            self._unship(batch)
        worker, slot = batch.pop("worker"), batch.pop("pool_slot", -1)
        if slot >= 0:
            self._lent.append((StorageWeakRef(batch["frames"].untyped_storage()), worker, slot))
        return batch

    def _unship(self, batch: dict) -> None:
        cfg = self.dataset.cfg
        shipped = unship(batch, cfg.num_frames, cfg.image_size, self.decode_on)
        batch["frames"], batch["image"] = shipped.frames, shipped.image
        for row, reason in shipped.failed:
            self.decode_errors += 1
            logger.warning(
                "a frame of sample %s did not decode on %s (left black): %s", batch["keys"][row], self.decode_on, reason
            )

    def _return_buffers(self) -> None:
        """Clear the in-use flag of each lent buffer whose storage here has no reference left."""
        in_use, still_lent = self.dataset.buffers_in_use, []
        for ref, worker, slot in self._lent:
            if ref.expired():
                in_use[worker, slot] = 0
            else:
                still_lent.append((ref, worker, slot))
        self._lent = still_lent

    def close(self) -> None:
        """Stop the worker processes."""
        self._iter = None

    def errors(self) -> tuple[int, int]:
        streams = self.state["streams"]
        return sum(p["shard_errors"] for p in streams), sum(p["sample_errors"] for p in streams) + self.decode_errors

    @property
    def shards_per_epoch(self) -> int:
        return len(self.dataset.plan.shards)

    def shards_begun(self) -> int:
        """Global positions of the shard plan begun, as far as this rank's streams see: one past the newest position
        in their current windows (all ranks' maximum: every position before it is begun, or carried after a resume
        at another number of streams)."""
        size, base = self.dataset.cfg.shards_per_window, self.dataset.rank * self.dataset.num_workers
        return 1 + max(
            piece.position
            for logical, position in enumerate(self.state["streams"])
            for piece in self.dataset.plan.window(base + logical, position["window"], size)
        )

    def filtered(self) -> int:
        """Samples ``data.filter`` left out so far, on this rank."""
        return sum(p.get("filtered", 0) for p in self.state["streams"])

    def state_dict(self) -> dict:
        state = {"batches": self.state["batches"], "streams": [dict(p) for p in self.state["streams"]]}
        return {**state, "decode_errors": self.decode_errors} if self.decode_errors else state

    def carry_state(self) -> dict:
        """The plan's carry (the same on every rank): saved once per checkpoint, next to the ranks' states."""
        return self.dataset.plan.carry.state_dict()

    @staticmethod
    def same_streams(saved: list[dict], cfg: DataConfig, world_size: int) -> bool:
        """Whether a checkpoint's data states were saved by this run's number of ranks and workers."""
        return len(saved) == world_size and all(len(r["streams"]) == max(cfg.num_workers, 1) for r in saved)
