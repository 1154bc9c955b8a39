"""train.evaluate: a tiny random model end to end through the CLI on real shards, several texts per video."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.manifest import Manifest, write_manifest
from pipeline.schema import ClipMeta, ClipSample, TextSource
from pipeline.shards import ShardLimits, ShardWriter
from preprocess.synthetic import CorpusConfig, clip_specs, render_clip
from train.checkpoint import load_model, resolve_checkpoint, train_config
from train.evaluate import Embedded, evaluate
from train.evaluate import main as evaluate_main
from train.model import VideoCLIPConfig, build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = """\
run_dir: unused
model:
  clip_model: ViT-B-32
  num_proxies: {proxies}
  logit_scale_init: 2.66
  clip_overrides:
    embed_dim: {embed}
    quick_gelu: true
    vision_cfg: {{image_size: 32, patch_size: 8, width: 64, head_width: 16, layers: 2}}
    text_cfg: {{context_length: 77, vocab_size: 49408, width: 64, heads: 4, layers: 2}}
data: {{num_frames: 4, image_size: 32, context_length: 32}}
"""


def write_tiny_config(path, proxies: int = 4, embed: int = 32) -> str:
    path.write_text(TINY_YAML.format(proxies=proxies, embed=embed))
    return str(path)


def save_random_model(config: str, path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = build_model(VideoCLIPConfig(**train_config(config).model.video_clip_kwargs()))
    torch.save(model.state_dict(), path)
    return str(path)


def jpeg(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def synthetic_samples(count: int, seed: int, frames: int = 8) -> list[tuple[ClipSample, str]]:
    """(sample, caption) for the first ``count`` clips of preprocess.synthetic's corpus, frames as JPEG."""
    cfg = CorpusConfig(videos=count, clips_per_video=1, seed=seed, size=(64, 48), fps=8, clip_seconds=1.0)
    out = []
    for spec in clip_specs(cfg):
        rendered = render_clip(spec, cfg)
        picks = np.linspace(0, len(rendered) - 1, frames).round().astype(int)
        meta = ClipMeta(
            video_id=spec.video_id,
            clip_id=spec.clip_id,
            span=(0.0, 1.0),
            source_fps=8.0,
            frame_times=tuple(float(i) / 8 for i in picks),
            frame_size=(64, 48),
            middle_frame=frames // 2,
            source_uri="synthetic",
            subtitle_source=TextSource(kind="given"),
        )
        out.append((ClipSample(meta=meta, frames=tuple(jpeg(rendered[i]) for i in picks)), spec.caption))
    return out


def write_samples(root, samples: list[ClipSample], per_shard: int = 4) -> str:
    with ShardWriter(str(root), "test", ShardLimits(max_samples=per_shard)) as writer:
        for sample in samples:
            writer.write(sample)
    write_manifest(str(root), Manifest(shards=tuple(writer.entries), config={}))
    return str(root)


@pytest.fixture
def test_set(tmp_path) -> str:
    """6 videos over 2 shards: video 0 has two texts, video 5 none (gallery only)."""
    texts = [["a first caption", "a second caption"], ["one"], ["two"], ["three"], ["four"], []]
    samples = [
        ClipSample(meta=s.meta, frames=s.frames, subtitle="\n".join(t), caption=(t or [""])[0])
        for (s, _), t in zip(synthetic_samples(6, seed=1), texts)
    ]
    return write_samples(tmp_path / "test", samples)


@pytest.mark.slow  # the command in a fresh process, importing torch and DeepSpeed: ~10 s on 2 cores
def test_cli_end_to_end_with_several_texts_per_video(tmp_path, test_set):
    config = write_tiny_config(tmp_path / "tiny.yaml")
    weights = save_random_model(config, tmp_path / "model.pt")
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.evaluate",
            "--checkpoint",
            weights,
            "--config",
            config,
            "--data",
            test_set,
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DSL (uses the whole test query set at once: transductive)" in proc.stdout
    results = json.loads(out.read_text())
    assert (results["videos"], results["texts"], results["videos_without_text"]) == (6, 6, 1)
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "v2t_r1", "dsl/t2v_r1", "dsl/v2t_meanr"):
        assert key in results
    # the same numbers in-process, and the ordered pass: manifest order, texts mapped to their video
    from train.evaluate import embed_dataset

    embedded = embed_dataset(load_model(weights, config, "cpu"), test_set, progress=False)
    assert embedded.text_to_video == [0, 0, 1, 2, 3, 4]
    assert embedded.texts[:2] == ["a first caption", "a second caption"]
    again = evaluate(embedded)
    assert {k: again[k] for k in ("t2v_r1", "v2t_meanr", "dsl/t2v_medr")} == {
        k: results[k] for k in ("t2v_r1", "v2t_meanr", "dsl/t2v_medr")
    }


def test_metrics_of_known_embeddings_with_a_gallery_only_video():
    eye = torch.eye(3)
    embedded = Embedded(
        clip_ids=["a", "b", "c"],
        videos=eye,
        texts=["a1", "a2", "b1"],
        text_embeddings=torch.stack([eye[0], eye[1], eye[1]]),
        text_to_video=[0, 0, 1],
    )
    results = evaluate(embedded)
    assert results["t2v_r1"] == pytest.approx(100 * 2 / 3)  # "a2" lands on b
    assert results["v2t_r1"] == 100.0 and results["videos_without_text"] == 1


def test_checkpoint_of_another_architecture_lists_the_mismatched_tensors(tmp_path, test_set, capsys):
    config = write_tiny_config(tmp_path / "tiny.yaml")
    other = save_random_model(write_tiny_config(tmp_path / "other.yaml", proxies=2, embed=16), tmp_path / "other.pt")
    code = evaluate_main(["--checkpoint", other, "--config", config, "--data", test_set, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a checkpoint of the model in" in err
    assert "proxy_tokens: checkpoint [1, 64], model [3, 64]" in err
    assert "clip.text_projection: checkpoint [64, 16], model [64, 32]" in err


def test_run_folder_resolves_newest_deepspeed_checkpoint(tmp_path, test_set):
    """The layout DeepSpeed writes: checkpoints/latest -> tag/mp_rank_00_model_states.pt {'module': ...}."""
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step000000002"
    tag.mkdir(parents=True)
    config = write_tiny_config(run / "config.yaml")
    state = torch.load(save_random_model(config, tmp_path / "m.pt", seed=3), weights_only=True)
    torch.save({"module": {f"model.{k}": v for k, v in state.items()}}, tag / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("step000000002")
    assert resolve_checkpoint(str(run)) == (str(tag / "mp_rank_00_model_states.pt"), str(run / "config.yaml"))
    loaded = load_model(str(run), device="cpu")
    assert torch.equal(loaded.model.state_dict()["proxy_tokens"], state["proxy_tokens"])
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        resolve_checkpoint(str(tmp_path))
