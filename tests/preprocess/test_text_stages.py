"""Caption and ASR stages on a real Ray cluster with tiny random models, real videos with audio; text import."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.shards import iter_dataset
from preprocess.decode import AUDIO_RATE, ClipRequest, DecodeConfig, DecodedClip, decode_clips
from tests.preprocess.fixtures_job import _ts, dataset_bytes, write_jsonl
from tests.preprocess.tiny_models import build_captioner, build_whisper
from tests.support.tiers import marks_users

# (video id, ffmpeg args after the inputs, extension, has audio)
VIDEOS = (
    ("av0", ["-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac"], "mp4", True),
    ("av1", ["-c:v", "mpeg2video", "-g", "12", "-q:v", "4", "-c:a", "mp2"], "ts", True),
    ("mute", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", "-an"], "webm", False),
)
CLIPS = ((0.0, 1.5), (1.5, 3.0))
GIVEN_SUBTITLE = "av1.0.mp4"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"caption": build_captioner(root / "captioner"), "asr": build_whisper(root / "whisper")}


@pytest.fixture(scope="module")
def av_corpus(tmp_path_factory) -> dict[str, Path]:
    """Two sources with a sine tone (AAC in mp4, MP2 in MPEG-TS), one without audio; two clips each."""
    root = tmp_path_factory.mktemp("avcorpus")
    vdir = root / "videos"
    vdir.mkdir()
    meta = []
    for v, (video_id, args, ext, audio) in enumerate(VIDEOS):
        inputs = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25"]
        if audio:
            inputs += ["-f", "lavfi", "-i", f"sine=frequency={300 + 200 * v}:sample_rate=22050"]
        subprocess.run(
            ["ffmpeg", "-v", "error", "-nostdin", "-y", *inputs, "-t", "4", *args, str(vdir / f"{video_id}.{ext}")],
            check=True,
            timeout=60,
        )
        clips = [{"clip_id": f"{video_id}.{c}.mp4", "span": [_ts(s), _ts(e)]} for c, (s, e) in enumerate(CLIPS)]
        meta.append({"video_id": video_id, "clip": clips})
    write_jsonl(root / "meta.jsonl", meta)
    write_jsonl(root / "subs.jsonl", [{"clip_id": GIVEN_SUBTITLE, "text": "given words"}])
    return {"videos": vdir, "metadata": root / "meta.jsonl", "subtitles": root / "subs.jsonl"}


@pytest.fixture(scope="module")
@marks_users("ray")
def ray_cluster():
    """A real local Ray cluster with room for one caption actor, one ASR actor and shard tasks."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def stage_config(corpus, models, output, *extra: str):
    from preprocess.shard import build_config, build_parser

    args = [
        "--metadata",
        str(corpus["metadata"]),
        "--videos",
        str(corpus["videos"]),
        "--subtitles",
        str(corpus["subtitles"]),
        "--output",
        str(output),
        "--clips-per-shard",
        "2",
        "--num-frames",
        "3",
        "--short-side",
        "48",
        "--no-progress",
        "--caption-model",
        str(models["caption"]),
        "--caption-batch-size",
        "3",
        "--caption-max-tokens",
        "8",
        "--asr-model",
        str(models["asr"]),
        "--asr-batch-size",
        "2",
        "--asr-max-tokens",
        "8",
        *extra,
    ]
    return build_config(build_parser().parse_args(args))


@pytest.fixture(scope="module")
def staged(av_corpus, models, ray_cluster, tmp_path_factory) -> Path:
    from preprocess.job import run_job

    out = tmp_path_factory.mktemp("staged")
    result = run_job(stage_config(av_corpus, models, out))
    assert result.manifest and result.ok == 6 and not result.failed, result.summary()
    assert result.texts["subtitle_no_audio"] == 2 and result.texts["caption_generated"] == 6, result.texts
    return out


def test_every_clip_gets_generated_texts(staged, models):
    from pipeline.manifest import read_manifest

    samples = {s.meta.clip_id: s for s in iter_dataset(str(staged))}
    assert len(samples) == 6
    for clip_id, s in samples.items():
        assert s.meta.caption_source.kind == "generated" and s.meta.caption_source.origin == str(models["caption"])
        if clip_id == GIVEN_SUBTITLE:
            assert s.subtitle == "given words" and s.meta.subtitle_source.kind == "given"
        elif clip_id.startswith("mute"):
            assert (
                s.subtitle == "" and s.meta.subtitle_source.kind == "missing"
            )  # no audio stream: kept, subtitle missing
        else:
            assert s.meta.subtitle_source.kind == "generated" and s.meta.subtitle_source.origin == str(models["asr"])
            assert s.subtitle, clip_id
    assert sum(bool(s.caption) for s in samples.values()) >= 4, [s.caption for s in samples.values()]
    config = read_manifest(str(staged)).config
    assert config["captioner"]["batch_size"] == 3 and config["asr"]["model"] == str(models["asr"])


