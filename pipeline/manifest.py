"""The dataset manifest: the list of committed shards, written last as the commit marker.

``manifest.json`` sits next to the shards. It records the schema version, the config that
produced the data set, and per shard its relative URL, sample count, byte size, SHA-256,
XXH3-64 (the fast hash that streaming readers verify), the XXH3-64 of its sample index
(pipeline/sample_index.py), total clip seconds, the samples with a non-empty subtitle and caption (the
text coverage training checks; absent in older manifests: unknown) and the histograms of its clips' quality
scores (pipeline/scores.py), plus totals, the data set's score histograms (the shards' merged) and a ``sizes``
map (shard file name -> samples) in the layout of open_clip's ``sizes.json`` (also written as its own file, before
the manifest). Nothing else in a data set folder is
authoritative: a shard that is not in the manifest does not exist for readers.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.layout import DatasetLayout
from pipeline.schema import SCHEMA_VERSION
from pipeline.scores import ScoreSummary

TEXT_FIELDS = ("subtitle", "caption")
"""The texts whose coverage the manifest records."""

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_XXH_RE = re.compile(r"^[0-9a-f]{16}$")


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    """One committed shard."""

    url: str
    """Path of the shard relative to the manifest's folder."""
    samples: int
    bytes: int
    sha256: str
    seconds: float
    """Total clip seconds of the shard's samples."""
    xxh3_64: str = ""
    """XXH3-64 of the shard (16 hex digits), what streaming readers check; empty in older manifests,
    whose readers then check the SHA-256."""
    index_xxh3_64: str = ""
    """XXH3-64 of the shard's sample index (pipeline/sample_index.py: per-sample digests, so readers check each
    sample before handing it on); empty in older manifests, whose readers then check the whole shard first."""
    texts: dict[str, int] = field(default_factory=dict)
    """Samples whose text is not empty or blank, per text (``subtitle``, ``caption``); empty in older manifests, whose
    text coverage is then unknown."""
    scores: dict = field(default_factory=dict)
    """Histograms of the shard's quality scores (pipeline/scores.py, fixed bins); empty in older manifests and
    when no sample has a score."""

    def validate(self) -> None:
        if not self.url or self.url.startswith("/") or storage.has_scheme(self.url) or ".." in self.url.split("/"):
            raise ValueError(f"shard url {self.url!r} must be a relative path inside the data set folder")
        if self.samples < 0 or self.bytes < 0 or self.seconds < 0:
            raise ValueError(f"shard {self.url!r}: negative samples, bytes or seconds")
        if not _SHA_RE.match(self.sha256):
            raise ValueError(f"shard {self.url!r}: sha256 {self.sha256!r} is not 64 hex digits")
        if self.xxh3_64 and not _XXH_RE.match(self.xxh3_64):
            raise ValueError(f"shard {self.url!r}: xxh3_64 {self.xxh3_64!r} is not 16 hex digits")
        if self.index_xxh3_64 and not _XXH_RE.match(self.index_xxh3_64):
            raise ValueError(f"shard {self.url!r}: index_xxh3_64 {self.index_xxh3_64!r} is not 16 hex digits")
        bad = {k: n for k, n in self.texts.items() if k not in TEXT_FIELDS or not 0 <= n <= self.samples}
        if bad:
            raise ValueError(f"shard {self.url!r}: texts {bad} are not counts of {TEXT_FIELDS} within its samples")
        ScoreSummary.from_dict(self.scores, self.samples, f"shard {self.url!r}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A data set: its shards in order, and the config that produced them."""

    shards: tuple[ShardEntry, ...]
    config: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def seconds(self) -> float:
        return round(sum(s.seconds for s in self.shards), 3)

    @property
    def texts(self) -> dict[str, int] | None:
        """Samples with a non-empty text, per text; None when a shard with samples does not say (older)."""
        if any(s.samples and not s.texts for s in self.shards):
            return None
        return {name: sum(s.texts.get(name, 0) for s in self.shards) for name in TEXT_FIELDS}

    def text_coverage(self) -> dict[str, float] | None:
        """Share of the samples with a non-empty text, per text; None when unknown (an older manifest)."""
        texts = self.texts
        if texts is None or not self.num_samples:
            return None
        return {name: n / self.num_samples for name, n in texts.items()}

    @property
    def scores(self) -> ScoreSummary:
        """The data set's score histograms: its shards' merged."""
        summary = ScoreSummary()
        for s in self.shards:
            summary.merge(ScoreSummary.from_dict(s.scores, s.samples, s.url))
        return summary

    @property
    def sizes(self) -> dict[str, int]:
        """open_clip-compatible ``sizes.json`` content."""
        return {s.name: s.samples for s in self.shards}

    def validate(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema version {self.schema_version}, this code reads version {SCHEMA_VERSION}")
        names = set()
        for entry in self.shards:
            entry.validate()
            if entry.name in names:
                raise ValueError(f"shard name {entry.name!r} appears twice")
            names.add(entry.name)

    def to_dict(self) -> dict:
        totals = {"shards": len(self.shards), "samples": self.num_samples, "bytes": self.num_bytes}
        totals["seconds"] = self.seconds
        if self.texts is not None:
            totals["texts"] = self.texts
        out = {
            "schema_version": self.schema_version,
            "config": self.config,
            "totals": totals,
            "sizes": self.sizes,
            "shards": [_entry_dict(s) for s in self.shards],
        }
        scores = self.scores.to_dict()
        if scores:  # without scores: the manifest as before they existed
            out["scores"] = scores
        return out

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _entry_dict(entry: ShardEntry) -> dict:
    data = dataclasses.asdict(entry)
    if not entry.texts:  # unknown: an older entry is written as it was read
        data.pop("texts")
    if not data["scores"]:
        del data["scores"]
    return data


def shard_uris(manifest: Manifest, location: str) -> list[str]:
    """Absolute URIs of a manifest's shards (``location``: the data set folder or the manifest URI)."""
    layout = DatasetLayout.of(location)
    return [layout.path(entry.url) for entry in manifest.shards]


def write_manifest(location: str, manifest: Manifest) -> str:
    """Validate and write ``sizes.json`` then ``manifest.json`` (the commit marker)."""
    manifest.validate()
    layout = DatasetLayout.of(location)
    storage.write_bytes(layout.sizes, json.dumps(manifest.sizes, indent=1, sort_keys=True).encode())
    storage.write_bytes(layout.manifest, manifest.to_json())
    return layout.manifest


def read_manifest(location: str) -> Manifest:
    """Read and validate a manifest; errors name the file and the problem."""
    uri = DatasetLayout.of(location).manifest
    try:
        raw = storage.read_bytes(uri)
    except storage.StorageNotFound as exc:
        raise ManifestError(f"{uri}: manifest not found (is the data set committed? {exc})") from exc
    return parse_manifest(raw, uri)


def parse_manifest(raw: bytes, uri: str) -> Manifest:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{uri}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{uri}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{uri}: schema version {version!r}, this code reads version {SCHEMA_VERSION}")
    try:
        manifest = Manifest(
            schema_version=version,
            config=data.get("config", {}),
            shards=tuple(ShardEntry(**s) for s in data["shards"]),
        )
        manifest.validate()
    except KeyError as exc:
        raise ManifestError(f"{uri}: missing field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{uri}: {exc}") from exc
    _check_totals(data, manifest, uri)
    if data.get("scores", {}) != manifest.to_dict().get("scores", {}):
        raise ManifestError(f"{uri}: the scores summary is not the sum of the shards' score histograms")
    return manifest


def _check_totals(data: dict, manifest: Manifest, uri: str) -> None:
    totals = data.get("totals", {})
    expected = manifest.to_dict()["totals"]
    for name, value in totals.items():
        if name in expected and expected[name] != value:
            raise ManifestError(f"{uri}: totals.{name} is {value} but the shards add up to {expected[name]}")
