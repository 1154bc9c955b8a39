"""A run checkpointed at N ranks resumes at M ranks under each ZeRO stage (DeepSpeed's universal checkpoint for
the model and optimizer, the data positions remapped): over the epoch every clip is trained on exactly once,
the weights go on from the checkpoint's, and the lr schedule goes on by samples seen.

18 shards of 4 clips, 2 clips per rank and step: one epoch is 18 steps at 2 ranks; the first run stops after
step 6 (24 clips), the second reads the 48 left at M ranks (8 steps at 3 ranks, 24 at 1)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest

from tests.train.fixtures_train import TINY_CONFIG, moving_dataset, spawn_ranks, tiny_overrides
from train.config import load_config
from train.optim import lr_factor
from train.run_outputs import read_metrics

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
SHARDS, PER_SHARD, BATCH, FIRST_STEPS = 18, 4, 2, 6
EPOCH = SHARDS * PER_SHARD
LOSS_TOLERANCE = 0.15
"""Loss per nat of the global batch (loss / ln B): the two steps after the change within 15% of the two before."""


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> str:
    return moving_dataset(str(tmp_path_factory.mktemp("even")), EPOCH, seed=4, max_samples=PER_SHARD)


def overrides(run_dir: str, train: str, stage: int, *extra: str) -> list[str]:
    return tiny_overrides(
        run_dir,
        [train],
        f"zero.stage={stage}",
        "max_steps=null",
        "epochs=1",
        f"data.batch_size={BATCH}",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "checkpoint.every_steps=100",
        "log.every_steps=1",
        "log.batch_keys=true",
        "log.tensorboard=false",
        "log.plots=false",
        *extra,
    )


def train_rows(run_dir: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"}


def run(args: list[str], ranks: int) -> str:
    proc = spawn_ranks(args, nproc=ranks)
    assert proc.wait() == 0, proc.output()
    return proc.output()


@pytest.mark.parametrize(("stage", "before", "after"), [(1, 2, 3), (2, 2, 1), (3, 2, 3)])
def test_resume_at_another_world_size_reads_the_epoch_once(tmp_path, even, stage, before, after):
    run_dir = str(tmp_path / "run")
    run(overrides(run_dir, even, stage, f"stop_at_step={FIRST_STEPS}"), before)
    output = run(overrides(run_dir, even, stage), after)
    assert f"saved by {before} ranks, now {after}" in output, output
    rows = train_rows(run_dir)
    steps_after = (EPOCH - FIRST_STEPS * BATCH * before) // (BATCH * after)
    assert sorted(rows) == list(range(1, FIRST_STEPS + steps_after + 1))
    keys = [key for step in sorted(rows) for rank_keys in rows[step]["keys"] for key in rank_keys]
    counts = Counter(keys)
    assert len(keys) == EPOCH and len(counts) == EPOCH, f"{len(keys)} read, {len(counts)} distinct"
    assert [len(rows[s]["keys"]) for s in sorted(rows)] == [before] * FIRST_STEPS + [after] * steps_after
    # The contrastive loss grows with the log of the global batch; per nat of it, training goes on where it was
    normal = [rows[s]["loss"] / math.log(len(rows[s]["keys"]) * BATCH) for s in sorted(rows)]
    before_mean = sum(normal[FIRST_STEPS - 2 : FIRST_STEPS]) / 2
    after_mean = sum(normal[FIRST_STEPS : FIRST_STEPS + 2]) / 2
    print(
        json.dumps(
            {
                "stage": stage,
                "ranks": [before, after],
                "read": len(keys),
                "distinct": len(counts),
                "loss_per_nat": [round(x, 3) for x in normal],
            }
        )
    )
    assert abs(after_mean - before_mean) < LOSS_TOLERANCE * before_mean, (before_mean, after_mean)
    assert after_mean < 0.9 * normal[0], "the resumed run trains as from its initial weights"
    # the lr schedule goes on by samples seen: step s after the change sits at (24 + (s - 6) x new batch) / 4 steps
    cfg = load_config(TINY_CONFIG, ["run_dir=unused"]).optim
    first_total, clock = EPOCH // (BATCH * before), FIRST_STEPS * BATCH * before
    for step in range(FIRST_STEPS + 1, FIRST_STEPS + 3):
        at = (clock + (step - FIRST_STEPS) * BATCH * after) / (BATCH * before)
        want = lr_factor(at, first_total, cfg) / lr_factor(FIRST_STEPS, first_total, cfg)
        assert rows[step]["lr"] / rows[FIRST_STEPS]["lr"] == pytest.approx(want, rel=1e-9), step
