"""train/wds_shards.py against pipeline/shards.py's reader (train/tar_readers.py) on shards written by ShardWriter:
the same samples, the same ShardError cases, the same loader batches."""

from __future__ import annotations

import dataclasses
import os
import tarfile

import pytest
import torch

from pipeline import storage
from pipeline.manifest import Manifest, shard_uris, write_manifest
from pipeline.schema import encode_key
from pipeline.shards import ShardError, ShardLimits, ShardWriter, iter_shard
from tests.support.ids import CLIP_IDS
from tests.support.samples import make_sample
from tests.train.fixtures_train import moving_dataset
from train.config import DataConfig
from train.loader import StreamingLoader
from train.wds_shards import iter_wds_shard

pytestmark = pytest.mark.timeout(120)


def write_dataset(root: str, max_samples: int = 3) -> Manifest:
    with ShardWriter(root, "part", ShardLimits(max_samples=max_samples)) as writer:
        for i, clip_id in enumerate(CLIP_IDS):
            writer.write(make_sample(clip_id, num_frames=2 + i % 3, video_id=f"v{i}"))
    manifest = Manifest(shards=tuple(writer.entries))
    write_manifest(root, manifest)
    return manifest


def read(reader, uri: str, entry) -> tuple[list[list], str | None]:
    """Each sample as its (key, value) list in order, and the ShardError's message, if any."""
    samples = []
    try:
        for sample in reader(uri, entry):
            samples.append(list(sample.items()))
    except ShardError as exc:
        return samples, str(exc)
    return samples, None


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "ds")
    return f"{request.getfixturevalue('s3_bucket')}/some/prefix"


def test_same_samples_in_the_same_order(root):
    manifest = write_dataset(root)
    for uri, entry in zip(shard_uris(manifest, root), manifest.shards):
        want = read(iter_shard, uri, entry)
        assert want[0] and want[1] is None
        assert read(iter_wds_shard, uri, entry) == want
        assert read(iter_wds_shard, uri, None) == want
        sha_only = dataclasses.replace(entry, xxh3_64="")  # a manifest from before the fast hash
        assert read(iter_wds_shard, uri, sha_only) == want


def _member_offsets(path) -> list[tuple[int, int]]:
    """(header offset, data offset) of each member."""
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


def _damage(path, case: str) -> None:
    data = bytearray(path.read_bytes())
    header, payload = _member_offsets(path)[7]  # a member in the second sample
    if case == "missing":
        os.remove(path)
        return
    if case == "truncated":
        data = data[: len(data) // 2]
    elif case == "cut at a header":
        data = data[:header]
    elif case == "cut inside a header":
        data = data[: header + 100]
    elif case == "altered payload":
        data[payload + 5] ^= 0xFF
    elif case == "garbled name":
        data[header + 10 : header + 20] = b"garbage!!!"
    elif case == "garbled size":  # not an octal number
        data[header + 124 : header + 136] = b"zz" + bytes(10)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "cut at a header",
        "cut inside a header",
        "altered payload",
        "garbled name",
        "garbled size",
    ],
)
@pytest.mark.parametrize("where", ["file", "s3"])
def test_same_shard_errors(request, tmp_path, case, where):
    manifest = write_dataset(str(tmp_path), max_samples=len(CLIP_IDS))
    uri, entry = str(tmp_path / "part-000.tar"), manifest.shards[0]
    _damage(tmp_path / "part-000.tar", case)
    if where == "s3":  # the damaged folder as it is, on the loopback S3 server
        root = f"{request.getfixturevalue('s3_bucket')}/damaged"
        for name in os.listdir(tmp_path):
            storage.put_file(str(tmp_path / name), f"{root}/{name}")
        uri = f"{root}/part-000.tar"
    want, want_error = read(iter_shard, uri, entry)
    got, got_error = read(iter_wds_shard, uri, entry)
    assert want_error and got_error and got_error.startswith(f"{uri}: ")
    if case in ("missing", "truncated", "cut at a header", "cut inside a header"):
        assert got == want[: len(got)], "the same samples, or fewer (tarfile reads ahead; see train/wds_shards.py)"
        assert got_error == want_error
        return
    # damage inside the second sample: exactly the first goes on, through either reader
    assert len(got) == len(want) == 1 and got == want
    second = f"{uri}: sample {encode_key(CLIP_IDS[1])!r}"
    assert got_error == f"{second} does not match its digest in the shard's index (corrupt)"
    if case == "garbled size":  # our reader refuses the size field itself; tarfile stops quietly before it
        assert want_error == f"{uri}: unreadable tar: invalid literal for int() with base 8: b'zz'"
    else:  # our reader skips header checksums where the index's digests cover the headers
        assert want_error == got_error


