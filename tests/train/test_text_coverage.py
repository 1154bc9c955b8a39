"""Training reads the manifests' text coverage at the start (train/text_coverage.py) and refuses, in one line, a loss
term whose text most clips lack; older manifests without coverage still load and are not checked (said once)."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from pipeline.manifest import read_manifest
from tests.train.fixtures_train import COMBOS, moving_clip, write_dataset
from train import shard_sources
from train.config import load_config
from train.loop import missing_texts
from train.shard_sources import open_sources
from train.text_coverage import check_train_texts, term_texts

CAPTION_REFUSAL = (
    "data.train {ds}: 25.0% of its clips have a caption (its manifest), under data.min_text_coverage 0.5; model.loss "
    "d reads the caption in c2v, v2s_joint, v2c_joint, f2c, c2f: preprocess it with --captions or --caption-model, "
    "choose another model.loss, or lower data.min_text_coverage"
)


def _dataset(root, captions: int, clips: int = 8) -> str:
    """``clips`` clips in two shards, the first ``captions`` of them with a caption (all with a subtitle)."""
    rng = np.random.default_rng(0)
    made = [moving_clip(i, COMBOS[i % len(COMBOS)], rng) for i in range(clips)]
    made = [c if i < captions else dataclasses.replace(c, caption="") for i, c in enumerate(made)]
    return write_dataset(str(root), made, max_samples=4)


def test_the_terms_that_read_each_text():
    assert term_texts("d") == {
        "subtitle": ("s2v", "v2s_joint", "v2c_joint"),
        "caption": ("c2v", "v2s_joint", "v2c_joint", "f2c", "c2f"),
    }
    assert term_texts("vs") == {"subtitle": ("s2v", "v2s")}
    assert term_texts("a") == {"subtitle": ("s2v", "v2s"), "caption": ("f2c", "c2f")}
    assert term_texts("infonce") == {"subtitle": ("v2t", "t2v")}
    assert term_texts("infonce", "caption") == {"caption": ("v2t", "t2v")}


def test_the_manifest_counts_texts_and_training_refuses_a_loss_without_them(tmp_path, capsys):
    from train import main

    ds = _dataset(tmp_path / "ds", captions=2)
    manifest = read_manifest(ds)
    assert [e.texts for e in manifest.shards] == [{"subtitle": 4, "caption": 2}, {"subtitle": 4, "caption": 0}]
    assert manifest.text_coverage() == {"subtitle": 1.0, "caption": 0.25}
    assert main.main([f"run_dir={tmp_path}/run", f"data.train=[{ds}]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["config error: " + CAPTION_REFUSAL.format(ds=ds)]
    # the same data set is fine for a loss that reads only subtitles, under a lower bar, or with the check off
    for overrides in (["model.loss=vs"], ["data.min_text_coverage=0.2"], ["data.min_text_coverage=0"]):
        check_train_texts(load_config(None, [f"run_dir={tmp_path}/run", f"data.train=[{ds}]", *overrides]))
    infonce = load_config(None, ["run_dir=r", f"data.train=[{ds}]", "model.loss=infonce", "data.train_text=caption"])
    with pytest.raises(ValueError, match=r"25\.0% of its clips have a caption .* model.loss infonce reads the caption"):
        check_train_texts(infonce)
    # a shard list whose folder has the manifest: its entries' coverage
    listed = load_config(None, ["run_dir=r", f"data.train=['{ds}/part0{{0..1}}-000.tar']"])
    with pytest.raises(ValueError, match=r"part0\{0\.\.1\}-000\.tar: 25\.0% of its clips have a caption"):
        check_train_texts(listed)
    with pytest.raises(ValueError, match="data.min_text_coverage: must be a fraction in"):
        load_config(None, ["run_dir=r", "data.min_text_coverage=1.5"])


def test_an_older_manifest_loads_and_is_said_once_to_have_no_coverage(tmp_path, caplog):
    ds = _dataset(tmp_path / "ds", captions=0)
    path = tmp_path / "ds" / "manifest.json"
    data = json.loads(path.read_text())
    for entry in data["shards"]:
        del entry["texts"]
    del data["totals"]["texts"]
    path.write_text(json.dumps(data))
    manifest = read_manifest(ds)
    assert manifest.texts is None and manifest.text_coverage() is None
    assert "texts" not in json.loads(manifest.to_json())["shards"][0]  # written back as it was read
    check_train_texts(load_config(None, ["run_dir=r", f"data.train=[{ds}]"]))  # unknown: not refused
    shard_sources._said.clear()
    with caplog.at_level(logging.WARNING, logger="train.shard_sources"):
        for _ in range(2):
            open_sources([ds], "data.train")
    said = [r.getMessage() for r in caplog.records if "text coverage" in r.getMessage()]
    assert said == [
        f"data.train: the shards of {ds} (2 shards) have manifest entries without text coverage: its check is skipped"
    ]


def test_the_validation_pass_names_the_loss_terms_of_the_missing_texts():
    cfg = load_config(None, ["run_dir=r", "data.train=[x]"])
    results = {"clips": 7, "clips_without_subtitle": 0, "clips_without_caption": 2}
    assert missing_texts(results, cfg) == [
        "2 of 7 held-out clips have no caption: loss d's terms c2v, v2s_joint, v2c_joint, f2c, c2f leave such "
        "clips out in training and retrieval skips them as queries"
    ]
    results = {"clips": 7, "clips_without_subtitle": 7, "clips_without_caption": 7}
    assert missing_texts(results, cfg) == [
        "7 of 7 held-out clips have no subtitle: loss d's terms s2v, v2s_joint, v2c_joint leave such clips out in "
        "training (all of them: the terms are skipped)",
        "7 of 7 held-out clips have no caption: loss d's terms c2v, v2s_joint, v2c_joint, f2c, c2f leave such "
        "clips out in training (all of them: the terms are skipped); retrieval skipped",
    ]
