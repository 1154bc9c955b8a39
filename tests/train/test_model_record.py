"""A checkpoint records the model it was trained with, and loading it into another model is refused.

The documented path: post-pretrain with QuickGELU (open_clip's ``-quickgelu`` name), fine-tune with a
config naming the GELU model. Tensor names and shapes are the same, so before the record the switch
went unnoticed. Here a real one-rank tiny run (launch/configs/train/tiny.yaml's towers under the name
ViT-B-32-quickgelu) is the post-pretraining; fine-tuning init, evaluate, search and export then refuse
the GELU config in one line naming both values, and accept ``model.clip_model=auto``, whose first
forward equals the checkpoint's model exactly.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from tests.support.tiers import marks_users
from tests.train.fixtures_train import PYTHON, REPO, TINY_CONFIG, env, moving_dataset
from train.checkpoint import adopt_init_checkpoint, load_init_checkpoint, load_model, stored_record
from train.config import load_config
from train.evaluate import main as evaluate_main
from train.export import main as export_main
from train.frames import normalize_frames
from train.loop import build_task
from train.model import VideoCLIPConfig, build_model, tiny_clip_overrides
from train.model_record import model_record, openai_model_for
from train.search import main as search_main
from train.tokenizer import get_tokenizer
from train.weights import ours_to_clipvip, read_file_record, save_state_dict

TAG = "step000000002"
QUICK = "ViT-B-32-quickgelu + clip_overrides (activation quick_gelu)"
GELU = "ViT-B-32 + clip_overrides (activation gelu)"


def tiny_yaml(path, clip_model: str) -> str:
    """tiny.yaml with ``clip_model`` and its clip_overrides without quick_gelu (the name decides it)."""
    with open(TINY_CONFIG) as f:
        values = yaml.safe_load(f)
    values["model"]["clip_model"] = clip_model
    del values["model"]["clip_overrides"]["quick_gelu"]
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def refusal(name: str, source: str = "recorded in it") -> str:
    return (
        f"model.clip_model: the checkpoint {name} ({source}) was trained with {QUICK}, this config has {GELU}: "
        "set model.clip_model=auto to adopt the checkpoint's, or load a checkpoint of this model"
    )


@pytest.fixture(scope="module")
@marks_users("deepspeed")
def post(tmp_path_factory) -> dict:
    """A 2-step one-rank tiny QuickGELU run, its GELU and auto fine-tune configs, and a held-out set."""
    root = tmp_path_factory.mktemp("post")
    train = moving_dataset(str(root / "train"), 8, seed=1, max_samples=8)
    held = moving_dataset(str(root / "held"), 4, seed=2, prefix="held")
    pretrain = tiny_yaml(root / "pretrain.yaml", "ViT-B-32-quickgelu")
    gelu = tiny_yaml(root / "finetune.yaml", "ViT-B-32")
    auto = tiny_yaml(root / "finetune-auto.yaml", "auto")
    run = str(root / "run")
    overrides = [f"run_dir={run}", f"data.train=[{train}]", "max_steps=2", "data.batch_size=4"]
    overrides += ["data.num_workers=0", "checkpoint.every_steps=2", "log.tensorboard=false", "log.plots=false"]
    done = subprocess.run(
        [PYTHON, "-m", "train.main", "--config", pretrain, *overrides],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return {"root": root, "run": run, "train": train, "held": held, "pretrain": pretrain, "gelu": gelu, "auto": auto}


def states_file(run: str) -> str:
    return os.path.join(run, "checkpoints", TAG, "mp_rank_00_model_states.pt")


def trained_model(post: dict):
    """The checkpoint's model, built from the post-pretraining config and loaded without train/checkpoint.py."""
    cfg = load_config(post["pretrain"], ["run_dir=unused"])
    model = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))
    module = torch.load(states_file(post["run"]), map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({key.removeprefix("model."): value for key, value in module.items()})
    return model.eval()


@torch.no_grad()
def first_forward(model) -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    tokens = get_tokenizer(77)(["the red square goes left", "a blue circle moving up"])
    model.eval()
    return model.encode_video(normalize_frames(frames, torch.float32)), model.encode_text(tokens)


def fine_tune_config(post: dict, config: str, *extra: str, init: str | None = None):
    return load_config(config, ["run_dir=unused", f"model.init_checkpoint={init or post['run']}", *extra])


def test_the_checkpoint_records_its_model(post):
    recorded = stored_record(states_file(post["run"]))
    expected = model_record(load_config(post["pretrain"], ["run_dir=unused"]).model)
    assert recorded == expected
    assert recorded["clip_model"] == "ViT-B-32-quickgelu" and recorded["activation"] == "quick_gelu"
    assert (recorded["num_proxies"], recorded["temporal_slots"], recorded["attention"]) == (4, 12, "fused")
    assert recorded["clip_config"]["quick_gelu"] is True and recorded["clip_config"]["vision_cfg"]["width"] == 64


def test_a_gelu_fine_tune_is_refused_in_one_line(post, tmp_path):
    cfg = fine_tune_config(post, post["gelu"])
    with pytest.raises(ValueError) as info:
        build_task(cfg, 0, 1)
    assert str(info.value) == refusal(post["run"])
    done = subprocess.run(  # the command: refused before any rank starts
        [PYTHON, "-m", "train.main", "--config", post["gelu"], f"run_dir={tmp_path / 'ft'}"]
        + [f"data.train=[{post['train']}]", f"model.init_checkpoint={post['run']}"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"config error: {refusal(post['run'])}"]
    assert not os.path.exists(tmp_path / "ft")


def test_auto_adopts_the_checkpoints_model_and_the_first_forward_equals_it(post):
    cfg = fine_tune_config(post, post["auto"], "model.num_proxies=auto", "model.temporal_slots=auto")
    task = build_task(cfg, 0, 1)
    assert task.model.cfg.clip_model == "ViT-B-32-quickgelu"
    assert model_record(task.model.cfg) == stored_record(states_file(post["run"]))
    reference = trained_model(post)
    video, text = first_forward(task.model)
    expected_video, expected_text = first_forward(reference)
    assert torch.equal(video, expected_video) and torch.equal(text, expected_text)

    # what the check prevents: the same tensors under GELU load without complaint and compute another function
    gelu = build_model(VideoCLIPConfig(**load_config(post["gelu"], ["run_dir=x"]).model.video_clip_kwargs()))
    gelu.load_state_dict(reference.state_dict())
    assert not torch.allclose(first_forward(gelu)[0], expected_video, atol=1e-4)


def test_auto_is_written_resolved_into_the_fine_tune_runs_config(post, tmp_path):
    run = tmp_path / "ft"
    done = subprocess.run(
        [PYTHON, "-m", "train.main", "--config", post["auto"], "--dry-run", f"run_dir={run}"]
        + [f"data.train=[{post['train']}]", f"model.init_checkpoint={post['run']}", "data.num_workers=0"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_config(str(run / "config.yaml"), [])
    assert saved.model.clip_model == "ViT-B-32-quickgelu"
    assert saved.model.clip_overrides == load_config(post["pretrain"], ["run_dir=x"]).model.clip_overrides
    assert "quick_gelu" not in saved.model.clip_overrides  # the name carries it, as in the checkpoint


def test_evaluate_search_and_export_refuse_the_gelu_config_and_accept_auto(post, tmp_path, capsys):
    run, held, index, out = post["run"], post["held"], str(tmp_path / "index.parquet"), str(tmp_path / "m.safetensors")
    calls = {
        "train.evaluate": lambda config: evaluate_main(
            ["--checkpoint", run, "--config", config, "--data", held, "--no-progress"]
        ),
        "train.search": lambda config: search_main(
            ["embed", "--checkpoint", run, "--config", config, "--data", held, "--out", index, "--no-progress"]
        ),
        "train.export": lambda config: export_main([run, "--format", "safetensors", "--out", out, "--config", config]),
    }
    for name, call in calls.items():
        capsys.readouterr()
        assert call(post["gelu"]) == 2, name
        assert capsys.readouterr().err.strip().splitlines() == [f"{name}: error: {refusal(run)}"]
        assert call(post["auto"]) == 0, name
    assert read_file_record(out) == stored_record(states_file(run))  # the export carries the record on


def test_a_copied_tag_folder_or_export_keeps_its_record(post, tmp_path, capsys):
    copy = str(tmp_path / "elsewhere" / TAG)
    shutil.copytree(os.path.join(post["run"], "checkpoints", TAG), copy)
    cfg = fine_tune_config(post, post["gelu"], init=copy)
    with pytest.raises(ValueError) as info:
        build_task(cfg, 0, 1)
    assert str(info.value) == refusal(copy)

    out = str(tmp_path / "model.pt")  # torch.save suffix: the record goes beside it
    assert export_main([post["run"], "--format", "safetensors", "--out", str(tmp_path / "x.safetensors")]) == 0
    assert export_main([post["run"], "--format", "clipvip", "--out", out]) == 0
    assert f"{out}.model.json" in capsys.readouterr().out
    with pytest.raises(ValueError) as info:
        load_model(out, post["gelu"], device="cpu")
    assert str(info.value) == refusal(out)
    assert load_model(out, post["auto"], device="cpu").model.cfg.clip_model == "ViT-B-32-quickgelu"


def old_checkpoint(post: dict, tmp_path, with_config: bool) -> str:
    """The run as checkpoints were before the record: client_state without "model"; config.yaml or not."""
    copy = str(tmp_path / "old")
    shutil.copytree(post["run"], copy)
    states = torch.load(states_file(copy), map_location="cpu", weights_only=False)
    del states["model"]
    torch.save(states, states_file(copy))
    if not with_config:
        os.remove(os.path.join(copy, "config.yaml"))
        return states_file(copy)
    return copy


def test_an_old_checkpoint_is_checked_against_its_runs_config(post, tmp_path):
    old = old_checkpoint(post, tmp_path, with_config=True)
    with pytest.raises(ValueError) as info:
        build_task(fine_tune_config(post, post["gelu"], init=old), 0, 1)
    assert str(info.value) == refusal(old, os.path.join(old, "config.yaml"))
    adopted = adopt_init_checkpoint(fine_tune_config(post, post["auto"], init=old))
    assert adopted.model.clip_model == "ViT-B-32-quickgelu"


def test_without_record_or_config_the_tensors_are_matched_and_it_says_so_once(post, tmp_path, caplog):
    old = old_checkpoint(post, tmp_path, with_config=False)
    caplog.set_level(logging.WARNING)
    task = build_task(fine_tune_config(post, post["gelu"], init=old), 0, 1)  # as strict as before: names, shapes
    assert torch.equal(task.model.state_dict()["temporal_embedding"], trained_model(post).temporal_embedding)
    said = [r.getMessage() for r in caplog.records if "could not be checked" in r.getMessage()]
    assert said == [
        f"{old} records no model (nothing in it, no config.yaml beside it): its activation (gelu or quick_gelu) "
        f"could not be checked against this config's {GELU}; tensors are matched by name and shape"
    ]
    with pytest.raises(ValueError, match=f"model.clip_model=auto adopts the checkpoint's value, but {old} records"):
        adopt_init_checkpoint(fine_tune_config(post, post["auto"], init=old))


# ----------------------------------------------------------------------------- released CLIP-ViP checkpoints


def test_a_released_clipvip_checkpoint_is_quick_gelu(tmp_path):
    """No record, no config: the HF layout says OpenAI CLIP, so QuickGELU; proxies and slots by its tensors."""
    torch.manual_seed(0)
    source = build_model(
        VideoCLIPConfig(clip_model="ViT-B-32", clip_overrides=tiny_clip_overrides(vocab_size=49408), num_proxies=3)
    )
    released = str(tmp_path / "pretrain_clipvip_tiny.pt")
    save_state_dict(ours_to_clipvip(source.state_dict()), released)  # as released: no record beside it

    init = ["run_dir=x", f"model.init_checkpoint={released}"]
    with pytest.raises(ValueError) as info:
        adopt_init_checkpoint(
            load_config(TINY_CONFIG, [*init, "model.num_proxies=3", "model.clip_overrides.quick_gelu=false"])
        )
    assert str(info.value) == (
        f"model.clip_model: the checkpoint {released} (a released CLIP-ViP checkpoint) was trained with OpenAI "
        f"CLIP (activation quick_gelu), this config has {GELU}: set model.clip_model=auto to adopt the "
        "checkpoint's, or load a checkpoint of this model"
    )
    task = build_task(load_config(TINY_CONFIG, [*init, "model.num_proxies=auto"]), 0, 1)
    assert task.model.cfg.num_proxies == 3
    assert torch.equal(first_forward(task.model)[0], first_forward(source)[0])
    with pytest.raises(ValueError, match="fits none of open_clip's -quickgelu models by its tensor shapes"):
        adopt_init_checkpoint(load_config(TINY_CONFIG, [*init, "model.clip_model=auto"]))


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-B-16-quickgelu"])
def test_the_released_b32_and_b16_are_recognised_by_their_shapes(name):
    with torch.device("meta"):  # shapes only: nothing allocated
        model = build_model(VideoCLIPConfig(clip_model=name))
    assert openai_model_for(ours_to_clipvip(model.state_dict())) == name


def test_a_weights_file_with_a_record_refuses_other_proxies(tmp_path):
    """A torch.save weights file with its record beside it (as train.export writes them)."""
    cfg = load_config(TINY_CONFIG, ["run_dir=x"])
    torch.manual_seed(3)
    model = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))
    path = str(tmp_path / "m.pt")
    save_state_dict(model.state_dict(), path, model_record(model.cfg))
    other = load_config(TINY_CONFIG, ["run_dir=x", f"model.init_checkpoint={path}", "model.num_proxies=2"])
    with pytest.raises(ValueError) as info:
        adopt_init_checkpoint(other)
    assert str(info.value) == (
        f"model.num_proxies: the checkpoint {path} (recorded in it) was trained with 4, this config has 2: "
        "set model.num_proxies=auto to adopt the checkpoint's"
    )
    load_init_checkpoint(build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs())), path)


