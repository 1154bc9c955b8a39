"""Inputs a new user meets: phone videos with a rotation matrix, pictures named .mp4, spans past the last frame.

Every file is made here with ffmpeg; rotated frames are checked against ffmpeg's own autorotated decode.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
from preprocess.failures import Failure

SRC = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25"]
H264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
PICTURES = {  # one picture each, named .mp4: (codec, muxer options)
    "png.mp4": ("png", ["-f", "image2", "-update", "1"]),
    "jpeg.mp4": ("mjpeg", ["-f", "image2", "-update", "1"]),
    "bmp.mp4": ("bmp", ["-f", "image2", "-update", "1"]),
    "webp.mp4": ("libwebp", ["-f", "webp"]),
    "gif.mp4": ("gif", ["-f", "gif"]),
}


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, timeout=60)


def _rotated(base: Path, out: Path, degrees: int) -> None:
    """A copy of ``base`` whose stream carries a display matrix: ffmpeg >= 6 ``-display_rotation``, else the
    mp4 muxer's ``rotate`` tag (ffmpeg 5). Either sign convention is fine: frames are compared with ffmpeg's."""
    try:
        _ffmpeg("-display_rotation", str(degrees), "-i", str(base), "-c", "copy", str(out))
    except subprocess.CalledProcessError:
        _ffmpeg("-i", str(base), "-c", "copy", "-metadata:s:v", f"rotate={degrees}", str(out))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("real_world")
    p = {name: d / name for name in ("base.mp4", *PICTURES)}
    _ffmpeg(*SRC, "-t", "2", *H264, "-g", "25", "-bf", "2", str(p["base.mp4"]))
    for degrees in (90, 180, 270):
        p[f"rot{degrees}"] = d / f"rot{degrees}.mp4"
        _rotated(p["base.mp4"], p[f"rot{degrees}"], degrees)
    for name, (codec, muxer) in PICTURES.items():
        _ffmpeg(*SRC, "-frames:v", "1", "-c:v", codec, *muxer, str(p[name]))
    p["png_in_mp4"] = d / "still.mp4"
    _ffmpeg(*SRC, "-frames:v", "1", "-c:v", "png", str(p["png_in_mp4"]))
    p["animated.gif"] = d / "animated.gif"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=5", "-t", "2", str(p["animated.gif"]))
    p["mjpeg_stream"] = d / "frames.mjpeg"  # concatenated JPEGs: ffmpeg reads it with the jpeg_pipe image demuxer
    _ffmpeg(*SRC, "-t", "1", "-c:v", "mjpeg", "-f", "mjpeg", str(p["mjpeg_stream"]))
    p["raw.m2v"] = d / "raw.m2v"  # an elementary stream: no duration anywhere, so no span is clamped
    _ffmpeg(*SRC, "-t", "4", "-c:v", "mpeg2video", str(p["raw.m2v"]))
    p["fps1.mp4"] = d / "fps1.mp4"  # frames at 0, 1 and 2 s, each lasting 1 s
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=1", "-t", "3", *H264, str(p["fps1.mp4"]))
    p["one_frame_fps1.mp4"] = d / "one_frame_fps1.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=1", "-frames:v", "1", *H264, str(p["one_frame_fps1.mp4"]))
    p["long_audio.webm"] = d / "long_audio.webm"  # 4 s of video, 4.5 s of audio: the container says 4.5 s
    _ffmpeg(
        *SRC[:-1], "testsrc2=size=160x120:rate=25:duration=4", "-f", "lavfi", "-i", "sine=duration=4.5",
        "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-c:a", "libopus", str(p["long_audio.webm"]),
    )  # fmt: skip
    return p


def _decode(path: Path, spans: list[tuple[float, float | None]], cfg: DecodeConfig | None = None) -> list:
    requests = [ClipRequest(clip_id=f"c{i}", start=s, end=e) for i, (s, e) in enumerate(spans)]
    return list(decode_clips(str(path), requests, cfg or DecodeConfig(num_frames=4)))


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float64)


def _ffmpeg_upright(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Every frame as ffmpeg shows it (the CLI autorotates by default), RGB."""
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout
    width, height = size
    assert len(raw) % (width * height * 3) == 0, "ffmpeg's upright frames are not the size we stored"
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3).astype(np.float64)


