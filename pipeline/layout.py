"""The layout of a data set folder: every file name in it is built, and read back, here.

A data set folder (local path, ``file://`` or ``s3://`` prefix; see docs/preprocessing.md and
docs/shard-format.md) holds::

    shard-<k>-<part>.tar        the tars of shard k (k: 6 digits, part: 3 digits, 000 unless split)
    shard-<k>-<part>.idx.json   each tar's sample index (pipeline/sample_index.py), written just before it
    stats/shard-<k>.json        shard k's stats: its commit marker, written last of the shard's files
    failures/shard-<k>.parquet  shard k's failures table
    failures.parquet            all failures, merged at the end
    texts/shard-<k>.jsonl       shard k's subtitles and captions, joined from the text files
    texts/_joined.json          the text join's marker, written last of its files
    config.json                 the config that decides the output bytes
    sizes.json                  shard file name -> samples (open_clip's layout)
    manifest.json               the committed shards, written last of all
    logs/run-<time>-<pid>.json  one per run

``DatasetLayout(root)`` builds those URIs; :meth:`DatasetLayout.of` also accepts a manifest URI, whose
folder is the root. Shard index ``k`` is the shard's position in the job (clips ``[k*n, (k+1)*n)``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from pipeline import storage

MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
CONFIG_NAME = "config.json"
FAILURES_NAME = "failures.parquet"
STATS_FOLDER = "stats"
FAILURES_FOLDER = "failures"
LOGS_FOLDER = "logs"
TEXTS_FOLDER = "texts"
INDEX_SUFFIX = ".idx.json"

_STEM_RE = re.compile(r"shard-(\d{6,})")
_TAR_RE = re.compile(r"shard-(\d{6,})-(\d{3,})\.tar")


def shard_stem(index: int) -> str:
    """``shard-000012``: the name every file of shard ``index`` starts with."""
    return f"shard-{index:06d}"


def tar_name(stem: str, part: int) -> str:
    """``<stem>-001.tar``: the ``part``-th tar of a shard (a shard splits once its tar reaches the byte limit)."""
    return f"{stem}-{part:03d}.tar"


def index_name(tar: str) -> str:
    """The sample index file of a tar (a name, relative URL or URI): ``x.tar`` -> ``x.idx.json``."""
    return (tar[:-4] if tar.endswith(".tar") else tar) + INDEX_SUFFIX


def shard_index(name: str, suffix: str) -> int | None:
    """The shard index of ``shard-<k><suffix>`` (a stats or failures file name); None for another name."""
    match = _STEM_RE.fullmatch(name.removesuffix(suffix)) if name.endswith(suffix) else None
    return int(match.group(1)) if match else None


def tar_shard(name: str) -> tuple[int, int] | None:
    """(shard index, part) of a shard tar name written by the job; None for another name."""
    match = _TAR_RE.fullmatch(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class DatasetLayout:
    """The URIs of one data set folder's files."""

    root: str
    """The folder, as given (local path, ``file://`` or ``s3://`` prefix)."""
    manifest_name: str = MANIFEST_NAME
    """The manifest's file name (another name when a reader was given a manifest URI)."""

    @classmethod
    def of(cls, location: str) -> DatasetLayout:
        """The layout of a data set folder, or of the folder of a manifest URI (one ending in ``.json``)."""
        if not location.endswith(".json"):
            return cls(location)
        if "/" not in location:
            return cls(".", location)
        root, _, name = location.rpartition("/")
        return cls(root, name)

    def path(self, *names: str) -> str:
        """A URI inside the folder."""
        return storage.join(self.root, *names)

    @property
    def manifest(self) -> str:
        return self.path(self.manifest_name)

    @property
    def sizes(self) -> str:
        return self.path(SIZES_NAME)

    @property
    def config(self) -> str:
        return self.path(CONFIG_NAME)

    @property
    def failures(self) -> str:
        """The merged failures table of the whole data set."""
        return self.path(FAILURES_NAME)

    @property
    def text_failures(self) -> str:
        """Problems of the subtitle and caption files found by the text join (merged first into ``failures``)."""
        return self.path(FAILURES_FOLDER, "texts.parquet")

    def stats(self, index: int) -> str:
        return self.path(STATS_FOLDER, f"{shard_stem(index)}.json")

    def shard_failures(self, index: int) -> str:
        return self.path(FAILURES_FOLDER, f"{shard_stem(index)}.parquet")

    def texts(self, index: int) -> str:
        """Shard ``index``'s subtitles and captions, written by the text join (preprocess/text/join.py)."""
        return self.path(TEXTS_FOLDER, f"{shard_stem(index)}.jsonl")

    @property
    def texts_marker(self) -> str:
        """Written last by the text join: its sources and cut (a rerun with the same ones skips the join)."""
        return self.path(TEXTS_FOLDER, "_joined.json")

    def run_log(self, stamp: str, pid: int) -> str:
        return self.path(LOGS_FOLDER, f"run-{stamp}-{pid}.json")

    def scratch(self, scratch_root: str, index: int) -> str:
        """A local scratch folder of one shard of this data set (unique per output folder and shard)."""
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
        return os.path.join(scratch_root, f"{digest}-{shard_stem(index)}")

    def list_stats(self) -> dict[int, str]:
        """Shard index -> stats URI of the shards committed so far (one listing)."""
        found = {}
        for name, uri in storage.list_children(self.path(STATS_FOLDER)):
            index = shard_index(name, ".json")
            if index is not None:
                found[index] = uri
        return found

    def shard_files(self, index: int) -> list[str]:
        """Names of the tars of shard ``index`` and their sample indexes now in the folder (one prefix listing)."""
        found = storage.list_children(self.root, f"{shard_stem(index)}-")
        return [name for name, _ in found if tar_shard(name) or tar_shard(name.removesuffix(INDEX_SUFFIX) + ".tar")]
