"""The default stream choice (preprocess/fetching/formats.py) against yt-dlp's own format machinery, offline.

A loopback HTTP server (tests/preprocess/http_faults.py) serves a DASH manifest of one generated video as a ladder
of renditions (H.264 at 240p, 360p, 480p and 720p, VP9 at 360p, an AAC audio track); yt-dlp's generic extractor
reads the manifest and picks by the selector and sort the fetcher gives it. The settings come from the command line
as the job builds them (``--frame-size``/``--short-side``, ``--fetch-format``, ``--asr-model``), and what was
downloaded is read from the server's request log: only the chosen rendition's file (and the audio, with ASR).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from preprocess.fetching import formats
from preprocess.fetching.fetch import Fetched, fetch_video
from preprocess.fetching.host_gate import HostGate
from tests.preprocess.fixtures_job import write_jsonl
from tests.preprocess.http_faults import FaultServer

H264 = ("-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p", "-an")
VP9 = ("-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", "-pix_fmt", "yuv420p", "-an")
RENDITIONS = (  # file, (width, height), codecs attribute, kbit/s, encoder
    ("r240.mp4", (428, 240), "avc1.42c015", 150, H264),
    ("r360.mp4", (640, 360), "avc1.42c01e", 300, H264),
    ("r480.mp4", (854, 480), "avc1.42c01e", 500, H264),
    ("r720.mp4", (1280, 720), "avc1.42c01f", 1000, H264),
    ("r360-vp9.webm", (640, 360), "vp09.00.21.08", 300, VP9),
)
AUDIO = "audio.m4a"


def _mpd(files: list[str]) -> str:
    """A static DASH manifest of the named renditions and the audio track, one file per representation (yt-dlp
    reads a representation with only a BaseURL as a plain file download)."""
    sets = []
    for name, (w, h), codecs, kbits, _ in RENDITIONS:
        if name in files:
            mime = "video/webm" if name.endswith(".webm") else "video/mp4"
            rep = f'<Representation id="{name}" codecs="{codecs}" bandwidth="{kbits * 1000}" width="{w}" height="{h}"'
            sets.append(f'<AdaptationSet mimeType="{mime}">{rep} frameRate="25"><BaseURL>{name}</BaseURL>')
            sets.append("</Representation></AdaptationSet>")
    rep = '<Representation id="audio" codecs="mp4a.40.2" bandwidth="64000" audioSamplingRate="48000">'
    sets.append(f'<AdaptationSet mimeType="audio/mp4">{rep}<BaseURL>{AUDIO}</BaseURL></Representation></AdaptationSet>')
    head = '<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" mediaPresentationDuration="PT2S" minBufferTime='
    return f'<?xml version="1.0"?>\n{head}"PT2S" profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period>' + (
        "".join(sets) + "</Period></MPD>\n"
    )


@pytest.fixture(scope="module")
def ladder(tmp_path_factory) -> Path:
    """2 s of testsrc2 at every rendition of RENDITIONS (one ffmpeg run), the audio, and two manifests: the whole
    ladder (``ladder.mpd``) and one without the H.264 360p rendition (``no-h264-360.mpd``)."""
    root = tmp_path_factory.mktemp("ladder")
    splits = "".join(f"[s{k}]" for k in range(len(RENDITIONS)))
    graph = f"[0:v]split={len(RENDITIONS)}{splits};" + ";".join(
        f"[s{k}]scale={w}:{h}[o{k}]" for k, (_, (w, h), *_) in enumerate(RENDITIONS)
    )
    outputs = []
    for k, (name, _, _, kbits, encoder) in enumerate(RENDITIONS):
        outputs += ["-map", f"[o{k}]", *encoder, "-b:v", f"{kbits}k", str(root / name)]
    sources = ["-f", "lavfi", "-t", "2", "-i", "testsrc2=size=1280x720:rate=25"]
    sources += ["-f", "lavfi", "-t", "2", "-i", "sine=frequency=440:sample_rate=48000"]
    audio = ["-map", "1:a", "-c:a", "aac", "-b:a", "64k", "-vn", str(root / AUDIO)]
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", *sources, "-filter_complex", graph, *outputs, *audio]
    subprocess.run(cmd, check=True, timeout=120)
    everything = [name for name, *_ in RENDITIONS]
    (root / "ladder.mpd").write_text(_mpd(everything))
    (root / "no-h264-360.mpd").write_text(_mpd([n for n in everything if n != "r360.mp4"]))
    return root


def _job_settings(tmp_path: Path, *flags: str, metadata: Path | None = None):
    """The settings the job hands its shard tasks for these command-line flags."""
    from preprocess.job import _settings
    from preprocess.shard import build_config, build_parser

    if metadata is None:
        metadata = tmp_path / "m.jsonl"
        metadata.write_text("")
    base = ["--metadata", str(metadata), "--fetch", "--fetch-http-downloader", "yt-dlp", "--require-texts", "none"]
    args = build_parser().parse_args([*base, "--output", str(tmp_path / "out"), *flags])
    return _settings(build_config(args))


def _fetch_settings(tmp_path: Path, *flags: str):
    return _job_settings(tmp_path, *flags).fetch


def _download(server: FaultServer, manifest: str, cfg, dest: Path) -> tuple[Fetched, dict[str, int]]:
    """Fetch the manifest's video; (the result, body bytes the server sent per file)."""
    server.clear_log()
    got = fetch_video(server.url(manifest), str(dest), "v", cfg, HostGate(8, 1000.0))
    assert isinstance(got, Fetched), got
    sent: dict[str, int] = {}
    for request in server.requests():
        sent[request.path.lstrip("/")] = sent.get(request.path.lstrip("/"), 0) + request.sent
    return got, sent