@pytest.mark.parametrize("degrees", [90, 270, 180])
def test_rotated_video_is_stored_upright_as_ffmpeg_shows_it(files, degrees):
    path = files[f"rot{degrees}"]
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).rotation % 360 != 0, "the fixture carries no display matrix"
    (clip,) = _decode(path, [(0.0, 2.0)], DecodeConfig(num_frames=4, short_side=0, jpeg_quality=95))
    assert isinstance(clip, DecodedClip)
    assert clip.frame_size == ((160, 120) if degrees == 180 else (120, 160))
    reference = _ffmpeg_upright(path, clip.frame_size)
    for jpeg, time in zip(clip.frames, clip.frame_times):
        ours, upright = _rgb(jpeg), reference[round(time * 25)]
        assert np.abs(ours - upright).mean() < 12, (degrees, time)
        assert np.abs(ours - np.rot90(upright, 2)).mean() > 40, (degrees, time)  # the other way round is far off
    (resized,) = _decode(path, [(0.0, 2.0)], DecodeConfig(num_frames=2, short_side=96))
    assert resized.frame_size == ((128, 96) if degrees == 180 else (96, 128))
    assert _rgb(resized.frames[0]).shape == (resized.frame_size[1], resized.frame_size[0], 3)


def test_unrotated_video_is_unchanged(files):
    (clip,) = _decode(files["base.mp4"], [(0.0, 2.0)], DecodeConfig(num_frames=2, short_side=0, jpeg_quality=95))
    assert clip.frame_size == (160, 120)
    reference = _ffmpeg_upright(files["base.mp4"], clip.frame_size)
    assert np.abs(_rgb(clip.frames[0]) - reference[round(clip.frame_times[0] * 25)]).mean() < 12


@pytest.mark.parametrize("kind", [*PICTURES, "png_in_mp4"])
def test_a_picture_is_not_a_video(files, kind):
    path = files[kind]
    results = _decode(path, [(0.0, 1.0), (0.0, None)])
    assert [(r.clip_id, r.stage, r.error) for r in results] == [
        ("c0", "probe", "not_a_video"),
        ("c1", "probe", "not_a_video"),
    ]
    assert all(isinstance(r, Failure) and str(path) in r.message for r in results)


@pytest.mark.parametrize("kind", ["animated.gif", "mjpeg_stream"])
def test_image_codecs_with_many_frames_are_videos(files, kind):
    (clip,) = _decode(files[kind], [(0.0, 0.9)])
    assert isinstance(clip, DecodedClip), clip
    assert len(set(clip.frame_times)) == 4 and len(set(clip.frames)) == 4  # four distinct pictures


def test_span_past_the_last_frame_fails_only_its_clip(files):
    inside, beyond, slightly = _decode(files["raw.m2v"], [(3.0, 3.9), (3.0, 6.0), (3.5, 4.2)])
    assert isinstance(inside, DecodedClip) and inside.span == (3.0, 3.9)
    for failed in (beyond, slightly):
        assert isinstance(failed, Failure) and (failed.stage, failed.error) == ("decode", "span_beyond_end")
        assert str(files["raw.m2v"]) in failed.message


def test_one_frame_per_second_video_covers_its_last_second(files):
    last, inside, first = _decode(files["fps1.mp4"], [(2.0, 3.0), (2.1, 2.95), (0.0, 1.0)])
    assert isinstance(last, DecodedClip) and last.frame_times == (2.0, 2.0, 2.0, 2.0)
    assert isinstance(inside, DecodedClip) and inside.frame_times == (2.0, 2.0, 2.0, 2.0)
    assert isinstance(first, DecodedClip) and first.frame_times == (0.0, 0.0, 0.0, 0.0)
    (single,) = _decode(files["one_frame_fps1.mp4"], [(0.0, 1.0)], DecodeConfig())
    assert isinstance(single, DecodedClip) and set(single.frame_times) == {0.0} and len(single.frames) == 12


def test_webm_span_is_clamped_to_the_video_track_not_the_longer_audio(files):
    (clip,) = _decode(files["long_audio.webm"], [(3.0, 4.5)])
    assert isinstance(clip, DecodedClip), clip
    assert clip.span[1] == pytest.approx(4.0, abs=0.02)
    assert len(set(clip.frame_times)) == 4  # no target past the video's last frame
