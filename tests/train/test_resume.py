"""Kill a 2-rank run (ZeRO-1 and ZeRO-3; SIGKILL, 2 DataLoader workers per rank) after a checkpoint and resume it:
the same batches and the same losses (fp32, CPU) as a run that was never stopped. The shards are
uneven (5, 9, 3, 8, 5 clips), so this is also the uneven-shards run under DeepSpeed."""

from __future__ import annotations

import os

import pytest

from tests.train.fixtures_train import moving_dataset, shm_buffers, spawn_ranks, tiny_overrides
from train.run_outputs import read_metrics

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]
STEPS = 6
EVERY = 2
KILL_AT = 3  # step 2 is checkpointed (by all ranks) before step 3 is logged


def by_step(run_dir: str) -> dict[int, dict]:
    """Last train row per step (a killed run may have logged steps that are then redone)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: r for r in read_metrics(path) if r["kind"] == "train"}


def kill_after_step(run_dir: str, step: int, ranks) -> None:
    ranks.wait_until(lambda: ranks.poll() or any(s >= step for s in by_step(run_dir)), poll=0.02)
    if not any(s >= step for s in by_step(run_dir)):
        raise AssertionError(f"run ended before step {step}:\n{ranks.output()}")
    ranks.kill()


@pytest.mark.parametrize("stage", [1, 3])
def test_kill_and_resume_gives_identical_batches_and_losses(tmp_path, stage):
    train = moving_dataset(str(tmp_path / "train"), 30, seed=7, shard_sizes=[5, 9, 3, 8, 5])
    common = (
        f"zero.stage={stage}",
        f"max_steps={STEPS}",
        "data.batch_size=3",
        "data.num_workers=2",
        f"checkpoint.every_steps={EVERY}",
        "log.every_steps=1",
        "log.batch_digests=true",
        "log.tensorboard=false",
        "log.plots=false",
    )
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    uninterrupted = spawn_ranks(tiny_overrides(reference, [train], *common))
    assert uninterrupted.wait() == 0, uninterrupted.output()

    first = spawn_ranks(tiny_overrides(killed, [train], *common))
    kill_after_step(killed, KILL_AT, first)
    assert not shm_buffers(first.port), "killed ranks left DeepSpeed's comm buffers in /dev/shm"
    assert max(by_step(killed)) < STEPS, "the run finished before it was killed"
    latest = open(os.path.join(killed, "checkpoints", "latest")).read().strip()
    assert latest in (f"step{EVERY:09d}", f"step{2 * EVERY:09d}")
    second = spawn_ranks(tiny_overrides(killed, [train], *common))
    assert second.wait() == 0, second.output()
    assert "resumed from" in second.output() and latest in second.output()

    want, got = by_step(reference), by_step(killed)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step]["digests"] == want[step]["digests"], f"step {step}: different batches"
        for key in [k for k in want[step] if k.startswith("loss")]:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6, abs=1e-7), (step, key)
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9)
        assert got[step]["logit_scale"] == pytest.approx(want[step]["logit_scale"], rel=1e-6)
