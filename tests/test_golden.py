"""Golden output: a fixed synthetic corpus, sharded through the CLI on a real Ray cluster, gives these exact bytes.

A refactor that changes one byte of a shard, the manifest or the failures table fails here. The corpus lives at a
fixed path because the manifest records the input paths and every sample its source URI. When a change of output
is intended, rerun with ``VIDPROXY_PRINT_GOLDEN=1`` and paste the printed digests (say why in the commit).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.preprocess.fixtures_job import ray_local  # noqa: F401

pytestmark = pytest.mark.ray

ROOT = Path("/tmp/vidproxy-golden")

GOLDEN = {
    "shard-000000-000.idx.json": "43a686beaaec1d1cc97f789b7fdb8f3577f26ed7a1ead873d2fa82437164c686",
    "shard-000000-000.tar": "cbac276ce55fbc8531f0de636d7558fa9cb08429eb61ec58569ae7c8009cc1d6",
    "shard-000001-000.idx.json": "1c0a2433e6d7c4d977f8ccfab7cb806b5cf0a2da63cc6d02472e0b37adda18c2",
    "shard-000001-000.tar": "8046286a1e5ff4122598575cb630f3723a210a2c2e6ed0ea4e87e0d42d82d1fb",
    "shard-000002-000.idx.json": "75552014d5552b45de3d34859a6e832b2f105afc1de8bec31bbcc3263fe9b299",
    "shard-000002-000.tar": "1d6d5090f39a60abb48e9daccdacd4b43271dc6375414a12f0b8daf415bb8f0e",
    "shard-000003-000.idx.json": "43cd334fb37befe4ac1184393f8f7bdf88f0f928d8ec04d6c840c7938ea98642",
    "shard-000003-000.tar": "622042099a8e3f3035868db655a8299b08b8d2c6af5f17a9b5547c0b3e912cf3",
    "shard-000004-000.idx.json": "5a6b811585bd4451854e4a2a0f6b2834aecfcaca7842120875b2060ccdc28833",
    "shard-000004-000.tar": "a6a1ae595898495f39cb3261f9b2facfb3cb7d3b08c1a3480c8eb2c9a0103283",
    "manifest.json": "9e902bb26c76d05be66d8368acfa4bccd85ff9a3fc7e8697019f9c04e180cb54",
    "sizes.json": "e5b2d2b9bf42a8b45a35d7791da274293d10634f792b7111abed1fccef96482c",
    "failures.parquet": "a0e91c7664395f6e792ebad612792fceaac9983851e911c1d3633b9843db37e9",
}
"""The default run: every sample's JSON carries its quality scores, the manifest their histograms (issue 23)."""

WITHOUT_SCORES = {
    "shard-000000-000.idx.json": "43658c767576bdcb8630dee97a441fffc1faeea24071c36283ccb9decaae4c11",
    "shard-000000-000.tar": "02db0bdead2c3e6fd4f85019e8d041157c7f5a63420015384110748c09292a37",
    "shard-000001-000.idx.json": "4503407f98839ce4352e4a548043239793f772c5c9ad333b55951123979ce4ad",
    "shard-000001-000.tar": "4a6a35f18c22ade7f33f58f56db01aee1604b93dd366e1c979f1fe84c249af42",
    "shard-000002-000.idx.json": "d7566fe8f9901e8dba983c40812bb7c9ea359ed326ad6255fdde6a6005a07b9f",
    "shard-000002-000.tar": "bb4f2258ef1182834946259a560c9287a9be2625f9221561562c42eda77f1c5d",
    "shard-000003-000.idx.json": "0e529089599bf9d37c613426bffab56c3b86387b32384090fe9948130bb34800",
    "shard-000003-000.tar": "54ee751fc90fd00954466caeeaf95478287cabe2e1aa2bdc06771ac82f93cb84",
    "shard-000004-000.idx.json": "5f03cf320414c03c3d7ff42164065b184f33ca567f8931d01849e9479ff54462",
    "shard-000004-000.tar": "7395afaafb800759bf8b94de32f5fcb87b33c4e8da77b00956ec4cf4c28c32eb",
    "manifest.json": "2e34053ccea7a441a65b3c1a973cf46b15639afe10e5075bff97d938641c934b",
    "sizes.json": "e5b2d2b9bf42a8b45a35d7791da274293d10634f792b7111abed1fccef96482c",
    "failures.parquet": "a0e91c7664395f6e792ebad612792fceaac9983851e911c1d3633b9843db37e9",
}
"""``--no-score-quality``: byte for byte the output from before the scores existed (the digests recorded then)."""


@contextlib.contextmanager
def _exclusive(path: Path):
    """Runs in parallel (other checkouts on this machine) share ROOT: one at a time."""
    lock_path = f"{path}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.unlink(lock_path)


def _corpus(root: Path):
    from preprocess.synthetic import make_corpus

    paths = make_corpus(root / "corpus", videos=5, clips_per_video=3, seed=11, fps=10, clip_seconds=2.0)
    # a clip whose span lies outside its video, and a clip id used twice: recorded failures
    rows = [json.loads(line) for line in paths.metadata.read_text().splitlines()]
    rows[1]["clip"].append({"clip_id": "beyond.mp4", "span": ["00:01:00.000", "00:01:02.000"]})
    rows[2]["clip"].append(dict(rows[2]["clip"][0]))
    paths.metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _digests(out: Path) -> dict[str, str]:
    shards = sorted(p.name for p in out.glob("shard-*") if p.suffix == ".tar" or p.name.endswith(".idx.json"))
    names = shards + ["manifest.json", "sizes.json", "failures.parquet"]
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in names}


@pytest.mark.parametrize("extra, golden", [((), GOLDEN), (("--no-score-quality",), WITHOUT_SCORES)])
def test_golden_shards(ray_local, extra, golden):  # noqa: F811
    from preprocess.shard import main

    with _exclusive(ROOT):
        shutil.rmtree(ROOT, ignore_errors=True)
        paths = _corpus(ROOT)
        out = ROOT / "out"
        argv = [
            "--metadata",
            str(paths.metadata),
            "--videos",
            str(paths.videos),
            "--subtitles",
            str(paths.subtitles),
            "--captions",
            str(paths.captions),
            "--output",
            str(out),
            "--clips-per-shard",
            "4",
            "--num-frames",
            "6",
            "--frame-size",
            "96x64",
            "--jpeg-quality",
            "85",
            "--no-progress",
            *extra,
        ]
        assert main(argv) == 0
        failures = pq.read_table(out / "failures.parquet").to_pydict()
        assert sorted(failures["error"]) == ["duplicate_clip_id", "span_out_of_range"], failures
        digests = _digests(out)
        if os.environ.get("VIDPROXY_PRINT_GOLDEN"):
            print(json.dumps(digests, indent=4))
        assert digests == golden
