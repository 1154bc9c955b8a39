"""Streaming training data: manifests -> per-(rank, worker) shard streams -> decoded batches.

Design (every choice serves "same number of batches everywhere" and "exact resume"):

* **Streams.** Each (rank, DataLoader worker) pair is one *stream* ``s`` of ``S = world * workers``.
  The shard sequence of a stream is infinite and a pure function of the seed: epoch ``e`` of the
  global order is a seeded permutation of all shards (or, with source weights, a seeded weighted
  draw); stream ``s`` takes every S-th entry of the concatenated epochs. A stream therefore never
  runs dry, also with fewer shards than streams or uneven shard sizes, and the training loop simply
  stops after the same number of steps on every rank: no rank can hang waiting for another.
* **Windows.** A stream reads ``shards_per_window`` shards at a time, interleaved at random in
  proportion to their remaining samples, through a raw-sample shuffle buffer that is drained at the
  end of the window. The order inside window ``k`` depends only on ``(seed, s, k)``.
* **Position.** A stream's position is ``(window, offset)``: the window index and the number of raw
  samples already emitted from it. Resuming regenerates that window and skips ``offset`` raw samples
  without decoding any JPEG. Frame jitter is seeded per sample from ``(seed, s, window, offset)``.
* **Randomness.** Window order and per-sample draws use `random.Random` seeded with a string
  (hashed with SHA-512 by the standard library, the same on every platform): 7 us a seed, where
  numpy's SeedSequence takes 50 us and a weighted ``Generator.choice`` 16 us, per sample.
* **Workers.** The DataLoader takes batches from workers round-robin. After a resume at batch ``g``
  worker ``w`` serves logical stream ``(w + g) mod W`` so the global batch order is unchanged.
* **Bad shards.** A missing or corrupt shard (`ShardError`) ends that shard only; it is counted and
  logged, and the stream goes on. A bad sample (bad JPEG / metadata) is skipped and counted too.

Batches hold uint8 frames (normalised on the training device, see `normalize_frames`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.manifest import Manifest, ShardEntry, read_manifest, shard_uris
from pipeline.schema import ClipSample, SchemaError
from pipeline.shards import ShardError, iter_shard
from train.config import DataConfig

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_EMPTY_WINDOWS = 64


class StreamPosition(TypedDict):
    """Where one stream stands, plus its error counters."""

    window: int
    offset: int
    shard_errors: int
    sample_errors: int


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ShardRef:
    uri: str
    entry: ShardEntry


@dataclass(frozen=True)
class Source:
    location: str
    shards: tuple[ShardRef, ...]

    @property
    def num_samples(self) -> int:
        return sum(ref.entry.samples for ref in self.shards)


def open_source(location: str) -> Source:
    """Read a manifest (ManifestError names the file on failure) and list its shards."""
    manifest: Manifest = read_manifest(location)
    refs = tuple(ShardRef(uri, entry) for uri, entry in zip(shard_uris(manifest, location), manifest.shards)
                 if entry.samples > 0)
    if not refs:
        raise ValueError(f"{location}: the manifest lists no non-empty shard")
    return Source(location, refs)


def open_sources(locations: list[str]) -> list[Source]:
    if not locations:
        raise ValueError("data.train: no training manifest given")
    return [open_source(loc) for loc in locations]


# ----------------------------------------------------------------------------- shard plan


class ShardPlan:
    """The infinite, seeded shard sequence of every stream."""

    def __init__(self, sources: list[Source], weights: list[float] | None, seed: int, num_streams: int):
        self.shards = [ref for source in sources for ref in source.shards]
        self._source_of = [i for i, source in enumerate(sources) for _ in source.shards]
        self._offsets = np.cumsum([0] + [len(s.shards) for s in sources])
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / sum(weights)
        self.seed, self.num_streams = seed, num_streams

    @functools.lru_cache(maxsize=8)
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
    """Counts skipped shards and samples; logs each one (never silent)."""

    def __init__(self, shard_errors: int = 0, sample_errors: int = 0):
        self.shard_errors, self.sample_errors = shard_errors, sample_errors

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


def window_samples(shards: list[ShardRef], rng: random.Random, buffer_size: int,
                   errors: ErrorCounter) -> Iterator[dict]:
    """Raw webdataset samples of a window: random interleave of its shards, then a shuffle buffer."""
    readers = [iter_shard(ref.uri, ref.entry) for ref in shards]
    remaining = [max(ref.entry.samples, 1) for ref in shards]
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


# ----------------------------------------------------------------------------- per-sample transform


def frame_indices(stored: int, wanted: int, rng: random.Random | None) -> list[int]:
    """Brief §3.3: uniform linspace (floored, in exact integer arithmetic); for training (rng given)
    with jittered ends when stored > wanted."""
    start, end = 0, stored - 1
    if wanted == 1:
        return [0]
    if rng is not None and stored > wanted:
        interval = stored // (wanted - 1)
        start = rng.randint(0, interval)
        end = rng.randint(max(stored - 1 - interval, start), stored - 1)
    return [start + (end - start) * k // (wanted - 1) for k in range(wanted)]


# Frames are decoded straight into their slot of the batch tensor, which is laid out
# [B, T, S, S, 3] (the decoders' native pixel order) and handed on as a [B, T, 3, S, S] view: no
# frame is copied after decoding when the stored size is the training size. Inside DataLoader
# workers the batch tensor lives in shared memory, so passing it to the trainer copies nothing either.
# A decoder takes (JPEG bytes, destination [S, S, 3] uint8 array) pairs, and the stored frame size
# (width, height) from the sample's metadata when known; the arrays are numpy views of the batch
# tensor (numpy indexing costs a tenth of torch's per frame).


def _resize_into(dest: np.ndarray, image_HWC: torch.Tensor) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    size = list(dest.shape[:2])
    resized = resize(image_HWC.permute(2, 0, 1), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    torch.from_numpy(dest).copy_(resized.permute(1, 2, 0))


def decode_simplejpeg(jobs: list[tuple[bytes, np.ndarray]], stored: tuple[int, int] | None = None) -> None:
    """libjpeg-turbo via simplejpeg: in place when the stored size is the target, else DCT-domain
    downscaling (never below the target) and a bicubic antialiased resize.

    ``stored`` (width, height), from the sample's metadata, saves reading each header when it is the target.
    """
    import simplejpeg

    size = jobs[0][1].shape[0] if jobs else 0  # every destination is one [S, S, 3] frame
    as_stored = stored == (size, size)
    for data, dest in jobs:
        if not as_stored and simplejpeg.decode_jpeg_header(data)[:2] != (size, size):
            image = simplejpeg.decode_jpeg(data, "RGB", min_height=size, min_width=size)
            _resize_into(dest, torch.from_numpy(image))
            continue
        shape = simplejpeg.decode_jpeg(data, "RGB", buffer=dest).shape  # raises if larger than dest
        if shape != dest.shape:
            raise ValueError(f"a frame is {shape[1]}x{shape[0]}, the sample's metadata says {size}x{size}")


def decode_torchvision(jobs: list[tuple[bytes, np.ndarray]], stored: tuple[int, int] | None = None) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # bytes are read-only; decode_jpeg only reads them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        frames = decode_jpeg([torch.frombuffer(data, dtype=torch.uint8) for data, _ in jobs], mode=ImageReadMode.RGB)
    for (_, dest), frame_CHW in zip(jobs, frames):
        image = frame_CHW.permute(1, 2, 0)
        torch.from_numpy(dest).copy_(image) if image.shape == dest.shape else _resize_into(dest, image)


def decode_pillow(jobs: list[tuple[bytes, np.ndarray]], stored: tuple[int, int] | None = None) -> None:
    from PIL import Image

    for data, dest in jobs:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            size = dest.shape[0]
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            dest[:] = np.asarray(img)


DECODE_FNS = {"simplejpeg": decode_simplejpeg, "torchvision": decode_torchvision, "pillow": decode_pillow}


def empty_frames(*shape: int) -> torch.Tensor:
    """Uninitialised uint8 tensor; in shared memory inside a DataLoader worker (as default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def decode_jpegs(jpegs: list[bytes], size: int, decoder: str = "simplejpeg") -> torch.Tensor:
    """JPEGs -> uint8 [N, 3, S, S] (a view of an [N, S, S, 3] tensor)."""
    out = empty_frames(len(jpegs), size, size, 3)
    DECODE_FNS[decoder](list(zip(jpegs, out.numpy())))
    return out.permute(0, 3, 1, 2)


# Printable ASCII, tabs and line breaks, no '&': text that ftfy and HTML unescaping leave as it is.
_PLAIN_TEXT = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


class ClipTokenizer:
    """open_clip's CLIP tokenizer with the same ids in a third of the time per text: plain text (see
    `encode`) takes a short path, and rows are assembled in numpy rather than one torch copy per row."""

    def __init__(self, context_length: int):
        from open_clip import tokenizer

        self.base = tokenizer.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self._short_path = self.base.clean_fn is tokenizer._clean_lower  # the default cleaning

    def encode(self, text: str) -> list[int]:
        """open_clip's ids. On plain text (printable ASCII, tabs and line breaks, no '&') its ftfy
        and HTML passes and its byte-to-unicode map change nothing, and are skipped."""
        base = self.base
        if not (self._short_path and _PLAIN_TEXT.fullmatch(text)):
            return base.encode(text)
        encoder, bpe, ids = base.encoder, base.bpe, []
        for word in base.pat.findall(" ".join(text.split()).lower()):
            if len(word) == 1:  # what bpe() returns for one character, uncached
                ids.append(encoder[word + "</w>"])
            else:
                ids += [encoder[piece] for piece in bpe(word).split(" ")]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Texts -> int64 [N, context_length]: <sot> ids <eot>, zero-padded; a long text is cut with
        <eot> kept as its last token, as open_clip does."""
        base, length = self.base, self.context_length
        out = np.zeros((len(texts), length), np.int64)
        for row, text in zip(out, texts):
            ids = self.encode(text)[:length - 2]
            row[:len(ids) + 2] = [base.sot_token_id, *ids, base.eot_token_id]
        return torch.from_numpy(out)


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length)


def pick_line(text: str, rng: random.Random | None) -> str:
    """One non-empty line of ``text``: a seeded random one for training (rng given), else the first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[rng.randrange(len(lines))] if rng is not None else lines[0]


@dataclass(frozen=True)
class SampleTransform:
    """ClipSample -> frames (uint8 [T, 3, S, S]), middle frame ([3, S, S]) and the two texts.

    Frames are decoded into ``out`` (numpy views [T, S, S, 3] and [S, S, 3] of a batch row) when
    given; else into fresh tensors, returned as "frames" and "image". Each stored frame is decoded
    once, also when picked twice or when it is the middle frame too. ``text_lines="sample"`` reduces
    each text member to one line (`pick_line`), drawn after the frame jitter from the same
    per-sample rng, so it is a pure function of seed and stream position.
    """

    num_frames: int
    image_size: int
    decoder: str = "simplejpeg"
    shuffle_frames: bool = False
    text_lines: str = "all"

    def __call__(self, sample: ClipSample, rng: random.Random | None,
                 out: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """The item, its frames decoded."""
        item = self.prepare(sample, rng, out)
        decode_item(item)
        return item

    def prepare(self, sample: ClipSample, rng: random.Random | None,
                out: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """The item with every draw made and its frames not yet decoded: `decode_item` does that."""
        indices = frame_indices(len(sample.frames), self.num_frames, rng)
        if self.shuffle_frames:
            (rng or seeded(len(sample.frames))).shuffle(indices)
        subtitle, caption = sample.subtitle, sample.caption
        if self.text_lines == "sample":
            subtitle, caption = pick_line(subtitle, rng), pick_line(caption, rng)
        item = {"subtitle": subtitle, "caption": caption, "key": sample.key, "indices": indices}
        if out is None:
            size = self.image_size
            frames_TSS3, image_SS3 = empty_frames(len(indices), size, size, 3), empty_frames(size, size, 3)
            item.update(frames=frames_TSS3.permute(0, 3, 1, 2), image=image_SS3.permute(2, 0, 1))
            out = frames_TSS3.numpy(), image_SS3.numpy()
        item["pending"] = self._decode_plan(sample, indices, *out)
        return item

    def _decode_plan(self, sample: ClipSample, indices: list[int], frames: np.ndarray, image: np.ndarray):
        """Decoder jobs into ``frames`` [T, S, S, 3] and ``image`` [S, S, 3], and the copies for
        repeated frames and a middle frame that is also picked."""
        first: dict[int, int] = {}  # stored frame -> the slot it is decoded into
        jobs, copies = [], []
        for slot, index in enumerate(indices):
            if index not in first:
                first[index] = slot
                jobs.append((sample.frames[index], frames[slot]))
            else:
                copies.append((frames[slot], frames[first[index]]))
        middle = sample.meta.middle_frame
        if middle in first:
            copies.append((image, frames[first[middle]]))
        else:
            jobs.append((sample.frames[middle], image))
        return DECODE_FNS[self.decoder], jobs, sample.meta.frame_size, copies


def decode_item(item: dict) -> None:
    """Decode a prepared item's frames into place (once: the plan is removed)."""
    decode, jobs, stored, copies = item.pop("pending")
    decode(jobs, stored)
    for dest, source in copies:
        dest[...] = source


class BatchFrames:
    """The frame tensors of one batch being filled: [B, T, S, S, 3] and [B, S, S, 3], one storage.

    ``slot`` >= 0: the buffer belongs to a `FramePool` and is lent out by `views`.
    """

    def __init__(self, batch_size: int, num_frames: int, size: int, slot: int = -1):
        self.shape, self.slot = (batch_size, num_frames, size), slot
        self.flat = empty_frames(batch_size * (num_frames + 1) * size * size * 3)
        self.frames, self.images = self._split(self.flat)
        self._frames_np, self._images_np = self.frames.numpy(), self.images.numpy()

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, num_frames, size = self.shape
        cut = batch_size * num_frames * size * size * 3
        return flat[:cut].view(batch_size, num_frames, size, size, 3), flat[cut:].view(batch_size, size, size, 3)

    def row_arrays(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``row``'s frames [T, S, S, 3] and middle frame [S, S, 3], as numpy views (a tenth of
        the cost of torch indexing, per sample)."""
        return self._frames_np[row], self._images_np[row]

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, T, 3, S, S] and middle frames [B, 3, S, S] (views, no copy).

        A pooled buffer in this process is handed out under a storage of its own (same memory), so
        the consumer's last reference to it is visible to `StreamingLoader` while the pool keeps ``flat``.
        """
        frames, images = self.frames, self.images
        if self.slot >= 0 and get_worker_info() is None:
            frames, images = self._split(torch.from_numpy(self.flat.numpy()))
        return frames.permute(0, 1, 4, 2, 3), images.permute(0, 3, 1, 2)


class FramePool:
    """Batch buffers of one producer, reused once the consumer holds no reference to them.

    A fresh buffer per batch is costly: in a DataLoader worker it is a new shared-memory segment
    whose pages are faulted in one by one (~2 ms per clip of 13 frames at 224 here, half again the
    JPEG decoding), and a fresh private allocation is faulted in too. ``in_use`` (shared with the
    consuming process) has one flag per slot: the producer sets it when it lends a buffer,
    `StreamingLoader` clears it when the storage it received has no reference left (views
    included). With every slot lent, a batch gets a fresh, unpooled buffer: never an overwrite.
    """

    def __init__(self, in_use: torch.Tensor, batch_size: int, num_frames: int, size: int):
        self.in_use, self.shape = in_use, (batch_size, num_frames, size)
        self.buffers: list[BatchFrames] = []

    def take(self) -> BatchFrames:
        buffer = next((b for b in self.buffers if not self.in_use[b.slot]), None)
        if buffer is None:
            if len(self.buffers) == len(self.in_use):
                return BatchFrames(*self.shape)  # every slot lent: a fresh, unpooled buffer
            buffer = BatchFrames(*self.shape, slot=len(self.buffers))
            self.buffers.append(buffer)
        self.in_use[buffer.slot] = 1
        return buffer


def decode_batch(samples: list[ClipSample], transform: SampleTransform) -> tuple[BatchFrames, list[dict]]:
    """Evaluation: samples transformed without jitter, row i of the batch tensors = sample i."""
    filled = BatchFrames(len(samples), transform.num_frames, transform.image_size)
    return filled, [transform(sample, None, filled.row_arrays(row)) for row, sample in enumerate(samples)]


def collate(items: list[dict], context_length: int, filled: BatchFrames) -> dict:
    """Items -> batch; their frames already sit in ``filled`` (row i = item i)."""
    tokenizer = get_tokenizer(context_length)
    digest = hashlib.sha1()
    for item in items:
        digest.update(f"{item['key']}:{item['indices']};".encode())
    frames, images = filled.views()
    return {
        "frames": frames,
        "image": images,
        "pool_slot": filled.slot,
        "subtitle": tokenizer([it["subtitle"] for it in items]),
        "caption": tokenizer([it["caption"] for it in items]),
        "keys": [it["key"] for it in items],
        "digest": digest.hexdigest()[:16],
    }


def normalize_frames(frames_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> CLIP-normalised float, on whatever device the input is."""
    mean = torch.tensor(CLIP_MEAN, device=frames_uint8.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames_uint8.device, dtype=dtype).view(3, 1, 1)
    return (frames_uint8.to(dtype) / 255.0 - mean) / std


# ----------------------------------------------------------------------------- the training stream


def stream_batches(plan: ShardPlan, stream: int, start: StreamPosition, cfg: DataConfig,
                   transform: SampleTransform, seed: int, pool: FramePool) -> Iterator[dict]:
    """Infinite batches of one stream, starting at ``start``; each carries the position after it.

    Rows are prepared sample by sample (metadata, frame and text draws) and decoded together once
    every row has a sample: the per-sample Python work and the JPEG decoding each stay warm in the
    caches (bench/loader.py). A sample that fails to decode is counted and its row goes to the next
    sample of the stream.
    """
    errors = ErrorCounter(start["shard_errors"], start["sample_errors"])
    window, skip = start["window"], start["offset"]
    rows: list[dict | None] = [None] * cfg.batch_size
    filled: BatchFrames | None = None  # taken at a batch's first sample: by then the last one may be back
    empty_windows = 0
    while True:
        rng = seeded(seed, stream, window, 1)
        shards = plan.window(stream, window, cfg.shards_per_window)
        offset = 0
        for raw in window_samples(shards, rng, cfg.shuffle_buffer, errors):
            offset += 1
            if offset <= skip:
                continue
            row = rows.index(None)
            filled = filled or pool.take()
            rows[row] = _prepare(raw, transform, seeded(seed, stream, window, offset, 2), errors,
                                 filled.row_arrays(row))
            if None in rows or not _decode_rows(rows, errors):
                continue
            batch = collate(rows, cfg.context_length, filled)
            filled = None
            batch["position"] = StreamPosition(window=window, offset=offset, shard_errors=errors.shard_errors,
                                               sample_errors=errors.sample_errors)
            rows = [None] * cfg.batch_size
            yield batch
        empty_windows = empty_windows + 1 if offset == 0 else 0
        if empty_windows >= MAX_EMPTY_WINDOWS:
            raise RuntimeError(f"stream {stream}: {MAX_EMPTY_WINDOWS} windows in a row had no readable sample "
                               f"({errors.shard_errors} shard errors); is the data set reachable?")
        window, skip = window + 1, 0


_SAMPLE_ERRORS = (SchemaError, OSError, ValueError, RuntimeError)


def _prepare(raw: dict, transform: SampleTransform, rng: random.Random, errors: ErrorCounter,
             out: tuple[np.ndarray, np.ndarray]) -> dict | None:
    try:
        item = transform.prepare(ClipSample.from_wds(raw), rng, out)
    except _SAMPLE_ERRORS as exc:
        errors.sample(f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", exc)
        return None
    item["url"] = raw.get("__url__", "?")
    return item


def _decode_rows(rows: list[dict], errors: ErrorCounter) -> bool:
    """Decode the rows not yet decoded; a row that fails is counted and emptied. True if none failed."""
    for row, item in enumerate(rows):
        if "pending" in item:
            try:
                decode_item(item)
            except _SAMPLE_ERRORS as exc:
                errors.sample(f"{item['url']}:{item['key']}", exc)
                rows[row] = None
    return None not in rows


def initial_position() -> StreamPosition:
    return StreamPosition(window=0, offset=0, shard_errors=0, sample_errors=0)


class StreamingDataset(IterableDataset):
    """One rank's view: its DataLoader workers each run one stream (see module docstring)."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world_size: int,
                 state: dict | None = None):
        self.cfg, self.seed, self.rank, self.world_size = cfg, seed, rank, world_size
        self.num_workers = max(cfg.num_workers, 1)
        self.sources = open_sources(cfg.train)
        self.plan = ShardPlan(self.sources, cfg.weights, seed, world_size * self.num_workers)
        self.transform = SampleTransform(cfg.num_frames, cfg.image_size, cfg.decoder, cfg.shuffle_frames, cfg.text_lines)
        self.state = state or fresh_state(self.num_workers)
        check_state(self.state, self.num_workers)
        # per worker, one flag per pooled batch buffer (see FramePool): enough for the batches in
        # flight (prefetch), the one being used, and one whose release is seen at the next fetch
        self.buffers_in_use = torch.zeros(self.num_workers, cfg.prefetch_factor + 4, dtype=torch.uint8).share_memory_()

    @property
    def samples_per_epoch(self) -> int:
        return sum(source.num_samples for source in self.sources)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        logical = (worker + self.state["batches"]) % self.num_workers
        stream = self.rank * self.num_workers + logical
        start = self.state["streams"][logical]
        pool = FramePool(self.buffers_in_use[worker], self.cfg.batch_size, self.cfg.num_frames, self.cfg.image_size)
        for batch in stream_batches(self.plan, stream, start, self.cfg, self.transform, self.seed, pool):
            batch["stream"], batch["worker"] = logical, worker
            yield batch


def fresh_state(num_workers: int) -> dict:
    return {"batches": 0, "streams": [initial_position() for _ in range(num_workers)]}


def check_state(state: dict, num_workers: int) -> None:
    if len(state.get("streams", [])) != num_workers:
        raise ValueError(f"data state has {len(state.get('streams', []))} worker streams but data.num_workers "
                         f"gives {num_workers}: resume with the same num_workers and world size")


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate step: batches are already tensors (its default walks every field)."""
    return batch


class StreamingLoader:
    """Iterates batches of one rank and tracks its data state (what goes into client_state)."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world_size: int, state: dict | None = None):
        self.dataset = StreamingDataset(cfg, seed, rank, world_size, state)
        get_tokenizer(cfg.context_length)  # import open_clip once here; forked workers inherit it
        self.state = {"batches": self.dataset.state["batches"],
                      "streams": [dict(p) for p in self.dataset.state["streams"]]}
        self.loader = DataLoader(self.dataset, batch_size=None, collate_fn=_as_is, num_workers=cfg.num_workers,
                                 prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
                                 persistent_workers=cfg.num_workers > 0, pin_memory=torch.cuda.is_available())
        self._iter: Iterator[dict] | None = None
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
        self.state["batches"] += 1
        worker, slot = batch.pop("worker"), batch.pop("pool_slot")
        if slot >= 0:
            self._lent.append((StorageWeakRef(batch["frames"].untyped_storage()), worker, slot))
        return batch

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
        return sum(p["shard_errors"] for p in streams), sum(p["sample_errors"] for p in streams)

    def state_dict(self) -> dict:
        return {"batches": self.state["batches"], "streams": [dict(p) for p in self.state["streams"]]}


# ----------------------------------------------------------------------------- evaluation data


def eval_batches(cfg: DataConfig, rank: int, world_size: int) -> Iterator[dict]:
    """Held-out clips in manifest order (first eval_max_samples), split over ranks.

    Every rank gets the same number of batches of the same size (the last rank's share is padded by
    repeating a clip, marked with index -1) so ZeRO-3 forwards stay in lock-step.
    """
    samples = _eval_samples(cfg)
    per_rank = math.ceil(len(samples) / world_size)
    mine = list(range(rank, len(samples), world_size))
    mine += [-1] * (per_rank - len(mine))
    transform = SampleTransform(cfg.num_frames, cfg.image_size, cfg.decoder, cfg.shuffle_frames, cfg.text_lines)
    tokenizer = get_tokenizer(cfg.context_length)
    for start in range(0, per_rank, cfg.batch_size):
        chunk = mine[start:start + cfg.batch_size]
        filled, items = decode_batch([samples[i if i >= 0 else 0] for i in chunk], transform)
        texts = [it[cfg.eval_text] for it in items]
        yield {
            "frames": filled.views()[0],
            "text": tokenizer(texts),
            "index": torch.tensor(chunk, dtype=torch.long),
        }


def _eval_samples(cfg: DataConfig) -> list[ClipSample]:
    errors = ErrorCounter()
    out: list[ClipSample] = []
    for location in cfg.eval:
        for ref in open_source(location).shards:
            try:
                for raw in iter_shard(ref.uri, ref.entry):
                    out.append(ClipSample.from_wds(raw))
                    if len(out) >= cfg.eval_max_samples:
                        return out
            except ShardError as exc:
                errors.shard(exc)
    if not out:
        raise ValueError(f"data.eval: no readable held-out clip in {cfg.eval}")
    return out
