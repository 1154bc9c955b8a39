"""Shard URL lists and ``::``-joined sources (train/shard_sources.py), local and on the loopback S3 server.

The same clips are written once as a data set folder (shards, sizes.json, manifest.json); a copy without the
manifest stands for a WebDataset-style data set made elsewhere. Every list is compared with what the loader
reads through the manifest.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline import storage
from pipeline.layout import shard_stem
from pipeline.manifest import Manifest, write_manifest
from pipeline.shards import ShardLimits, ShardWriter
from tests.train.fixtures_train import COMBOS, moving_clip
from train.config import DataConfig
from train.eval_data import eval_batches
from train.loader import StreamingLoader

pytestmark = pytest.mark.timeout(120)

SIZES = (3, 5, 4)
PATTERN = "shard-{000000..000002}-000.tar"


def write_shards(root: str) -> str:
    """Shards shard-00000k-000.tar of SIZES clips, then sizes.json and manifest.json."""
    rng = np.random.default_rng(7)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng) for i in range(sum(SIZES))]
    entries, start = [], 0
    for k, n in enumerate(SIZES):
        with ShardWriter(root, shard_stem(k), ShardLimits(max_samples=10**6)) as writer:
            for clip in clips[start : start + n]:
                writer.write(clip)
        entries += writer.entries
        start += n
    write_manifest(root, Manifest(shards=tuple(entries)))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_shards(str(tmp_path_factory.mktemp("ds")))


def copy_without(dataset: str, folder: str, *left_out: str) -> str:
    """The data set's files but ``left_out`` (manifest.json always) in a new folder."""
    os.makedirs(folder)
    for name in os.listdir(dataset):
        if name not in ("manifest.json", *left_out) and os.path.isfile(os.path.join(dataset, name)):
            shutil.copy(os.path.join(dataset, name), folder)
    return folder


@pytest.fixture(scope="module")
def bare(dataset, tmp_path_factory) -> str:
    """Shards and sizes.json, no manifest: a WebDataset data set as other tools write it."""
    return copy_without(dataset, str(tmp_path_factory.mktemp("bare") / "ds"))


