"""Helpers and fixtures for the preprocessing job tests: a small ffmpeg-made corpus, a Ray cluster, run helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tiers import marks_users

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# (video id, ffmpeg encoder args, extension): H.264, VP9 and MPEG-2 sources.
CODECS = (
    (["-c:v", "libx264", "-preset", "veryfast", "-bf", "2", "-g", "25", "-pix_fmt", "yuv420p"], "mp4"),
    (["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25"], "webm"),
    (["-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-q:v", "4"], "ts"),
)
PATTERNS = ("testsrc2", "smptebars", "rgbtestsrc", "testsrc", "yuvtestsrc", "smptehdbars")


def make_corpus(root: Path, videos: int = 6, clips: int = 2) -> dict[str, Path]:
    """``videos`` 4 s sources (H.264 / VP9 / MPEG-2 in turn), ``clips`` clips each; returns the input paths."""
    vdir = root / "videos"
    vdir.mkdir(parents=True, exist_ok=True)
    meta, subs, caps = [], [], []
    for v in range(videos):
        args, ext = CODECS[v % len(CODECS)]
        video_id = f"vid{v:02d}"
        src = f"{PATTERNS[v % len(PATTERNS)]}=size=160x120:rate=25"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-nostdin",
                "-y",
                "-f",
                "lavfi",
                "-i",
                src,
                "-t",
                "4",
                *args,
                str(vdir / f"{video_id}.{ext}"),
            ],
            check=True,
            timeout=60,
        )
        entries = []
        for c in range(clips):
            clip_id = f"{video_id}.{c}.mp4"
            entries.append({"clip_id": clip_id, "span": [_ts(c * 1.5), _ts(c * 1.5 + 1.5)]})
            subs.append({"clip_id": clip_id, "text": f"subtitle {video_id} {c}"})
            caps.append({"clip_id": clip_id, "caption": f"a {PATTERNS[v % len(PATTERNS)]} pattern, clip {c}"})
        meta.append({"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}", "clip": entries})
    paths = {
        "videos": vdir,
        "metadata": root / "meta.jsonl",
        "subtitles": root / "subs.jsonl",
        "captions": root / "caps.jsonl",
    }
    write_jsonl(paths["metadata"], meta)
    write_jsonl(paths["subtitles"], subs)
    write_jsonl(paths["captions"], caps)
    return paths


def _ts(seconds: float) -> str:
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:06.3f}"


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def cli_args(corpus: dict[str, Path], output, *extra: str) -> list[str]:
    """Command-line arguments of a small, fast job over ``corpus`` (a text source set to None is left out)."""
    texts = [(f"--{name}", str(corpus[name])) for name in ("subtitles", "captions") if corpus.get(name) is not None]
    return [
        *("--metadata", str(corpus["metadata"]), "--videos", str(corpus["videos"])),
        *(arg for pair in texts for arg in pair),
        *("--output", str(output), "--clips-per-shard", "3", "--num-frames", "4", "--short-side", "64"),
        "--no-progress",
        *extra,
    ]


def config(corpus: dict[str, Path], output, *extra: str):
    from preprocess.shard import build_config, build_parser

    return build_config(build_parser().parse_args(cli_args(corpus, output, *extra)))


def dataset_bytes(out: Path) -> dict[str, bytes]:
    """The bytes that must be identical between runs: shard tars and the manifest."""
    names = sorted(p.name for p in out.glob("shard-*.tar")) + ["manifest.json", "sizes.json"]
    return {name: (out / name).read_bytes() for name in names}


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}, **extra)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` and `ray` are the venv's
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
@marks_users("ray")
def ray_local(s3_server):
    """A real 2-CPU local Ray cluster for this module (started after the S3 env is set, so workers see it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
