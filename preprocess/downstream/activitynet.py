"""ActivityNet Captions: paragraph-to-video retrieval over whole videos, 32 frames per video.

Files: ``train.json`` and ``val_1.json`` of the release, each
``{"v_<id>": {"duration": s, "timestamps": [[s, e], ...], "sentences": [str, ...]}}``.
The sentences of a video are joined (one space, file order) into one paragraph: the original
left them as a list, which is why users got R@1 of about 20 instead of about 50.

Test is ``val_1`` (the usual convention). ``val_2`` annotates the same videos as ``val_1``, so it
cannot serve for model selection; validation is instead ``val_count`` train videos (default 500)
held out by the hash of their id. Video files may be named with or without the ``v_`` prefix.
"""

from __future__ import annotations

from preprocess.downstream.common import (
    AnnotationError,
    SplitAnnotations,
    TextCollector,
    find_file,
    hold_out,
    json_entries,
    read_text,
    subset,
    text_list,
    where,
)

NAME = "activitynet"
FRAMES = 32
DEFAULT_VAL_COUNT = 500
TRAIN = ("train.json",)
TEST = ("val_1.json", "val1.json")


def read_splits(annotations: str, val_count: int | None) -> dict[str, SplitAnnotations]:
    count = DEFAULT_VAL_COUNT if val_count is None else val_count
    train = read_captions(find_file(annotations, TRAIN, "ActivityNet train json"), "train")
    kept, held = hold_out([item.clip_id for item in train.items], count)
    test = read_captions(find_file(annotations, TEST, "ActivityNet val_1 json"), "test")
    return {"train": subset(train, kept, "train"), "val": subset(train, held, "val"), "test": test}


def read_captions(path: str, split: str) -> SplitAnnotations:
    """``{video_id: {duration, timestamps, sentences}}`` -> one paragraph per video."""
    collector = TextCollector(split, join=True)
    collector.source(path)
    for video_id, record, line, _ in json_entries(path, read_text(path)):
        if not isinstance(video_id, str) or not isinstance(record, dict):
            raise AnnotationError(
                f"{where(path, line)}: entry {video_id!r} is not a {{video_id: {{...}}}} object; "
                "is this an ActivityNet Captions file?"
            )
        if "sentences" not in record:
            raise AnnotationError(f"{where(path, line, 'sentences')}: missing in video {video_id!r}")
        sentences = text_list(record["sentences"], path, line, "sentences")
        duration = record.get("duration")
        if duration is not None and (
            isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0
        ):
            raise AnnotationError(f"{where(path, line, 'duration')}: {duration!r} is not a positive number")
        for sentence in sentences or [""]:
            collector.add(video_id, sentence, where(path, line))
    return collector.build()