@pytest.fixture
def said():
    """The warnings train/shard_sources.py logs (its logger's records, whatever the logging setup)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    source_logger = logging.getLogger("train.shard_sources")
    source_logger.addHandler(handler)
    yield lambda: [r.getMessage() for r in records]
    source_logger.removeHandler(handler)


def data_cfg(train, **kw) -> DataConfig:
    base = dict(
        train=train, batch_size=2, num_frames=4, image_size=32, num_workers=0, shards_per_window=2, shuffle_buffer=4
    )
    return DataConfig(**{**base, **kw})


def read(train, steps: int = 8, rank: int = 0, **kw) -> tuple[StreamingLoader, list[tuple]]:
    """(loader, [(keys, digest, frames) per batch]) of ``steps`` batches of one rank of 1 (seed 3)."""
    loader = StreamingLoader(data_cfg(train, **kw), seed=3, rank=rank, world_size=1)
    batches = [loader.next() for _ in range(steps)]
    loader.close()
    return loader, [(b["keys"], b["digest"], b["frames"].clone()) for b in batches]


def unchecked_line(setting: str, location: str, shards: int) -> str:
    problem = "have no manifest entry: their size and hash are not checked"
    return f"{setting}: the shards of {location} ({shards} shards) {problem}"


def same(a: list[tuple], b: list[tuple]) -> bool:
    return all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))


def test_brace_list_reads_what_the_manifest_reads(dataset, bare, said):
    _, via_manifest = read([dataset])
    loader, checked = read([f"{dataset}/{PATTERN}"])
    assert same(checked, via_manifest)
    assert all(ref.entry is not None for ref in loader.dataset.sources[0].shards)  # the manifest beside them
    assert not said()
    pattern = f"{bare}/{PATTERN}"
    loader, unchecked = read([pattern])
    assert same(unchecked, via_manifest)
    assert loader.samples_per_epoch == sum(SIZES)  # from sizes.json
    assert [ref.samples for ref in loader.dataset.sources[0].shards] == list(SIZES)
    read([pattern], steps=2)  # a second loader of the run (train.loop builds two per rank)
    assert said() == [unchecked_line("data.train", pattern, 3)]
    read([f"{bare}/shard-{{000000..000001}}-000.tar"], steps=1, rank=1)
    assert len(said()) == 1, "ranks above 0 say nothing"


def test_globs_single_urls_and_missing_shards(dataset, bare, said):
    _, via_manifest = read([dataset])
    _, globbed = read([f"{bare}/shard-*.tar"])
    assert same(globbed, via_manifest)
    one = f"{bare}/shard-000001-000.tar"
    loader, _ = read([one], steps=3)
    assert loader.samples_per_epoch == SIZES[1]
    pattern = f"{bare}/shard-{{000000..000004}}-000.tar"
    loader, _ = read([pattern], steps=2)
    assert loader.dataset.sources[0].missing == ("shard-000003-000.tar", "shard-000004-000.tar")
    assert f"data.train: the shards of {pattern} (2 shards) do not exist and are left out" in said()


def test_counts_need_sizes_json_or_train_num_samples(dataset, tmp_path, said):
    pattern = f"{copy_without(dataset, str(tmp_path / 'ds'), 'sizes.json')}/{PATTERN}"
    with pytest.raises(ValueError, match=r"no sample count for the shards of .*\(3 shards\).*data.train_num_samples"):
        StreamingLoader(data_cfg([pattern]), seed=0, rank=0, world_size=1)
    loader, batches = read([pattern], steps=12, train_num_samples=100)
    assert loader.samples_per_epoch == 100
    assert len({k for keys, _, _ in batches for k in keys}) == sum(SIZES)


def test_patterns_that_match_nothing_or_no_tar_are_one_line_errors(dataset, tmp_path):
    nothing = f"{tmp_path}/shard-{{000010..000012}}-000.tar"
    with pytest.raises(ValueError) as info:
        StreamingLoader(data_cfg([dataset, nothing]), seed=0, rank=0, world_size=1)
    assert str(info.value) == f"{nothing}: matches no file (3 names, e.g. {tmp_path}/shard-000010-000.tar)"
    with pytest.raises(ValueError, match=r"names '.*manifest.json', not a .tar shard"):
        StreamingLoader(data_cfg([f"{dataset}/{{manifest,sizes}}.json"]), seed=0, rank=0, world_size=1)


def test_open_clip_syntax_in_the_config():
    cfg = DataConfig(train="a::s3://b/ds/shard-{000000..000009}-000.tar", weights="3::1", eval="h1::h2")
    assert cfg.train == ["a", "s3://b/ds/shard-{000000..000009}-000.tar"] and cfg.weights == [3.0, 1.0]
    assert cfg.eval == ["h1", "h2"]
    assert DataConfig(train=["a::b", "c"]).train == ["a", "b", "c"]
    with pytest.raises(ValueError, match="data.weights: 2 weights for 3 train sources"):
        DataConfig(train="a::b::c", weights="1::2")
    with pytest.raises(ValueError, match="data.weights: must be numbers"):
        DataConfig(train="a::b", weights="1::x")
    with pytest.raises(ValueError, match=r"data.train: '\[s3://b/x-\{0..9\}.tar\]' is a list YAML could not read"):
        DataConfig(train="[s3://b/x-{0..9}.tar]")  # what data.train=[s3://b/x-{0..9}.tar] gives on a command line


def test_from_s3_brace_lists_and_joined_sources(dataset, bare, s3_bucket, said):
    for name in os.listdir(bare):
        storage.put_file(os.path.join(bare, name), f"{s3_bucket}/ds/{name}")
    pattern = f"{s3_bucket}/ds/{PATTERN}"
    _, via_manifest = read([dataset])
    loader, from_s3 = read([pattern])
    assert same(from_s3, via_manifest)
    assert loader.samples_per_epoch == sum(SIZES)
    assert said() == [unchecked_line("data.train", pattern, 3)]
    joined = StreamingLoader(data_cfg(f"{dataset}::{pattern}", weights="0::1"), seed=0, rank=0, world_size=1)
    assert [s.location for s in joined.dataset.sources] == [dataset, pattern]
    assert joined.samples_per_epoch == 2 * sum(SIZES)
    assert joined.next()["frames"].shape == (2, 4, 3, 32, 32)
    joined.close()
    nothing = f"{s3_bucket}/ds/shard-{{000007..000009}}-000.tar"
    with pytest.raises(ValueError, match=rf"^{nothing}: matches no file \(3 names"):
        StreamingLoader(data_cfg([nothing]), seed=0, rank=0, world_size=1)
    # held-out clips: the same batches through the list on S3 as through the manifest
    cfg = data_cfg([dataset], eval=f"{pattern}", eval_max_samples=10)
    from_manifest = list(eval_batches(data_cfg([dataset], eval=[dataset], eval_max_samples=10), 0, 1))
    from_list = list(eval_batches(cfg, 0, 1))
    assert len(from_list) == len(from_manifest) == 5
    for a, b in zip(from_list, from_manifest):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["text"], b["text"])
    assert said()[-1].startswith(f"data.eval: the shards of {pattern} (3 shards) have no manifest entry")
