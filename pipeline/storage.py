"""The one place that knows ``file://`` and ``s3://``.

Every URI in the project goes through here. Plain paths and ``file://`` URIs are local;
``s3://bucket/key`` goes through boto3, which takes the endpoint, region and credentials
from the standard AWS environment and config files (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config``...). Credentials are never
logged or put into error messages.

Writes are atomic: a local write goes to a hidden temp file in the target folder and is
renamed into place; an S3 write is spooled to a local temp file and uploaded in one
PutObject or one multipart upload that is completed only when every part is in (and
aborted otherwise), so no reader sees a partial object under its final name. What a killed
writer leaves (a local temp file, an S3 multipart upload never completed nor aborted, whose parts S3
keeps and bills) is removed by :func:`cleanup_temp`. Objects above ``VIDPROXY_S3_PART_BYTES`` (default
64 MiB) go in parts of that size.

Reads stream. An S3 read whose connection is cut part-way re-opens the object with a
ranged GET from the last byte received (pinned to the object's ETag), up to
``READ_RETRIES`` times in a row.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import http.client
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
READ_RETRIES = 8
MULTIPART_THRESHOLD = 64 << 20
PART_BYTES_ENV = "VIDPROXY_S3_PART_BYTES"
"""Overrides ``MULTIPART_THRESHOLD``: S3 uploads above this size go in parts of this size (boto3 raises a part
below S3's least, 5 MiB, to 5 MiB; the tests set it low to make small objects multipart uploads)."""
TEMP_PREFIX = ".tmp-"


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the reason."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object, file or bucket does not exist."""


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``file`` or ``s3``; ``path`` is the local path or the S3 key."""

    scheme: str
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.path}" if self.scheme == "s3" else self.path


def parse(uri: str) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"empty or non-string URI: {uri!r}")
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket name")
        return Location("s3", bucket, key)
    if uri.startswith("file://"):
        return Location("file", "", uri[7:])
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a local path, file:// or s3://)")
    return Location("file", "", uri)


def join(base: str, *names: str) -> str:
    """Join names onto a base URI with ``/`` (works for local paths and S3)."""
    out = base.rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    return parse(uri).scheme == "s3"


def has_scheme(text: str) -> bool:
    """True for a URI with a scheme (``s3://``, ``file://`` or any other), False for a plain path."""
    return "://" in text


# --------------------------------------------------------------------------- S3 client


@functools.cache
def _s3_client():
    import boto3
    from botocore.config import Config

    # AWS_MAX_ATTEMPTS (total attempts, botocore reads it) replaces the default of 5 retries when set
    retries = {"mode": "standard"} if os.environ.get("AWS_MAX_ATTEMPTS") else {"max_attempts": 5, "mode": "standard"}
    config = Config(retries=retries, max_pool_connections=32)
    return boto3.session.Session().client("s3", config=config)


def reset_clients() -> None:
    """Forget cached S3 clients (after the AWS environment changed)."""
    _s3_client.cache_clear()


@contextlib.contextmanager
def s3_hook(event: str, handler: Callable[..., None]) -> Iterator[None]:
    """Within the block, call ``handler`` on a botocore event of this process's S3 client (such as
    ``after-call.s3.UploadPart``): fault injection (preprocess/shard_task.py)."""
    events = _s3_client().meta.events
    events.register(event, handler)
    try:
        yield
    finally:
        events.unregister(event, handler)


_DENIED = {
    "InvalidAccessKeyId": "the access key id is unknown to S3: check AWS_ACCESS_KEY_ID or the profile",
    "SignatureDoesNotMatch": "the secret key does not match the access key id: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "these credentials lack the permission: check the bucket policy or the IAM role",
    "InvalidToken": "the session token is invalid: refresh the credentials",
    "ExpiredToken": "the session token has expired: refresh the credentials",
    "403": "the access key, the secret key or the permissions are wrong (S3 gives no detail for this request)",
}
"""S3 error codes that mean the credentials were refused, with a short reason (a HEAD answer has no code)."""


def _s3_error(uri: str, exc: Exception) -> StorageError:
    """Turn a botocore error into a StorageError: one line naming the URI and the reason."""
    from botocore.exceptions import ClientError, NoCredentialsError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, BotoConnectionError):  # refused, timed out, DNS, proxy or TLS failure
        return StorageError(f"{uri}: cannot reach the S3 endpoint: {_one_line(exc)}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return StorageNotFound(f"{uri}: bucket {parse(uri).bucket!r} does not exist")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageNotFound(f"{uri}: no such object")
        if code in _DENIED:
            return StorageError(f"{uri}: access denied by S3 ({code}): {_DENIED[code]}")
        if code in ("PreconditionFailed", "412"):  # a resumed read pins the ETag it started with
            return StorageError(f"{uri}: the object was replaced while it was being read (its ETag changed)")
        return StorageError(f"{uri}: S3 error {code}: {_one_line(exc.response.get('Error', {}).get('Message', ''))}")
    return StorageError(f"{uri}: {type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())


@contextlib.contextmanager
def _s3_errors(uri: str):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc) from exc


# --------------------------------------------------------------------------- reads


_TRANSIENT = (OSError, http.client.HTTPException)


def _transient_errors() -> tuple[type[BaseException], ...]:
    import urllib3.exceptions
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return _TRANSIENT + (
        urllib3.exceptions.HTTPError,
        BotoConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )


class S3ObjectReader(io.RawIOBase):
    """A streaming, resuming reader of one S3 object (use through ``open_read``)."""

    def __init__(self, uri: str, retries: int = READ_RETRIES, start: int = 0):
        loc = parse(uri)
        self.uri, self._bucket, self._key, self._retries = uri, loc.bucket, loc.path, retries
        self._pos = start
        self._transient = _transient_errors()
        self.resumes = 0
        self._etag = None
        response = self._get(start or None)
        self.size = start + int(response["ContentLength"])
        self._etag = response["ETag"]
        self._body = response["Body"]

    def _get(self, start: int | None) -> dict:
        kwargs = {"Bucket": self._bucket, "Key": self._key}
        if start is not None:
            kwargs["Range"] = f"bytes={start}-"
        if self._etag is not None:
            kwargs["IfMatch"] = self._etag
        with _s3_errors(self.uri):
            return _s3_client().get_object(**kwargs)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._pos >= self.size:
            return 0
        failures = 0
        while True:
            try:
                data = self._body.read(len(buffer))
                if not data:
                    raise http.client.IncompleteRead(b"", self.size - self._pos)
                break
            except self._transient as exc:
                failures += 1
                if failures > self._retries:
                    raise StorageError(
                        f"{self.uri}: read failed at byte {self._pos} after {self._retries} resumes: {exc}"
                    ) from exc
                self._resume(exc, failures)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def _resume(self, exc: BaseException, attempt: int) -> None:
        log.warning(
            "%s: connection lost at byte %d (%s); resuming with a ranged GET", self.uri, self._pos, type(exc).__name__
        )
        with contextlib.suppress(Exception):
            self._body.close()
        time.sleep(min(0.05 * 2**attempt, 2.0))
        self._body = self._get(self._pos)["Body"]
        self.resumes += 1

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def open_read(uri: str, buffer_size: int = READ_CHUNK, start: int = 0) -> BinaryIO:
    """Open a URI for streaming binary reads from byte ``start`` on (a ranged GET on S3); ``buffer_size=0``:
    unbuffered (a raw reader, for a caller that buffers itself: a buffer over a buffer copies every byte twice)."""
    loc = parse(uri)
    if loc.scheme == "s3":
        raw = S3ObjectReader(uri, start=start)
        return io.BufferedReader(raw, buffer_size=buffer_size) if buffer_size else raw
    try:
        f = open(loc.path, "rb", buffering=buffer_size)
        f.seek(start)
        return f
    except FileNotFoundError as exc:
        raise StorageNotFound(f"{uri}: no such file") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri}: is a directory, not a file") from exc


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def exists(uri: str) -> bool:
    loc = parse(uri)
    if loc.scheme == "file":
        return os.path.exists(loc.path)
    try:
        with _s3_errors(uri):
            _s3_client().head_object(Bucket=loc.bucket, Key=loc.path)
        return True
    except StorageNotFound:
        return False


def size(uri: str) -> int:
    loc = parse(uri)
    if loc.scheme == "file":
        try:
            return os.path.getsize(loc.path)
        except FileNotFoundError as exc:
            raise StorageNotFound(f"{uri}: no such file") from exc
    with _s3_errors(uri):
        return int(_s3_client().head_object(Bucket=loc.bucket, Key=loc.path)["ContentLength"])


def list_files(prefix: str) -> list[str]:
    """URIs of the files directly or indirectly under a folder/prefix, sorted; temp files excluded."""
    loc = parse(prefix)
    if loc.scheme == "file":
        root = loc.path
        if not os.path.isdir(root):
            return []
        found = []
        for folder, _, files in os.walk(root):
            found += [os.path.join(folder, f) for f in files if not f.startswith(TEMP_PREFIX)]
        return sorted(found)
    key_prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    found = []
    with _s3_errors(prefix):
        pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=key_prefix)
        for page in pages:
            found += [f"s3://{loc.bucket}/{o['Key']}" for o in page.get("Contents", [])]
    return sorted(found)