def test_batch_path_matches_one_at_a_time(staged, models, av_corpus):
    """Batched captions/transcripts equal one-at-a-time ones, and equal what the Ray pipeline stored."""
    from preprocess.text.asr import AsrConfig, Transcriber
    from preprocess.text.captions import CaptionConfig, Captioner

    samples = list(iter_dataset(str(staged)))
    captioner = Captioner(CaptionConfig(model=str(models["caption"]), max_new_tokens=8))
    jpegs = [s.frames[s.meta.middle_frame] for s in samples]
    batched = captioner.from_jpegs(jpegs)
    assert batched == [captioner.from_jpegs([j])[0] for j in jpegs]
    assert batched == [s.caption for s in samples]

    transcriber = Transcriber(AsrConfig(model=str(models["asr"]), max_new_tokens=8))
    path = av_corpus["videos"] / "av0.mp4"
    clips = list(
        decode_clips(
            str(path),
            [ClipRequest(clip_id=str(c), start=s, end=e, audio=True) for c, (s, e) in enumerate(CLIPS)],
            DecodeConfig(num_frames=3),
        )
    )
    audios = [c.audio for c in clips]
    texts = transcriber(audios)
    assert texts == [transcriber([a])[0] for a in audios]
    assert texts == [s.subtitle for s in samples if s.meta.video_id == "av0"]


def test_worker_death_and_resume_give_identical_shards(staged, av_corpus, models, tmp_path, monkeypatch):
    from preprocess.faults import FAULT_EXIT_ENV
    from preprocess.job import run_job

    monkeypatch.setenv(FAULT_EXIT_ENV, f"1:{tmp_path / 'exited'}")
    out = tmp_path / "out"
    result = run_job(stage_config(av_corpus, models, out, "--max-in-flight", "2"))
    assert (tmp_path / "exited").exists() and result.manifest, result.summary()
    assert dataset_bytes(out) == dataset_bytes(staged)
    monkeypatch.delenv(FAULT_EXIT_ENV)
    for name in (
        "stats/shard-000002.json",
        "manifest.json",
        "shard-000002-000.tar",
    ):  # as if killed before shard 2 committed
        (out / name).unlink()
    result = run_job(stage_config(av_corpus, models, out))
    assert result.shards_run == 1 and result.shards_skipped == 2
    assert dataset_bytes(out) == dataset_bytes(staged)


def test_model_failure_is_retried_per_sample_then_recorded(models, av_corpus):
    """A corrupt frame makes the captioner fail: the batch is retried one by one; only that clip loses its caption."""
    from pipeline.schema import ClipMeta, ClipSample
    from preprocess.inputs import ClipItem
    from preprocess.text.captions import CaptionConfig, Captioner
    from preprocess.text.stages import StageModel, TextStages, guarded

    captioner = Captioner(CaptionConfig(model=str(models["caption"]), max_new_tokens=6))
    path = av_corpus["videos"] / "av0.mp4"
    decoded = [
        c
        for c in decode_clips(
            str(path),
            [ClipRequest(clip_id=f"c{i}", start=0.5 * i, end=0.5 * i + 1) for i in range(4)],
            DecodeConfig(num_frames=1),
        )
        if isinstance(c, DecodedClip)
    ]
    frames = [c.frames[0] for c in decoded]
    frames[2] = b"not a jpeg"
    calls, emitted, notes = [], [], []

    def model(batch):
        calls.append(len(batch))
        return guarded(captioner.from_jpegs, batch)

    stages = TextStages(
        lambda item, out: emitted.append(out),
        lambda item, what: notes.append(what),
        caption=StageModel(fn=model, origin="tiny", batch_size=8),
    )
    for i, (clip, jpeg) in enumerate(zip(decoded, frames)):
        meta = ClipMeta(
            video_id="av0",
            clip_id=clip.clip_id,
            span=clip.span,
            source_fps=25.0,
            frame_times=clip.frame_times,
            frame_size=clip.frame_size,
            middle_frame=0,
            source_uri=str(path),
        )
        stages.add(
            ClipItem(position=i, line=1, video_id="av0", clip_id=clip.clip_id, span=clip.span),
            ClipSample(meta=meta, frames=(jpeg,)),
        )
    assert not emitted  # waiting for a full batch (or the end of the shard)
    stages.finish()
    assert calls == [4, 1, 1, 1, 1]
    assert [s.meta.clip_id for s in emitted] == ["c0", "c1", "c2", "c3"]
    assert [s.meta.caption_source.kind for s in emitted] == ["generated", "generated", "missing", "generated"]
    assert [s.caption for i, s in enumerate(emitted) if i != 2] == [
        captioner.from_jpegs([f])[0] for i, f in enumerate(frames) if i != 2
    ]
    assert (
        len(notes) == 1 and notes[0].stage == "caption" and notes[0].error == "caption_error" and not notes[0].dropped
    )
    assert "c2" in notes[0].message and "tiny" in notes[0].message