# ----------------------------------------------------------------------------- the recipes


def test_fine_tune_recipes_adopt_the_checkpoints_model(tmp_path):
    """Every fine-tune recipe leaves clip_model, num_proxies and temporal_slots at auto."""
    weights = str(tmp_path / "b32.pt")  # no tensors: adopting reads only the record beside it
    b32 = VideoCLIPConfig(clip_model="ViT-B-32-quickgelu", num_proxies=8, temporal_slots=16)
    save_state_dict({}, weights, model_record(b32))
    recipes = sorted(glob.glob(os.path.join(REPO, "launch/configs/finetune/*.yaml")))
    assert len(recipes) == 4
    for recipe in recipes:
        cfg = load_config(recipe, [f"model.init_checkpoint={weights}"])
        assert (cfg.model.clip_model, cfg.model.num_proxies, cfg.model.temporal_slots) == ("auto",) * 3, recipe
        model = adopt_init_checkpoint(cfg).model
        assert (model.clip_model, model.clip_overrides, model.num_proxies, model.temporal_slots) == (
            "ViT-B-32-quickgelu",
            {},
            8,
            16,
        )
        with pytest.raises(ValueError) as info:
            adopt_init_checkpoint(load_config(recipe, []))
        assert str(info.value) == (
            "model.clip_model=auto adopts model.init_checkpoint's value, but none is set: set "
            "model.init_checkpoint, or model.clip_model, model.num_proxies, model.temporal_slots to start without one"
        )