def list_children(folder: str, prefix: str = "") -> list[tuple[str, str]]:
    """(name, URI) of the files directly in a folder (not in its subfolders) whose name starts with ``prefix``,
    sorted; temp files excluded. One request per 1,000 names on S3, never a listing of the subfolders."""
    base = folder.rstrip("/")
    loc = parse(base)
    found = []
    if loc.scheme == "file":
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(loc.path or ".") as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and not entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                    found.append((entry.name, os.path.join(loc.path or ".", entry.name)))
        return sorted(found)
    key_prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    with _s3_errors(base):
        pages = _s3_client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=loc.bucket, Prefix=key_prefix + prefix, Delimiter="/"):
            for o in page.get("Contents", []):
                name = o["Key"][len(key_prefix) :]
                if not name.startswith(TEMP_PREFIX):
                    found.append((name, f"s3://{loc.bucket}/{o['Key']}"))
    return sorted(found)


def children_by_stem(folder: str, stems: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """(name, URI) of the files directly in a folder whose name is ``<stem>.<extension>``, for each stem, in name
    order. Local: one streaming pass over the folder; S3: one prefix listing per stem (a 3.3M-object prefix is
    never listed whole)."""
    wanted, found = set(stems), {}
    base = folder.rstrip("/")
    loc = parse(base)
    if loc.scheme == "file":
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(loc.path) as entries:
            for entry in entries:
                stem = entry.name.rsplit(".", 1)[0] if "." in entry.name.lstrip(".") else None
                if stem in wanted and not entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                    found.setdefault(stem, []).append((entry.name, os.path.join(loc.path, entry.name)))
    else:
        key_prefix = loc.path.rstrip("/") + "/" if loc.path else ""
        paginator = _s3_client().get_paginator("list_objects_v2")
        for stem in sorted(wanted):
            with _s3_errors(f"{base}/{stem}."):
                for page in paginator.paginate(Bucket=loc.bucket, Prefix=f"{key_prefix}{stem}.", Delimiter="/"):
                    for o in page.get("Contents", []):
                        name = o["Key"][len(key_prefix) :]
                        if name.rsplit(".", 1)[0] == stem:
                            found.setdefault(stem, []).append((name, f"s3://{loc.bucket}/{o['Key']}"))
    return {stem: sorted(pairs) for stem, pairs in found.items()}


def expand(pattern: str) -> list[str]:
    """The files a glob pattern (``*``, ``?``, ``[...]`` in the last path component) names, in name order; a
    pattern without glob characters is returned as it is."""
    folder, _, name = pattern.rstrip("/").rpartition("/")
    if not any(c in name for c in "*?["):
        return [pattern]
    return [uri for child, uri in list_children(folder or ".") if fnmatch.fnmatchcase(child, name)]


def delete(uri: str) -> None:
    """Delete a file or object; a missing one is not an error."""
    loc = parse(uri)
    if loc.scheme == "file":
        with contextlib.suppress(FileNotFoundError):
            os.remove(loc.path)
        return
    with _s3_errors(uri):
        _s3_client().delete_object(Bucket=loc.bucket, Key=loc.path)


# --------------------------------------------------------------------------- writes


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """Write a file atomically: it appears under ``uri`` only if the block exits cleanly."""
    loc = parse(uri)
    if loc.scheme == "file":
        with _local_atomic(loc.path) as f:
            yield f
        return
    with tempfile.TemporaryFile(prefix=TEMP_PREFIX) as spool:
        yield spool
        spool.flush()
        spool.seek(0)
        upload(spool, uri)


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[BinaryIO]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def upload(fileobj: BinaryIO, uri: str) -> None:
    """Upload a seekable file object to S3 (multipart above the threshold, completed only when whole)."""
    from boto3.s3.transfer import TransferConfig

    loc = parse(uri)
    part = int(os.environ.get(PART_BYTES_ENV) or MULTIPART_THRESHOLD)
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, use_threads=True)
    with _s3_errors(uri):
        _s3_client().upload_fileobj(fileobj, loc.bucket, loc.path, Config=config)


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