def test_a_member_that_runs_past_the_shard_is_refused(tmp_path):
    """With the index in use our reader computes no header checksum; a size field that still parses but would
    run past the shard is refused before anything is read for it."""
    manifest = write_dataset(str(tmp_path), max_samples=len(CLIP_IDS))
    path, entry = tmp_path / "part-000.tar", manifest.shards[0]
    data = bytearray(path.read_bytes())
    header = _member_offsets(path)[7][0]
    data[header + 124 : header + 136] = b"77777777777\0"  # 8 GiB
    path.write_bytes(bytes(data))
    got, error = read(iter_shard, str(path), entry)
    assert len(got) == 1 and error == f"{path}: unreadable tar: a member of 8589934591 bytes runs past the shard's end"
    got, error = read(iter_shard, str(path), None)  # no index: the header checksum speaks
    assert error == f"{path}: unreadable or truncated tar: bad header checksum"


def test_unreadable_without_a_manifest_entry(tmp_path):
    write_dataset(str(tmp_path))
    path = tmp_path / "part-000.tar"
    path.write_bytes(path.read_bytes()[:1500])  # inside the first member's data
    with pytest.raises(ShardError, match=f"{path}: unreadable tar: unexpected end of data"):
        list(iter_wds_shard(str(path)))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="empty.tar: unreadable tar"):
        list(iter_wds_shard(str(tmp_path / "empty.tar")))


def test_the_loader_gives_the_same_batches_through_either_reader(tmp_path):
    """data.tar_reader=ours (the default) and webdataset: the same batches, the same errors counted."""
    root = moving_dataset(str(tmp_path / "ds"), 12, seed=4, max_samples=3)
    os.remove(os.path.join(root, "part01-000.tar"))  # a missing shard is counted the same way too
    garbled = sorted(name for name in os.listdir(root) if name.endswith(".tar"))[0]
    _damage(tmp_path / "ds" / garbled, "garbled size")  # each reader words this one its own way (above)

    def batches(reader: str) -> tuple[list[tuple], tuple[int, int], list[str]]:
        sizes = dict(batch_size=3, num_frames=4, image_size=32, num_workers=0, shards_per_window=2, shuffle_buffer=4)
        cfg = DataConfig(train=[root], tar_reader=reader, **sizes)
        loader = StreamingLoader(cfg, seed=0, rank=0, world_size=1)
        out = [(b["keys"], b["digest"], b["frames"].clone(), b["subtitle"]) for b in (loader.next() for _ in range(6))]
        loader.close()
        return out, loader.errors(), loader.recent_shard_errors

    want, want_errors, want_lines = batches("webdataset")
    got, got_errors, got_lines = batches("ours")
    assert got_errors == want_errors and want_errors[0] > 0
    assert any("invalid literal" in line for line in got_lines), got_lines  # read by ours
    assert not any("invalid literal" in line for line in want_lines), want_lines  # read by webdataset
    for (keys, digest, frames, text), (want_keys, want_digest, want_frames, want_text) in zip(got, want, strict=True):
        assert (keys, digest) == (want_keys, want_digest)
        assert torch.equal(frames, want_frames) and torch.equal(text, want_text)


def test_an_unknown_reader_is_one_clear_line():
    with pytest.raises(ValueError, match="data.tar_reader: must be one of"):
        DataConfig(train=["x"], tar_reader="tarfile")
