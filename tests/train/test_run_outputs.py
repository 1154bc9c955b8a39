"""What rank 0 writes (train/run_outputs.py): the recall plot's layout, W&B offline runs, and one real training
run that logs to W&B while it reads a shard URL list from S3.

W&B runs offline (``WANDB_MODE=offline``): its run file ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` is
read back with `wandb_records`, a reader of W&B's record log (LevelDB's log format: 32 KiB blocks of
CRC-framed chunks after a 7-byte ``:W&B`` header) that hands each record to W&B's own protobuf classes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import pytest

from pipeline import storage
from tests.train.fixtures_train import moving_dataset, run_single
from tests.train.test_shard_sources import PATTERN, SIZES, write_shards
from train.config import LogConfig, TrainConfig
from train.run_layout import RunLayout
from train.run_outputs import MetricLogger, read_metrics, recall_figure, wandb_settings, write_plots

pytestmark = pytest.mark.timeout(120)

BLOCK = 32 * 1024
FULL, LAST = 1, 4


def wandb_records(path: str) -> list:
    """The records of a W&B run file, as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> list[dict]:
    """The logged rows: metric -> value, with W&B's ``_step``."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def finished_run_records(run_dir: str, timeout: float = 20.0) -> tuple[str, list]:
    """The one W&B run file under ``run_dir`` and its records, once they end with the run's exit record
    (``wandb.finish`` can return before W&B's service process has written the last records)."""
    deadline = time.monotonic() + timeout
    while True:
        found = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(found) <= 1, found
        records = wandb_records(found[0]) if found else []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return found[0], records
        assert time.monotonic() < deadline, f"no finished W&B run file under {run_dir}: {found}"
        time.sleep(0.1)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its settings, cache and data folders under tmp_path (nothing in the home folder)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    # W&B makes temp folders of its own (``tmp...wandb-media``, ``-artifacts``) and leaves them: keep them here
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))


def eval_row(step: int) -> dict:
    row = {"clips": 8}
    for i, direction in enumerate(("t2v", "v2t")):
        for k in (1, 5, 10):
            row[f"{direction}_r{k}"] = min(100.0, 10.0 * k + step + i)
            row[f"dsl/{direction}_r{k}"] = min(100.0, 12.0 * k + step + i)
        row[f"{direction}_medr"] = 3.0
    return row


def test_recall_plot_has_a_panel_per_direction_distinct_recalls_and_the_legend_outside(tmp_path):
    rows = [{"kind": "eval", "step": s, **eval_row(s)} for s in (0, 10, 20)]
    fig = recall_figure(rows)
    fig.canvas.draw()
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["text -> video", "video -> text"]
    for ax, direction in zip(axes, ("t2v", "v2t")):
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert [line.get_label() for line in solid] == ["R@1", "R@5", "R@10"]
        assert len({line.get_color() for line in solid}) == 3 and len({line.get_marker() for line in solid}) == 3
        assert [line.get_color() for line in dashed] == [line.get_color() for line in solid]  # DSL: same colour
        assert list(solid[0].get_ydata()) == [r[f"{direction}_r1"] for r in rows]
        assert list(dashed[2].get_ydata()) == [r[f"dsl/{direction}_r10"] for r in rows]
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in axes), "the legend covers a panel"
    assert [t.get_text() for t in legend.get_texts()] == ["R@1", "R@5", "R@10", "zero-shot", "with DSL"]
    # the files: loss.png and recall.png, written from metrics.jsonl at the end of a run
    run = RunLayout(str(tmp_path))
    with open(run.metrics, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [{"kind": "train", "step": 1, "loss": 2.0, "loss/s2v": 1.0}, *rows])
    assert write_plots(run) == [run.loss_plot, run.recall_plot]
    from PIL import Image

    assert Image.open(run.recall_plot).size == (1000, 400)


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_it(tmp_path, wandb_offline):
    cfg = TrainConfig(run_dir=str(tmp_path / "my-run"), log=LogConfig(wandb=True, wandb_tags=["tiny"]))
    settings = wandb_settings(cfg)
    assert (settings["project"], settings["name"], settings["tags"]) == ("vidproxy", "my-run", ["tiny"])
    assert settings["config"]["log"]["wandb"] is True
    run = RunLayout(cfg.run_dir)
    metrics = MetricLogger(run, 0, 4, 0, tensorboard=False, progress_bar=False, plots=False, wandb=settings)
    metrics.log("train", 1, {"loss": 2.5, "lr": 1e-4, "data/shard_errors": 0})
    metrics.log("train", 2, {"loss": 2.0, "lr": 1e-4, "data/shard_errors": 1})
    metrics.log("eval", 2, eval_row(2))
    metrics.close()
    with open(run.wandb_run_id) as f:
        run_id = f.read().strip()
    path, records = finished_run_records(cfg.run_dir)
    assert os.path.basename(path) == f"run-{run_id}.wandb"
    history = wandb_history(records)
    assert [(h["_step"], h["train/loss"], h["train/data/shard_errors"]) for h in history[:2]] == [
        (1, 2.5, 0),
        (2, 2.0, 1),
    ]
    assert history[-1]["eval/t2v_r1"] == 12.0 and history[-1]["eval/dsl/v2t_r5"] == 63.0
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (start.project, start.display_name, list(start.tags)) == ("vidproxy", "my-run", ["tiny"])
    assert "zero" in {item.key for item in start.config.update}
    # a later MetricLogger on the same run folder (a resumed run) continues the same W&B run
    shutil.rmtree(os.path.dirname(path))
    other = LogConfig(wandb=True, wandb_project="p2", wandb_name="named")
    again = wandb_settings(TrainConfig(run_dir=cfg.run_dir, log=other))
    metrics = MetricLogger(run, 0, 4, 2, tensorboard=False, progress_bar=False, plots=False, wandb=again)
    metrics.log("train", 3, {"loss": 1.5})
    metrics.close()
    path, records = finished_run_records(cfg.run_dir)
    assert os.path.basename(path) == f"run-{run_id}.wandb"
    assert [h["train/loss"] for h in wandb_history(records)] == [1.5]
    # ranks above 0 start no W&B run
    MetricLogger(RunLayout(str(tmp_path / "r1")), 1, 4, 0, wandb=settings).close()
    assert not os.path.exists(tmp_path / "r1")


