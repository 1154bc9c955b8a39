"""Where the training and held-out shards come from: each entry of ``data.train`` / ``data.eval`` -> a `Source`.

An entry is one of (local path, ``file://`` or ``s3://``; train/config.py splits open_clip's ``a::b`` into
separate entries first):

* a manifest URI or a data set folder (docs/shard-format.md): the shards the manifest lists, each checked
  against its size and hash while it is read;
* a shard URL list as WebDataset users write it: a brace pattern (``s3://b/ds/shard-{000000..000099}-000.tar``,
  ``{a,b}`` alternatives too; expanded by webdataset's own ``expand_urls``), a glob in the file name
  (``shard-*.tar``) or one ``.tar`` URL. Every name must be a ``.tar``. Each folder of the expanded names is
  listed once: names that are not there are left out with one warning, and a pattern that matches no file
  at all is an error naming it. A shard's sample count and checks come from the ``manifest.json`` in its
  folder when that lists it, else its count from the folder's ``sizes.json`` (open_clip's layout), else
  the count is unknown (the loader then needs ``data.train_num_samples``).

Shards read without a manifest entry have no size or hash check, and those whose manifest predates text coverage
(docs/shard-format.md) have no coverage for train/text_coverage.py to check. Each is said once per process and
setting (``data.train``, ``data.eval``), on the rank that logs it, in one line naming the entries: not
once per shard or per pass (the set of what was said is the module's only state, as torchtitan's
``warn_once``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from pipeline import storage
from pipeline.layout import DatasetLayout
from pipeline.manifest import TEXT_FIELDS, Manifest, ShardEntry, parse_manifest, read_manifest, shard_uris

logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
_GLOB_CHARS = "*?["
_said: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: its URI, its sample count (None: unknown) and its manifest entry (None: unchecked)."""

    uri: str
    samples: int | None
    entry: ShardEntry | None = None


@dataclass(frozen=True)
class Source:
    """The shards of one ``data.train`` / ``data.eval`` entry, in order."""

    location: str
    shards: tuple[ShardRef, ...]
    missing: tuple[str, ...] = ()
    """Names of a shard list that are not in their folder (left out)."""

    @property
    def num_samples(self) -> int | None:
        """Total samples, or None when a shard's count is unknown."""
        counts = [ref.samples for ref in self.shards]
        return None if None in counts else sum(counts)

    @property
    def unchecked(self) -> int:
        return sum(ref.entry is None for ref in self.shards)

    @property
    def uncounted(self) -> int:
        return sum(ref.samples is None for ref in self.shards)

    @property
    def text_coverage(self) -> dict[str, float] | None:
        """Share of the samples with a non-empty subtitle and caption, from the manifest entries; None when a
        shard's is not recorded (no manifest entry, or a manifest written before coverage was recorded)."""
        if not self.shards or any(ref.entry is None or not ref.entry.texts for ref in self.shards):
            return None
        samples = sum(ref.entry.samples for ref in self.shards)
        return {name: sum(ref.entry.texts.get(name, 0) for ref in self.shards) / samples for name in TEXT_FIELDS}

    @property
    def no_coverage(self) -> int:
        """Shards whose manifest entry records no text coverage (written before it was recorded)."""
        return sum(ref.entry is not None and not ref.entry.texts for ref in self.shards)


def is_shard_list(location: str) -> bool:
    """True for a brace pattern, a glob in the file name or a ``.tar`` URL; False for a manifest or folder."""
    name = location.rpartition("/")[2]
    return "{" in location or location.endswith(SHARD_SUFFIX) or any(c in name for c in _GLOB_CHARS)


def open_source(location: str) -> Source:
    """The shards of one entry (see the module docstring); ValueError (ManifestError) names the entry."""
    source = _shard_list(location) if is_shard_list(location) else _manifest_source(location)
    if not source.shards:
        raise ValueError(f"{location}: lists no non-empty shard")
    return source


