"""Config, DeepSpeed JSON and optimizer groups; real 2-rank DeepSpeed runs: ZeRO-3 on local shards
with a missing shard, ZeRO-2 over two simulated nodes (two launcher invocations) reading from the
loopback S3 server. ZeRO-1 runs in test_resume.py."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from pipeline.shards import iter_dataset
from tests.support.s3server import free_port
from tests.train.fixtures_train import (
    REPO,
    Ranks,
    moving_dataset,
    shm_buffers,
    spawn_ranks,
    start_launcher,
    tiny_overrides,
    write_dataset,
)
from train.config import deepspeed_json, load_config
from train.frames import normalize_frames
from train.run_outputs import read_metrics

TINY = os.path.join(REPO, "launch/configs/train/tiny.yaml")


def test_config_layers_and_errors(tmp_path):
    cfg = load_config(TINY, ["run_dir=x", "optim.lr=1e-4", "data.train=[a,s3://b/c]", "zero.stage=2"])
    assert cfg.optim.lr == 1e-4 and cfg.data.train == ["a", "s3://b/c"] and cfg.zero.stage == 2
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-6
    with pytest.raises(ValueError, match="conflicts with model.clip_overrides.vision_cfg.image_size=32"):
        load_config(TINY, ["run_dir=x", "data.image_size=64"])
    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        load_config(TINY, ["run_dir=x", "optim.lrr=1"])
    with pytest.raises(ValueError, match="zero.stage"):
        load_config(TINY, ["run_dir=x", "zero.stage=4"])
    with pytest.raises(ValueError, match="stop_at_step=9 is beyond max_steps=5"):
        load_config(TINY, ["run_dir=x", "max_steps=5", "stop_at_step=9"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ValueError, match="optim.embedding_lr_mul"):
        load_config(TINY, ["run_dir=x", "optim.embedding_lr_mul=0"])
    with pytest.raises(ValueError, match="model.lock_text_unlocked_layers: is only used with model.lock_text=true"):
        load_config(TINY, ["run_dir=x", "model.lock_text_unlocked_layers=1"])


def test_resume_refuses_a_changed_run(tmp_path):
    from train.config import check_resumable, dump_config

    run = str(tmp_path / "run")
    base = ["run_dir=" + run, "data.train=[a]"]
    dump_config(load_config(TINY, base), os.path.join(run, "config.yaml"))
    check_resumable(load_config(TINY, base + ["optim.lr=1"]))  # no checkpoint yet: a fresh start
    os.makedirs(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write("global_step10")
    with pytest.raises(
        ValueError,
        match=r"holds checkpoints of a run with other settings \(data.num_frames: 4 -> 8; "
        r"optim.embedding_lr_mul: 30.0 -> 1.0\)",
    ):
        check_resumable(load_config(TINY, base + ["optim.embedding_lr_mul=1.0", "data.num_frames=8"]))
    check_resumable(
        load_config(TINY, base + ["max_steps=50", "log.every_steps=1", "checkpoint.keep_last=5", "data.eval=[b]"])
    )
    # how the data is split over ranks may change (a resume at another world size remaps it)
    check_resumable(load_config(TINY, base + ["data.batch_size=8", "data.num_workers=3", "zero.grad_accum_steps=2"]))
    check_resumable(load_config(TINY, base + ["optim.lr=1", "checkpoint.resume=never"]))


def test_lock_text_freezes_the_text_tower_only():
    from train.loop import build_task
    from train.optim import param_groups

    cfg = load_config(TINY, ["run_dir=x", "model.lock_text=true"])
    task = build_task(cfg, rank=0, world_size=1)
    frozen = {n for n, p in task.model.named_parameters() if not p.requires_grad}
    assert "clip.token_embedding.weight" in frozen and "clip.text_projection" in frozen
    assert "clip.transformer.resblocks.1.mlp.c_fc.weight" in frozen and "clip.ln_final.weight" in frozen
    assert not any(
        n.startswith("clip.visual") or n in ("proxy_tokens", "temporal_embedding", "clip.logit_scale") for n in frozen
    )
    grouped = {id(p) for g in param_groups(task, cfg.optim) for p in g["params"]}
    assert grouped == {id(p) for p in task.parameters() if p.requires_grad}
    top = build_task(
        load_config(TINY, ["run_dir=x", "model.lock_text=true", "model.lock_text_unlocked_layers=1"]), 0, 1
    )
    assert top.model.clip.text_projection.requires_grad and not top.model.clip.ln_final.weight.requires_grad


def test_training_forward_equals_one_text_pass_per_text():
    """The task encodes subtitle and caption in one batched text-tower pass: same loss and gradients."""
    from train.loop import build_task

    task = build_task(load_config(TINY, ["run_dir=x"]), rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    subtitle, caption = (torch.randint(1, 400, (3, 70), generator=g) for _ in range(2))
    losses = task(frames, image=frames[:, 2], subtitle=subtitle, caption=caption)
    losses["loss"].backward()
    batched = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad()
    model = task.model
    features = {
        "video": model.encode_video(normalize_frames(frames)).float(),
        "subtitle": task._text(subtitle),
        "caption": task._text(caption),
        "frame": model.encode_image(normalize_frames(frames[:, 2])).float(),
    }
    reference = task.loss(features, model.logit_scale.float())
    reference["loss"].backward()
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value)
    for name, p in task.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(batched[name], p.grad, rtol=1e-4, atol=1e-5)  # summation order


def test_ds_config_is_explicit():
    cfg = load_config(TINY, ["run_dir=x", "zero.stage=3", "zero.grad_accum_steps=2", "optim.grad_clip=5"])
    ds = deepspeed_json(cfg, world_size=4, bf16=False)
    assert ds["gradient_clipping"] == 5.0 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4 and ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False and "data_types" not in ds
    bf16 = deepspeed_json(cfg, world_size=1, bf16=True)
    assert bf16["bf16"]["enabled"] is True and bf16["data_types"]["grad_accum_dtype"] == "fp32"


def test_weight_decay_groups():
    from train.model import VideoCLIPConfig, build_model
    from train.optim import is_decayed, lr_factor, param_groups

    cfg = load_config(TINY, ["run_dir=x"])
    task = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))  # the task's parameters are the model's
    named = dict(task.named_parameters())
    default = {n for n, p in named.items() if is_decayed(n, p, False)}
    everything = {n for n, p in named.items() if is_decayed(n, p, True)}
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in default
    for excluded in (
        "proxy_tokens",
        "temporal_embedding",
        "clip.visual.ln_pre.weight",
        "clip.token_embedding.weight",
        "clip.visual.positional_embedding",
    ):
        assert excluded not in default and excluded in everything
    for never in ("clip.logit_scale", "clip.visual.ln_pre.bias"):
        assert never not in everything
    groups = param_groups(task, cfg.optim)
    assert sum(len(g["params"]) for g in groups) == len(named)
    ids = {name: id(p) for name, p in named.items()}
    mul = {ids_: g["lr_mul"] for g in groups for ids_ in map(id, g["params"])}
    assert cfg.optim.embedding_lr_mul > 1  # the tiny config learns frame order only with it
    for name in (
        "proxy_tokens",
        "temporal_embedding",
        "clip.visual.positional_embedding",
        "clip.visual.class_embedding",
        "clip.token_embedding.weight",
        "clip.positional_embedding",
    ):
        assert mul[ids[name]] == cfg.optim.embedding_lr_mul, name
    for name in ("clip.visual.conv1.weight", "clip.visual.ln_pre.weight", "clip.text_projection"):
        assert mul[ids[name]] == 1.0, name
    assert mul[ids["clip.logit_scale"]] == cfg.optim.logit_scale_lr_mul
    assert lr_factor(0, 100, cfg.optim) < lr_factor(4, 100, cfg.optim) == pytest.approx(1.0)
    assert lr_factor(99, 100, cfg.optim) < 0.01


def _metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]


def _drop_captions(root: str, clip_ids: tuple[str, ...]) -> None:
    """Rewrite a data set with the captions of ``clip_ids`` empty (its manifest too)."""
    samples = list(iter_dataset(root))
    for name in os.listdir(root):
        if name.endswith((".tar", ".json")):
            os.remove(os.path.join(root, name))
    write_dataset(root, [dataclasses.replace(s, caption="") if s.meta.clip_id in clip_ids else s for s in samples])


@pytest.mark.deepspeed
def test_zero3_two_ranks_skips_missing_shard(tmp_path):
    train = moving_dataset(str(tmp_path / "train"), 24, seed=1, max_samples=4)
    os.remove(os.path.join(train, "part03-000.tar"))
    held = moving_dataset(str(tmp_path / "eval"), 7, seed=2, prefix="held")  # odd: one rank's share is padded
    _drop_captions(held, ("held1.0.mp4", "held4.0.mp4"))
    run_dir = str(tmp_path / "run")
    ranks = spawn_ranks(
        tiny_overrides(
            run_dir,
            [train],
            "zero.stage=3",
            "max_steps=3",
            "data.batch_size=4",
            "data.num_workers=0",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=2",
            "log.every_steps=1",
            "log.profile_skip=0",
            "log.profile_steps=2",
            eval_=[held],
        )
    )
    assert ranks.wait() == 0, ranks.output()
    assert not shm_buffers(ranks.port), "DeepSpeed's shared-memory comm buffers were left in RAM"
    train_rows, eval_rows = _metrics(run_dir)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and 0 < r["logit_scale"] <= 5.3 for r in train_rows)
    assert {"loss/s2v", "loss/v2s_joint", "loss/f2c", "lr", "samples_per_s", "data_wait_fraction"} <= set(train_rows[0])
    assert max(r["data/shard_errors"] for r in train_rows) >= 1
    assert eval_rows and eval_rows[-1]["clips"] == 7 and "dsl/t2v_r1" in eval_rows[-1]
    assert (eval_rows[-1]["clips_without_caption"], eval_rows[-1]["clips_without_subtitle"]) == (2, 0)
    said = "validation: 2 of 7 held-out clips have no caption: loss d's terms c2v, v2s_joint, v2c_joint, f2c, c2f"
    assert ranks.output().count(said) == len(eval_rows), ranks.output()  # rank 0, once per validation
    with open(os.path.join(run_dir, "ds_config.json")) as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3
    saved = sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith(("step", "latest")))
    assert saved == ["latest", "step000000002", "step000000003"]  # keep_last=2
    for name in ("config.yaml", "loss.png", "recall.png", "profile_trace.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "profile.txt")) as f:
        assert "aten::" in f.read()  # rank 0's op table of steps 2 and 3
    # this 2-rank run goes on with one rank: its universal form, the data remapped, max_steps in the first batch
    alone = spawn_ranks(
        tiny_overrides(
            run_dir,
            [train],
            "zero.stage=3",
            "max_steps=4",
            "data.batch_size=4",
            "data.num_workers=0",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=2",
            "log.every_steps=1",
            eval_=[held],
        ),
        nproc=1,
    )
    assert alone.wait() == 0, alone.output()
    assert "(universal: saved by 2 ranks, now 1)" in alone.output()
    train_rows, _ = _metrics(run_dir)
    assert [r["step"] for r in train_rows][-2:] == [4, 5]  # 4 x 8 samples in all: 24 done, 8 left = 2 steps of 4


@pytest.mark.deepspeed
def test_two_nodes_zero2_from_s3(tmp_path, s3_bucket):
    """Two launcher invocations (node ranks 0 and 1, one rank each) sharing a master address."""
    train = moving_dataset(f"{s3_bucket}/train", 24, seed=3, max_samples=4)
    run_dir = str(tmp_path / "run")
    port = free_port()
    overrides = tiny_overrides(
        run_dir,
        [train],
        "zero.stage=2",
        "max_steps=3",
        "data.batch_size=4",
        "data.num_workers=0",
        "checkpoint.every_steps=3",
        "log.every_steps=1",
        "log.tensorboard=false",
        "log.plots=false",
    )
    nodes = Ranks.together(
        [
            start_launcher(
                overrides,
                nproc=1,
                port=port,
                extra_args=["--nodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1"],
            )
            for r in (0, 1)
        ]
    )
    assert nodes.wait() == 0, nodes.output()
    train_rows, _ = _metrics(run_dir)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert train_rows[0]["samples_per_s"] / train_rows[0]["samples_per_s_per_device"] == pytest.approx(2.0)
    assert os.path.exists(
        os.path.join(run_dir, "checkpoints", "step000000003", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    )


def test_retime_goes_on_by_samples_also_from_a_checkpoint_without_the_record():
    """2 ranks x 2 clips stopped at step 6 (24 samples), resumed at 3 ranks: 48 left = 8 steps; the lr schedule's
    clock counts 4-sample steps. A checkpoint saved before the schedule record gives its batch as samples / step."""
    from types import SimpleNamespace

    from train.loop import TrainState, retime
    from train.optim import build_scheduler, lr_factor

    cfg = load_config(TINY, ["run_dir=x", "data.train=[a]", "max_steps=null", "epochs=1", "data.batch_size=2"])
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, 12, cfg.optim)
    for _ in range(6):  # the scheduler as the checkpoint restores it: 6 steps taken
        optimizer.step()
        scheduler.step()
    state = TrainState(step=6, samples=24)
    assert retime(SimpleNamespace(lr_scheduler=scheduler), cfg, state, 72, world_size=3) == 14
    assert state.schedule == {"global_batch": 4}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(6, 18, cfg.optim), rel=1e-12)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(7.5, 18, cfg.optim), rel=1e-12)
