"""pipeline/verify.py (vidproxy-verify): a damaged shard is named and fails the check; --add-index gives a data set
written before sample indexes the exact index files and manifest the shard writer writes today."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.manifest import read_manifest, write_manifest
from pipeline.schema import encode_key
from pipeline.verify import main
from tests.pipeline.test_shards import write_dataset
from tests.support.damage import flip_payload_byte
from tests.support.ids import CLIP_IDS

INDEXES = [f"part-00{i}.idx.json" for i in range(3)]


def strip_indexes(root: str) -> None:
    """The data set as written before sample indexes existed."""
    manifest = read_manifest(root)
    old = tuple(dataclasses.replace(e, index_xxh3_64="") for e in manifest.shards)
    write_manifest(root, dataclasses.replace(manifest, shards=old))
    for name in INDEXES:
        storage.delete(storage.join(root, name))


@pytest.mark.parametrize("where", ["file", "s3"])
def test_add_index_writes_what_the_shard_writer_writes(tmp_path, where, request, capsys):
    root = str(tmp_path / "ds") if where == "file" else f"{request.getfixturevalue('s3_bucket')}/ds"
    write_dataset(root, CLIP_IDS)
    want = {name: storage.read_bytes(storage.join(root, name)) for name in INDEXES + ["manifest.json"]}
    strip_indexes(root)
    assert main([root]) == 0  # an older data set checks fine, shard by shard whole
    assert not storage.exists(storage.join(root, INDEXES[0]))
    assert main([root, "--add-index", "--workers", "2"]) == 0
    got = {name: storage.read_bytes(storage.join(root, name)) for name in want}
    assert got == want
    assert (
        capsys.readouterr().out.splitlines()[-1] == "3 shards, 8 samples in good shards: 0 bad; 3 sample indexes added"
    )


def test_a_damaged_shard_is_named_and_fails(tmp_path, capsys):
    write_dataset(str(tmp_path), CLIP_IDS)
    flip_payload_byte(tmp_path / "part-001.tar", encode_key(CLIP_IDS[4]))
    assert main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    damaged = f"{tmp_path}/part-001.tar: sample {encode_key(CLIP_IDS[4])!r} does not match its digest"
    assert err.startswith(damaged) and len(err.splitlines()) == 1
    assert out.splitlines()[-1] == "3 shards, 5 samples in good shards: 1 bad"


def test_add_index_leaves_the_manifest_of_a_data_set_with_a_bad_shard(tmp_path, capsys):
    write_dataset(str(tmp_path), CLIP_IDS)
    strip_indexes(str(tmp_path))
    before = (tmp_path / "manifest.json").read_bytes()
    flip_payload_byte(tmp_path / "part-002.tar", encode_key(CLIP_IDS[7]))
    assert main([str(tmp_path), "--add-index"]) == 1
    out, err = capsys.readouterr()
    assert err == f"{tmp_path}/part-002.tar: xxh3_64 mismatch with the manifest (corrupt shard)\n"
    assert out.splitlines()[-1].endswith("1 bad; 2 sample indexes added (manifest not rewritten: bad shards)")
    assert (tmp_path / "manifest.json").read_bytes() == before and not Path(tmp_path / INDEXES[2]).exists()


def test_a_missing_manifest_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipeline.verify: error: {tmp_path}/nowhere/manifest.json: manifest not found")
    assert len(err.splitlines()) == 1
