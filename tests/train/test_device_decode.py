"""data.decode_device=cuda: the workers ship JPEG bytes and the training process decodes each batch on a device.

On CPU the shipped path runs with the CPU as the decoding device and must give exactly the batches of the
in-worker path with the same decoder (torchvision's libjpeg-turbo, and the same bicubic antialiased resize); on a
GPU (marker gpu) nvJPEG's frames stay within a bound of the CPU's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.train.fixtures_train import COMBOS, moving_clip, moving_dataset, write_dataset
from train.config import DataConfig
from train.loader import StreamingLoader

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")


def cfg(root: str, **kw) -> DataConfig:
    base = dict(train=[root], batch_size=3, num_frames=4, image_size=32, num_workers=0, shards_per_window=2)
    return DataConfig(**{**base, "shuffle_buffer": 4, **kw})


def batches(config: DataConfig, n: int, decode_on: torch.device | None = None) -> tuple[list[dict], tuple]:
    loader = StreamingLoader(config, seed=5, rank=0, world_size=1, decode_on=decode_on)
    out = [loader.next() for _ in range(n)]
    loader.close()
    return out, loader.errors()


@pytest.fixture(scope="module")
def clips_root(tmp_path_factory) -> str:
    return moving_dataset(str(tmp_path_factory.mktemp("shipped")), 9, seed=2, shard_sizes=[4, 5])


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("size", [32, 24])  # the stored size, and a resize on the decoding device
def test_shipped_jpegs_give_the_batches_of_the_worker_path(clips_root, size, workers):
    want, want_errors = batches(cfg(clips_root, image_size=size, num_workers=workers, decoder="torchvision"), 4)
    got, got_errors = batches(cfg(clips_root, image_size=size, num_workers=workers, decode_device="cuda"), 4, CPU)
    assert got_errors == want_errors == (0, 0)
    for mine, theirs in zip(got, want, strict=True):
        assert mine["frames"].shape == (3, 4, 3, size, size) and mine["image"].shape == (3, 3, size, size)
        assert mine["frames"].dtype == torch.uint8 and mine["frames"].device == CPU
        assert (mine["keys"], mine["digest"]) == (theirs["keys"], theirs["digest"])
        assert torch.equal(mine["frames"], theirs["frames"]) and torch.equal(mine["image"], theirs["image"])
        assert torch.equal(mine["subtitle"], theirs["subtitle"]) and torch.equal(mine["caption"], theirs["caption"])
        assert not {"jpegs", "jpeg_slots", "jpeg_copies"} & mine.keys()


def test_frames_that_are_no_jpeg_are_refilled_in_the_worker(tmp_path):
    """A frame that is not a JPEG fails its header check in the worker: counted, its row refilled, as when the
    worker decodes."""
    rng = np.random.default_rng(7)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng) for i in range(8)]
    clips[3] = dataclasses.replace(clips[3], frames=(b"not a jpeg",) * len(clips[3].frames))
    root = write_dataset(str(tmp_path / "ds"), clips, max_samples=4)
    want, want_errors = batches(cfg(root, decoder="torchvision"), 5)
    got, got_errors = batches(cfg(root, decode_device="cuda"), 5, CPU)
    assert got_errors == want_errors and want_errors[1] >= 1
    assert [b["digest"] for b in got] == [b["digest"] for b in want]
    assert not any("clip3" in key for b in got for key in b["keys"])


def test_a_frame_that_fails_on_the_device_is_left_black_counted_and_logged(tmp_path, caplog):
    """A JPEG cut short passes the header check and fails to decode on the device: the other frames of the batch
    still decode, it stays black, and the loader counts and names it."""
    rng = np.random.default_rng(8)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng, num_frames=4) for i in range(3)]
    whole = clips[1].frames[0]
    clips[1] = dataclasses.replace(clips[1], frames=(whole[:-30], *clips[1].frames[1:]))  # the scan cut short
    root = write_dataset(str(tmp_path / "ds"), clips, max_samples=3)
    config = cfg(root, shards_per_window=1, shuffle_buffer=1)  # 4 of 4 stored frames: each decoded once
    (batch,), errors = batches(dataclasses.replace(config, decode_device="cuda"), 1, CPU)
    assert sorted(batch["keys"]) == sorted(c.key for c in clips)
    row = batch["keys"].index(clips[1].key)
    assert errors == (0, 1)
    (line,) = [r.message for r in caplog.records if "did not decode" in r.message]
    assert line.startswith(f"a frame of sample {clips[1].key} did not decode on cpu (left black): ") and "trunc" in line
    assert not batch["frames"][row, 0].any(), "the frame that failed is black"
    assert batch["frames"][row, 1:].float().mean() > 10 and batch["image"][row].float().mean() > 10
    others = [r for r in range(3) if r != row]
    assert batch["frames"][others].float().mean() > 10, "the rest of the batch decoded"


def test_frames_that_failed_on_the_device_stay_counted_across_a_resume(tmp_path):
    """The count is in the data state: a resume with the same streams goes on from it, and one at another number
    of streams adds it to the sample errors it carries over (train/stream_remap.py)."""
    rng = np.random.default_rng(8)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng, num_frames=4) for i in range(3)]
    clips[1] = dataclasses.replace(clips[1], frames=(clips[1].frames[0][:-30], *clips[1].frames[1:]))
    root = write_dataset(str(tmp_path / "ds"), clips, max_samples=3)
    config = cfg(root, shards_per_window=1, shuffle_buffer=1, decode_device="cuda")
    loader = StreamingLoader(config, seed=5, rank=0, world_size=1, decode_on=CPU)
    loader.next()
    state = loader.state_dict()
    assert state["decode_errors"] == 1 and loader.errors() == (0, 1)
    resumed = StreamingLoader(config, seed=5, rank=0, world_size=1, state=state, decode_on=CPU)
    assert resumed.errors() == (0, 1) and resumed.state_dict()["decode_errors"] == 1
    remapped = StreamingLoader(
        config, seed=5, rank=0, world_size=2, carry=loader.carry_state(), saved=[state], decode_on=CPU
    )
    assert remapped.errors() == (0, 1) and "decode_errors" not in remapped.state_dict()


def test_a_cpu_decoder_with_gpu_decoding_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"^data.decoder: pillow would not be used: with data.decode_device=cuda"):
        DataConfig(train=["x"], decoder="pillow", decode_device="cuda")


def test_cuda_without_a_gpu_is_one_clear_line(clips_root):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"^data.decode_device=cuda: no CUDA device here"):
        StreamingLoader(cfg(clips_root, decode_device="cuda"), seed=5, rank=0, world_size=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size", [32, 24])
def test_nvjpeg_frames_stay_close_to_the_cpu_decoders(clips_root, size):
    want, _ = batches(cfg(clips_root, image_size=size, decoder="torchvision"), 3)
    got, errors = batches(cfg(clips_root, image_size=size, decode_device="cuda"), 3)
    assert errors == (0, 0)
    for mine, theirs in zip(got, want, strict=True):
        assert mine["frames"].is_cuda and mine["keys"] == theirs["keys"]
        diff = (mine["frames"].cpu().float() - theirs["frames"].float()).abs()
        assert diff.mean() < 1.5 and diff.max() <= 40, (diff.mean(), diff.max())
