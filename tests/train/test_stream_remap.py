"""Resume at another number of streams: the loader's positions of N ranks remapped onto M ranks read the rest
of the interrupted epoch exactly once (sample accounting on real shards, no DeepSpeed: each rank's loader runs
here in turn, as the ranks would)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.train.fixtures_train import moving_dataset
from train.config import DataConfig
from train.loader import StreamingLoader
from train.shard_sources import ShardRef
from train.shard_stream import Carry, Piece, split_carry

pytestmark = pytest.mark.timeout(180)
SHARDS, PER_SHARD, BATCH = 18, 4, 2
EPOCH = SHARDS * PER_SHARD


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> str:
    return moving_dataset(str(tmp_path_factory.mktemp("even")), EPOCH, seed=4, max_samples=PER_SHARD)


def data_cfg(train: list[str], **kw) -> DataConfig:
    base = dict(
        train=train,
        batch_size=BATCH,
        num_frames=4,
        image_size=32,
        num_workers=0,
        shards_per_window=2,
        shuffle_buffer=4,
    )
    return DataConfig(**(base | kw))


def run_ranks(cfg: DataConfig, world: int, steps: int, carry=None, saved=None) -> tuple[list[str], list[dict], dict]:
    """Every rank's keys over ``steps`` batches, its data state after them, and the (shared) carry."""
    keys, states, carries = [], [], []
    for rank in range(world):
        loader = StreamingLoader(cfg, seed=11, rank=rank, world_size=world, carry=carry, saved=saved)
        for _ in range(steps):
            keys.extend(loader.next()["keys"])
        states.append(loader.state_dict())
        carries.append(loader.carry_state())
        loader.close()
    assert all(c == carries[0] for c in carries), "ranks disagree on the carry"
    return keys, states, carries[0]


@pytest.mark.parametrize(
    ("worlds", "steps", "workers"),
    [
        ((2, 3), (6, 8), 0),  # 24 read at 2 ranks, 48 left over 3 ranks
        ((2, 1), (6, 24), 0),
        ((3, 2), (4, 12), 0),
        ((2, 3, 1), (3, 4, 18), 0),  # twice in one epoch: the carry of a carry
        ((2, 1), (4, 28), 2),  # 2 DataLoader worker processes per rank: 4 streams -> 2
    ],
)
def test_one_epoch_exactly_once_across_world_sizes(even, worlds, steps, workers):
    cfg = data_cfg([even], num_workers=workers)
    seen: list[str] = []
    carry, saved = None, None
    for world, count in zip(worlds, steps):
        keys, saved, carry = run_ranks(cfg, world, count, carry, saved if seen else None)
        seen.extend(keys)
    counts = Counter(seen)
    assert len(seen) == EPOCH, f"{len(seen)} samples read"
    assert len(counts) == EPOCH, "a clip was skipped"
    assert max(counts.values()) == 1, f"read twice: {[k for k, n in counts.items() if n > 1]}"


def test_after_the_carry_the_next_epoch_is_whole(even):
    """2 -> 3 ranks mid-epoch, then the new run reads the rest and the whole next epoch: each clip twice."""
    cfg = data_cfg([even])
    first, saved, carry = run_ranks(cfg, 2, 6)
    rest, _, _ = run_ranks(cfg, 3, 8 + EPOCH // (3 * BATCH), carry, saved)
    assert set(Counter(first + rest).values()) == {2}


def test_same_world_size_resume_is_unchanged(even):
    """Without a change the plan has no carry and resume is the position as before (the exact path)."""
    cfg = data_cfg([even])
    straight, _, _ = run_ranks(cfg, 2, 10)
    loaders = [StreamingLoader(cfg, seed=11, rank=r, world_size=2) for r in range(2)]
    halves = [[k for _ in range(4) for k in loader.next()["keys"]] for loader in loaders]
    states = [loader.state_dict() for loader in loaders]
    assert loaders[0].carry_state() == Carry().state_dict()
    resumed = [StreamingLoader(cfg, seed=11, rank=r, world_size=2, state=states[r]) for r in range(2)]
    rest = [[k for _ in range(6) for k in loader.next()["keys"]] for loader in resumed]
    assert halves[0] + rest[0] + halves[1] + rest[1] == straight


def test_unknown_sample_counts_refuse_a_remap(even, tmp_path):
    import os
    import shutil

    bare = str(tmp_path / "bare")
    shutil.copytree(even, bare)
    os.remove(os.path.join(bare, "manifest.json"))
    if os.path.exists(os.path.join(bare, "sizes.json")):
        os.remove(os.path.join(bare, "sizes.json"))
    cfg = data_cfg([f"{bare}/part{{00..17}}-000.tar"], train_num_samples=EPOCH)
    _, saved, carry = run_ranks(cfg, 2, 3)
    with pytest.raises(ValueError, match="cannot resume at another number of streams.*no sample count"):
        StreamingLoader(cfg, seed=11, rank=0, world_size=3, carry=carry, saved=saved)


def test_split_carry_cuts_equal_runs_in_order():
    pieces = [Piece(p, ShardRef(f"s{p}", n)) for p, n in [(0, 5), (3, 4), (7, 3)]]
    runs = split_carry(pieces, 3)
    flat = [[(piece.position, i) for piece in run for i in piece.indices()] for run in runs]
    assert [len(run) for run in flat] == [4, 4, 4]
    assert sum(flat, []) == [(p.position, i) for p in pieces for i in range(p.samples)]
    assert split_carry(pieces[:1], 8)[0] == [] and sum(len(r) for r in split_carry(pieces[:1], 8)) == 5
