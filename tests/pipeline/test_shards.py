import dataclasses
import io
import json
import subprocess
import tarfile

import pytest

from pipeline import storage
from pipeline.manifest import Manifest, ManifestError, read_manifest, write_manifest
from pipeline.schema import encode_key
from pipeline.shards import ShardError, ShardLimits, ShardWriter, iter_dataset, iter_shard
from tests.support.damage import flip_payload_byte, flip_trailer_byte, member_offsets
from tests.support.ids import CLIP_IDS
from tests.support.samples import make_sample


def write_dataset(root: str, clip_ids, limits: ShardLimits | None = None) -> Manifest:
    with ShardWriter(root, "part", limits or ShardLimits(max_samples=3)) as writer:
        for i, clip_id in enumerate(clip_ids):
            writer.write(make_sample(clip_id, num_frames=2 + i % 3, video_id=f"v{i}"))
    manifest = Manifest(shards=tuple(writer.entries), config={"test": True})
    write_manifest(root, manifest)
    return manifest


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "ds")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/some/prefix"


def test_round_trip(root):
    manifest = write_dataset(root, CLIP_IDS)
    assert [s.samples for s in manifest.shards] == [3, 3, 2]
    back = read_manifest(root)
    assert back == manifest
    got = list(iter_dataset(root))
    assert [s.meta.clip_id for s in got] == CLIP_IDS
    for i, sample in enumerate(got):
        want = make_sample(CLIP_IDS[i], num_frames=2 + i % 3, video_id=f"v{i}")
        assert sample == want
    assert storage.exists(storage.join(root, "sizes.json"))
    assert json.loads(storage.read_bytes(storage.join(root, "sizes.json"))) == manifest.sizes


def test_same_samples_same_bytes(tmp_path):
    a = write_dataset(str(tmp_path / "a"), CLIP_IDS)
    b = write_dataset(str(tmp_path / "b"), CLIP_IDS)
    assert a.shards == b.shards
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_byte_limit_rolls_over(tmp_path):
    manifest = write_dataset(str(tmp_path), CLIP_IDS, ShardLimits(max_samples=100, max_bytes=4096))
    assert len(manifest.shards) > 1
    assert sum(s.samples for s in manifest.shards) == len(CLIP_IDS)


