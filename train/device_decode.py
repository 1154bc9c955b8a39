"""JPEG frames decoded on the training device (``data.decode_device=cuda``).

The DataLoader workers do everything but the decoding (shard reading, checks, draws, tokenisation) and ship each
batch's JPEGs as bytes with where each one goes (`ship`); the training process decodes them in one batched call of
``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a GPU), resizes on the device what is not stored at the
training size (the bicubic antialiased resize of the CPU path) and fills the uint8 frame tensors there (`unship`).

A worker reads each JPEG's header first, so a frame that is not a JPEG, or not of the size its metadata says,
is a bad sample there, counted and refilled like any other. A frame whose data fails to decode on the device
is left black and reported by the loader (`Unshipped.failed`), which counts and logs its sample.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from train.frames import check_header

logger = logging.getLogger(__name__)


def ship(items: list[dict]) -> dict:
    """The batch fields that carry the items' JPEGs instead of decoded frames (their plans are removed)."""
    jpegs, where, copies = [], [], []
    for row, item in enumerate(items):
        plan = item.pop("pending")
        for data, slot in plan.jobs:
            jpegs.append(data)
            where.append((row, slot))
        copies += [(row, to, source) for to, source in plan.copies]
    return {
        "jpegs": jpegs,
        "jpeg_slots": torch.tensor(where, dtype=torch.long).view(-1, 2),
        "jpeg_copies": torch.tensor(copies, dtype=torch.long).view(-1, 3),
    }


def check_shipped(item: dict) -> None:
    """In the worker: each JPEG of a prepared item is a JPEG of the size its metadata says (ValueError if not)."""
    plan = item["pending"]
    for data, _ in plan.jobs:
        check_header(data, plan.stored)


@dataclass
class Unshipped:
    frames: torch.Tensor
    """uint8 [B, T, 3, S, S] on the device."""
    image: torch.Tensor
    """uint8 [B, 3, S, S] on the device."""
    failed: list[tuple[int, str]]
    """(row, reason) of each frame that did not decode (left black)."""


def unship(batch: dict, num_frames: int, size: int, device: torch.device) -> Unshipped:
    """Decode a shipped batch's JPEGs on ``device`` into its frame tensors (the shipping fields are removed)."""
    jpegs, slots, copies = batch.pop("jpegs"), batch.pop("jpeg_slots"), batch.pop("jpeg_copies")
    rows = len(batch["keys"])
    out = torch.zeros(rows * (num_frames + 1), 3, size, size, dtype=torch.uint8, device=device)
    images, failed = _decode(jpegs, device)
    flat_slots = slots[:, 0] * (num_frames + 1) + slots[:, 1]
    done = [i for i, image in enumerate(images) if image is not None]
    for shape in {images[i].shape for i in done}:
        same = [i for i in done if images[i].shape == shape]
        stacked = torch.stack([images[i] for i in same])
        if shape[-2:] != (size, size):
            stacked = _resize(stacked, size)
        out[flat_slots[same].to(device)] = stacked
    if len(copies):
        base = copies[:, 0] * (num_frames + 1)
        out[(base + copies[:, 1]).to(device)] = out[(base + copies[:, 2]).to(device)]
    out = out.view(rows, num_frames + 1, 3, size, size)
    return Unshipped(out[:, :num_frames], out[:, num_frames], [(int(slots[i, 0]), reason) for i, reason in failed])


def _decode(jpegs: list[bytes], device: torch.device) -> tuple[list, list[tuple[int, str]]]:
    """Every JPEG decoded to uint8 [3, H, W] on ``device`` in one call; if that fails, one by one (None, and the
    (index, reason), for each that fails)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # bytes are read-only; decode_jpeg only reads them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        data = [torch.frombuffer(jpeg, dtype=torch.uint8) for jpeg in jpegs]
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), []
    except RuntimeError:
        pass
    images, failed = [], []
    for i, one in enumerate(data):
        try:
            images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            images.append(None)
            failed.append((i, " ".join(str(exc).split())[:200]))
    return images, failed


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    return resize(frames, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
