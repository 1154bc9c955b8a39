"""Retrieval benchmarks (MSR-VTT, DiDeMo, LSMDC, ActivityNet Captions) -> sharding-job inputs -> shards.

    python -m preprocess.downstream <dataset> --annotations DIR --videos DIR --out DIR

See docs/datasets.md for the expected annotation files and the shard text layout.
"""

from preprocess.downstream import activitynet, didemo, lsmdc, msrvtt

DATASETS = {module.NAME: module for module in (msrvtt, didemo, lsmdc, activitynet)}
"""Data set name -> converter module (NAME, FRAMES, DEFAULT_VAL_COUNT, read_splits)."""
