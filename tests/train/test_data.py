"""The streaming loader on real shards: equal batch counts, determinism, resume position, bad input."""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.manifest import ManifestError
from tests.support.damage import flip_payload_byte
from tests.train.fixtures_train import COMBOS, moving_clip, moving_dataset, write_dataset
from train.config import DataConfig
from train.frames import normalize_frames
from train.loader import StreamingLoader
from train.sample_transform import frame_indices
from train.shard_stream import seeded

pytestmark = pytest.mark.timeout(120)


def data_cfg(train: list[str], **kw) -> DataConfig:
    base = dict(
        train=train, batch_size=2, num_frames=4, image_size=32, num_workers=0, shards_per_window=2, shuffle_buffer=4
    )
    base.update(kw)
    return DataConfig(**base)


def take(loader: StreamingLoader, n: int) -> list[dict]:
    batches = [loader.next() for _ in range(n)]
    loader.close()
    return batches


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """3 shards of 1, 7 and 2 clips."""
    return moving_dataset(str(tmp_path_factory.mktemp("uneven")), 10, seed=3, shard_sizes=[1, 7, 2])


def test_uneven_shards_same_batches_on_every_rank_and_worker(uneven):
    """2 ranks x 2 real worker processes over 3 uneven shards: every rank gets full batches, no hang."""
    cfg = data_cfg([uneven], num_workers=2)
    steps = 2 * 10 // (2 * 2) + 3  # more than an epoch per rank
    results: dict[int, list[dict]] = {}

    def run(rank: int) -> None:
        results[rank] = take(StreamingLoader(cfg, seed=0, rank=rank, world_size=2), steps)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(not t.is_alive() for t in threads), "a rank hung"
    for rank in range(2):
        assert len(results[rank]) == steps
        assert all(b["frames"].shape == (2, 4, 3, 32, 32) and b["frames"].dtype == torch.uint8 for b in results[rank])
        assert all(b["subtitle"].shape == (2, 70) for b in results[rank])
    keys = [k for r in range(2) for b in results[r] for k in b["keys"]]
    assert len(set(keys)) == 10, "the streams together cover every clip"


def test_deterministic_and_resumes_from_position(uneven):
    cfg = data_cfg([uneven], num_workers=2)
    full = [b["digest"] for b in take(StreamingLoader(cfg, seed=5, rank=1, world_size=2), 7)]
    again = [b["digest"] for b in take(StreamingLoader(cfg, seed=5, rank=1, world_size=2), 7)]
    assert full == again
    first = StreamingLoader(cfg, seed=5, rank=1, world_size=2)
    take(first, 3)
    resumed = StreamingLoader(cfg, seed=5, rank=1, world_size=2, state=first.state_dict())
    assert [b["digest"] for b in take(resumed, 4)] == full[3:]
    other_seed = [b["digest"] for b in take(StreamingLoader(cfg, seed=6, rank=1, world_size=2), 7)]
    assert other_seed != full


def test_weighted_sources(tmp_path):
    a = moving_dataset(str(tmp_path / "a"), 8, seed=1, max_samples=4, prefix="a")
    b = moving_dataset(str(tmp_path / "b"), 8, seed=2, max_samples=4, prefix="b")
    loader = StreamingLoader(data_cfg([a, b], weights=[1.0, 0.0], batch_size=4), seed=0, rank=0, world_size=1)
    keys = [k for batch in take(loader, 6) for k in batch["keys"]]
    assert all(k.startswith("a") for k in keys)
    assert loader.samples_per_epoch == 16


def test_missing_and_corrupt_shards_are_skipped_and_counted(tmp_path, caplog):
    """part01 (clips 3-5) is missing; one byte of clip 7's first frame in part02 (clips 6-8) is flipped (the
    JPEG still decodes). Each sample is checked before it goes on, so clip 6 trains and clips 7 and 8 never do."""
    root = moving_dataset(str(tmp_path / "ds"), 12, seed=4, max_samples=3)
    os.remove(os.path.join(root, "part01-000.tar"))
    flip_payload_byte(Path(root) / "part02-000.tar", "clip7%2E0%2Emp4")
    loader = StreamingLoader(data_cfg([root], batch_size=3, shards_per_window=1), seed=0, rank=0, world_size=1)
    batches = take(loader, 7)  # 21 rows: three epochs of the 7 good clips (a window of one shard is drained whole)
    assert all(b["frames"].shape[0] == 3 for b in batches)
    good = [f"clip{i}%2E0%2Emp4" for i in (0, 1, 2, 6, 9, 10, 11)]
    assert Counter(k for b in batches for k in b["keys"]) == dict.fromkeys(good, 3)
    shard_errors, sample_errors = loader.errors()
    assert sample_errors == 0
    assert 4 <= shard_errors <= 6  # 2 bad shards an epoch; the third epoch's last ones may not be reached yet
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping the rest of a shard")]
    missing = f"skipping the rest of a shard: {root}/part01-000.tar: shard missing"
    damaged = f"skipping the rest of a shard: {root}/part02-000.tar: sample 'clip7%2E0%2Emp4' does not match its digest"
    assert len(skipped) == shard_errors and all(m.startswith((missing, damaged)) for m in skipped)
    assert any(m.startswith(missing) for m in skipped) and any(m.startswith(damaged) for m in skipped)


