"""JPEG frames decoded straight into pooled batch buffers, and their CLIP normalisation.

Frames are decoded straight into their slot of the batch tensor, which is laid out
[B, T, S, S, 3] (the decoders' native pixel order) and handed on as a [B, T, 3, S, S] view: no
frame is copied after decoding when the stored size is the training size. Inside DataLoader
workers the batch tensor lives in shared memory, so passing it to the trainer copies nothing either.
A decoder takes (JPEG bytes, destination [S, S, 3] uint8 array) pairs, and the stored frame size
(width, height) from the sample's metadata when known; the arrays are numpy views of the batch
tensor (numpy indexing costs a tenth of torch's per frame).

Batches hold uint8 frames, normalised on the training device (`normalize_frames`).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from torch.utils.data import get_worker_info

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- JPEG decoders


def _resize_into(dest: np.ndarray, image_HWC: torch.Tensor) -> None:
    """Bicubic antialiased resize of a uint8 [H, W, 3] image straight into ``dest`` [S, S, 3].

    Both are channels-last [1, 3, H, W] views for torch's uint8 AVX2 kernel, which writes into ``dest`` itself
    (the ``out=`` form of the op torchvision's ``resize`` calls: the same pixels). Through ``resize`` and a
    copy it took 2.9x as long per 398x224 frame: its CHW result went through a transposing copy into ``dest``.
    """
    image = image_HWC.permute(2, 0, 1).unsqueeze(0)
    out = torch.from_numpy(dest).permute(2, 0, 1).unsqueeze(0)
    torch.ops.aten._upsample_bicubic2d_aa.out(image, list(dest.shape[:2]), False, None, None, out=out)


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


def check_header(data: bytes, stored: tuple[int, int] | None) -> None:
    """ValueError unless ``data`` starts like a JPEG of the stored size (width, height) when that is known."""
    import simplejpeg

    height, width = simplejpeg.decode_jpeg_header(data)[:2]  # ValueError when it is no JPEG
    if stored is not None and (width, height) != tuple(stored):
        raise ValueError(f"a frame is {width}x{height}, the sample's metadata says {stored[0]}x{stored[1]}")


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


# ----------------------------------------------------------------------------- batch buffers


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


def normalize_frames(frames_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> CLIP-normalised float, on whatever device the input is."""
    mean = torch.tensor(CLIP_MEAN, device=frames_uint8.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=frames_uint8.device, dtype=dtype).view(3, 1, 1)
    return (frames_uint8.to(dtype) / 255.0 - mean) / std
