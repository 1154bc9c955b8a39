"""A real HTTP server on loopback serving a folder, with faults injected per path (for the fetch tests and bench).

``FaultServer`` is a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) running in a thread. It serves the files
of its ``root`` folder with ``Content-Length``, ``ETag``, ``Last-Modified``, ``Accept-Ranges`` and single-range
``Range``/``If-Range`` support. A test sets a :class:`Fault` on a path to make that path misbehave: an error status
(optionally only for the first N requests, with headers such as ``Retry-After``), a connection cut at a byte
offset, a trickling or stalled body, inline content (an HTML or JSON page with status 200), a body without
``Content-Length``, or a per-connection bandwidth limit. Every request is logged (:class:`Request`: method, path,
headers, start and end times, status, body bytes sent) so a test can check what the client did: the Range of a
resume, the wait a Retry-After asked for, how many downloads were in flight at once.

It also answers requests in absolute form (``GET http://any.host/path``), as a forward proxy would: a client
configured with ``http://user:pw@127.0.0.1:<port>`` as its proxy reaches it for any URL (``Request.proxied``).

Use it as a context manager (``with FaultServer(folder) as server``) or through the ``fault_server`` fixture
(import it into a test module or a conftest).
"""

from __future__ import annotations

import email.utils
import http.server
import mimetypes
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

CHUNK = 64 << 10


@dataclass(frozen=True, kw_only=True)
class Fault:
    """How one path misbehaves. Knobs combine (e.g. a bandwidth limit with a cut)."""

    status: int | None = None
    """Answer with this status (``headers``, ``body``) instead of the file, for the first ``times`` requests."""
    times: int | None = None
    """How many requests get ``status`` or ``cut_at``; later ones are served normally. None: every request."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (e.g. ``Retry-After``) sent with ``status``."""
    body: bytes | None = None
    """With ``status``: the error body; without: serve these bytes (status 200) instead of a file."""
    content_type: str | None = None
    """Content-Type of the file or ``body`` (default: guessed from the path's extension)."""
    cut_at: int | None = None
    """Close the connection once the file's byte at this offset is reached (for the first ``times`` responses)."""
    ranges: bool = True
    """Advertise ``Accept-Ranges: bytes`` and honour Range; False: ignore Range and always send the whole file."""
    trickle: tuple[int, float] | None = None
    """Send the body as (bytes, seconds): that many bytes, then a pause, until the end or the client leaves."""
    stall_after: int | None = None
    """Send the headers and this many body bytes, then nothing until the client leaves."""
    chunked: bool = False
    """No Content-Length: chunked transfer encoding (the client learns the size only by reading)."""
    bandwidth: float | None = None
    """Bytes per second per connection (overrides the server's)."""


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    start: float
    """time.monotonic() when the request line was read."""
    wall: float = field(default_factory=time.time)
    """time.time() at the same moment (to compare with an HTTP date)."""
    proxied: bool = False
    """The request came in absolute form (through this server as a proxy)."""
    status: int = 0
    sent: int = 0
    """Body bytes written."""
    end: float | None = None
    """time.monotonic() just before the response's last write (None while in flight): a client that holds the whole
    response is never counted as in flight, so :meth:`FaultServer.max_in_flight` never exceeds the client's own."""
    last_write: float | None = None

    def header(self, name: str) -> str | None:
        lowered = {k.lower(): v for k, v in self.headers.items()}
        return lowered.get(name.lower())


class _ClientGone(Exception):
    """The client closed the connection (or the server is stopping)."""