def test_undecodable_samples_are_skipped_counted_and_their_rows_refilled(tmp_path):
    """Clips whose frames are not JPEG sit in intact shards: each is counted once per visit, never
    reaches a batch, batches stay full, and a resume mid-stream gives the same batches."""
    rng = np.random.default_rng(7)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng) for i in range(12)]
    bad = {2, 3, 9}
    clips = [
        dataclasses.replace(c, frames=(b"not a jpeg",) * len(c.frames)) if i in bad else c for i, c in enumerate(clips)
    ]
    root = write_dataset(str(tmp_path / "ds"), clips, max_samples=6)
    cfg = data_cfg([root], batch_size=4, shards_per_window=2, shuffle_buffer=3)
    loader = StreamingLoader(cfg, seed=1, rank=0, world_size=1)
    batches = take(loader, 6)  # 24 rows: more than 2 passes over the 9 good clips
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 24 and not {k for k in keys if k.split("%")[0] in {f"clip{i}" for i in bad}}
    shard_errors, sample_errors = loader.errors()
    assert shard_errors == 0 and 6 <= sample_errors <= 9  # each bad clip once per pass, 2 or 3 passes
    first = StreamingLoader(cfg, seed=1, rank=0, world_size=1)
    take(first, 2)
    resumed = StreamingLoader(cfg, seed=1, rank=0, world_size=1, state=first.state_dict())
    assert [b["digest"] for b in take(resumed, 4)] == [b["digest"] for b in batches[2:]]
    assert resumed.errors() == loader.errors()


