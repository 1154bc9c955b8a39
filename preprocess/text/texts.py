"""Where a shard task gets the subtitle and caption of its clips, without any process holding every text.

Three sources, chosen per text (docs/preprocessing.md, "Texts"):

* ``joined``: a jsonl file or JSON list of ``{clip_id, text}``. Before the shard tasks, a join on Ray Data
  (preprocess/text/join.py, run by preprocess/job.py) writes each shard's texts to a small file of its own; the
  task reads that file.
* ``lmdb``: a local LMDB of clip id -> text, present at the same path on every node; the task looks its clips up.
* ``inline``: no source given; a ``"subtitle"`` or ``"caption"`` string in the clip entry of the metadata is used.

Every text is cut to ``max_chars`` (and counted as truncated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline import storage
from pipeline.layout import DatasetLayout
from preprocess.failures import Failure
from preprocess.inputs import ClipItem, TextEntry, open_lmdb, text_format

STAGES = (("subtitles", "subtitle"), ("captions", "caption"))
"""(source stage name, ClipItem field) of the two texts."""


@dataclass(frozen=True, kw_only=True)
class TextSource:
    uri: str
    kind: str
    """``joined`` or ``lmdb``."""


@dataclass(frozen=True, kw_only=True)
class TextSources:
    """The text sources of a job: stage name (``subtitles``, ``captions``) -> source; absent: inline texts."""

    sources: dict[str, TextSource] = dataclasses.field(default_factory=dict)
    max_chars: int = 2000

    @classmethod
    def of(cls, subtitles: str | None, captions: str | None, max_chars: int) -> TextSources:
        """Classify the given URIs (ValueError naming a source that cannot be read)."""
        sources = {}
        for stage, uri in (("subtitles", subtitles), ("captions", captions)):
            if uri:
                sources[stage] = TextSource(uri=uri, kind="lmdb" if _kind(stage, uri) == "lmdb" else "joined")
        return cls(sources=sources, max_chars=max_chars)

    def joined(self) -> dict[str, str]:
        """Stage -> URI of the sources that need the join."""
        return {stage: s.uri for stage, s in self.sources.items() if s.kind == "joined"}


def _kind(stage: str, uri: str) -> str:
    try:
        return text_format(uri)
    except storage.StorageNotFound as exc:
        raise ValueError(f"{stage} {uri}: not found ({exc})") from exc


def with_texts(
    clips: list[ClipItem], texts: TextSources, out: DatasetLayout, index: int
) -> tuple[list[ClipItem], list[Failure]]:
    """The clips with their subtitle and caption filled in from the configured sources, and the problems found
    reading them (LMDB values that are not UTF-8)."""
    failures: list[Failure] = []
    found: dict[str, dict[str, TextEntry]] = {}
    for stage, source in texts.sources.items():
        if source.kind == "lmdb":
            found[stage], bad = lmdb_lookup(source.uri, stage, [c.clip_id for c in clips], texts.max_chars)
            failures += bad
    joined = _joined(texts, out, index)
    out_clips = []
    for clip in clips:
        values = {}
        for stage, field in STAGES:
            source = texts.sources.get(stage)
            if source is None:
                values[field] = _cut(getattr(clip, field), texts.max_chars)
            elif source.kind == "lmdb":
                values[field] = found[stage].get(clip.clip_id)
            else:
                values[field] = joined.get(clip.position, {}).get(field)
        out_clips.append(dataclasses.replace(clip, **values))
    return out_clips, failures


def _joined(texts: TextSources, out: DatasetLayout, index: int) -> dict[int, dict[str, TextEntry]]:
    if not texts.joined():
        return {}
    from preprocess.text.join import shard_texts

    return {
        position: {field: entry for (_, field), entry in zip(STAGES, pair) if entry is not None}
        for position, pair in shard_texts(out, index).items()
    }


def _cut(entry: TextEntry | None, max_chars: int) -> TextEntry | None:
    if entry is None or len(entry.text) <= max_chars:
        return entry
    return TextEntry(text=entry.text[:max_chars], truncated=True, origin=entry.origin)


def lmdb_lookup(uri: str, stage: str, clip_ids: list[str], max_chars: int) -> tuple[dict[str, TextEntry], list]:
    """The texts of ``clip_ids`` in a local LMDB of UTF-8 clip id -> UTF-8 text (opened read-only, no lock)."""
    env = open_lmdb(uri, stage)
    found: dict[str, TextEntry] = {}
    failures: list[Failure] = []
    with env, env.begin() as txn:
        for clip_id in clip_ids:
            value = txn.get(clip_id.encode("utf-8"))
            if value is None:
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                text = value.decode("utf-8", errors="replace")
                message = f"{uri} record {clip_id!r}: not UTF-8 ({exc.reason}); bad bytes replaced"
                failures.append(Failure(stage=stage, error="non_utf8", message=message, clip_id=clip_id, dropped=False))
            found[clip_id] = TextEntry(text=text[:max_chars], truncated=len(text) > max_chars, origin=uri)
    return found, failures