def open_sources(locations: list[str], setting: str, *, log_warnings: bool = True) -> list[Source]:
    """The sources of a setting's entries; with ``log_warnings``, what is unchecked or missing is said once."""
    if not locations:
        raise ValueError(f"{setting}: no source given")
    sources = [open_source(location) for location in locations]
    if log_warnings:
        unchecked = {s.location: s.unchecked for s in sources}
        _say_once(setting, "have no manifest entry: their size and hash are not checked", unchecked)
        _say_once(setting, "do not exist and are left out", {s.location: len(s.missing) for s in sources})
        uncovered = {s.location: s.no_coverage for s in sources}
        _say_once(setting, "have manifest entries without text coverage: its check is skipped", uncovered)
    return sources


def _say_once(setting: str, problem: str, counts: dict[str, int]) -> None:
    named = [f"{location} ({n} shards)" for location, n in counts.items() if n]
    key = (setting, problem, *named)
    if named and key not in _said:
        _said.add(key)
        logger.warning("%s: the shards of %s %s", setting, ", ".join(named), problem)


# ----------------------------------------------------------------------------- manifests and folders


def _manifest_source(location: str) -> Source:
    manifest: Manifest = read_manifest(location)
    refs = tuple(
        ShardRef(uri, entry.samples, entry)
        for uri, entry in zip(shard_uris(manifest, location), manifest.shards)
        if entry.samples > 0
    )
    return Source(location, refs)


# ----------------------------------------------------------------------------- shard URL lists


def expand_shard_list(pattern: str) -> list[str]:
    """The shard URIs a pattern names, in order: braces expanded as WebDataset does, then file-name globs."""
    expanded = []
    for name in expand_urls(pattern):
        expanded += storage.expand(name)
    bad = [uri for uri in expanded if not uri.endswith(SHARD_SUFFIX)]
    if bad:
        raise ValueError(f"{pattern}: names {bad[0]!r}, not a {SHARD_SUFFIX} shard (a shard list names tar files)")
    return expanded


def _shard_list(pattern: str) -> Source:
    uris = expand_shard_list(pattern)
    by_folder: dict[str, list[str]] = {}
    for uri in uris:
        by_folder.setdefault(uri.rpartition("/")[0], []).append(uri)
    present, counts = set(), {}
    for folder, members in by_folder.items():
        names = [uri.rpartition("/")[2] for uri in members]
        listed = {name for name, _ in storage.list_children(folder or ".", os.path.commonprefix(names))}
        present |= {uri for uri, name in zip(members, names) if name in listed}
        counts[folder] = _folder_counts(folder)
    if not present:
        raise ValueError(f"{pattern}: matches no file ({len(uris)} names, e.g. {uris[0]})")
    refs, missing = [], []
    for uri in uris:
        if uri not in present:
            missing.append(uri.rpartition("/")[2])
            continue
        folder, _, name = uri.rpartition("/")
        entries, sizes = counts[folder]
        ref = ShardRef(uri, entries[name].samples, entries[name]) if name in entries else ShardRef(uri, sizes.get(name))
        if ref.samples != 0:
            refs.append(ref)
    return Source(pattern, tuple(refs), tuple(missing))


def _folder_counts(folder: str) -> tuple[dict[str, ShardEntry], dict[str, int]]:
    """The manifest entries (by shard file name) and the ``sizes.json`` counts of a folder; empty if absent."""
    layout = DatasetLayout(folder or ".")
    try:
        manifest = parse_manifest(storage.read_bytes(layout.manifest), layout.manifest)
        return {entry.url: entry for entry in manifest.shards}, {}
    except storage.StorageNotFound:
        pass
    try:
        sizes = json.loads(storage.read_bytes(layout.sizes))
    except storage.StorageNotFound:
        return {}, {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{layout.sizes}: not valid JSON ({exc})") from exc
    if not isinstance(sizes, dict) or not all(isinstance(n, int) and n >= 0 for n in sizes.values()):
        raise ValueError(f"{layout.sizes}: expected a JSON object of shard file name -> sample count")
    return {}, sizes