@pytest.mark.parametrize(
    "which, wrong, expected",
    [
        ("caption", "missing", "no such folder"),
        ("caption", "asr", "not an image captioner"),
        ("asr", "caption", "not a speech recogniser"),
        ("asr", "empty", "no config.json"),
    ],
)
def test_bad_model_path_stops_before_any_work(which, wrong, expected, models, av_corpus, tmp_path):
    from preprocess.job import run_job

    paths = {"missing": tmp_path / "nope", "empty": tmp_path, **models}
    chosen = dict(models, **{which: paths[wrong]})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=expected) as info:
        run_job(stage_config(av_corpus, chosen, out))
    assert str(paths[wrong]) in str(info.value)
    assert not out.exists(), "work started before the model check"


def test_decoder_reads_audio_in_the_same_pass(av_corpus):
    for name, has_audio in (("av0.mp4", True), ("av1.ts", True), ("mute.webm", False)):
        path = str(av_corpus["videos"] / name)
        requests = [ClipRequest(clip_id=str(c), start=s, end=e) for c, (s, e) in enumerate(CLIPS)]
        plain = list(decode_clips(path, requests, DecodeConfig(num_frames=3)))
        with_audio = list(
            decode_clips(
                path,
                [ClipRequest(clip_id=r.clip_id, start=r.start, end=r.end, audio=True) for r in requests],
                DecodeConfig(num_frames=3),
            )
        )
        assert [c.frames for c in with_audio] == [c.frames for c in plain] and all(c.audio is None for c in plain)
        for clip, (s, e) in zip(with_audio, CLIPS):
            if not has_audio:
                assert clip.audio is None
                continue
            assert clip.audio.dtype == np.float32 and abs(len(clip.audio) - (e - s) * AUDIO_RATE) <= 0.02 * AUDIO_RATE
            assert 0.05 < float(np.abs(clip.audio).max()) <= 1.0  # the sine tone, not silence


def test_lmdb_texts_are_looked_up_by_the_shard_task(av_corpus, tmp_path):
    """An LMDB source needs no join: the task reads its clips' texts from the local store (JSON-list captions go
    through the join: tests/preprocess/test_text_join.py)."""
    lmdb = pytest.importorskip("lmdb", reason="lmdb is not installed")
    from pipeline.layout import DatasetLayout
    from preprocess.config import Layout
    from preprocess.plan import metadata_files, plan_shards, read_slice
    from preprocess.text.texts import TextSources, with_texts

    db = tmp_path / "subs.lmdb"
    with lmdb.open(str(db), map_size=1 << 20) as env, env.begin(write=True) as txn:
        txn.put(b"av1.1.mp4", b"lmdb words that run long")
        txn.put(b"mute.0.mp4", b"bad \xff byte")
    files = metadata_files(str(av_corpus["metadata"]))
    (piece,) = plan_shards(files, 1000, Layout.SOURCE)
    clips = read_slice(files, piece, Layout.SOURCE).clips
    texts = TextSources.of(str(db), None, max_chars=20)
    assert texts.sources["subtitles"].kind == "lmdb" and not texts.joined()
    with_text, failures = with_texts(clips, texts, DatasetLayout(str(tmp_path / "out")), 0)
    by_id = {c.clip_id: c for c in with_text}
    assert by_id["av1.1.mp4"].subtitle.text == "lmdb words that run " and by_id["av1.1.mp4"].subtitle.truncated
    assert by_id["av1.1.mp4"].subtitle.origin == str(db) and by_id["av0.0.mp4"].subtitle is None
    assert by_id["mute.0.mp4"].subtitle.text == "bad \ufffd byte"
    assert [(f.error, f.clip_id, f.dropped) for f in failures] == [("non_utf8", "mute.0.mp4", False)]
