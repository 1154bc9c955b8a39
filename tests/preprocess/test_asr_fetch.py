"""The release path with an ASR stage: ``--fetch`` downloads each source with its audio stream and the stage
transcribes it, end to end on a real local Ray cluster and a loopback HTTP server.

The speech is real (espeak-ng, muxed under an ffmpeg test pattern); the model is not. No small speech model that
our ASR stage can load (a transformers Whisper checkpoint) ships inside a PyPI package: the ones found there are
CTranslate2 (faster-whisper), ONNX (Moonshine) or PocketSphinx models, and model hubs cannot be reached. So the
stage runs the tiny random Whisper of tests/preprocess/tiny_models.py: its words are noise, and what this test
shows is that the audio reaches it (a source without an audio track gets no subtitle and is counted so).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.manifest import read_manifest
from pipeline.shards import iter_dataset
from preprocess.fetching.formats import VIDEO_ONLY, WITH_AUDIO
from preprocess.job import run_job
from tests.preprocess.fixtures_job import ray_local, write_jsonl  # noqa: F401
from tests.preprocess.http_faults import FaultServer
from tests.preprocess.tiny_models import build_whisper
from tests.support.videos import in_ci

SPEECH = "the red square moves to the left"
FFMPEG = ("ffmpeg", "-v", "error", "-nostdin", "-y")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """``talk.mp4``: 3 s of testsrc2 with espeak-ng speaking SPEECH (AAC); ``mute.mp4``: the same, no audio."""
    if shutil.which("espeak-ng") is None:
        message = "espeak-ng is not installed (launch/setup_env.sh installs it)"
        pytest.fail(message) if in_ci() else pytest.skip(message)
    root = tmp_path_factory.mktemp("speech")
    subprocess.run(["espeak-ng", "-w", str(root / "speech.wav"), SPEECH], check=True, timeout=60)
    video = ("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25")
    h264 = ("-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-t", "3")
    subprocess.run(
        [*FFMPEG, *video, "-i", str(root / "speech.wav"), "-af", "apad", *h264, "-c:a", "aac", str(root / "talk.mp4")],
        check=True,
        timeout=60,
    )
    subprocess.run([*FFMPEG, *video, *h264, "-an", str(root / "mute.mp4")], check=True, timeout=60)
    return {"talk": root / "talk.mp4", "mute": root / "mute.mp4"}


def _audio_streams(path: Path) -> int:
    probe = ["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=index", "-of", "json"]
    return len(json.loads(subprocess.run([*probe, str(path)], capture_output=True, check=True).stdout)["streams"])


def _job_config(tmp_path: Path, server: FaultServer, videos: Path, whisper: Path, downloader: str):
    from preprocess.shard import build_config, build_parser

    lines = [
        {"video_id": name, "url": server.url(f"{name}.mp4"), "clip": [{"clip_id": f"{name}.0", "span": [0.5, 2.5]}]}
        for name in ("talk", "mute")
    ]
    write_jsonl(tmp_path / "meta.jsonl", lines)
    write_jsonl(tmp_path / "caps.jsonl", [{"clip_id": f"{n}.0", "caption": f"a {n} clip"} for n in ("talk", "mute")])
    args = ["--metadata", str(tmp_path / "meta.jsonl"), "--captions", str(tmp_path / "caps.jsonl")]
    args += ["--fetch", "--videos", str(videos), "--fetch-http-downloader", downloader, "--fetch-host-rate", "50"]
    args += ["--asr-model", str(whisper), "--asr-max-tokens", "8", "--output", str(tmp_path / "out")]
    args += ["--num-frames", "4", "--short-side", "64", "--no-progress"]
    return build_config(build_parser().parse_args(args))


def test_the_job_asks_the_fetcher_for_audio_when_asr_runs(tmp_path):
    from preprocess.job import _settings
    from preprocess.shard import build_config, build_parser

    (tmp_path / "m.jsonl").write_text("")
    base = ["--metadata", str(tmp_path / "m.jsonl"), "--fetch", "--output", "o"]
    with_asr = _settings(build_config(build_parser().parse_args([*base, "--asr-model", "w"]))).fetch
    without = _settings(build_config(build_parser().parse_args(base))).fetch
    assert (with_asr.audio, with_asr.selector) == (True, WITH_AUDIO)
    assert (without.audio, without.selector) == (False, VIDEO_ONLY)


@pytest.mark.ray
@pytest.mark.parametrize("downloader", ["requests", "yt-dlp"])
def test_fetched_speech_is_transcribed_by_the_asr_stage(sources, ray_local, tmp_path, downloader):  # noqa: F811
    """Both videos are on the server; ``mute`` is also in the local videos folder (found, not fetched), ``talk`` is
    fetched with its audio track and transcribed; ``mute`` has no audio: no subtitle, counted."""
    assert (_audio_streams(sources["talk"]), _audio_streams(sources["mute"])) == (1, 0)
    local = tmp_path / "videos"
    local.mkdir()
    shutil.copy(sources["mute"], local / "mute.mp4")
    whisper = build_whisper(tmp_path / "whisper")
    with FaultServer(tmp_path / "www") as server:
        for path in sources.values():
            server.add(path.name, path.read_bytes())
        result = run_job(_job_config(tmp_path, server, local, whisper, downloader))
        fetched = [r.path for r in server.log]
    assert result.manifest and result.ok == 2 and not result.failed, result.summary()
    assert result.videos == f"video files: 1 of 2 found under {local}; 1 to fetch (first: talk)"
    assert set(fetched) == {"/talk.mp4"}  # mute came from the folder
    assert result.texts == {"subtitle_generated": 1, "subtitle_no_audio": 1, "subtitle_missing": 1}
    samples = {s.meta.clip_id: s for s in iter_dataset(str(tmp_path / "out"))}
    talk, mute = samples["talk.0"], samples["mute.0"]
    assert talk.meta.source_uri == server.url("talk.mp4") and mute.meta.source_uri == str(local / "mute.mp4")
    assert talk.meta.subtitle_source.kind == "generated" and talk.meta.subtitle_source.origin == str(whisper)
    assert talk.subtitle.strip()  # the random model's words: not empty
    assert (mute.subtitle, mute.meta.subtitle_source.kind) == ("", "missing")
    assert read_manifest(str(tmp_path / "out")).texts == {"subtitle": 1, "caption": 2}
