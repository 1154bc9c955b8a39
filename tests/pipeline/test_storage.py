import os
import uuid

import boto3
import pytest

from pipeline import storage
from pipeline.manifest import Manifest, ManifestError, read_manifest, write_manifest
from pipeline.shards import ShardWriter, iter_dataset
from tests.support.cutproxy import CuttingProxy
from tests.support.samples import make_sample


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_write_read_list_delete(root):
    a, b = storage.join(root, "a.bin"), storage.join(root, "sub/b.bin")
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"beta" * 1000)
    assert storage.read_bytes(a) == b"alpha"
    assert storage.size(b) == 4000
    assert storage.list_files(root) == sorted([a, b])
    storage.delete(a)
    assert not storage.exists(a) and storage.exists(b)
    storage.delete(a)  # deleting a missing object is fine


def test_list_children_names_files_directly_in_the_folder(root):
    for name in ("b.mp4", "a.mp4", "sub/c.mp4"):
        storage.write_bytes(storage.join(root, name), b"x")
    expected = [("a.mp4", storage.join(root, "a.mp4")), ("b.mp4", storage.join(root, "b.mp4"))]
    assert storage.list_children(root) == storage.list_children(root + "/") == expected
    assert storage.list_children(storage.join(root, "none")) == []


def test_prefix_listing_stems_and_globs(root):
    for name in ("v1.mp4", "v1.webm", "v10.mp4", "v2.mkv", "part-2.jsonl", "part-10.jsonl", "sub/v3.mp4"):
        storage.write_bytes(storage.join(root, name), b"x")
    assert [n for n, _ in storage.list_children(root, "v1")] == ["v1.mp4", "v1.webm", "v10.mp4"]
    found = storage.children_by_stem(root, {"v1", "v2", "v3", "nope"})
    assert found == {
        "v1": [("v1.mp4", storage.join(root, "v1.mp4")), ("v1.webm", storage.join(root, "v1.webm"))],
        "v2": [("v2.mkv", storage.join(root, "v2.mkv"))],
    }
    assert storage.expand(storage.join(root, "part-*.jsonl")) == [
        storage.join(root, "part-10.jsonl"),
        storage.join(root, "part-2.jsonl"),
    ]
    assert storage.expand(storage.join(root, "v2.mkv")) == [storage.join(root, "v2.mkv")]


def test_ranged_read_starts_at_the_offset(root):
    uri = storage.join(root, "lines.txt")
    storage.write_bytes(uri, b"0123456789" * 100)
    with storage.open_read(uri, start=995) as stream:
        assert stream.read() == b"56789"


def test_missing_object_is_named(root):
    uri = storage.join(root, "nothing-here.tar")
    with pytest.raises(storage.StorageNotFound, match="nothing-here.tar"):
        storage.read_bytes(uri)


def test_failed_write_leaves_nothing(root):
    uri = storage.join(root, "partial.tar")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"x" * 100_000)
            raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    assert storage.list_files(root) == []


def test_local_write_is_a_rename(tmp_path):
    """While a write is in progress only a hidden temp file exists; the final name appears whole."""
    uri = str(tmp_path / "x.bin")
    with storage.open_write(uri) as f:
        f.write(b"half")
        assert not os.path.exists(uri)
        assert [p.name.startswith(storage.TEMP_PREFIX) for p in tmp_path.iterdir()] == [True]
    assert storage.read_bytes(uri) == b"half"
    assert storage.list_files(str(tmp_path)) == [uri]


def test_multipart_upload_round_trip(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 << 20)
    payload = os.urandom(12 << 20)
    uri = f"{s3_bucket}/big.bin"
    storage.write_bytes(uri, payload)
    assert storage.read_bytes(uri) == payload
    loc = storage.parse(uri)
    etag = boto3.client("s3").head_object(Bucket=loc.bucket, Key=loc.path)["ETag"]
    assert etag.strip('"').endswith("-3"), f"not a 3-part multipart upload: ETag {etag}"  # 12 MiB in 5 MiB parts
    storage.write_bytes(f"{s3_bucket}/small.bin", payload[: 1 << 20])
    small = boto3.client("s3").head_object(Bucket=loc.bucket, Key="small.bin")["ETag"]
    assert "-" not in small, "a small object was uploaded in parts"