class FaultServer:
    """The server; ``url(path)`` gives a file's URL, ``fault(path, Fault(...))`` makes a path misbehave."""

    def __init__(self, root: str | os.PathLike, bandwidth: float | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.bandwidth = bandwidth
        self.log: list[Request] = []
        self._faults: dict[str, Fault] = {}
        self._faults_used: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_class(self))
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ test-facing API

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``: the host key of this server's URLs."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{path.lstrip('/')}"

    def add(self, path: str, data: bytes) -> str:
        """Write a file under the root; returns its URL."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return self.url(path)

    def fault(self, path: str, fault: Fault | None) -> str:
        """Set (or with None, clear) the fault of a path; returns its URL."""
        key = "/" + path.lstrip("/")
        with self._lock:
            self._faults_used.pop(key, None)
            if fault is None:
                self._faults.pop(key, None)
            else:
                self._faults[key] = fault
        return self.url(path)

    def requests(self, path: str | None = None) -> list[Request]:
        """The logged requests (of one path), in arrival order."""
        with self._lock:
            return [r for r in self.log if path is None or r.path == "/" + path.lstrip("/")]

    def max_in_flight(self, prefix: str = "/") -> int:
        """The most requests under a path prefix that were being answered at the same moment."""
        events = []
        for r in self.requests():
            if r.path.startswith(prefix):
                events += [(r.start, 1), (r.end if r.end is not None else float("inf"), -1)]
        most = current = 0
        for _, step in sorted(events, key=lambda e: (e[0], e[1])):
            current += step
            most = max(most, current)
        return most

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ used by the handler

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def _take_fault(self, path: str) -> tuple[Fault | None, bool]:
        """(the path's fault, whether its counted part — status or cut — applies to this request)."""
        with self._lock:
            fault = self._faults.get(path)
            if fault is None:
                return None, False
            used = self._faults_used.get(path, 0)
            counted = (fault.status is not None or fault.cut_at is not None) and (
                fault.times is None or used < fault.times
            )
            if counted:
                self._faults_used[path] = used + 1
            return fault, counted


class _QuietServer(http.server.ThreadingHTTPServer):
    """Daemon threads; a client that drops a kept-alive connection is not an error worth a traceback."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exception(), (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler_class(server: FaultServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server

    return Handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_CONNECT(self) -> None:
        """A tunnel request (an https URL through this server as a proxy): logged, refused with 502."""
        request = Request(method="CONNECT", path=self.path, headers=dict(self.headers.items()), start=time.monotonic())
        self.owner._record(request)
        request.status = 502
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True
        request.end = time.monotonic()

    def _serve(self, head: bool) -> None:
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=unquote(parts.path),
            headers=dict(self.headers.items()),
            start=time.monotonic(),
            proxied=self.path.startswith(("http://", "https://")),
        )
        self.owner._record(request)
        self._request = request
        try:
            self._answer(head)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            request.end = request.last_write or time.monotonic()

    # ------------------------------------------------------------------ answers

    def _answer(self, head: bool) -> None:
        fault, counted = self.owner._take_fault(self._request.path)
        fault = fault or Fault()
        if counted and fault.status is not None:
            body = fault.body or b""
            self._head(fault.status, {"Content-Length": str(len(body)), **fault.headers})
            self._write_all([body] if not head else [], fault)
            return
        if fault.body is not None:
            self._send_content(fault.body, fault, head)
            return
        target = self.owner.root / self._request.path.lstrip("/")
        if not target.is_file():
            body = b"not found"
            self._head(404, {"Content-Length": str(len(body)), "Content-Type": "text/plain"})
            self._write_all([body] if not head else [], fault)
            return
        self._send_file(target, fault, head, cut=fault.cut_at if counted else None)

    def _send_content(self, data: bytes, fault: Fault, head: bool) -> None:
        kind = fault.content_type or "application/octet-stream"
        self._head(200, {"Content-Type": kind, **self._length_headers(len(data), fault)})
        if not head:
            self._write_all([data], fault)

    def _send_file(self, target: Path, fault: Fault, head: bool, cut: int | None) -> None:
        stat = target.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        kind = fault.content_type or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        headers = {"Content-Type": kind, "ETag": etag, "Last-Modified": modified}
        if fault.ranges:
            headers["Accept-Ranges"] = "bytes"
        start, end = 0, size
        wanted = self._range(size) if fault.ranges and self._if_range_ok(etag, modified) else None
        if wanted == "unsatisfiable":
            self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            return
        status = 200
        if wanted is not None:
            start, end = wanted
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._head(status, {**headers, **self._length_headers(end - start, fault)})
        if head:
            return
        stop = end if cut is None else max(start, min(end, cut))
        self._write_all(_file_chunks(target, start, stop), fault)
        if stop < end:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            raise _ClientGone

    def _range(self, size: int) -> tuple[int, int] | str | None:
        """(start, end) of a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` Range, or None to send it all."""
        value = self.headers.get("Range", "")
        if not value.startswith("bytes=") or "," in value:
            return None
        first, _, last = value[6:].strip().partition("-")
        try:
            if first == "":
                start, end = max(0, size - int(last)), size
            else:
                start, end = int(first), min(size, int(last) + 1) if last else size
        except ValueError:
            return None
        return "unsatisfiable" if start >= size or start >= end else (start, end)

    def _if_range_ok(self, etag: str, modified: str) -> bool:
        validator = self.headers.get("If-Range")
        return validator is None or validator in (etag, modified)

    @staticmethod
    def _length_headers(length: int, fault: Fault) -> dict[str, str]:
        return {"Transfer-Encoding": "chunked"} if fault.chunked else {"Content-Length": str(length)}

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self._request.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self._request.last_write = time.monotonic()
        self.end_headers()
        self._chunked = headers.get("Transfer-Encoding") == "chunked"

    # ------------------------------------------------------------------ paced writing

    def _write_all(self, chunks, fault: Fault) -> None:
        pace = _Pace(self, fault.bandwidth if fault.bandwidth is not None else self.owner.bandwidth)
        budget = fault.stall_after
        size = fault.trickle[0] if fault.trickle else pace.piece
        for data in chunks:
            for piece in _pieces(data, size):
                if budget is not None and len(piece) >= budget:
                    self._write(piece[:budget], pace)
                    self.wfile.flush()
                    self._wait_for_client_to_leave()
                self._write(piece, pace)
                if budget is not None:
                    budget -= len(piece)
                if fault.trickle:
                    self.wfile.flush()
                    self._sleep(fault.trickle[1])
        if self._chunked:
            self._request.last_write = time.monotonic()
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write(self, data: bytes, pace: _Pace) -> None:
        if not data:
            return
        pace.wait()
        self._request.last_write = time.monotonic()
        if self._chunked:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        else:
            self.wfile.write(data)
        self._request.sent += len(data)
        pace.total += len(data)

    def _sleep(self, seconds: float) -> None:
        if self.owner._stopping.wait(seconds):
            raise _ClientGone

    def _wait_for_client_to_leave(self) -> None:
        """Send nothing more until the client closes the connection (or the server stops)."""
        while not self.owner._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        break
                except OSError:
                    break
        raise _ClientGone


class _Pace:
    """Holds a connection to ``rate`` bytes per second (None: no limit): small pieces, each sent on schedule."""

    def __init__(self, handler: _Handler, rate: float | None):
        self.handler, self.rate, self.start, self.total = handler, rate, time.monotonic(), 0
        self.piece = CHUNK if not rate else max(1024, min(CHUNK, int(rate / 50)))

    def wait(self) -> None:
        if self.rate:
            self.handler.wfile.flush()
            ahead = self.start + self.total / self.rate - time.monotonic()
            if ahead > 0:
                self.handler._sleep(ahead)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _file_chunks(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data


@pytest.fixture
def fault_server(tmp_path) -> Iterator[FaultServer]:
    """A :class:`FaultServer` over ``tmp_path/www``, stopped after the test."""
    with FaultServer(tmp_path / "www") as server:
        yield server