def test_bad_inputs_have_clear_messages(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        StreamingLoader(data_cfg([str(tmp_path / "nothing")]), seed=0, rank=0, world_size=1)
    root = moving_dataset(str(tmp_path / "v"), 2, seed=0)
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(ManifestError, match="schema version 99"):
        StreamingLoader(data_cfg([root]), seed=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="data.weights"):
        data_cfg(["a", "b"], weights=[1.0])
    with pytest.raises(ValueError, match="data.num_workers"):
        StreamingLoader(
            data_cfg([moving_dataset(str(tmp_path / "w"), 2, seed=0)], num_workers=2),
            seed=0,
            rank=0,
            world_size=1,
            state={"batches": 0, "streams": [{}]},
        )


def test_frame_sampling_and_normalisation():
    assert frame_indices(8, 4, None) == [0, 2, 4, 7]

    draws = {tuple(frame_indices(24, 4, seeded(i))) for i in range(20)}
    assert len(draws) > 1 and all(list(d) == sorted(d) and 0 <= d[0] and d[-1] <= 23 for d in draws)
    assert frame_indices(3, 4, seeded(0)) == [0, 0, 1, 2]
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(
        normalize_frames(white)[0, :, 0, 0],
        torch.tensor([(1 - 0.48145466) / 0.26862954, (1 - 0.4578275) / 0.26130258, (1 - 0.40821073) / 0.27577711]),
    )


def _batches(root: str, size: int) -> dict[str, dict]:
    return {
        name: take(StreamingLoader(data_cfg([root], decoder=name, image_size=size), 0, 0, 1), 1)[0]
        for name in ("simplejpeg", "torchvision", "pillow")
    }


def test_decoders_agree_exactly_at_the_stored_size(uneven):
    """All three decode with libjpeg(-turbo) in place: the same pixels (a red/blue swap, ~2 mean abs diff on
    these frames, or a +5 brightness offset would fail)."""
    batches = _batches(uneven, 32)
    ref = batches.pop("simplejpeg")
    assert ref["frames"].shape == (2, 4, 3, 32, 32) and ref["image"].shape == (2, 3, 32, 32)
    for name, batch in batches.items():
        assert batch["keys"] == ref["keys"]
        assert torch.equal(batch["frames"], ref["frames"]) and torch.equal(batch["image"], ref["image"]), name


def test_decoders_resized_stay_close_to_the_stored_frames_resized(uneven):
    """32 -> 24: the reference is the stored-size decode resized by train/frames.py's bicubic antialiased resize.
    torchvision decodes then resizes that way (equal); Pillow's own bicubic differs by rounding (mean < 0.01,
    max 2); simplejpeg scales in the DCT domain (libjpeg's 6/8) instead: measured mean 2.0 here, bound 2.5."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    stored = _batches(uneven, 32)["simplejpeg"]
    batches = _batches(uneven, 24)
    for field in ("frames", "image"):
        flat = stored[field].flatten(0, -4)
        ref = resize(flat, [24, 24], interpolation=InterpolationMode.BICUBIC, antialias=True).view(
            *stored[field].shape[:-2], 24, 24
        )
        for name, (mean, most) in {"torchvision": (0, 0), "pillow": (0.01, 2), "simplejpeg": (2.5, 40)}.items():
            diff = (batches[name][field].float() - ref.float()).abs()
            assert diff.mean() <= mean and diff.max() <= most, (name, field, diff.mean(), diff.max())


@pytest.mark.parametrize("decoder", ["simplejpeg", "torchvision", "pillow"])
@pytest.mark.parametrize("size", [32, 24])  # stored size (decoded in place) and a resize
def test_transform_decodes_each_frame_once_into_its_slot(decoder, size):
    from train.frames import decode_jpegs
    from train.sample_transform import SampleTransform

    clip = moving_clip(0, COMBOS[5], np.random.default_rng(3), num_frames=3)  # middle frame 1
    transform = SampleTransform(num_frames=4, image_size=size, decoder=decoder)
    item = transform(clip, None)  # 3 stored frames for 4 slots: indices [0, 0, 1, 2]
    assert item["indices"] == [0, 0, 1, 2] and item["frames"].shape == (4, 3, size, size)
    each = decode_jpegs(list(clip.frames), size, decoder)
    assert torch.equal(item["frames"], each[[0, 0, 1, 2]]) and torch.equal(item["image"], each[1])
    with pytest.raises((ValueError, RuntimeError, OSError)):  # the errors the stream counts and skips
        transform(clip.__class__(meta=clip.meta, frames=(b"not a jpeg",) * 3, subtitle="s", caption="c"), None)


def test_frames_that_contradict_their_metadata_are_refused():
    """The metadata's frame size spares the header read; a JPEG of another size is an error, never half a frame."""
    from train.sample_transform import SampleTransform

    clip = moving_clip(0, COMBOS[5], np.random.default_rng(3), num_frames=3)  # 32x32 JPEGs
    for claimed, message in ((24, "too small"), (40, "a frame is 32x32, the sample's metadata says 40x40")):
        liar = clip.__class__(meta=dataclasses.replace(clip.meta, frame_size=(claimed, claimed)), frames=clip.frames)
        with pytest.raises(ValueError, match=message):
            SampleTransform(num_frames=4, image_size=claimed)(liar, None)


def segment_id(tensor: torch.Tensor) -> tuple:
    """Which memory holds a batch tensor: its address here, or the shared-memory segment's inode."""
    storage = tensor.untyped_storage()
    if storage.is_shared():
        return ("shm", os.fstat(storage._share_fd_cpu_()[0]).st_ino)
    return ("local", storage.data_ptr())


@pytest.mark.parametrize("workers", [0, 2])
def test_pooled_buffers_are_reused_but_never_overwrite_a_held_batch(uneven, workers):
    """Batches used one at a time come back to the pool; batches kept alive are never refilled."""
    cfg = data_cfg([uneven], num_workers=workers)
    steps = 14  # more than a worker's pool slots (prefetch_factor + 4 = 6)
    loader = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
    streamed, segments = [], set()
    for _ in range(steps):
        batch = loader.next()
        segments.add(segment_id(batch["frames"]))
        streamed.append((batch["digest"], batch["frames"].clone(), batch["image"].clone()))
        del batch
    loader.close()
    # a worker: prefetched batches, the one in use, one released at the next fetch; in this process:
    # the one in use, the previous one (the generator's locals still hold it at the fetch) and the next
    in_flight = cfg.prefetch_factor + 2 if workers else 3
    assert len(segments) <= max(workers, 1) * in_flight, f"{len(segments)} buffers for {steps} batches"
    held = take(StreamingLoader(cfg, seed=0, rank=0, world_size=1), steps)  # all alive at once
    for (digest, frames, image), batch in zip(streamed, held):
        assert batch["digest"] == digest
        assert torch.equal(batch["frames"], frames) and torch.equal(batch["image"], image)
    assert len({segment_id(b["frames"]) for b in held}) == steps


def test_tokenizer_fast_path_gives_open_clips_ids():
    """Plain ASCII text skips ftfy; every string, plain or not, must get open_clip's own ids."""
    from open_clip.tokenizer import SimpleTokenizer

    from train.tokenizer import PLAIN_TEXT, get_tokenizer

    ours, theirs = get_tokenizer(70), SimpleTokenizer(context_length=70)
    alphabet = list("abcXYZ019 .,!?'-&;#\t\n\r\x0b\x0c\x1b\x7f") + [
        "&amp;",
        "&lt;",
        "\u00e9",
        "\u00c3\u00a9",
        "\u201c",
        "\ufb01",
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["Don't  STOP\r\nme now", "  spaced\tout\n", "fish &amp; chips", "caf\u00c3\u00a9", ""]
    texts += ["word " * n for n in (67, 68, 69, 200)] + ["caf\u00e9 " * 90]  # cut at 70 with <eot> kept last
    plain = sum(bool(PLAIN_TEXT.fullmatch(t)) for t in texts)
    assert 100 < plain < len(texts) - 100  # both paths are exercised
    assert torch.equal(ours(texts), theirs(texts))
