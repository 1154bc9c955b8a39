"""DiDeMo: paragraph-to-video retrieval; all sentences of a video are joined into one paragraph.

Files (the release's, or the original's jsonl)::

    train_data.json, val_data.json, test_data.json
        a JSON list of moments {"video": "<id>.<ext>", "description": str, "times": [...], ...};
        a record may instead carry "sentences": [str, ...]. Several moments share a video.
    train.jsonl, val.jsonl, test.jsonl
        {"clip_id": "<id>", "text": str or [str, ...]} per line.

Sentences are joined with one space, in file order, into one paragraph per video (train and test),
as the original did whenever the annotation path contained "didemo". Validation is the release's
own val split.
"""

from __future__ import annotations

from preprocess.downstream.common import (
    AnnotationError,
    SplitAnnotations,
    TextCollector,
    find_file,
    json_entries,
    read_text,
    strip_video_extension,
    text_list,
    where,
)
from preprocess.downstream.msrvtt import read_jsonl

NAME = "didemo"
FRAMES = 12
DEFAULT_VAL_COUNT = 0
FILES = {split: (f"{split}_data.json", f"{split}.json") for split in ("train", "val", "test")}
JSONL = {split: (f"{split}.jsonl",) for split in ("train", "val", "test")}


def read_splits(annotations: str, val_count: int | None) -> dict[str, SplitAnnotations]:
    """The three release splits (``val_count`` is not used: DiDeMo has its own val split)."""
    out = {}
    for split in ("train", "val", "test"):
        path = find_file(annotations, FILES[split], "", required=False)
        if path:
            out[split] = read_moments(path, split)
            continue
        path = find_file(annotations, JSONL[split], "", required=False)
        if path is None:
            raise AnnotationError(
                f"{annotations}: no DiDeMo {split} annotations; expected one of {list(FILES[split] + JSONL[split])}"
            )
        out[split] = read_jsonl(path, split, join=True)
    return out


def read_moments(path: str, split: str) -> SplitAnnotations:
    """A DiDeMo JSON list of moments -> one paragraph per video."""
    collector = TextCollector(split, join=True)
    collector.source(path)
    for index, record, line, _ in json_entries(path, read_text(path)):
        if not isinstance(record, dict):
            raise AnnotationError(f"{where(path, line)}: moment {index} is not an object")
        video = record.get("video", record.get("video_id"))
        if not isinstance(video, str) or not video.strip():
            raise AnnotationError(f"{where(path, line, 'video')}: missing or not a non-empty string")
        field_name = next((name for name in ("description", "sentences", "text") if name in record), None)
        if field_name is None:
            raise AnnotationError(f"{where(path, line, 'description')}: missing (nor 'sentences' or 'text')")
        video_id = strip_video_extension(video.strip())
        texts = text_list(record[field_name], path, line, field_name)
        for text in texts or [""]:
            collector.add(video_id, text, where(path, line))
    return collector.build()
