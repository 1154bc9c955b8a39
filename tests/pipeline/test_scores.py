"""Quality scores in the contract: the sample JSON (optional, old samples load), fixed-bin histograms per tar, their
merge into the manifest (old manifests load), and the text table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.manifest import Manifest, ManifestError, read_manifest, write_manifest
from pipeline.schema import ClipMeta, SchemaError
from pipeline.scores import ScoreSummary, summarize, table
from pipeline.shards import ShardLimits, ShardWriter
from tests.support.samples import make_sample

CLIPS = [
    {"motion": 0.0, "static": 1.0, "black": 1.0, "cuts": 0},
    {"motion": 0.002, "static": 0.009, "black": 0.0, "cuts": 4, "sim_caption": -0.5},
    {"motion": 0.25, "static": 0.5, "black": 0.25, "cuts": 12, "sim_caption": 0.31, "sim_subtitle": 0.2},
    {},
]


def scored(clip_id: str, scores: dict):
    sample = make_sample(clip_id)
    return dataclasses.replace(sample, meta=dataclasses.replace(sample.meta, scores=scores))


def test_bins_are_fixed_and_every_clip_is_counted():
    summary = summarize(CLIPS).to_dict()
    assert summary["motion"] == {"counts": [1, 1, 0, 0, 0, 0, 0, 1], "absent": 1, "sum": 0.252, "min": 0.0, "max": 0.25}
    assert summary["static"]["counts"] == [1, 0, 0, 1, 0, 1]  # 0.009 < 0.01; exactly 1.0: the last bin
    assert summary["cuts"]["counts"] == [1, 0, 0, 1, 0, 1]  # 4: bin [3, 5); 12: bin [10, inf)
    assert summary["sim_caption"] == {
        "counts": [1, 0, 0, 0, 0, 0, 1, 0, 0],
        "absent": 2,
        "sum": -0.19,
        "min": -0.5,
        "max": 0.31,
    }
    assert summary["sim_subtitle"]["absent"] == 3 and list(summary) == [
        "motion",
        "static",
        "black",
        "cuts",
        "sim_subtitle",
        "sim_caption",
    ]


def test_summaries_merge_to_the_summary_of_all():
    whole = summarize(CLIPS)
    for split in range(len(CLIPS) + 1):
        merged = summarize(CLIPS[:split])
        merged.merge(summarize(CLIPS[split:]))
        assert merged.to_dict() == whole.to_dict() and merged.clips == 4, split
    assert ScoreSummary.from_dict(whole.to_dict(), 4, "x").to_dict() == whole.to_dict()
    assert summarize([{}, {}]).to_dict() == {}


def test_a_histogram_that_does_not_add_up_is_refused():
    data = summarize(CLIPS).to_dict()
    with pytest.raises(ValueError, match=r"shard 'a': score 'motion': 8 bins and 3\+1 clips, expected 8 bins and 5"):
        ScoreSummary.from_dict(data, 5, "shard 'a'")
    with pytest.raises(ValueError, match="unknown score 'sharpness'"):
        ScoreSummary.from_dict({"sharpness": data["motion"]}, 4, "shard 'a'")


def test_the_table():
    lines = table(summarize(CLIPS[:2]))
    assert lines[0].split() == "score scored absent min mean max clips per bin (lower edge: n)".split()
    assert (
        lines[1].split()
        == "motion 2 0 0 0.001 0.002 0: 1 0.002: 1 0.005: 0 0.01: 0 0.02: 0 0.05: 0 0.1: 0 0.2: 0".split()
    )
    assert lines[5].split()[:7] == ["sim_caption", "1", "1", "-0.5", "-0.5", "-0.5", "-1:"]
    assert table(summarize([{}, {}])) == ["scores: none recorded (2 clips)"]


def test_sample_json_carries_scores_only_when_there_are_some():
    plain = make_sample("x.1.mp4")
    assert "scores" not in json.loads(plain.meta.to_json())  # the bytes of a sample from before the scores
    meta = scored("x.1.mp4", CLIPS[2]).meta
    assert json.loads(meta.to_json())["scores"] == CLIPS[2]
    assert ClipMeta.from_json(meta.to_json()) == meta and ClipMeta.from_json(plain.meta.to_json()).scores == {}


@pytest.mark.parametrize("bad", [{"motion": "high"}, {"motion": float("nan")}, {"cuts": True}, {"motion": None}, []])
def test_bad_scores_are_refused_naming_the_clip(bad):
    raw = json.loads(make_sample("x.1.mp4").meta.to_json())
    raw["scores"] = bad
    with pytest.raises(SchemaError, match="clip 'x.1.mp4': score"):
        ClipMeta.from_json(json.dumps(raw))


def test_each_tar_summarises_its_own_samples_and_the_manifest_all(tmp_path):
    samples = [scored(f"c{i}.mp4", CLIPS[i % len(CLIPS)]) for i in range(7)]
    with ShardWriter(str(tmp_path), "shard", ShardLimits(max_samples=3)) as writer:
        for sample in samples:
            writer.write(sample)
    entries = writer.entries
    assert [e.samples for e in entries] == [3, 3, 1]
    for k, entry in enumerate(entries):
        assert entry.scores == summarize(s.meta.scores for s in samples[3 * k : 3 * k + 3]).to_dict()
    write_manifest(str(tmp_path), Manifest(shards=tuple(entries)))
    manifest = read_manifest(str(tmp_path))
    assert manifest.scores.to_dict() == summarize(s.meta.scores for s in samples).to_dict()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["scores"] == manifest.scores.to_dict()
    data["scores"]["cuts"]["counts"][0] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="the scores summary is not the sum of the shards' score histograms"):
        read_manifest(str(tmp_path))


def test_a_manifest_without_scores_is_as_before(tmp_path):
    with ShardWriter(str(tmp_path), "shard") as writer:
        writer.write(make_sample("a.mp4"))
    write_manifest(str(tmp_path), Manifest(shards=tuple(writer.entries)))
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert "scores" not in data and "scores" not in data["shards"][0]
    assert read_manifest(str(tmp_path)).scores.to_dict() == {}
