"""The attempt functions of the plain routes: http(s) through our streaming client (``requests``: Range resumes,
Retry-After, content sniffing) and s3:// / file:// URIs through :mod:`pipeline.storage`."""

from __future__ import annotations

import contextlib
import http.client
import re
from urllib.parse import urlsplit

from pipeline import storage
from preprocess.fetching.attempts import CHUNK, Download, FetchFailed, Sink, retry_after


class HttpStream:
    """Our http(s) client for one URL: state kept across attempts for Range resumes."""

    def __init__(self):
        self.sink: Sink | None = None
        self.total: int | None = None
        self.validator: str | None = None
        self.ranges = False

    def attempt(self, job: Download) -> tuple[str, float | None]:
        import requests

        with requests.Session() as session:
            if job.cfg.proxy:
                session.proxies = {"http": job.cfg.proxy, "https": job.cfg.proxy}
            resume = self.sink is not None and self.sink.written > 0 and self.ranges
            response = self._get(session, job, resume)
            with response:
                offset = self._accept(response, job, resume)
                self._read_body(response, job, offset)
        return self.sink.finish(), None

    def _get(self, session, job: Download, resume: bool):
        import requests

        headers = {"Accept-Encoding": "identity", "User-Agent": "clipvip-preprocess/1 (+requests)"}
        if resume:
            headers["Range"] = f"bytes={self.sink.written}-"
            if self.validator:
                headers["If-Range"] = self.validator
        timeout = max(0.1, min(job.cfg.read_timeout_s, job.time_left()))
        try:
            return session.get(job.url, stream=True, timeout=(timeout, timeout), headers=headers)
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout) as exc:
            raise FetchFailed("timeout", f"no answer within {timeout:g} s ({type(exc).__name__})") from None
        except requests.exceptions.ConnectionError as exc:
            raise FetchFailed("network", f"cannot connect: {_first_reason(exc)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
            raise FetchFailed("fetch_error", "not a URL this fetch can download (http(s)://, s3://, file://)") from None
        except requests.exceptions.RequestException as exc:
            raise FetchFailed("fetch_error", f"{type(exc).__name__}: {_first_reason(exc)}") from None

    def _accept(self, response, job: Download, resume: bool) -> int:
        """Check the status and headers; returns the byte offset the body starts at."""
        if response.status_code == 416:
            self.ranges = False  # the next attempt starts over
        _raise_for_status(response)
        if self.sink is None:
            self.sink = Sink(job, response.headers.get("Content-Type"), urlsplit(job.url).path)
        length = response.headers.get("Content-Length")
        if response.status_code == 206:
            offset, total = _content_range(response.headers.get("Content-Range", ""))
            if not resume or offset != self.sink.written:
                self.ranges = False
                raise FetchFailed("truncated", f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
            self.total = total
        else:
            offset = 0
            self.ranges = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
            self.total = int(length) if length and length.isdigit() else None
            etag = response.headers.get("ETag", "")
            self.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        if self.total is not None:
            job.check_size(self.total, announced=True)
        return offset

    def _read_body(self, response, job: Download, offset: int) -> None:
        import urllib3.exceptions

        with self.sink.open(offset) as f:
            while True:
                try:
                    data = response.raw.read1(CHUNK)
                except urllib3.exceptions.ReadTimeoutError:
                    where = f"at byte {self.sink.written}"
                    raise FetchFailed("timeout", f"no bytes for {job.cfg.read_timeout_s:g} s {where}") from None
                except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                    code = "truncated" if self.total is not None else "network"
                    where = f"connection lost at byte {self.sink.written}"
                    raise FetchFailed(code, f"{where}: {_first_reason(exc)}") from None
                if not data:
                    break
                self.sink.write(f, data)  # a local disk error propagates: it is not the source's fault
        if self.total is not None and self.sink.written < self.total:
            raise FetchFailed("truncated", f"{self.sink.written} of {self.total} bytes received")


_STATUS_CODES = {403: "http_403", 404: "http_404", 410: "http_410", 429: "rate_limited"}


def _raise_for_status(response) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    reason = f"HTTP {status} {response.reason or ''}".strip()
    if status in (429, 503):
        code = "rate_limited" if status == 429 else "http_5xx"
        raise FetchFailed(code, reason, retry_after=retry_after(response.headers.get("Retry-After")))
    if status in _STATUS_CODES:
        raise FetchFailed(_STATUS_CODES[status], reason)
    if status == 416:
        raise FetchFailed("truncated", f"{reason} (range not satisfiable)")
    if 500 <= status < 600:
        raise FetchFailed("http_5xx", reason)
    if 400 <= status < 500:
        raise FetchFailed("http_4xx", reason)
    raise FetchFailed("fetch_error", f"unexpected {reason}")


def _content_range(value: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return -1, None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _first_reason(exc: BaseException) -> str:
    """The innermost cause's message, on one line (urllib3 wraps the useful part several levels down)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    for marker in ("Failed to resolve", "Name or service not known", "Connection refused", "Connection reset"):
        if marker in text:
            return marker
    return " ".join(text.split())[:200]


# ----------------------------------------------------------------------------- s3:// and file:// via storage


def storage_attempt(job: Download) -> tuple[str, float | None]:
    """One attempt at an s3:// or file:// source through pipeline.storage (which resumes cut S3 reads itself)."""
    sink = Sink(job, None, urlsplit(job.url).path)
    with _storage_errors():
        job.check_size(storage.size(job.url), announced=True)
        src = storage.open_read(job.url)
    with src, sink.open(0) as f:
        while True:
            with _storage_errors():
                data = src.read(CHUNK)
            if not data:
                break
            sink.write(f, data)
    return sink.finish(), None


@contextlib.contextmanager
def _storage_errors():
    try:
        yield
    except storage.StorageNotFound as exc:
        raise FetchFailed("http_404", str(exc)) from None
    except storage.StorageError as exc:
        code = "http_403" if "access denied" in str(exc) else "network"
        raise FetchFailed(code, str(exc)) from None
    except OSError as exc:
        raise FetchFailed("network", f"{type(exc).__name__}: {exc}") from None
