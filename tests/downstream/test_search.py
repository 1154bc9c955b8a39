"""launch.search: a tiny model trained briefly on the synthetic data set finds the right clip first.

The videos are real mp4 files written by preprocess.synthetic (ffmpeg); the model is trained in
process with plain torch (symmetric InfoNCE) on frames decoded by the same path `embed` uses.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from launch.search import decode_video
from launch.search import main as search_main
from preprocess.synthetic import CorpusConfig, clip_specs, make_corpus
from tests.downstream.test_evaluate import save_random_model, write_samples, write_tiny_config
from train.checkpoint import train_config
from train.frames import normalize_frames
from train.loss import OCLLoss
from train.model import VideoCLIPConfig, build_model
from train.search import read_index
from train.tokenizer import get_tokenizer

VIDEOS = 8
CORPUS = dict(videos=VIDEOS, clips_per_video=1, size=(64, 48), fps=8, clip_seconds=1.5)


def distinct_seed() -> int:
    """The first seed whose clips all differ in (colour, shape): captions then identify a clip by content."""
    for seed in range(200):
        specs = clip_specs(CorpusConfig(seed=seed, **CORPUS))
        if len({(s.colour, s.shape) for s in specs}) == VIDEOS:
            return seed
    raise AssertionError("no seed with distinct clips")


def train_tiny(config: str, frames: np.ndarray, captions: list[str], max_steps: int = 150) -> torch.nn.Module:
    """Plain-torch symmetric InfoNCE on the 8 (video, caption) pairs until the loss is below 0.1 (about 50 steps,
    5 s unloaded)."""
    cfg = train_config(config)
    torch.manual_seed(0)
    model = build_model(VideoCLIPConfig(**cfg.model.video_clip_kwargs()))
    loss_fn = OCLLoss("infonce")
    tokens = torch.nn.functional.pad(
        get_tokenizer(cfg.data.context_length)(captions), (0, 77 - cfg.data.context_length)
    )
    video = normalize_frames(torch.from_numpy(frames))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start, loss, step = time.monotonic(), torch.tensor(10.0), 0
    while step < max_steps and loss.item() > 0.1:
        step += 1
        loss = loss_fn({"video": model.encode_video(video), "text": model.encode_text(tokens)}, model.logit_scale)[
            "loss"
        ]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {step} steps in {time.monotonic() - start:.1f} s, final loss {loss.item():.3f}")
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The synthetic videos (distinct colour and shape each) and the tiny model's config."""
    root = tmp_path_factory.mktemp("search")
    seed = distinct_seed()
    paths = make_corpus(root / "corpus", seed=seed, **CORPUS)
    specs = clip_specs(CorpusConfig(seed=seed, **CORPUS))
    files = [str(paths.videos / f"{s.video_id}.mp4") for s in specs]
    config = write_tiny_config(root / "tiny.yaml")
    return {"root": root, "config": config, "videos": paths.videos, "specs": specs, "files": files}


@pytest.fixture(scope="module")
def trained(corpus):
    frames = np.stack([decode_video(f, 4, 32) for f in corpus["files"]])
    model = train_tiny(corpus["config"], frames, [s.caption for s in corpus["specs"]])
    weights = corpus["root"] / "model.pt"
    torch.save(model.state_dict(), weights)
    return {**corpus, "weights": str(weights)}


def run(capsys, *argv: str) -> str:
    code = search_main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_text_query_finds_the_right_video_first(trained, capsys):
    common = ["--checkpoint", trained["weights"], "--config", trained["config"], "--device", "cpu"]
    index = str(trained["root"] / "videos.parquet")
    out = run(capsys, "embed", *common, "--videos", str(trained["videos"]), "--out", index)
    assert f"{VIDEOS} videos, 0 texts, 32 dims" in out
    table = read_index(index)
    assert table.embeddings.shape == (VIDEOS, 32) and np.allclose(
        np.linalg.norm(table.embeddings, axis=1), 1, atol=1e-4
    )
    right = 0
    for spec in trained["specs"]:
        hits = json.loads(run(capsys, "query", *common, "--index", index, "--text", spec.caption, "-k", "3", "--json"))
        assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        right += hits[0]["id"] == f"{spec.video_id}.mp4"
    hits = json.loads(
        run(capsys, "query", *common, "--index", index, "--video", trained["files"][2], "-k", "1", "--json")
    )
    assert hits[0]["id"] == f"{trained['specs'][2].video_id}.mp4" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    print(f"text->video top-1 correct: {right}/{VIDEOS}")
    assert right >= 6  # chance is 1/8 per query


def test_video_query_against_a_shard_data_set_returns_its_texts(trained, capsys):
    from pipeline.schema import ClipSample
    from tests.downstream.test_evaluate import synthetic_samples

    seed = distinct_seed()
    samples = [
        ClipSample(meta=s.meta, frames=s.frames, subtitle=caption, caption=caption)
        for s, caption in synthetic_samples(VIDEOS, seed=seed)
    ]
    data = write_samples(trained["root"] / "shards", samples)
    common = ["--checkpoint", trained["weights"], "--config", trained["config"], "--device", "cpu"]
    index = str(trained["root"] / "shards.parquet")
    assert f"{VIDEOS} videos, {VIDEOS} texts" in run(
        capsys, "embed", *common, "--data", data, "--out", index, "--no-progress"
    )
    right = 0
    for spec, file in zip(trained["specs"], trained["files"]):
        hits = json.loads(
            run(capsys, "query", *common, "--index", index, "--video", file, "--target", "text", "--json")
        )
        right += hits[0]["text"] == spec.caption and hits[0]["video"] == spec.clip_id
    print(f"video->text top-1 correct: {right}/{VIDEOS}")
    assert right >= 6


def test_bad_index_and_other_checkpoint_are_refused(corpus, tmp_path, capsys):
    weights = save_random_model(corpus["config"], tmp_path / "model.pt")  # refused before any retrieval
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("not a table")
    code = search_main(
        [
            "query",
            "--checkpoint",
            weights,
            "--config",
            corpus["config"],
            "--index",
            str(not_parquet),
            "--text",
            "a red circle",
        ]
    )
    assert code == 2 and "not a readable Parquet file" in capsys.readouterr().err
    other = write_tiny_config(tmp_path / "other.yaml", embed=16)
    code = search_main(
        [
            "embed",
            "--checkpoint",
            weights,
            "--config",
            other,
            "--videos",
            str(corpus["videos"]),
            "--out",
            str(tmp_path / "o.parquet"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "clip.text_projection: checkpoint [64, 32], model [64, 16]" in err