@pytest.mark.parametrize(
    ("flags", "target", "rendition"),
    [
        (("--fetch-margin", "1"), 360, "r360.mp4"),  # the default 224x224: short side 224 -> 360p
        (("--frame-size", "398x224", "--fetch-margin", "1"), 360, "r360.mp4"),
        (("--short-side", "224", "--fetch-margin", "1"), 360, "r360.mp4"),
        (("--short-side", "448", "--fetch-margin", "1"), 480, "r480.mp4"),
        (("--short-side", "448", "--fetch-margin", "1.2"), 720, "r720.mp4"),  # 537.6 -> 720
        ((), 480, "r480.mp4"),  # the default margin 2: 224 x 2 = 448 -> 480p
        (("--short-side", "160"), 360, "r360.mp4"),  # 320 -> 360p
        (("--short-side", "448"), 720, "r720.mp4"),  # 896 is above the ladder: its top, 720p
        (("--short-side", "0"), None, "r720.mp4"),  # decoded size kept: the largest of at most 720p, as before
    ],
)
def test_the_smallest_rendition_that_holds_the_stored_frames_and_only_it_is_downloaded(
    ladder, tmp_path, flags, target, rendition
):
    cfg = _fetch_settings(tmp_path, *flags)
    assert cfg.target_short_side == target and cfg.selector == "bv/b/w"
    with FaultServer(ladder) as server:
        got, sent = _download(server, "ladder.mpd", cfg, tmp_path / "d")
    size = (ladder / rendition).stat().st_size
    assert sent == {"ladder.mpd": len((ladder / "ladder.mpd").read_bytes()), rendition: size}
    assert got.format["format_id"] == rendition and got.bytes == size
    assert Path(got.path).read_bytes() == (ladder / rendition).read_bytes()


def test_h264_is_preferred_at_the_size_and_vp9_taken_when_no_h264_has_it(ladder, tmp_path):
    cfg = _fetch_settings(tmp_path, "--fetch-margin", "1")
    with FaultServer(ladder) as server:
        both, _ = _download(server, "ladder.mpd", cfg, tmp_path / "d1")
        vp9, sent = _download(server, "no-h264-360.mpd", cfg, tmp_path / "d2")
    assert (both.format["format_id"], both.format["vcodec"]) == ("r360.mp4", "avc1.42c01e")
    assert (vp9.format["format_id"], vp9.format["vcodec"], vp9.format["height"]) == (
        "r360-vp9.webm",
        "vp09.00.21.08",
        360,
    )
    assert set(sent) == {"no-h264-360.mpd", "r360-vp9.webm"}  # not the H.264 480p


