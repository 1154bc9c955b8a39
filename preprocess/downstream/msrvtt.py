"""MSR-VTT: the 9k train list / 1k-A (JSFusion) test split, from either of the two usual layouts.

Layout A (the raw release plus the JSFusion split files)::

    MSRVTT_data.json          {"videos": [{"video_id", ...}], "sentences": [{"video_id", "caption"}]}
    MSRVTT_train.9k.csv       the 9k train video ids (csv with a video_id header, or one id per line:
                              train_list_jsfusion.txt)
    MSRVTT_JSFUSION_test.csv  key,vid_key,video_id,sentence (1000 rows, one sentence per video)

Layout B (the original's jsonl, HD-VILA data.zip): ``train9k.jsonl`` and ``test1ka.jsonl`` with
``{"clip_id", "text"}`` per line, text a string or a list; optional ``val.jsonl``.

Train videos get every caption (about 20), one per line; a test video gets its one sentence.
Validation: ``val_count`` train videos (default 500) are held out, chosen by the hash of their id.
"""

from __future__ import annotations

import csv
import io

from preprocess.downstream.common import (
    AnnotationError,
    SplitAnnotations,
    TextCollector,
    find_file,
    hold_out,
    json_entries,
    jsonl_records,
    need_str,
    read_text,
    split_from,
    strip_video_extension,
    subset,
    text_list,
    where,
)

NAME = "msrvtt"
FRAMES = 12
DEFAULT_VAL_COUNT = 500
DATA_JSON = ("MSRVTT_data.json",)
TRAIN_LISTS = ("MSRVTT_train.9k.csv", "train_list_jsfusion.txt", "train_9k.txt")
TEST_CSVS = ("MSRVTT_JSFUSION_test.csv",)
TRAIN_JSONL = ("train9k.jsonl", "train.jsonl")
TEST_JSONL = ("test1ka.jsonl", "test.jsonl")
VAL_JSONL = ("val.jsonl",)


def read_splits(annotations: str, val_count: int | None) -> dict[str, SplitAnnotations]:
    """train / val / test annotations from whichever layout the folder holds."""
    count = DEFAULT_VAL_COUNT if val_count is None else val_count
    if find_file(annotations, TRAIN_JSONL, "", required=False):
        return _jsonl_layout(annotations, count)
    if find_file(annotations, DATA_JSON, "", required=False):
        return _json_layout(annotations, count)
    raise AnnotationError(
        f"{annotations}: no MSR-VTT annotations; expected {DATA_JSON[0]} with one of "
        f"{list(TRAIN_LISTS)} and {TEST_CSVS[0]}, or {TRAIN_JSONL[0]} and {TEST_JSONL[0]}"
    )


# --------------------------------------------------------------------------- layout A


def _json_layout(annotations: str, val_count: int) -> dict[str, SplitAnnotations]:
    data_path = find_file(annotations, DATA_JSON, "MSR-VTT data json")
    captions = _read_data_json(data_path)
    train_ids = _read_train_list(find_file(annotations, TRAIN_LISTS, "9k train list"))
    unknown = [v for v in train_ids if v not in captions.ids()]
    if unknown:
        raise AnnotationError(
            f"{data_path}: {len(unknown)} videos of the train list have no sentence "
            f"(e.g. {unknown[:3]}); is this the right MSRVTT_data.json?"
        )
    kept, held = hold_out(train_ids, val_count)
    splits = {"train": split_from(captions, kept, "train"), "val": split_from(captions, held, "val")}
    splits["test"] = _read_test_csv(find_file(annotations, TEST_CSVS, "1k-A test csv"))
    return splits


def _read_data_json(path: str) -> TextCollector:
    text = read_text(path)
    collector = TextCollector("all")
    collector.source(path)
    sections = {key: pos for key, _, _, pos in json_entries(path, text)}
    if "sentences" not in sections:
        raise AnnotationError(
            f'{where(path, 1, "sentences")}: missing; expected {{"videos": [...], "sentences": [...]}}'
        )
    for index, record, line, _ in json_entries(path, text, sections["sentences"]):
        if not isinstance(record, dict):
            raise AnnotationError(f"{where(path, line)}: sentence {index} is not an object")
        video_id = need_str(record, "video_id", path, line)
        collector.add(video_id, need_str(record, "caption", path, line, allow_empty=True), where(path, line))
    return collector


def _read_train_list(path: str) -> list[str]:
    ids = []
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
        value = raw.strip().split(",")[0].strip()
        if not value or (number == 1 and value == "video_id"):
            continue
        if " " in value:
            raise AnnotationError(f"{where(path, number, 'video_id')}: {value!r} is not a video id")
        ids.append(value)
    if not ids:
        raise AnnotationError(f"{path}: the train list is empty")
    return ids


def _read_test_csv(path: str) -> SplitAnnotations:
    collector = TextCollector("test")
    collector.source(path)
    rows = csv.reader(io.StringIO(read_text(path)))
    header = next(rows, None)
    wanted = ("video_id", "sentence")
    if header is None or any(name not in header for name in wanted):
        raise AnnotationError(
            f"{where(path, 1)}: header {header} lacks {list(wanted)} (expected key,vid_key,video_id,sentence)"
        )
    column = {name: header.index(name) for name in wanted}
    for number, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise AnnotationError(f"{where(path, number)}: {len(row)} columns, the header has {len(header)}")
        video_id = row[column["video_id"]].strip()
        if not video_id:
            raise AnnotationError(f"{where(path, number, 'video_id')}: empty")
        collector.add(video_id, row[column["sentence"]], where(path, number))
    return collector.build()


# --------------------------------------------------------------------------- layout B


def read_jsonl(path: str, name: str, join: bool = False) -> SplitAnnotations:
    """``{clip_id, text}`` lines (text a string or a list) -> one entry per clip id."""
    collector = TextCollector(name, join=join)
    collector.source(path)
    for line, record in jsonl_records(path, read_text(path)):
        clip_id = strip_video_extension(need_str(record, "clip_id", path, line).rsplit("/", 1)[-1])
        if "text" not in record:
            raise AnnotationError(f"{where(path, line, 'text')}: missing")
        texts = text_list(record["text"], path, line, "text")
        if not texts:
            collector.add(clip_id, "", where(path, line))
        for text in texts:
            collector.add(clip_id, text, where(path, line))
    return collector.build()


def _jsonl_layout(annotations: str, val_count: int) -> dict[str, SplitAnnotations]:
    train = read_jsonl(find_file(annotations, TRAIN_JSONL, "train jsonl"), "train")
    test = read_jsonl(find_file(annotations, TEST_JSONL, "test jsonl"), "test")
    val_path = find_file(annotations, VAL_JSONL, "val jsonl", required=False)
    if val_path:
        return {"train": train, "val": read_jsonl(val_path, "val"), "test": test}
    kept, held = hold_out([item.clip_id for item in train.items], val_count)
    return {"train": subset(train, kept, "train"), "val": subset(train, held, "val"), "test": test}