def test_stock_webdataset_and_tar_read_shards(tmp_path):
    import webdataset as wds

    write_dataset(str(tmp_path), CLIP_IDS)
    url = str(tmp_path / "part-000.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert len(samples) == 3
    assert samples[0]["f000.jpg"].size == (32, 24)
    assert (
        json.loads(samples[0]["json"])["clip_id"] == CLIP_IDS[0]
        if isinstance(samples[0]["json"], (bytes, str))
        else samples[0]["json"]["clip_id"] == CLIP_IDS[0]
    )
    listing = subprocess.run(["tar", "tf", url], capture_output=True, text=True, check=True).stdout.split()
    assert listing[0].endswith(".f000.jpg") and all("/" not in n for n in listing)


def test_truncated_shard_is_named(tmp_path):
    manifest = write_dataset(str(tmp_path), CLIP_IDS)
    path = tmp_path / "part-001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="part-001.tar.*(truncated|unreadable)"):
        list(iter_dataset(str(tmp_path), manifest))


def test_truncated_tar_without_manifest_is_named(tmp_path):
    write_dataset(str(tmp_path), CLIP_IDS)
    path = tmp_path / "part-000.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ShardError, match="part-000.tar: unreadable or truncated tar"):
        list(iter_shard(str(path)))


KEYS = [encode_key(c) for c in CLIP_IDS]  # shards part-000: 0-2, part-001: 3-5, part-002: 6-7


def read_keys(root: str, manifest: Manifest | None = None) -> tuple[list[str], list[str]]:
    """Keys of the samples iter_dataset hands on, and the ShardErrors it reported."""
    errors = []
    keys = [s.key for s in iter_dataset(root, manifest, on_error=lambda exc: errors.append(str(exc)))]
    return keys, errors


@pytest.mark.parametrize("sample", [0, 1, 2])
def test_a_flipped_byte_stops_its_shard_before_the_sample(tmp_path, sample):
    """Each sample is checked against the shard's index before it goes on: the samples before the damaged
    one, exactly, then the error; the other shards whole. The last sample waits for the whole-shard check."""
    root = str(tmp_path)
    write_dataset(root, CLIP_IDS)
    flip_payload_byte(tmp_path / "part-000.tar", KEYS[sample])
    keys, errors = read_keys(root)
    assert keys == KEYS[:sample] + KEYS[3:]
    assert errors == [
        f"{tmp_path}/part-000.tar: sample {KEYS[sample]!r} does not match its digest in the shard's index (corrupt)"
    ]
    with pytest.raises(ShardError, match="part-000.tar: sample"):
        list(iter_dataset(root))


def test_damage_after_the_last_sample_holds_back_the_last_sample(tmp_path):
    write_dataset(str(tmp_path), CLIP_IDS)
    flip_trailer_byte(tmp_path / "part-001.tar")
    keys, errors = read_keys(str(tmp_path))
    assert keys == KEYS[:5] + KEYS[6:]
    assert errors == [f"{tmp_path}/part-001.tar: xxh3_64 mismatch with the manifest (corrupt shard)"]


def test_damage_after_the_last_sample_holds_it_back_wherever_a_read_ends(tmp_path, monkeypatch):
    """The reader reads in chunks; with a chunk that ends right after the first end-of-archive block, the end of
    the shard is first met by the drain before the last sample goes on: that drain must raise, too."""
    import pipeline.shards

    write_dataset(str(tmp_path), CLIP_IDS)
    path = tmp_path / "part-001.tar"
    end_of_archive = _archive_end(path)
    monkeypatch.setattr(pipeline.shards, "_CHUNK", end_of_archive + 512)
    flip_trailer_byte(path)
    keys, errors = read_keys(str(tmp_path))
    assert keys == KEYS[:5] + KEYS[6:]
    assert errors == [f"{tmp_path}/part-001.tar: xxh3_64 mismatch with the manifest (corrupt shard)"]


def _archive_end(path) -> int:
    """Where a tar's end-of-archive blocks start."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


@pytest.mark.parametrize("fields", [("index_xxh3_64",), ("index_xxh3_64", "xxh3_64")])
def test_without_an_index_a_shard_is_checked_whole_before_any_sample(tmp_path, fields):
    """Manifests written before the sample index (and before the fast hash): the reader checks the whole shard
    first (pipeline/shard_check.py), so a damaged shard gives no sample at all."""
    manifest = write_dataset(str(tmp_path), CLIP_IDS)
    old = dataclasses.replace(
        manifest, shards=tuple(dataclasses.replace(e, **dict.fromkeys(fields, "")) for e in manifest.shards)
    )
    write_manifest(str(tmp_path), old)
    flip_payload_byte(tmp_path / "part-002.tar", KEYS[7])
    keys, errors = read_keys(str(tmp_path))
    assert keys == KEYS[:6]
    hash_name = "sha256" if "xxh3_64" in fields else "xxh3_64"
    assert errors == [f"{tmp_path}/part-002.tar: {hash_name} mismatch with the manifest (corrupt shard)"]


@pytest.mark.parametrize("fault", ["missing", "altered"])
def test_an_unusable_index_falls_back_to_the_whole_shard_check(tmp_path, fault, caplog):
    write_dataset(str(tmp_path), CLIP_IDS)
    for name in ("part-000", "part-001"):
        index = tmp_path / f"{name}.idx.json"
        if fault == "missing":
            index.unlink()
        else:
            index.write_bytes(index.read_bytes().replace(b'"keys":[', b'"keys": ['))
    flip_payload_byte(tmp_path / "part-001.tar", KEYS[5])
    keys, errors = read_keys(str(tmp_path))
    assert keys == KEYS[:3] + KEYS[6:]
    assert errors == [f"{tmp_path}/part-001.tar: xxh3_64 mismatch with the manifest (corrupt shard)"]
    warned = [r.getMessage() for r in caplog.records if "sample index unusable" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith(f"{tmp_path}/part-000.idx.json: sample index unusable")


def test_truncated_shard_gives_only_checked_samples(tmp_path):
    write_dataset(str(tmp_path), CLIP_IDS)
    path = tmp_path / "part-000.tar"
    size, cut = path.stat().st_size, member_offsets(path)[f"{KEYS[2]}.f000.jpg"][0]
    path.write_bytes(path.read_bytes()[:cut])  # cut where sample 2 starts: samples 0 and 1 are whole
    keys, errors = read_keys(str(tmp_path))
    assert keys == KEYS[:1] + KEYS[3:]  # sample 1 ends only with the next header, where the size check fires
    assert errors == [f"{path}: truncated or altered shard: {cut} bytes, manifest says {size}"]


def test_bad_shard_can_be_skipped_and_reported(tmp_path):
    write_dataset(str(tmp_path), CLIP_IDS)
    (tmp_path / "part-001.tar").unlink()
    errors = []
    got = list(iter_dataset(str(tmp_path), on_error=errors.append))
    assert [s.key for s in got] == KEYS[:3] + KEYS[6:]
    assert len(errors) == 1 and "part-001.tar: shard missing" in str(errors[0])


def test_failed_writer_commits_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), "part", ShardLimits(max_samples=10)) as writer:
            writer.write(make_sample("a.mp4"))
            raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []


def test_tar_headers_are_deterministic(tmp_path):
    write_dataset(str(tmp_path), CLIP_IDS[:2])
    with tarfile.open(tmp_path / "part-000.tar") as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o644)


def test_manifest_lists_only_committed_shards(tmp_path):
    """A stray tar in the folder (say a half-written one from a killed job) is not read."""
    write_dataset(str(tmp_path), CLIP_IDS)
    (tmp_path / "part-099.tar").write_bytes(b"garbage")
    assert len(list(iter_dataset(str(tmp_path)))) == len(CLIP_IDS)
    with pytest.raises(ManifestError):
        read_manifest(str(tmp_path / "nope"))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_members_reads_what_tarfile_writes(fmt):
    from pipeline.shards import tar_members

    files = [
        ("a.000.jpg", b"x" * 1000),
        ("d" * 90 + "/" + "k" * 90 + ".json", b"{}"),
        ("empty.txt", b""),
        ("b" * 150 + ".txt", b"long name"),
        ("caf\u00e9.txt", b"unicode"),
    ]
    if fmt == tarfile.USTAR_FORMAT:
        files = [f for f in files if len(f[0]) < 100 and f[0].isascii()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    assert list(tar_members(buf, "mem.tar")) == files  # the directory is skipped
    damaged = bytearray(buf.getvalue())
    damaged[520] ^= 0xFF  # inside the first header's name field (after the directory's header)
    with pytest.raises(ShardError, match="mem.tar: unreadable or truncated tar: bad header checksum"):
        list(tar_members(io.BytesIO(bytes(damaged)), "mem.tar"))
    with pytest.raises(ShardError, match="mem.tar: unreadable or truncated tar"):
        list(tar_members(io.BytesIO(buf.getvalue()[:1500]), "mem.tar"))
    for start, end in ((148, 156), (124, 136)):  # the second header's checksum, then size: not octal numbers
        garbled = bytearray(buf.getvalue())
        garbled[512 + start : 512 + end] = b"zz" + bytes(end - start - 2)
        with pytest.raises(ShardError, match="mem.tar: unreadable"):  # never a bare ValueError
            list(tar_members(io.BytesIO(bytes(garbled)), "mem.tar"))