def test_fetch_format_overrides_the_choice(ladder, tmp_path):
    cfg = _fetch_settings(tmp_path, "--fetch-format", "bv[height<=240]")
    assert (cfg.selector, cfg.format_sort) == ("bv[height<=240]", ())
    with FaultServer(ladder) as server:
        got, sent = _download(server, "ladder.mpd", cfg, tmp_path / "d")
    assert got.format["format_id"] == "r240.mp4"
    assert set(sent) == {"ladder.mpd", "r240.mp4"}


def test_the_audio_track_is_added_only_for_the_asr_stage(ladder, tmp_path):
    without = _fetch_settings(tmp_path, "--fetch-margin", "1")
    with_asr = _fetch_settings(tmp_path, "--fetch-margin", "1", "--asr-model", "whisper")
    assert (without.audio, with_asr.audio) == (False, True)
    with FaultServer(ladder) as server:
        got, sent = _download(server, "ladder.mpd", with_asr, tmp_path / "d")
    assert set(sent) == {"ladder.mpd", "r360.mp4", AUDIO}
    assert sent["r360.mp4"] == (ladder / "r360.mp4").stat().st_size
    assert sent[AUDIO] == (ladder / AUDIO).stat().st_size
    assert (got.format["format_id"], got.format["acodec"]) == ("r360.mp4+audio", "mp4a.40.2")
    probe = ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,height", "-of", "json", got.path]
    streams = json.loads(subprocess.run(probe, capture_output=True, check=True).stdout)["streams"]
    assert sorted((s["codec_type"], s.get("height")) for s in streams) == [("audio", None), ("video", 360)]


def test_the_shard_stats_record_each_download(ladder, tmp_path):
    from pipeline import storage
    from pipeline.layout import DatasetLayout
    from preprocess.config import Layout
    from preprocess.plan import plan_shards
    from preprocess.shard_task import ShardStats, ShardTask, process_shard

    meta = tmp_path / "meta.jsonl"
    with FaultServer(ladder) as server:
        clip = {"clip_id": "lad.0", "span": [0.2, 1.8]}
        write_jsonl(meta, [{"video_id": "lad", "url": server.url("ladder.mpd"), "clip": [clip]}])
        settings = _job_settings(tmp_path, "--num-frames", "2", metadata=meta)
        (piece,) = plan_shards([str(meta)], 10, Layout.SOURCE)
        stats = process_shard(ShardTask(index=0, slice=piece), settings, gate=HostGate(8, 1000.0))
    row = {"video_id": "lad", "format_id": "r480.mp4", "width": 854, "height": 480, "vcodec": "avc1.42c01e"}
    row |= {"acodec": None, "filesize": None, "bytes": (ladder / "r480.mp4").stat().st_size}
    assert stats.ok == 1 and stats.fetched == [row]
    uri = DatasetLayout(str(tmp_path / "out")).stats(0)
    assert ShardStats.from_json(storage.read_bytes(uri), uri).fetched == [row]


@pytest.mark.parametrize(
    ("stored", "margin", "target"),
    [(224, 1.0, 360), (360, 1.0, 360), (361, 1.0, 480), (448, 1.0, 480), (481, 1.0, 720), (224, 1.7, 480)]
    + [
        (720, 1.0, 720),
        (800, 1.0, 800),
        (600, 1.5, 720),
        (800, 1.5, 800),
        (None, 1.0, None),
        (224, 2.0, 480),
        (180, 2.0, 360),
    ],
)
def test_target_short_side_rounds_up_to_the_ladder(stored, margin, target):
    assert formats.target_short_side(stored, margin) == target


def test_stored_short_side_of_the_decode_settings():
    assert formats.stored_short_side((224, 224), None) == 224
    assert formats.stored_short_side((398, 224), None) == 224
    assert formats.stored_short_side((224, 400), None) == 224  # a portrait squash
    assert formats.stored_short_side(None, 448) == 448
    assert formats.stored_short_side(None, 0) is None
