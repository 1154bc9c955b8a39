"""Damage a shard tar in place at a chosen sample, the way storage faults do: one flipped byte, a cut."""

from __future__ import annotations

import tarfile
from pathlib import Path


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (header offset, data offset)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_payload_byte(path: Path, key: str, field: str = "f000.jpg") -> None:
    """Flip one byte inside the payload of member ``<key>.<field>`` (a JPEG by default: it may still decode)."""
    flip_byte(path, member_offsets(path)[f"{key}.{field}"][1] + 5)


def flip_trailer_byte(path: Path) -> None:
    """Flip a byte of the end-of-archive zero blocks, after every sample."""
    flip_byte(path, path.stat().st_size - 2)
