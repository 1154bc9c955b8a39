"""Check a data set against its manifest, and give older data sets their sample indexes.

    vidproxy-verify <data set folder or manifest URI> [--add-index] [--workers 8]

Every shard is read once: its size and hash against the manifest, and each sample against the shard's sample
index (pipeline/shard_check.py). A bad shard is one line on stderr naming it and the reason; the exit code is 1
if any shard is bad. Use it after copying a data set (say to S3) or before a long training run. It also prints
the distribution of the clips' quality scores the manifest records (pipeline/scores.py), before its verdict.

``--add-index`` writes the sample index (pipeline/sample_index.py) of each shard whose manifest entry has none (data
sets written before it existed, which readers otherwise check whole before streaming), then the manifest with
the indexes' hashes. A shard gets its index only after it matched its manifest entry whole. The index has the
bytes the shard writer would have written: the offsets come from the tar's own headers.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from pipeline import storage
from pipeline.config import HelpFormatter, prog
from pipeline.layout import index_name
from pipeline.logs import setup_logging
from pipeline.manifest import ManifestError, ShardEntry, read_manifest, shard_uris, write_manifest
from pipeline.sample_index import RangeHasher, SampleIndex
from pipeline.scores import table
from pipeline.shards import ShardError, iter_shard, key_and_field, open_shard


@dataclass(frozen=True)
class Checked:
    """One shard's outcome: its entry (with the index hash, when one was added), or what is wrong with it."""

    entry: ShardEntry
    error: str | None = None
    indexed: bool = False


def check_shard(uri: str, entry: ShardEntry, add_index: bool) -> Checked:
    """Read the shard through every check; with ``add_index``, a shard whose entry has no index is checked whole
    and indexed instead."""
    try:
        if add_index and not entry.index_xxh3_64:  # indexed from bytes checked whole: no second read
            return Checked(dataclasses.replace(entry, index_xxh3_64=write_index(uri, entry)), indexed=True)
        count = sum(1 for _ in iter_shard(uri, entry))
        if count != entry.samples:
            raise ShardError(f"{uri}: {count} samples, manifest says {entry.samples}")
    except (ShardError, storage.StorageError) as exc:
        return Checked(entry, error=str(exc))
    return Checked(entry)


def write_index(uri: str, entry: ShardEntry) -> str:
    """Write the sample index of a shard that matches ``entry`` whole; returns the index file's XXH3-64."""
    with tempfile.NamedTemporaryFile(prefix=storage.TEMP_PREFIX, suffix=".tar") as local:
        with open_shard(uri, entry) as stream:  # no index in the entry: checked whole before the first byte
            shutil.copyfileobj(stream, local, storage.READ_CHUNK)
        local.flush()
        index = index_of(local.name, uri)
    if len(index.keys) != entry.samples:
        raise ShardError(f"{uri}: {len(index.keys)} samples in the tar, manifest says {entry.samples}")
    raw = index.to_bytes()
    storage.write_bytes(index_name(uri), raw)
    return xxhash.xxh3_64_hexdigest(raw)


def index_of(path: str, uri: str) -> SampleIndex:
    """The sample index of a local tar: samples grouped by key as webdataset groups them (``key_and_field``)."""
    keys: list[str] = []
    offsets: list[int] = []
    end = 0
    with tarfile.open(path) as tar:
        for member in tar:
            split = key_and_field(member.name) if member.isfile() else None
            if split is None:
                continue
            key = split[0]
            if not keys or key != keys[-1]:
                keys.append(key)
                offsets.append(member.offset)  # where its first header block starts (PAX headers included)
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    offsets.append(end)
    hasher = RangeHasher(offsets)
    with open(path, "rb") as f:
        while chunk := f.read(storage.READ_CHUNK):
            hasher.update(chunk)
    if len(hasher.digests) != len(offsets):
        raise ShardError(f"{uri}: the tar ends before its last sample")
    return SampleIndex(tuple(keys), tuple(offsets), tuple(hasher.digests[1:]))


def verify(location: str, add_index: bool = False, workers: int = 8) -> list[Checked]:
    """Every shard's outcome, in manifest order; with ``add_index``, the manifest is rewritten when indexes were
    added (only if no shard is bad)."""
    manifest = read_manifest(location)
    uris = shard_uris(manifest, location)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda pair: check_shard(*pair, add_index), zip(uris, manifest.shards)))
    if any(r.indexed for r in results) and not any(r.error for r in results):
        write_manifest(location, dataclasses.replace(manifest, shards=tuple(r.entry for r in results)))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m pipeline.verify"),
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("location", help="a data set folder or manifest URI (local path, file:// or s3://)")
    parser.add_argument("--add-index", action="store_true", help="write the sample index of shards that have none")
    parser.add_argument("--workers", type=int, default=8, help="shards read at once")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("WARNING")
    try:
        results = verify(args.location, args.add_index, max(1, args.workers))
    except (ManifestError, storage.StorageError) as exc:
        print(f"{prog('pipeline.verify')}: error: {exc}", file=sys.stderr)
        return 2
    bad = [r for r in results if r.error]
    for r in bad:
        print(r.error, file=sys.stderr)
    added = sum(r.indexed for r in results)
    samples = sum(r.entry.samples for r in results if not r.error)
    note = f"; {added} sample indexes added" + (" (manifest not rewritten: bad shards)" if bad else "") if added else ""
    print("\n".join(score_table(args.location)))
    print(f"{len(results)} shards, {samples} samples in good shards: {len(bad)} bad{note}")
    return 1 if bad else 0


def score_table(location: str) -> list[str]:
    """The distribution of the data set's quality scores, from its manifest (pipeline/scores.py)."""
    return ["quality scores (manifest):", *(f"  {line}" for line in table(read_manifest(location).scores))]


if __name__ == "__main__":
    sys.exit(main())
