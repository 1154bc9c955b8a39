"""Fine-tuning: MSR-VTT-style annotations + real videos -> shards -> 2 DeepSpeed CPU ranks from an init
checkpoint -> evaluate; the fine-tuned model must have learned its training pairs, and a run stopped and
resumed must continue exactly (losses, batches, sampled text lines, weights).

The runs lock the lower text tower (``model.lock_text`` with one unlocked layer, LiT-style as
tests/train/test_learning.py explains): from a random init, both towers learning from scratch stay near
chance longer than a test can run (20 steps: train-pair InfoNCE 0.72 -> 0.64, chance ln 2 = 0.69), with
it 16 steps give 0.72 -> 0.04. The frozen part also proves that the run started from the init checkpoint:
it must come out equal to the init's, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess.downstream.__main__ import main as convert_main
from tests.downstream.test_converters import (
    SMALL,
    VIDEOS,
    _ffmpeg_video,
    ray_local,  # noqa: F401 (fixture)
    write,
)
from tests.support.tiers import marks_users
from tests.train.fixtures_train import COMBOS, PYTHON, REPO, TINY_CONFIG, env, moving_clip, spawn_ranks, tiny_overrides
from train.checkpoint import load_init_checkpoint, load_model
from train.config import load_config
from train.evaluate import embed_dataset
from train.frames import BatchFrames
from train.loader import collate
from train.loop import build_task
from train.model import VideoCLIPConfig, build_model
from train.run_outputs import read_metrics
from train.sample_transform import SampleTransform, pick_line
from train.shard_stream import seeded

STEPS = 16
STOP_AT = 7  # the interrupted run stops (checkpointing) here and is resumed to STEPS
CAPTIONS = {  # MSR-VTT style: several captions per video; video1 is held out as val (the smallest SHA-1)
    "video1": ["a man sings on stage", "someone is singing", "a concert"],
    "video2": ["a cat plays", "a kitten with a ball", "pets at home"],
    "video3": ["a dog runs", "a puppy in a park", "an animal running"],
}


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


def finetune_annotations(folder: Path) -> Path:
    """MSR-VTT's JSON layout: train videos with three captions each, the two-video JSFusion test split."""
    sentences = [
        {"video_id": video, "caption": caption, "sen_id": i}
        for i, (video, caption) in enumerate((v, c) for v, captions in CAPTIONS.items() for c in captions)
    ]
    videos = [{"video_id": v} for v in (*CAPTIONS, "video4", "video5")]
    write(folder, "MSRVTT_data.json", {"info": {}, "videos": videos, "sentences": sentences})
    write(folder, "MSRVTT_train.9k.csv", "video_id\n" + "".join(f"{v}\n" for v in CAPTIONS))
    write(
        folder,
        "MSRVTT_JSFUSION_test.csv",
        'key,vid_key,video_id,sentence\nret0,msr4,video4,"cars, driving"\nret1,msr5,video5,a sunny beach\n',
    )
    return folder


def finetune_overrides(run_dir: Path, data: Path, init: str, *extra: str) -> list[str]:
    return tiny_overrides(
        str(run_dir),
        [str(data / "train")],
        "model.loss=infonce",
        "data.text_lines=sample",
        "data.train_text=subtitle",
        f"model.init_checkpoint={init}",
        "model.lock_text=true",
        "model.lock_text_unlocked_layers=1",
        "data.batch_size=2",
        "data.num_workers=0",
        f"max_steps={STEPS}",
        f"checkpoint.every_steps={STEPS}",
        "log.every_steps=1",
        "log.batch_digests=true",
        "log.tensorboard=false",
        "log.plots=false",
        *extra,
        eval_=[str(data / "val")],
    )


@pytest.fixture(scope="module")
@marks_users("ray", "deepspeed")
def finetuned(ray_local, msrvtt_videos, tmp_path_factory) -> dict:  # noqa: F811
    """Converted MSR-VTT-style data, the init checkpoint and an uninterrupted 16-step fine-tuning run on it."""
    root = tmp_path_factory.mktemp("finetune")
    out = root / "msrvtt"
    args = ["--annotations", str(finetune_annotations(root / "ann")), "--videos", str(msrvtt_videos)]
    assert convert_main(["msrvtt", *args, "--out", str(out), "--val-count", "1", "--frames", "4", *SMALL]) == 0
    init = save_tiny_state(root / "post-pretrained.pt", 7)
    ranks = spawn_ranks(finetune_overrides(root / "run", out, init), nproc=2)
    assert ranks.wait() == 0, ranks.output()
    return {"data": out, "init": init, "run": root / "run", "log": ranks.output()}


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["kind"] == "train"}


def train_pair_fit(checkpoint: str, config: Path, data: Path) -> dict:
    """How well a checkpoint matches the training split's texts (every caption) to their videos: the
    InfoNCE of texts over videos at the model's logit scale (ln 2 = 0.69 is chance for two videos) and R@1."""
    loaded = load_model(checkpoint, str(config), "cpu")
    embedded = embed_dataset(loaded, str(data / "train"), progress=False)
    logits_TV = loaded.model.logit_scale.exp().item() * embedded.text_embeddings @ embedded.videos.T
    owners = torch.tensor(embedded.text_to_video)
    best_V = logits_TV.argmax(dim=0)  # each video's best text
    return {
        "texts": len(embedded.texts),
        "infonce": float(torch.nn.functional.cross_entropy(logits_TV, owners)),
        "t2v_r1": float((logits_TV.argmax(dim=1) == owners).float().mean()),
        "v2t_r1": float((owners[best_V] == torch.arange(len(best_V))).float().mean()),
    }


