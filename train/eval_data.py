"""Held-out batches for the validation pass during training (train/loop.py `validate`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from pipeline.manifest import TEXT_FIELDS
from pipeline.schema import ClipSample
from pipeline.shards import ShardError
from train.config import DataConfig
from train.sample_transform import SampleTransform, decode_batch
from train.shard_sources import open_sources
from train.shard_stream import ErrorCounter
from train.tar_readers import READERS
from train.tokenizer import get_tokenizer


def eval_batches(cfg: DataConfig, rank: int, world_size: int) -> Iterator[dict]:
    """Held-out clips in source order (first eval_max_samples), split over ranks.

    Every rank gets the same number of batches of the same size (the last rank's share is padded by
    repeating a clip, marked with index -1) so ZeRO-3 forwards stay in lock-step. ``has_text`` says per clip
    which of its texts (``TEXT_FIELDS`` order) are not empty.
    """
    samples = _eval_samples(cfg, log_warnings=rank == 0)
    per_rank = math.ceil(len(samples) / world_size)
    mine = list(range(rank, len(samples), world_size))
    mine += [-1] * (per_rank - len(mine))
    transform = SampleTransform(cfg.num_frames, cfg.image_size, cfg.decoder, cfg.shuffle_frames, cfg.text_lines)
    tokenizer = get_tokenizer(cfg.context_length)
    for start in range(0, per_rank, cfg.batch_size):
        chunk = mine[start : start + cfg.batch_size]
        filled, items = decode_batch([samples[i if i >= 0 else 0] for i in chunk], transform)
        texts = [it[cfg.eval_text] for it in items]
        yield {
            "frames": filled.views()[0],
            "text": tokenizer(texts),
            "index": torch.tensor(chunk, dtype=torch.long),
            "has_text": torch.tensor([[bool(it[n].strip()) for n in TEXT_FIELDS] for it in items], dtype=torch.uint8),
        }


def _eval_samples(cfg: DataConfig, log_warnings: bool) -> list[ClipSample]:
    errors = ErrorCounter()
    out: list[ClipSample] = []
    for source in open_sources(cfg.eval, "data.eval", log_warnings=log_warnings):
        for ref in source.shards:
            try:
                for raw in READERS[cfg.tar_reader](ref.uri, ref.entry):
                    out.append(ClipSample.from_wds(raw))
                    if len(out) >= cfg.eval_max_samples:
                        return out
            except ShardError as exc:
                errors.shard(exc)
    if not out:
        raise ValueError(f"data.eval: no readable held-out clip in {cfg.eval}")
    return out
