"""pipeline.layout: the names of a data set folder's files, built and read back in one place."""

from pipeline import storage
from pipeline.layout import DatasetLayout, shard_index, shard_stem, tar_name, tar_shard


def test_names_round_trip():
    assert shard_stem(12) == "shard-000012"
    assert tar_name(shard_stem(12), 1) == "shard-000012-001.tar"
    assert tar_shard("shard-000012-001.tar") == (12, 1)
    assert tar_shard("shard-1234567-000.tar") == (1234567, 0)
    assert shard_index("shard-000012.json", ".json") == 12
    for other in ("shard-000012.tar", "part-000-000.tar", "shard-12-000.tar", "shard-000012-000.tar.tmp"):
        assert tar_shard(other) is None
    assert shard_index("shard-x.json", ".json") is None and shard_index("shard-000001.parquet", ".json") is None


def test_uris_of_a_folder_and_of_a_manifest():
    out = DatasetLayout("s3://b/data/")
    assert out.manifest == "s3://b/data/manifest.json" and out.sizes == "s3://b/data/sizes.json"
    assert out.stats(3) == "s3://b/data/stats/shard-000003.json"
    assert out.shard_failures(3) == "s3://b/data/failures/shard-000003.parquet"
    assert out.failures == "s3://b/data/failures.parquet" and out.config == "s3://b/data/config.json"
    assert out.run_log("20240101T000000", 7) == "s3://b/data/logs/run-20240101T000000-7.json"
    other = DatasetLayout.of("/data/train-v2.json")
    assert (other.root, other.manifest, other.sizes) == ("/data", "/data/train-v2.json", "/data/sizes.json")
    assert DatasetLayout.of("/data").manifest == "/data/manifest.json"


def test_scratch_is_unique_per_output_and_shard():
    a, b = DatasetLayout("/out/a"), DatasetLayout("/out/b")
    assert a.scratch("/tmp/s", 1) != b.scratch("/tmp/s", 1) != b.scratch("/tmp/s", 2)
    assert a.scratch("/tmp/s", 1).endswith("-shard-000001")


def test_listings(tmp_path):
    out = DatasetLayout(str(tmp_path))
    names = ("shard-000000-000.tar", "shard-000000-000.idx.json", "shard-000000-001.tar", "shard-000002-000.tar")
    for name in names + ("notes.tar", "shard-000000-x.idx.json", "shard-000002.idx.json"):
        storage.write_bytes(out.path(name), b"t")
    for index in (0, 2):
        storage.write_bytes(out.stats(index), b"{}")
    storage.write_bytes(out.path("stats", "README"), b"")
    assert out.shard_files(0) == ["shard-000000-000.idx.json", "shard-000000-000.tar", "shard-000000-001.tar"]
    assert out.shard_files(2) == ["shard-000002-000.tar"] and out.shard_files(1) == []
    assert out.list_stats() == {0: out.stats(0), 2: out.stats(2)}