@pytest.mark.ray
@pytest.mark.deepspeed
def test_convert_finetune_two_ranks_then_evaluate(finetuned, tmp_path):
    out, run_dir, log = finetuned["data"], finetuned["run"], finetuned["log"]
    assert "fine-tuning from" in log and "post-pretrained.pt" in log
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss/v2t"]) and np.isfinite(r["loss/t2v"]) for r in rows.values())
    evals = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["kind"] == "eval"]
    assert [r["clips"] for r in evals] == [1]  # the val split: one video
    assert (run_dir / "checkpoints" / "latest").read_text().strip()
    result = tmp_path / "test.json"
    cmd = ["-m", "train.evaluate", "--checkpoint", str(run_dir), "--data", str(out / "test"), "--out", str(result)]
    proc = subprocess.run(
        [PYTHON, *cmd, "--no-progress", "--device", "cpu"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(result.read_text())
    assert results["videos"] == 2 and results["texts"] == 2  # video4 ("cars, driving") and video5
    assert results["checkpoint"].endswith(f"step{STEPS:09d}/mp_rank_00_model_states.pt")

    # what fine-tuning is for: the training pairs, near chance at the init, are learned
    before = train_pair_fit(finetuned["init"], run_dir / "config.yaml", out)
    after = train_pair_fit(str(run_dir), run_dir / "config.yaml", out)
    assert before["texts"] == after["texts"] == 6  # video2 and video3, three captions each
    assert before["infonce"] > 0.6 and (before["t2v_r1"], before["v2t_r1"]) != (1.0, 1.0), before
    assert after["infonce"] < before["infonce"] / 4, (before, after)
    assert after["t2v_r1"] == after["v2t_r1"] == 1.0, after

    # it started from the init: the locked part of the text tower is the init's, bit for bit
    init = torch.load(finetuned["init"], weights_only=True)
    tuned = load_model(str(run_dir), str(run_dir / "config.yaml"), "cpu").model.state_dict()
    locked = tiny_model(0)
    locked.clip.lock_text_tower(unlocked_layers=1)
    frozen = [name for name, param in locked.named_parameters() if not param.requires_grad]
    assert "clip.token_embedding.weight" in frozen and "clip.transformer.resblocks.0.attn.in_proj_weight" in frozen
    assert [name for name in frozen if not torch.equal(tuned[name], init[name])] == []
    assert not torch.equal(tuned["clip.visual.conv1.weight"], init["clip.visual.conv1.weight"])


def test_batch_digest_covers_the_sampled_text_lines():
    """The resume test compares digests: one that ignored the texts could not see a text line drawn wrongly."""

    def digest(subtitle: str) -> str:
        items = [{"key": "video2", "indices": [0, 2, 4, 7], "subtitle": subtitle, "caption": "a cat plays"}]
        return collate(items, 16, BatchFrames(1, 4, 32))["digest"]

    assert digest("a cat plays") == digest("a cat plays") != digest("pets at home")


@pytest.mark.ray
@pytest.mark.deepspeed
def test_resumed_finetuning_continues_exactly(finetuned, tmp_path):
    """Stopped at step 7 (stop_at_step, which checkpoints) and resumed: every later step has the uninterrupted
    run's batches (keys, frame indices, sampled text lines) and its losses, lr and logit scale exactly, and the
    final weights are equal. Exact, not approximately: ZeRO-1 in fp32 on CPU with torch's AdamW (DeepSpeedCPUAdam
    only with optimizer offload) restores weights and optimizer moments bit for bit, the two ranks' gloo all-reduce
    sums in a fixed order, and every data draw is a function of (seed, stream position); so the same operations
    meet the same bits. Under optimizer offload this does not hold: DeepSpeedCPUAdam keeps beta^t as an fp32
    running product, which a resumed run recomputes with pow (csrc/includes/cpu_adam.h, IncrementStep), and the
    same runs with zero.extra's offload_optimizer differ from step 11 by up to 1.6e-7 relative (measured): such a
    comparison needs rel=1e-6."""
    data, init, reference = finetuned["data"], finetuned["init"], finetuned["run"]
    run_dir = tmp_path / "run"
    first = spawn_ranks(finetune_overrides(run_dir, data, init, f"stop_at_step={STOP_AT}"), nproc=2)
    assert first.wait() == 0, first.output()
    assert sorted(train_rows(run_dir)) == list(range(1, STOP_AT + 1))
    second = spawn_ranks(finetune_overrides(run_dir, data, init), nproc=2)
    assert second.wait() == 0, second.output()
    assert "resumed from" in second.output() and f"step{STOP_AT:09d}" in second.output()

    want, got = train_rows(reference), train_rows(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert len({json.dumps(want[s]["digests"]) for s in want}) > 1  # the batches differ from step to step
    for step in range(1, STEPS + 1):
        assert got[step]["digests"] == want[step]["digests"], f"step {step}: other batches or text lines"
        for key in ("loss", "loss/v2t", "loss/t2v", "lr", "logit_scale"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    tag = Path("checkpoints", f"step{STEPS:09d}", "mp_rank_00_model_states.pt")
    resumed_weights = torch.load(run_dir / tag, weights_only=False)["module"]
    reference_weights = torch.load(reference / tag, weights_only=False)["module"]
    assert sorted(resumed_weights) == sorted(reference_weights)
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in reference_weights)