def test_wandb_missing_is_a_one_line_config_error(tmp_path, monkeypatch, capsys):
    from train import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds without the package
    with pytest.raises(
        ValueError, match=r"^log.wandb=true but wandb is not installed: pip install -e '\.\[wandb\]' in the repository"
    ):
        wandb_settings(TrainConfig(run_dir="x", log=LogConfig(wandb=True)))
    assert wandb_settings(TrainConfig(run_dir="x")) is None
    assert main.main([f"run_dir={tmp_path}/run", "log.wandb=true", "data.train=x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: log.wandb=true but wandb is not installed: pip install -e '.[wandb]' in the repository"
    ]


@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_training_logs_to_wandb_offline_from_an_s3_shard_list(tmp_path, s3_bucket, wandb_offline):
    """A real run (one rank): train on a brace list from S3 without a manifest (counts from sizes.json),
    evaluate on two ``::``-joined held-out sources; W&B gets the same rows as metrics.jsonl."""
    local = write_shards(str(tmp_path / "ds"))
    for name in ("sizes.json", *(f"shard-{k:06d}-000.tar" for k in range(len(SIZES)))):
        storage.put_file(os.path.join(local, name), f"{s3_bucket}/ds/{name}")
    held = moving_dataset(str(tmp_path / "held"), 4, seed=2, prefix="held")
    run_dir = str(tmp_path / "run")
    done = run_single(
        [
            f"run_dir={run_dir}",
            f"data.train={s3_bucket}/ds/{PATTERN}",
            f"data.eval={held}::{s3_bucket}/ds/shard-000000-000.tar",
            "max_steps=3",
            "data.batch_size=2",
            "data.num_workers=1",
            "log.every_steps=1",
            "log.eval_every_steps=1",
            "log.progress_bar=false",
            "log.wandb=true",
            "log.wandb_project=tiny-tests",
        ]
    )
    assert done.returncode == 0, done.stderr[-6000:]
    warned = [line for line in done.stderr.splitlines() if "have no manifest entry" in line]
    assert len(warned) == 2, warned  # data.train (opened twice) and data.eval (opened at each of 3 evaluations)
    assert f"data.train: the shards of {s3_bucket}/ds/{PATTERN} (3 shards)" in warned[0]
    assert f"data.eval: the shards of {s3_bucket}/ds/shard-000000-000.tar (1 shards)" in warned[1]
    assert f"{sum(SIZES)} samples per epoch" in done.stderr
    rows = read_metrics(RunLayout(run_dir).metrics)
    history = wandb_history(finished_run_records(run_dir)[1])
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h] == [
        (r["step"], r["loss"]) for r in train_rows
    ]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in eval_rows] == [1, 2, 3] and eval_rows[-1]["clips"] == 4 + SIZES[0]
    assert [h["eval/t2v_r1"] for h in history if "eval/t2v_r1" in h] == [r["t2v_r1"] for r in eval_rows]
    assert os.path.exists(RunLayout(run_dir).recall_plot)
