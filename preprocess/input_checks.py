"""The checks before any work: every required text has a source, and the source videos are there.

Texts (``--require-texts``): a text comes from its file (``--subtitles`` / ``--captions``; the metadata's inline
texts are then not used), else from the clip entries of the metadata (inline), and for the clips still without
one from a model stage (``--asr-model`` / ``--caption-model``). A required text with none of these stops
``--plan-only`` (exit 2) and the job, in one line naming the loss that reads it and the flags that would give
it a source. ``--plan-only`` counts the inline texts of every clip; the job looks at the first shard's clips
(one ranged read: the release's lines carry no text at all).

Videos (``--max-missing-videos``): the videos folder (and with ``--fetch`` the ``--keep-sources`` archive) is
listed once -- one request per 1,000 names on S3, never one per video -- and each planned video is looked up in
that listing as the plan goes by (preprocess/plan.py ``on_line``: no second pass over the metadata). ``source``
layout: a metadata record with a clip to decode needs a ``<video_id>.<ext>``; ``clips`` layout: each clip entry
needs its file ``<video_id>/<clip_id>`` (one recursive listing). The names listed are held in memory while the
plan is read, about 100 bytes each.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterable

from pipeline import storage
from preprocess.config import TEXT_FIELDS, InputConfig, Layout, PreprocessConfig
from preprocess.inputs import ClipItem, ParsedLine, list_source_videos

FILE_FLAGS = {"subtitle": "--subtitles", "caption": "--captions"}
MODEL_FLAGS = {"subtitle": "--asr-model", "caption": "--caption-model"}
STAGE_NAMES = {"subtitle": "ASR", "caption": "caption"}
DEFAULT_LOSS_TERMS = {
    "subtitle": ("s2v", "v2s_joint", "v2c_joint"),
    "caption": ("c2v", "v2s_joint", "v2c_joint", "f2c", "c2f"),
}
"""The terms of training's default loss ``d`` (train/loss.py) that read each text. preprocess/ cannot import
train/; tests/preprocess/test_input_checks.py holds this table against train/loss.py."""
MISSING_SHOWN = 5
"""Missing videos named in the report."""

# --------------------------------------------------------------------------- texts


def text_file(cfg: PreprocessConfig, field: str) -> str | None:
    """The file a text comes from (None: inline texts are used)."""
    return cfg.inputs.subtitles if field == "subtitle" else cfg.inputs.captions


def text_model(cfg: PreprocessConfig, field: str) -> str | None:
    """The model of the stage that fills a text in where none is given (None: no stage)."""
    stage = cfg.asr if field == "subtitle" else cfg.captioner
    return stage.model if stage is not None else None


def inline_texts(clips: Iterable[ClipItem]) -> Counter:
    """Clips that carry a non-empty text in their metadata entry, per text."""
    counts = Counter()
    for clip in clips:
        counts.update(f for f in TEXT_FIELDS if getattr(clip, f) is not None and getattr(clip, f).text)
    return counts


def unsourced(cfg: PreprocessConfig, inline: Counter) -> list[str]:
    """The required texts without a source: no file, no model stage and no clip with an inline text."""
    return [
        f
        for f in cfg.inputs.require_texts
        if not text_file(cfg, f) and not text_model(cfg, f) and not (inline.get(f, 0) > 0)
    ]


def unsourced_message(cfg: PreprocessConfig, fields: list[str]) -> str:
    """One line: the texts without a source, the loss terms that read them, the flags that would give them one."""
    one = len(fields) == 1
    terms = [t for f in fields for t in DEFAULT_LOSS_TERMS[f]]
    terms = sorted(set(terms), key=terms.index)
    keep = [f for f in cfg.inputs.require_texts if f not in fields]
    give = " and ".join(f"{FILE_FLAGS[f]} FILE or {MODEL_FLAGS[f]} DIR" for f in fields)
    return (
        f"{' and '.join(fields)} {'has' if one else 'have'} no source (no file, no inline text in the metadata, "
        f"no model stage), and training's default loss d reads {'it' if one else 'them'} (terms {', '.join(terms)}): "
        f"give {give}, or --require-texts {','.join(keep) or 'none'} to shard without {'it' if one else 'them'} "
        "on purpose"
    )


def unmatched_message(cfg: PreprocessConfig, name: str, uri: str, records: int | None) -> str | None:
    """One line when ``name`` is required, comes from the file ``uri`` alone (no model stage fills it in) and that
    file gave no clip of the plan a text (``records``: its usable records, None when not counted); None else."""
    if name not in cfg.inputs.require_texts or text_model(cfg, name):
        return None
    what = f"none of its {records} records" if records is not None else "none of its entries"
    keep = [f for f in cfg.inputs.require_texts if f != name]
    return (
        f"{FILE_FLAGS[name][2:]} {uri}: {what} gives a planned clip a {name} (are its clip ids those of the "
        f"metadata, and its text field the one docs/preprocessing.md names?), and training's default loss d reads "
        f"it (terms {', '.join(DEFAULT_LOSS_TERMS[name])}): fix the file, add {MODEL_FLAGS[name]} DIR, or "
        f"--require-texts {','.join(keep) or 'none'} to shard without it on purpose"
    )


# --------------------------------------------------------------------------- videos


class VideoCheck:
    """The planned videos (``clips`` layout: clip files) looked up in one listing of the videos folder."""

    def __init__(self, inputs: InputConfig, names: set[str]):
        self.inputs, self.names = inputs, names
        self.found = self.missing = 0
        self.first_missing: list[str] = []

    @classmethod
    def listing(cls, inputs: InputConfig) -> VideoCheck | None:
        """List the folder (and, with fetch, the archive) once; None when there is nothing to check: no videos
        folder, or ``max_missing_videos`` 1 (the check is off)."""
        if inputs.videos is None or inputs.max_missing_videos >= 1:
            return None
        if inputs.layout is Layout.CLIPS:
            return cls(inputs, _clip_files(inputs.videos))
        names = set(list_source_videos(inputs.videos))
        if inputs.fetch and inputs.keep_sources:
            names |= set(list_source_videos(inputs.keep_sources))
        return cls(inputs, names)

    @property
    def unit(self) -> str:
        return "clip files" if self.inputs.layout is Layout.CLIPS else "videos"

    def add_line(self, parsed: ParsedLine) -> None:
        """Look up what one metadata line needs (its clips ruled out by the metadata need nothing)."""
        clips = [e for e in parsed.entries if isinstance(e, ClipItem) and e.problem is None]
        if not clips:
            return
        if self.inputs.layout is Layout.SOURCE:
            self._count(clips[0].video_id)
            return
        for clip in clips:
            self._count(clip_name(clip.video_id, clip.clip_id))

    def _count(self, name: str) -> None:
        if name in self.names:
            self.found += 1
            return
        self.missing += 1
        if len(self.first_missing) < MISSING_SHOWN:
            self.first_missing.append(name)

    def line(self) -> str:
        """What was found, for the plan and the job's log."""
        archive = self.inputs.keep_sources if self.inputs.fetch else None
        where = self.inputs.videos + (f" or {archive}" if archive else "")
        total = self.found + self.missing
        text = f"{self.unit.replace('videos', 'video files')}: {self.found} of {total} found under {where}"
        if self.missing:
            text += f"; {self.missing} {'to fetch' if self.inputs.fetch else 'missing'}"
            text += f" (first: {', '.join(self.first_missing)})"
        return text

    def refusal(self) -> str | None:
        """One line when more than ``max_missing_videos`` of them are missing (never with fetch: downloaded)."""
        total, limit = self.found + self.missing, self.inputs.max_missing_videos
        if self.inputs.fetch or not total or self.missing <= limit * total:
            return None
        return (
            f"videos {self.inputs.videos}: {self.missing} of {total} {self.unit} are not there "
            f"({100 * self.missing / total:.1f}%, over --max-missing-videos {limit:g}), e.g. {self.first_missing[0]}"
            f"{'' if self.inputs.layout is Layout.CLIPS else '.<ext>'}: check --videos and --layout, or raise "
            "--max-missing-videos"
        )


def clip_name(video_id: str, clip_id: str) -> str:
    """A pre-cut clip's file name under the videos folder (as preprocess/inputs.py ``clip_file`` builds it)."""
    return f"{video_id}/{posixpath.normpath(clip_id.replace(chr(92), '/'))}"


def _clip_files(videos: str) -> set[str]:
    """The names of every file under the folder, relative to it (one recursive listing)."""
    root = storage.parse(videos).uri.rstrip("/") + "/"
    return {uri[len(root) :] for uri in storage.list_files(videos) if uri.startswith(root)}
