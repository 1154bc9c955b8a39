"""Fine-tuning: MSR-VTT-style annotations + real videos -> shards -> 2 gloo ranks from an init checkpoint ->
evaluate."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from preprocess.downstream.__main__ import main as convert_main
from tests.downstream.test_converters import (
    SMALL,
    VIDEOS,
    _ffmpeg_video,
    msrvtt_annotations,
    ray_local,  # noqa: F401 (fixture)
)
from tests.train.fixtures_train import COMBOS, PYTHON, REPO, TINY_CONFIG, env, moving_clip, spawn_ranks, tiny_overrides
from train.checkpoint import load_init_checkpoint
from train.config import load_config
from train.loop import build_task
from train.model import VideoCLIPConfig, build_model
from train.sample_transform import SampleTransform, pick_line
from train.shard_stream import seeded


@pytest.fixture(scope="module")
def msrvtt_videos(tmp_path_factory):
    """Only the MSR-VTT videos of test_converters' set (video1..video5)."""
    folder = tmp_path_factory.mktemp("videos")
    for i in range(1, 6):
        _ffmpeg_video(folder / f"video{i}.mp4", VIDEOS[f"video{i}"])
    return folder


def tiny_model(seed: int, *overrides: str):
    cfg = load_config(TINY_CONFIG, ["run_dir=unused", *overrides])
    torch.manual_seed(seed)
    return build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))


def save_tiny_state(path, seed: int = 7, *overrides: str) -> str:
    torch.save(tiny_model(seed, *overrides).state_dict(), path)
    return str(path)


def test_finetune_options_are_validated():
    cfg = load_config(
        TINY_CONFIG, ["run_dir=x", "model.loss=infonce", "data.train_text=caption", "data.text_lines=sample"]
    )
    assert (cfg.model.loss, cfg.data.train_text, cfg.data.text_lines) == ("infonce", "caption", "sample")
    assert "init_checkpoint" not in cfg.model.video_clip_kwargs()
    for override, field in (
        ("data.text_lines=some", "data.text_lines"),
        ("data.train_text=title", "data.train_text"),
        ("model.loss=nce", "model.loss"),
    ):
        with pytest.raises(ValueError, match=field):
            load_config(TINY_CONFIG, ["run_dir=x", override])


def test_sampled_lines_are_seeded_and_evaluation_takes_the_first():
    text = "first line\n\n  second line \nthird line\n"
    picks = [pick_line(text, seeded(0, 0, 0, offset, 2)) for offset in range(40)]
    assert set(picks) == {"first line", "second line", "third line"}
    assert picks == [pick_line(text, seeded(0, 0, 0, offset, 2)) for offset in range(40)]
    assert pick_line(text, None) == "first line" and pick_line(" \n", None) == ""
    clip = moving_clip(0, COMBOS[0], np.random.default_rng(0), num_frames=4)
    clip = clip.__class__(meta=clip.meta, frames=clip.frames, subtitle="a\nb\nc", caption="only")
    sample = SampleTransform(4, 32, text_lines="sample")
    whole = SampleTransform(4, 32, text_lines="all")
    assert sample(clip, None)["subtitle"] == "a" and whole(clip, None)["subtitle"] == "a\nb\nc"
    trained = [sample(clip, seeded(1, 0, 0, o, 2))["subtitle"] for o in range(20)]
    assert set(trained) == {"a", "b", "c"}
    # frame jitter is drawn before the line, so sampling lines does not change the frames chosen
    assert sample(clip, seeded(5))["indices"] == whole(clip, seeded(5))["indices"]


def test_init_checkpoint_loads_strictly_and_lists_mismatched_tensors(tmp_path):
    saved = save_tiny_state(tmp_path / "tiny.pt", 7)
    cfg = load_config(TINY_CONFIG, [f"run_dir={tmp_path}/run", f"model.init_checkpoint={saved}", "model.loss=infonce"])
    task = build_task(cfg, 0, 1)
    expected = tiny_model(7).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in task.model.state_dict().items())
    assert task.loss.features == ("video", "text")
    wider = save_tiny_state(tmp_path / "wider.pt", 7, "model.clip_overrides.embed_dim=48")
    with pytest.raises(ValueError, match=r"model.init_checkpoint.*mismatched.*text_projection"):
        load_init_checkpoint(tiny_model(0), wider)
    with pytest.raises(ValueError, match="model.init_checkpoint.*no such file"):
        load_init_checkpoint(tiny_model(0), str(tmp_path / "absent.pt"))


@pytest.mark.ray
def test_convert_finetune_two_ranks_then_evaluate(ray_local, msrvtt_videos, tmp_path):  # noqa: F811
    ann, out = msrvtt_annotations(tmp_path / "ann"), tmp_path / "msrvtt"
    assert (
        convert_main(
            [
                "msrvtt",
                "--annotations",
                str(ann),
                "--videos",
                str(msrvtt_videos),
                "--out",
                str(out),
                "--val-count",
                "1",
                "--frames",
                "4",
                *SMALL,
            ]
        )
        == 0
    )
    init = save_tiny_state(tmp_path / "post-pretrained.pt", 7)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        str(run_dir),
        [str(out / "train")],
        "model.loss=infonce",
        "data.text_lines=sample",
        "data.train_text=subtitle",
        f"model.init_checkpoint={init}",
        "data.batch_size=2",
        "data.num_workers=0",
        "max_steps=3",
        "checkpoint.every_steps=3",
        "log.every_steps=1",
        "log.tensorboard=false",
        "log.plots=false",
        eval_=[str(out / "val")],
    )
    ranks = spawn_ranks(overrides, nproc=2)
    assert ranks.wait() == 0, ranks.output()
    log = ranks.output()
    assert "fine-tuning from" in log and "post-pretrained.pt" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss/v2t"]) and np.isfinite(r["loss/t2v"]) for r in train_rows)
    assert [r["clips"] for r in rows if r["kind"] == "eval"] == [1]  # the val split: one video
    assert (run_dir / "checkpoints" / "latest").read_text().strip()
    result = tmp_path / "test.json"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "train.evaluate",
            "--checkpoint",
            str(run_dir),
            "--data",
            str(out / "test"),
            "--out",
            str(result),
            "--no-progress",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(result.read_text())
    assert results["videos"] == 2 and results["texts"] == 2  # video4 ("cars, driving") and video5
    assert 1 <= results["t2v_medr"] <= 2 and "dsl/t2v_r1" in results