def test_post_pretraining_recipes_warn_when_their_towers_start_random():
    for name in ("vit-b32", "vit-b16"):
        cfg = load_config(os.path.join(REPO, f"launch/configs/train/{name}.yaml"), [])
        assert cfg.model.expect_pretrained and cfg.model.pretrained is None
        assert cfg.model.random_start_note().startswith(
            f"model.pretrained is not set: the {cfg.model.clip_model} towers start from random weights"
        )
        assert (
            load_config(
                os.path.join(REPO, f"launch/configs/train/{name}.yaml"), ["model.pretrained=openai"]
            ).model.random_start_note()
            is None
        )
    assert load_config(TINY_CONFIG, ["run_dir=x"]).model.random_start_note() is None  # random on purpose
    with pytest.raises(ValueError, match=r"model.num_proxies: must be an integer >= 1 or auto, got 'many'"):
        load_config(TINY_CONFIG, ["run_dir=x", "model.num_proxies=many"])


def test_a_random_start_is_warned_once_and_noted_in_config_yaml(post, tmp_path):
    run = tmp_path / "random"
    done = subprocess.run(
        [PYTHON, "-m", "train.main", "--config", TINY_CONFIG, "--dry-run", f"run_dir={run}"]
        + [f"data.train=[{post['train']}]", "model.expect_pretrained=true", "data.num_workers=0"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    note = load_config(TINY_CONFIG, ["run_dir=x", "model.expect_pretrained=true"]).model.random_start_note()
    warned = [line for line in done.stderr.splitlines() if "random weights" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and warned[0].endswith(f"train.main: {note}"), warned
    text = (run / "config.yaml").read_text()
    assert text.splitlines()[0] == f"# note: {note}"
    assert load_config(str(run / "config.yaml"), []).model.expect_pretrained is True  # still a config
