"""A shard's sample index: per-sample digests that let a reader check each sample before handing it on.

Next to each tar ``shard-000012-000.tar`` the writer puts ``shard-000012-000.idx.json`` (written before the
tar; name: :func:`pipeline.layout.index_name`). For sample ``i`` (tar order) it lists the sample's key and the offset
``offsets[i]`` where the first header of its members starts; ``offsets[n]`` is where the tar's
end-of-archive blocks start. ``xxh3_64[i]`` is the XXH3-64 of the tar bytes ``[offsets[i], offsets[i+1])``:
the sample's headers, data and padding. The manifest entry of the shard records the XXH3-64 of the index
file itself (``index_xxh3_64``), so the index is trusted only through the manifest.

A reader hashes each range as the bytes stream past (:class:`RangeHasher`) and hands sample ``i`` on only
once its range has been read and matched (pipeline/shard_check.py): a corrupt sample and everything after
it never reach a consumer, while the shard still streams. The index of a 1000-clip shard is ~60 KB.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import xxhash

FORMAT = "vidproxy.sample-index"
VERSION = 1
_XXH_RE = re.compile(r"^[0-9a-f]{16}$")


class SampleIndexError(ValueError):
    """An index file that does not parse or does not describe a tar."""


@dataclass(frozen=True)
class SampleIndex:
    """Keys, range offsets and range digests of one shard's samples."""

    keys: tuple[str, ...]
    offsets: tuple[int, ...]
    """``len(keys) + 1`` byte offsets: sample ``i`` is ``[offsets[i], offsets[i+1])``."""
    xxh3_64: tuple[str, ...]

    def to_bytes(self) -> bytes:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "keys": list(self.keys),
            "offsets": list(self.offsets),
            "xxh3_64": list(self.xxh3_64),
        }
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes) -> SampleIndex:
        """The index in ``raw``; :class:`SampleIndexError` says what is wrong with it."""
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise SampleIndexError(f"not a {FORMAT} version {VERSION} file")
            index = cls(tuple(data["keys"]), tuple(data["offsets"]), tuple(data["xxh3_64"]))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
            raise SampleIndexError(f"unreadable index ({exc!r})") from exc
        index._validate()
        return index

    def _validate(self) -> None:
        n = len(self.keys)
        if len(self.offsets) != n + 1 or len(self.xxh3_64) != n:
            raise SampleIndexError(f"{n} keys but {len(self.offsets)} offsets and {len(self.xxh3_64)} digests")
        if not all(isinstance(k, str) for k in self.keys):
            raise SampleIndexError("a key is not a string")
        if not all(isinstance(o, int) for o in self.offsets) or self.offsets[0] < 0:
            raise SampleIndexError("an offset is not a non-negative whole number")
        if any(b < a for a, b in zip(self.offsets, self.offsets[1:])):
            raise SampleIndexError("offsets are not ascending")
        if not all(isinstance(d, str) and _XXH_RE.match(d) for d in self.xxh3_64):
            raise SampleIndexError("a digest is not 16 hex digits")


class RangeHasher:
    """XXH3-64 of consecutive byte ranges of a stream that arrives in chunks of any size.

    Range ends are given ascending, all at once (reading) or one at a time ahead of the bytes (writing).
    ``digests[j]`` covers ``[ends[j-1], ends[j])`` with ``ends[-1] = 0``; a writer may feed bytes before it
    knows where their range ends.
    """

    def __init__(self, ends: Iterable[int] = ()):
        self._ends = deque(ends)
        self._hash = xxhash.xxh3_64()
        self._pos = 0
        self.digests: list[str] = []

    def expect(self, end: int) -> None:
        if end < self._pos:
            raise ValueError(f"range end {end} is behind the {self._pos} bytes hashed so far")
        self._ends.append(end)

    def update(self, data) -> None:
        view, pos, ends = memoryview(data), self._pos, self._ends
        while ends and pos + len(view) >= ends[0]:
            cut = ends.popleft() - pos
            self._hash.update(view[:cut])
            self.digests.append(self._hash.hexdigest())
            self._hash.reset()
            view, pos = view[cut:], pos + cut
        self._hash.update(view)
        self._pos = pos + len(view)
