"""Shard errors in the training stream (train/shard_errors.py) on the loopback S3 server (moto, checking
credentials): a deleted object and one the credentials may not read (a real 403 AccessDenied: an IAM policy
denies its GetObject) are each counted, logged in one line naming the shard and the cause, and skipped; the loader
resumes exactly after them; two DeepSpeed ranks train through them; data.max_shard_errors stops both ranks."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest

from pipeline import storage
from pipeline.layout import index_name
from tests.support.s3server import free_port
from tests.train.fixtures_train import moving_dataset, spawn_ranks, tiny_overrides
from train.config import DataConfig
from train.loader import StreamingLoader
from train.run_outputs import read_metrics
from train.shard_errors import TooManyShardErrors, check_limit, parse_limit, per_epoch
from train.shard_sources import ShardRef
from train.shard_stream import ErrorCounter, Piece, ShardPlan, seeded, window_samples

SKIP = "skipping the rest of a shard: "


def data_cfg(train: list[str], **kw) -> DataConfig:
    base = dict(train=train, batch_size=3, num_frames=4, image_size=32, num_workers=0, shards_per_window=2)
    return DataConfig(**{**base, "shuffle_buffer": 4, **kw})


def take(loader: StreamingLoader, n: int) -> list[dict]:
    batches = [loader.next() for _ in range(n)]
    loader.close()
    return batches


def skipped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(SKIP)]


def missing_line(uri: str) -> str:
    return f"{SKIP}{uri}: shard missing ({uri}: no such object)"


def refused_line(uri: str) -> str:
    why = "these credentials lack the permission: check the bucket policy or the IAM role"
    return f"{SKIP}{uri}: access denied by S3 (AccessDenied): {why}"


def test_the_limit_setting():
    assert parse_limit("10") == (10, None) and parse_limit("5%") == (None, 5.0) and parse_limit(" 0 ") == (0, None)
    for bad in ("ten", "-1", "101%", "5 %%", ""):
        with pytest.raises(ValueError, match="data.max_shard_errors: a count"):
            parse_limit(bad)
    assert DataConfig(max_shard_errors=10).max_shard_errors == "10"  # YAML's 10 is a number
    assert DataConfig().max_shard_errors == "5%"
    with pytest.raises(ValueError, match="data.max_shard_errors"):
        DataConfig(max_shard_errors="lots")
    assert [per_epoch("5%", n) for n in (1, 6, 20, 21, 200)] == [1, 1, 1, 2, 10]  # rounded up to whole shards
    assert per_epoch("0%", 200) == 0 and per_epoch("7", 3) == 7


def test_the_limit_check_counts_epochs_begun_and_names_the_last_errors():
    asked = []

    def begun(n: int):
        return lambda: asked.append("begun") or n

    def recent():
        asked.append("recent")
        return [["a: 1", "a: 2", "a: 3", "a: 4"], ["b: 1"]]

    check_limit(10, "5%", 200, begun(1), recent)  # within one epoch's allowance: no collective at all
    assert asked == []
    check_limit(20, "5%", 200, begun(201), recent)  # 2 epochs begun: 20 allowed
    assert asked == ["begun"]
    with pytest.raises(TooManyShardErrors) as raised:
        check_limit(21, "5%", 200, begun(400), recent)
    assert str(raised.value) == (
        "21 shard errors over all ranks, more than data.max_shard_errors=5% allows (20: 5% of 200 shards per epoch, "
        "2 epoch(s) begun); the last: a: 2 | a: 3 | a: 4 | b: 1"
    )


@pytest.fixture
def s3_data(s3_server, s3_bucket):
    """8 shards of 3 clips on S3; part02 deleted, part05 refused (403) while the test runs."""
    root = moving_dataset(f"{s3_bucket}/ds", 24, seed=5, max_samples=3)
    deleted, refused = f"{root}/part02-000.tar", f"{root}/part05-000.tar"
    storage.delete(deleted)
    with s3_server.refused(refused):
        yield root, deleted, refused


def test_deleted_and_refused_s3_shards_are_skipped_counted_and_resume_exactly(s3_data, caplog):
    root, deleted, refused = s3_data
    cfg = data_cfg([root], max_shard_errors="50%")
    loader = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
    # 12 batches of 3 = 36 rows: exactly two epochs of the 18 readable clips (4 windows of 2 shards an epoch,
    # each drained whole), so each bad shard was met exactly twice
    batches = take(loader, 12)
    bad = {f"clip{i}%2E0%2Emp4" for i in (6, 7, 8, 15, 16, 17)}
    good = {f"clip{i}%2E0%2Emp4" for i in range(24)} - bad
    assert Counter(k for b in batches for k in b["keys"]) == dict.fromkeys(good, 2)
    assert loader.errors() == (4, 0)
    lines = skipped(caplog)
    assert Counter(lines) == {missing_line(deleted): 2, refused_line(refused): 2}
    assert loader.recent_shard_errors == [line.removeprefix(SKIP) for line in lines]

    caplog.clear()
    for stop in (1, 2, 4, 6, 9):  # resumed inside windows that hold a bad shard and inside ones that do not
        first = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
        take(first, stop)
        resumed = StreamingLoader(cfg, seed=0, rank=0, world_size=1, state=first.state_dict())
        assert [b["digest"] for b in take(resumed, 12 - stop)] == [b["digest"] for b in batches[stop:]]
        assert resumed.errors() == (4, 0), f"resumed after batch {stop}: a bad shard counted twice or not at all"
    assert len(skipped(caplog)) == 5 * 4, "a bad shard met again on the way to the resumed position is logged again"


def test_an_unreachable_endpoint_is_a_shard_error(s3_bucket, monkeypatch, caplog):
    """Nothing listens where the S3 endpoint should be: after botocore's retries the shard is given up in one line
    naming it and the cause (here its sample index, read first). Two attempts, not the default six: botocore's
    back-off between them (up to 1, 2, 4, 8, 16 s) would be most of the test's time."""
    root = moving_dataset(f"{s3_bucket}/ds", 3, seed=2, max_samples=3)
    ref = StreamingLoader(data_cfg([root]), seed=0, rank=0, world_size=1).dataset.plan.shards[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage.reset_clients()
    errors = ErrorCounter()
    try:
        assert list(window_samples([Piece(0, ref)], seeded(0), 1, errors)) == []
    finally:
        monkeypatch.undo()
        storage.reset_clients()
    assert errors.shard_errors == 1
    [line] = skipped(caplog)
    cause = f"{index_name(ref.uri)}: cannot reach the S3 endpoint: Could not connect to the endpoint URL"
    assert line.startswith(f"{SKIP}{ref.uri}: {cause}"), line


def test_a_directory_in_a_shards_place_is_a_shard_error_and_a_bug_is_not(tmp_path, caplog):
    root = moving_dataset(str(tmp_path / "ds"), 6, seed=1, max_samples=3)
    os.remove(os.path.join(root, "part01-000.tar"))
    os.mkdir(os.path.join(root, "part01-000.tar"))
    loader = StreamingLoader(data_cfg([root], max_shard_errors="1"), seed=0, rank=0, world_size=1)
    assert sorted(k for b in take(loader, 1) for k in b["keys"]) == [f"clip{i}%2E0%2Emp4" for i in range(3)]
    uri = os.path.join(root, "part01-000.tar")
    assert skipped(caplog) == [f"{SKIP}{uri}: is a directory, not a file"] and loader.errors() == (1, 0)
    errors = ErrorCounter()
    bug = [Piece(0, ShardRef(os.path.join(root, "part00-000.tar"), 3, entry="not a manifest entry"))]
    with pytest.raises(AttributeError, match="index_xxh3_64"):
        list(window_samples(bug, seeded(0), 4, errors))
    assert errors.shard_errors == 0


# ----------------------------------------------------------------------------- two DeepSpeed ranks


def ranks_run(run_dir: str, train: str, *extra: str):
    common = (
        "zero.stage=1",
        "data.batch_size=4",
        "data.num_workers=1",
        "data.shards_per_window=2",
        "log.tensorboard=false",
        "log.plots=false",
    )
    return spawn_ranks(tiny_overrides(run_dir, [train], *common, *extra))


def mid_epoch_shards(root: str) -> list[str]:
    """One shard of each stream's second window in epoch 0 (2 ranks x 1 worker, 2 shards a window)."""
    loader = StreamingLoader(data_cfg([root]), seed=0, rank=0, world_size=2)
    plan: ShardPlan = loader.dataset.plan
    return [plan.window(stream, 1, 2)[0].ref.uri for stream in (0, 1)]


def replay(root: str, rank: int, steps: int) -> list[tuple[str, int]]:
    """(batch digest, shard errors so far) of each step of ``rank`` in a 2-rank run, read here: the same streams
    (data.num_workers 0 or 1: one stream a rank) and the tiny config's data settings."""
    loader = StreamingLoader(data_cfg([root], batch_size=4, shuffle_buffer=32), seed=0, rank=rank, world_size=2)
    out = [(loader.next()["digest"], loader.errors()[0]) for _ in range(steps)]
    loader.close()
    return out


@pytest.mark.deepspeed
@pytest.mark.slow
def test_two_ranks_train_through_a_deleted_and_a_refused_s3_shard_and_resume_exactly(s3_server, s3_bucket, tmp_path):
    """Stopped after the first epoch (step 3 of 6: 24 readable clips, 8 a step) and resumed: each step's batches
    are those the loader gives each rank uninterrupted, and the error count goes on from the checkpoint's."""
    root = moving_dataset(f"{s3_bucket}/train", 32, seed=6, max_samples=4)
    deleted, refused = mid_epoch_shards(root)
    storage.delete(deleted)
    run_dir = str(tmp_path / "run")
    common = ("max_steps=6", "log.every_steps=1", "log.batch_digests=true", "data.max_shard_errors=50%")
    with s3_server.refused(refused):
        first = ranks_run(run_dir, root, *common, "stop_at_step=3")
        assert first.wait() == 0, first.output()
        second = ranks_run(run_dir, root, *common)
        assert second.wait() == 0, second.output()
        want = [replay(root, rank, 6) for rank in (0, 1)]
    assert "resumed from" in second.output()
    rows = {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"}
    assert sorted(rows) == list(range(1, 7))
    for step, row in rows.items():
        assert row["digests"] == [[want[rank][step - 1][0]] for rank in (0, 1)], f"step {step}: other batches"
        assert row["data/shard_errors"] == want[0][step - 1][1] + want[1][step - 1][1], step
    assert rows[3]["data/shard_errors"] >= 2 and rows[6]["data/shard_errors"] >= 4  # each bad shard once an epoch
    lines = set(re.findall(rf"{SKIP}.*", first.output() + second.output()))
    assert lines == {missing_line(deleted), refused_line(refused)}, first.output() + second.output()


@pytest.mark.deepspeed
@pytest.mark.slow
def test_max_shard_errors_stops_both_ranks_in_one_line(tmp_path):
    """Each stream's first window holds a missing shard; a shuffle buffer larger than the window drains it
    whole before the first batch, so each rank's first batch comes after its error: 2 errors at step 1."""
    root = moving_dataset(str(tmp_path / "train"), 32, seed=6, max_samples=4)
    loader = StreamingLoader(data_cfg([root]), seed=0, rank=0, world_size=2)
    first = [loader.dataset.plan.window(stream, 0, 2)[0].ref.uri for stream in (0, 1)]
    for uri in first:
        os.remove(uri)
    run_dir = str(tmp_path / "run")
    ranks = ranks_run(
        run_dir, root, "max_steps=6", "log.every_steps=1", "data.shuffle_buffer=16", "data.max_shard_errors=1"
    )
    assert ranks.wait() == 3, ranks.output()
    said = (
        "training stopped: 2 shard errors over all ranks, more than data.max_shard_errors=1 allows (1: 1 of 8 shards "
        f"per epoch, 1 epoch(s) begun); the last: {first[0]}: shard missing ({first[0]}: no such file) | "
        f"{first[1]}: shard missing ({first[1]}: no such file)"
    )
    logs = ranks.output().split("--- rank ")
    assert len(logs) == 3 and all(said in log for log in logs[1:]), ranks.output()
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert [(r["step"], r["data/shard_errors"]) for r in rows] == [(1, 2)]
