"""One sample's training or evaluation item: which frames (`frame_indices`), which text line
(`pick_line`), and the decoding of its JPEGs into a batch row (`SampleTransform`, `decode_batch`).

Every draw comes from the per-sample rng the caller passes (train/loader.py seeds it from the
stream position, so it is a pure function of the seed); evaluation passes no rng and gets no jitter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipeline.schema import ClipSample
from train.frames import DECODE_FNS, BatchFrames, empty_frames
from train.shard_stream import seeded


def frame_indices(stored: int, wanted: int, rng: random.Random | None) -> list[int]:
    """Uniform linspace over the stored frames (floored, in exact integer arithmetic); for training
    (rng given) with jittered ends when stored > wanted: the start is drawn from [0, interval] and
    the end from [stored - 1 - interval, stored - 1], interval = stored // (wanted - 1), as the
    CLIP-ViP code samples (docs/training.md, Data)."""
    start, end = 0, stored - 1
    if wanted == 1:
        return [0]
    if rng is not None and stored > wanted:
        interval = stored // (wanted - 1)
        start = rng.randint(0, interval)
        end = rng.randint(max(stored - 1 - interval, start), stored - 1)
    return [start + (end - start) * k // (wanted - 1) for k in range(wanted)]


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

    def __call__(
        self, sample: ClipSample, rng: random.Random | None, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> dict:
        """The item, its frames decoded into ``out`` (or into fresh "frames" and "image" tensors)."""
        item = self.prepare(sample, rng)
        if out is None:
            size = self.image_size
            frames_TSS3, image_SS3 = empty_frames(self.num_frames, size, size, 3), empty_frames(size, size, 3)
            item.update(frames=frames_TSS3.permute(0, 3, 1, 2), image=image_SS3.permute(2, 0, 1))
            out = frames_TSS3.numpy(), image_SS3.numpy()
        decode_item(item, out)
        return item

    def prepare(self, sample: ClipSample, rng: random.Random | None) -> dict:
        """The item with every draw made and its frames not yet decoded: its decode plan (`decode_item` decodes it
        into a batch row; train/device_decode.py ships it to the training process instead)."""
        indices = frame_indices(len(sample.frames), self.num_frames, rng)
        if self.shuffle_frames:
            (rng or seeded(len(sample.frames))).shuffle(indices)
        subtitle, caption = sample.subtitle, sample.caption
        if self.text_lines == "sample":
            subtitle, caption = pick_line(subtitle, rng), pick_line(caption, rng)
        item = {"subtitle": subtitle, "caption": caption, "key": sample.key, "indices": indices}
        jobs, copies = decode_plan(sample, indices)
        item["pending"] = DecodePlan(DECODE_FNS[self.decoder], jobs, copies, sample.meta.frame_size)
        return item


class DecodePlan(NamedTuple):
    """A prepared item's frames, not yet decoded (`decode_plan`)."""

    decode: Callable
    """The data.decoder function (train/frames.py)."""
    jobs: list[tuple[bytes, int]]
    """(JPEG, slot): each stored frame once."""
    copies: list[tuple[int, int]]
    """(to slot, from slot): a frame picked twice, a middle frame also picked."""
    stored: tuple[int, int] | None
    """The stored frame size (width, height) from the metadata."""


def decode_plan(sample: ClipSample, indices: list[int]) -> tuple[list[tuple[bytes, int]], list[tuple[int, int]]]:
    """Which JPEG goes into which slot of a row, each stored frame decoded once: (JPEG, slot) jobs, and (to, from)
    slot copies for a frame picked twice or a middle frame also picked. Slots 0..T-1 are the frames, T the image."""
    first: dict[int, int] = {}  # stored frame -> the slot it is decoded into
    jobs, copies = [], []
    for slot, index in enumerate(indices):
        if index not in first:
            first[index] = slot
            jobs.append((sample.frames[index], slot))
        else:
            copies.append((slot, first[index]))
    middle, image_slot = sample.meta.middle_frame, len(indices)
    if middle in first:
        copies.append((image_slot, first[middle]))
    else:
        jobs.append((sample.frames[middle], image_slot))
    return jobs, copies


def decode_item(item: dict, out: tuple[np.ndarray, np.ndarray]) -> None:
    """Decode a prepared item's frames into a row, ``out`` = (frames [T, S, S, 3], image [S, S, 3]) arrays (once:
    the plan is removed)."""
    plan: DecodePlan = item.pop("pending")
    frames, image = out
    slots = [*frames, image]
    plan.decode([(data, slots[slot]) for data, slot in plan.jobs], plan.stored)
    for to, source in plan.copies:
        slots[to][...] = slots[source]


def decode_batch(samples: list[ClipSample], transform: SampleTransform) -> tuple[BatchFrames, list[dict]]:
    """Evaluation: samples transformed without jitter, row i of the batch tensors = sample i."""
    filled = BatchFrames(len(samples), transform.num_frames, transform.image_size)
    return filled, [transform(sample, None, filled.row_arrays(row)) for row, sample in enumerate(samples)]