def test_cleanup_aborts_dead_uploads_and_takes_one_that_ended_meanwhile_in_its_stride(s3_bucket):
    """Two uploads in progress under the prefix; a dying writer ends one of them between the listing and its abort
    (S3 answers NoSuchUpload): cleanup_temp counts the other, raises nothing, and nothing is left in progress."""
    s3, bucket = boto3.client("s3"), storage.parse(s3_bucket).bucket
    ids = {key: s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"] for key in ("out/a.tar", "out/b.tar")}

    def writer_ends_a(**_) -> None:
        s3.abort_multipart_upload(Bucket=bucket, Key="out/a.tar", UploadId=ids["out/a.tar"])

    with storage.s3_hook("after-call.s3.ListMultipartUploads", writer_ends_a):
        assert storage.cleanup_temp(f"{s3_bucket}/out") == 1
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_wrong_credentials_are_reported(s3_bucket, monkeypatch):
    storage.write_bytes(f"{s3_bucket}/x", b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_clients()
    try:
        with pytest.raises(
            storage.StorageError, match=r"s3://.*/x: access denied by S3 \(SignatureDoesNotMatch\)"
        ) as info:
            storage.read_bytes(f"{s3_bucket}/x")
        assert "not-the-secret" not in str(info.value)
    finally:
        monkeypatch.undo()
        storage.reset_clients()


def test_missing_bucket_is_reported(s3_server):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/manifest.json"
    with pytest.raises(storage.StorageNotFound, match="bucket 'no-such-bucket-.*' does not exist"):
        storage.read_bytes(uri)


def test_unsupported_scheme():
    with pytest.raises(storage.StorageError, match="gs://b/x: unsupported scheme"):
        storage.parse("gs://b/x")


def test_missing_manifest_is_reported(root):
    with pytest.raises(ManifestError, match="manifest.json: manifest not found"):
        read_manifest(root)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema_version": 7, "shards": []}', "schema version 7, this code reads version 1"),
        (b'{"schema_version": 1}', "missing field 'shards'"),
        (
            b'{"schema_version": 1, "shards": [{"url": "../x.tar", "samples": 1, "bytes": 1, "sha256": "'
            + b"0" * 64
            + b'", "seconds": 1}]}',
            "must be a relative path",
        ),
        (
            b'{"schema_version": 1, "shards": '
            b'[{"url": "x.tar", "samples": 1, "bytes": 1, "sha256": "abc", "seconds": 1}]}',
            "not 64 hex digits",
        ),
        (
            b'{"schema_version": 1, "shards": [], "totals": {"samples": 3}}',
            "totals.samples is 3 but the shards add up to 0",
        ),
    ],
)
def test_corrupt_manifest_is_reported(root, payload, message):
    uri = storage.join(root, "manifest.json")
    storage.write_bytes(uri, payload)
    with pytest.raises(ManifestError, match=f"manifest.json: .*{message}"):
        read_manifest(root)


def _write_dataset(root: str, n: int) -> Manifest:
    with ShardWriter(root, "s") as writer:
        for i in range(n):
            writer.write(make_sample(f"clip.{i}.mp4", num_frames=6))
    manifest = Manifest(shards=tuple(writer.entries))
    write_manifest(root, manifest)
    return manifest


def test_connection_cut_mid_read_resumes(s3_bucket, s3_server, monkeypatch):
    """Every connection through the proxy is dropped after 20 kB: the reader resumes each time."""
    root = f"{s3_bucket}/cut"
    manifest = _write_dataset(root, 12)
    assert manifest.num_bytes > 60_000
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), cut_after=20_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage.reset_clients()
    try:
        got = [s.meta.clip_id for s in iter_dataset(root)]
    finally:
        monkeypatch.undo()
        storage.reset_clients()
        proxy.close()
    assert got == [f"clip.{i}.mp4" for i in range(12)]
    assert proxy.cuts_made >= 3


def test_an_object_replaced_mid_read_is_a_clear_error(s3_bucket, s3_server, monkeypatch):
    """The reader pins the ETag of its first GET: a resume after the object was rewritten fails, naming why,
    instead of splicing two versions."""
    uri = f"{s3_bucket}/replaced.bin"
    storage.write_bytes(uri, os.urandom(200_000))
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), cut_after=20_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    storage.reset_clients()
    try:
        with storage.open_read(uri) as stream:
            first = stream.read(10_000)
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the writer goes straight to the server
            storage.reset_clients()
            storage.write_bytes(uri, os.urandom(200_000))
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            storage.reset_clients()
            with pytest.raises(storage.StorageError, match="replaced while it was being read"):
                stream.read()
    finally:
        monkeypatch.undo()
        storage.reset_clients()
        proxy.close()
    assert len(first) == 10_000 and proxy.cuts_made >= 1
