"""LSMDC: the 101k training clips, the val clips and the 1k public test, from the tab-separated csv files.

Each line of ``LSMDC16_annos_training.csv``, ``LSMDC16_annos_val.csv`` and
``LSMDC16_challenge_1000_publictect.csv`` is::

    clip_id <TAB> start_aligned <TAB> end_aligned <TAB> start_extracted <TAB> end_extracted <TAB> sentence

The clips are distributed pre-cut (``<clip_id>.avi``), so each clip is a whole video here and the
times are only checked to be present. A clip id seen on several lines gets all their sentences.
"""

from __future__ import annotations

from preprocess.downstream.common import AnnotationError, SplitAnnotations, TextCollector, find_file, read_text, where

NAME = "lsmdc"
FRAMES = 12
DEFAULT_VAL_COUNT = 0
FIELDS = ("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "sentence")
FILES = {
    "train": ("LSMDC16_annos_training.csv", "train.csv", "train.tsv"),
    "val": ("LSMDC16_annos_val.csv", "val.csv", "val.tsv"),
    "test": ("LSMDC16_challenge_1000_publictect.csv", "LSMDC16_annos_test.csv", "test.csv", "test.tsv"),
}


def read_splits(annotations: str, val_count: int | None) -> dict[str, SplitAnnotations]:
    """train / val / test from the release files (``val_count`` is not used: LSMDC has a val split)."""
    return {
        split: read_tsv(find_file(annotations, names, f"LSMDC {split} csv"), split) for split, names in FILES.items()
    }


def read_tsv(path: str, split: str) -> SplitAnnotations:
    collector = TextCollector(split)
    collector.source(path)
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        if len(fields) < len(FIELDS):
            missing = FIELDS[len(fields)]
            raise AnnotationError(
                f"{where(path, number, missing)}: missing; expected {len(FIELDS)} tab-separated "
                f"fields {list(FIELDS)}, got {len(fields)}"
            )
        for index, name in enumerate(FIELDS[:5]):
            if not fields[index].strip():
                raise AnnotationError(f"{where(path, number, name)}: empty")
        collector.add(fields[0].strip(), "\t".join(fields[5:]), where(path, number))
    if not collector.ids():
        raise AnnotationError(f"{path}: no annotation lines")
    return collector.build()
