"""Checkpoints of ZeRO stages 1, 2 and 3 load for evaluation, search, fine-tuning init and export.

Three real 2-rank CPU runs (tiny model, 3 steps) save a checkpoint each. ZeRO-1/2 tag folders hold
the whole model in ``mp_rank_00_model_states.pt``; ZeRO-3 splits it over the ranks' files, and
train/checkpoint.py consolidates them with DeepSpeed's zero_to_fp32 (train/engine.py). The
reference for ZeRO-1/2 is that model states file; for ZeRO-3 it is the model as a resumed run holds
it (tests/train/zero_reference.py: DeepSpeed's own checkpoint loader, parameters gathered).
A checkpoint with a file missing is refused in one line naming it.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.support.s3server import free_port
from tests.support.tiers import marks_users
from tests.train.fixtures_train import (
    PYTHON,
    TINY_CONFIG,
    log_dir_beside,
    moving_dataset,
    rank_env_of,
    spawn_ranks,
    start_ranks,
    tiny_overrides,
)
from train.checkpoint import load_model, resolve_checkpoint, stored_record
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.export import main as export_main
from train.loop import build_task
from train.model_record import model_record
from train.search import main as search_main

STAGES = (1, 2, 3)
TAG = "step000000003"


@pytest.fixture(scope="module")
@marks_users("deepspeed")
def runs(tmp_path_factory) -> dict:
    """{stage: run folder} of three 2-rank runs started at once, plus the held-out set and ZeRO-3's reference."""
    root = tmp_path_factory.mktemp("zero")
    train = moving_dataset(str(root / "train"), 16, seed=1, max_samples=8)
    held = moving_dataset(str(root / "held"), 6, seed=2, prefix="held")
    started = {
        stage: spawn_ranks(
            tiny_overrides(
                str(root / f"zero{stage}"),
                [train],
                f"zero.stage={stage}",
                "max_steps=3",
                "data.batch_size=4",
                "data.num_workers=0",
                "checkpoint.every_steps=3",
                "log.every_steps=3",
                "log.tensorboard=false",
                "log.plots=false",
            )
        )
        for stage in STAGES
    }
    for ranks in started.values():
        assert ranks.wait() == 0, ranks.output()
    out = {stage: str(root / f"zero{stage}") for stage in STAGES}
    reference = str(root / "zero3-reference.pt")
    run_reference(out[3], reference)
    return {**out, "held": held, "reference": reference}


def run_reference(run_dir: str, out: str, nproc: int = 2) -> None:
    """tests/train/zero_reference.py as ``nproc`` ranks."""
    port = free_port()
    envs = [rank_env_of(rank, nproc, port) for rank in range(nproc)]
    cmd = [PYTHON, "-m", "tests.train.zero_reference", run_dir, out]
    ranks = start_ranks(cmd, envs, log_dir_beside(out), port=port)
    assert ranks.wait() == 0, ranks.output()


def trained_weights(runs: dict, stage: int) -> dict[str, torch.Tensor]:
    """The reference: what the run trained, not read through train/checkpoint.py."""
    if stage == 3:
        return torch.load(runs["reference"], weights_only=True)
    path = os.path.join(runs[stage], "checkpoints", TAG, "mp_rank_00_model_states.pt")
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {key.removeprefix("model."): value for key, value in module.items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_loads_for_evaluation_and_fine_tuning(runs, stage, tmp_path):
    expected = trained_weights(runs, stage)
    weights, config = resolve_checkpoint(runs[stage])
    tag_dir = os.path.join(runs[stage], "checkpoints", TAG)
    assert weights == (tag_dir if stage == 3 else os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    assert config == os.path.join(runs[stage], "config.yaml")
    recorded = stored_record(weights)  # ZeRO-3: from the ranks' model states files, which hold no weights
    assert recorded == model_record(load_config(TINY_CONFIG, ["run_dir=x"]).model)
    assert (recorded["clip_model"], recorded["activation"]) == ("ViT-B-32", "quick_gelu")
    assert_same(load_model(runs[stage], device="cpu").model.state_dict(), expected)  # evaluate and search

    cfg = load_config(TINY_CONFIG, [f"run_dir={tmp_path / 'ft'}", f"model.init_checkpoint={runs[stage]}"])
    assert_same(build_task(cfg, rank=0, world_size=1).model.state_dict(), expected)  # fine-tuning init

    out = str(tmp_path / "model.safetensors")
    assert export_main([runs[stage], "--format", "safetensors", "--out", out]) == 0
    assert_same(load_file(out), expected)

    towers = str(tmp_path / "open_clip" / "vidproxy-tiny.safetensors")  # open_clip's CLIP: the clip.* tensors
    assert export_main([runs[stage], "--format", "open_clip", "--out", towers]) == 0
    assert_same(load_file(towers), {k.removeprefix("clip."): v for k, v in expected.items() if k.startswith("clip.")})


@pytest.mark.deepspeed
def test_zero3_run_through_the_evaluate_and_search_commands(runs, tmp_path, capsys):
    """train.evaluate on a ZeRO-3 run folder (the command that failed before), then train.search embed and query."""
    assert evaluate_main(["--checkpoint", runs[3], "--data", runs["held"], "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "text->video" in out and "6 videos, 6 texts" in out
    assert "zero stage" not in out  # DeepSpeed's consolidation messages go to stderr

    index = str(tmp_path / "index.parquet")
    assert search_main(["embed", "--checkpoint", runs[3], "--data", runs["held"], "--out", index, "--no-progress"]) == 0
    assert search_main(["query", "--checkpoint", runs[3], "--index", index, "--text", "the red square goes left"]) == 0


def broken_copy(runs: dict, stage: int, tmp_path, *remove: str) -> str:
    """A copy of a run with some of its files removed (paths relative to the run folder)."""
    copy = str(tmp_path / f"zero{stage}")
    shutil.copytree(runs[stage], copy)
    for name in remove:
        path = os.path.join(copy, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return copy


@pytest.mark.deepspeed
@pytest.mark.parametrize(
    "stage, remove, named",
    [
        (
            3,
            [f"checkpoints/{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ),
        (
            3,
            [f"checkpoints/{TAG}/zero_pp_rank_0_mp_rank_00_model_states.pt"],
            "zero_pp_rank_0_mp_rank_00_model_states.pt",
        ),
        (1, [f"checkpoints/{TAG}/mp_rank_00_model_states.pt"], "neither mp_rank_00_model_states.pt (ZeRO-1/2)"),
        (3, ["checkpoints/latest"], "checkpoints/latest: missing"),
        (2, [f"checkpoints/{TAG}"], f"names {TAG}, but"),
        (1, ["checkpoints"], "checkpoints: no such folder"),
    ],
)
def test_a_missing_file_is_one_line_naming_it(runs, tmp_path, capsys, stage, remove, named):
    run = broken_copy(runs, stage, tmp_path, *remove)
    code = evaluate_main(["--checkpoint", run, "--data", runs["held"], "--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and named in errors[0], errors
    cfg = load_config(TINY_CONFIG, [f"run_dir={tmp_path / 'ft'}", f"model.init_checkpoint={run}"])
    with pytest.raises(ValueError, match="model.init_checkpoint") as info:
        build_task(cfg, rank=0, world_size=1)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_a_folder_that_does_not_exist_is_named(tmp_path, capsys):
    missing = str(tmp_path / "no-such-run")
    assert evaluate_main(["--checkpoint", missing, "--data", str(tmp_path), "--no-progress"]) == 2
    assert f"checkpoint {missing}: no such file or folder" in capsys.readouterr().err