def put_file(local_path: str, uri: str) -> None:
    """Copy a local file to ``uri`` atomically."""
    if is_remote(uri):
        with open(local_path, "rb") as src:
            upload(src, uri)
        return
    with open(local_path, "rb") as src, open_write(uri) as dst:
        shutil.copyfileobj(src, dst, READ_CHUNK)


def cleanup_temp(prefix: str) -> int:
    """Remove what killed writers left under a local folder (temp files) or an S3 prefix (multipart uploads in
    progress: aborted); returns how many. Only for a folder no one is writing: an upload in progress there is a
    dead writer's (preprocess/job.py calls it before and after a job, the one writer of its output folder)."""
    loc = parse(prefix)
    if loc.scheme == "s3":
        return _abort_uploads(prefix)
    if not os.path.isdir(loc.path):
        return 0
    removed = 0
    for folder, _, files in os.walk(loc.path):
        for name in files:
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def _abort_uploads(prefix: str) -> int:
    """Abort the multipart uploads in progress under an S3 prefix. Listing them needs the
    ``s3:ListBucketMultipartUploads`` permission: without it, a warning says that none was aborted."""
    loc = parse(prefix)
    key_prefix = loc.path.rstrip("/") + "/" if loc.path else ""
    client = _s3_client()
    try:
        with _s3_errors(prefix):
            pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=loc.bucket, Prefix=key_prefix)
            uploads = [u for page in pages for u in page.get("Uploads", [])]
    except StorageNotFound:
        return 0
    except StorageError as exc:
        log.warning("cannot list the multipart uploads in progress (%s); none aborted", exc)
        return 0
    aborted = 0
    for upload in uploads:
        aborted += _abort_upload(client, loc.bucket, upload["Key"], upload["UploadId"])
    return aborted


def _abort_upload(client, bucket: str, key: str, upload_id: str) -> bool:
    """Abort one upload; False when it ended between the listing and now (a dying writer completed or aborted it:
    S3's NoSuchUpload), which is what the abort was for."""
    from botocore.exceptions import ClientError

    try:
        with _s3_errors(f"s3://{bucket}/{key}"):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except StorageError as exc:
        cause = exc.__cause__
        if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return False
        raise
    log.info("aborted an unfinished multipart upload of s3://%s/%s", bucket, key)
    return True
