"""preprocess/fetching/ against a real HTTP server on loopback with injected faults, the real S3 server, and yt-dlp.

Every fault gets its own error code, good files arrive byte-identical, nothing is left in the destination folder
after a failure, Retry-After and the host gate's limits are measured from the server's request log, and neither
the cookies file nor the proxy's password reaches a log record or a Failure message.
"""

from __future__ import annotations

import email.utils
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline import storage
from preprocess.failures import Failure
from preprocess.fetching.attempts import redact_url
from preprocess.fetching.config import CODES, TRANSIENT, FetchConfig
from preprocess.fetching.fetch import Fetched, fetch_video, host_key, route, site_extractor
from preprocess.fetching.host_gate import HostGate
from tests.preprocess.http_faults import Fault, FaultServer, fault_server  # noqa: F401 - the fixture

YOUTUBE = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    """A 2 s and a 6 s H.264 mp4 (testsrc2) and a PNG frame, as bytes."""
    d = tmp_path_factory.mktemp("fetch_media")
    src = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25"]
    enc = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    _ffmpeg(*src, "-t", "2", *enc, str(d / "small.mp4"))
    _ffmpeg(*src, "-t", "6", *enc, "-b:v", "400k", str(d / "big.mp4"))
    _ffmpeg(*src, "-frames:v", "1", str(d / "frame.png"))
    return {
        name: (d / f).read_bytes() for name, f in [("small", "small.mp4"), ("big", "big.mp4"), ("png", "frame.png")]
    }


@pytest.fixture
def gate() -> HostGate:
    return HostGate(concurrency=8, rate=1000.0)


def _cfg(**overrides) -> FetchConfig:
    values = dict(retries=2, backoff_s=0.01, max_backoff_s=0.05, timeout_s=10.0, read_timeout_s=5.0)
    return FetchConfig(**{**values, **overrides})


def _fetch(url: str, dest: Path, cfg: FetchConfig, gate, name: str = "v") -> Fetched | Failure:
    """fetch_video, checking the destination afterwards: the one file on success, nothing on failure."""
    result = fetch_video(url, str(dest), name, cfg, gate)
    left = sorted(os.listdir(dest)) if dest.exists() else []
    if isinstance(result, Failure):
        assert result.stage == "fetch" and result.error in CODES, result
        assert left == [], f"{result.error}: left {left}"
        assert "\n" not in result.message
    else:
        assert left == [os.path.basename(result.path)]
    return result


def _assert_fetched(result, data: bytes, suffix: str = ".mp4") -> None:
    assert isinstance(result, Fetched), result
    assert result.path.endswith("/v" + suffix)
    assert Path(result.path).read_bytes() == data
    assert result.bytes == len(data)


# ----------------------------------------------------------------------------- good files


def test_good_files_arrive_byte_identical(fault_server, media, gate, tmp_path):
    plain = fault_server.add("a.mp4", media["small"])
    _assert_fetched(_fetch(plain, tmp_path / "d1", _cfg(), gate), media["small"])
    fault_server.add("blob", media["big"])
    untyped = fault_server.fault("blob", Fault(content_type="application/octet-stream"))
    _assert_fetched(_fetch(untyped, tmp_path / "d2", _cfg(), gate), media["big"])
    fault_server.add("chunked.mp4", media["big"])
    chunked = fault_server.fault("chunked.mp4", Fault(chunked=True))
    _assert_fetched(_fetch(chunked, tmp_path / "d3", _cfg(), gate), media["big"])
    assert [r.status for r in fault_server.requests()] == [200, 200, 200]


# ----------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "code"), [(404, "http_404"), (410, "http_410"), (403, "http_403"), (401, "http_4xx")]
)
def test_client_errors_fail_at_once_with_their_code(fault_server, media, gate, tmp_path, status, code):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=status))
    result = _fetch(url, tmp_path / "d", _cfg(), gate)
    assert isinstance(result, Failure) and result.error == code
    assert str(status) in result.message and url in result.message
    assert len(fault_server.requests("x.mp4")) == 1, "a client error is not retried"


def test_429_with_retry_after_seconds_is_waited_then_200(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=429, times=1, headers={"Retry-After": "1"}))
    _assert_fetched(_fetch(url, tmp_path / "d", _cfg(), gate), media["small"])
    first, second = fault_server.requests("x.mp4")
    assert (first.status, second.status) == (429, 200)
    assert second.start - first.start >= 0.95


def test_503_with_retry_after_http_date_is_waited(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["small"])
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    url = fault_server.fault("x.mp4", Fault(status=503, times=1, headers={"Retry-After": when}))
    _assert_fetched(_fetch(url, tmp_path / "d", _cfg(), gate), media["small"])
    first, second = fault_server.requests("x.mp4")
    # the retry comes at the date, however late the first request came (no retry was due before it)
    assert second.wall >= email.utils.parsedate_to_datetime(when).timestamp() - 0.01 > first.wall


class _ToldGate(HostGate):
    """A real :class:`HostGate` that says when (between which two clock readings) it was told to back off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.told, self.backed_off = threading.Event(), (0.0, 0.0, 0.0)

    def back_off(self, host: str, seconds: float) -> None:
        before = time.monotonic()
        super().back_off(host, seconds)
        self.backed_off = (before, time.monotonic(), float(seconds))
        self.told.set()


def test_retry_after_closes_the_host_for_every_caller(fault_server, media, tmp_path):
    gate = _ToldGate(concurrency=4, rate=1000.0)
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=429, times=1, headers={"Retry-After": "2"}))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_fetch(url, tmp_path / "d", _cfg(), gate), done.set()))
    thread.start()
    assert gate.told.wait(60), "the 429's Retry-After never reached the gate"
    before = time.monotonic()
    wait = gate.try_acquire(fault_server.host)
    after = time.monotonic()
    told_from, told_to, seconds = gate.backed_off
    assert seconds == 2.0
    assert told_from + seconds - after <= wait <= told_to + seconds - before, "another caller waits until then too"
    assert wait > 0, "another caller must wait for the Retry-After too"
    thread.join(60)
    assert done.is_set()


def test_503_twice_then_200(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=503, times=2))
    result = _fetch(url, tmp_path / "d", _cfg(), gate)
    _assert_fetched(result, media["small"])
    assert [r.status for r in fault_server.requests("x.mp4")] == [503, 503, 200]
    assert result.attempts == 3


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (Fault(status=429, headers={"Retry-After": "0"}), "rate_limited"),
        (Fault(status=503), "http_5xx"),
        (Fault(status=500), "http_5xx"),
    ],
)
def test_persistent_server_errors_give_up_after_the_retries(fault_server, media, gate, tmp_path, fault, code):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", fault)
    result = _fetch(url, tmp_path / "d", _cfg(retries=2), gate)
    assert isinstance(result, Failure) and result.error == code and code in TRANSIENT
    assert len(fault_server.requests("x.mp4")) == 3


def test_retry_after_beyond_the_timeout_fails_at_once(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=429, headers={"Retry-After": "3600"}))
    started = time.monotonic()
    result = _fetch(url, tmp_path / "d", _cfg(timeout_s=120.0), gate)
    assert isinstance(result, Failure) and result.error == "rate_limited"
    assert time.monotonic() - started < 60, "not waited out: neither the Retry-After nor the video's 120 s"
    assert len(fault_server.requests("x.mp4")) == 1
    assert gate.try_acquire(fault_server.host) > 3000, "the host stays closed for the job"
    other = _fetch(fault_server.add("y.mp4", media["small"]), tmp_path / "d2", _cfg(timeout_s=120.0), gate)
    assert isinstance(other, Failure) and other.error == "rate_limited" and "closed" in other.message
    assert fault_server.requests("y.mp4") == [], "nobody asks a closed host"


# ----------------------------------------------------------------------------- cut, trickle, stall


def test_cut_connection_resumes_with_a_range_request(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(cut_at=10_000, times=1))
    _assert_fetched(_fetch(url, tmp_path / "d", _cfg(), gate), media["big"])
    first, second = fault_server.requests("x.mp4")
    assert (first.status, first.sent) == (200, 10_000)
    assert second.status == 206 and second.header("Range") == "bytes=10000-"
    assert second.header("If-Range") is not None
    assert second.sent == len(media["big"]) - 10_000


def test_cut_connection_without_range_support_restarts(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(cut_at=10_000, times=1, ranges=False))
    _assert_fetched(_fetch(url, tmp_path / "d", _cfg(), gate), media["big"])
    first, second = fault_server.requests("x.mp4")
    assert second.status == 200 and second.header("Range") is None
    assert second.sent == len(media["big"])


@pytest.mark.parametrize("ranges", [True, False])
def test_a_connection_cut_every_time_is_truncated(fault_server, media, gate, tmp_path, ranges):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(cut_at=10_000, ranges=ranges))
    result = _fetch(url, tmp_path / "d", _cfg(retries=2), gate)
    assert isinstance(result, Failure) and result.error == "truncated"
    assert "10000" in result.message
    assert len(fault_server.requests("x.mp4")) == 4  # the first attempt made progress; 1 + 2 retries without


def test_a_trickling_body_is_cut_by_the_timeout(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(trickle=(1024, 0.25)))
    started = time.monotonic()
    result = _fetch(url, tmp_path / "d", _cfg(timeout_s=1.5), gate)
    elapsed = time.monotonic() - started
    assert isinstance(result, Failure) and result.error == "timeout"
    (request,) = fault_server.requests("x.mp4")  # no retry once the video's time is spent
    assert elapsed > 1.4 and request.sent < len(media["big"]) // 2, "cut at 1.5 s, not read to the end (~60 s)"


def test_a_stalled_body_hits_the_read_timeout(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(stall_after=0))
    started = time.monotonic()
    result = _fetch(url, tmp_path / "d", _cfg(read_timeout_s=0.5, retries=1, timeout_s=120.0), gate)
    assert isinstance(result, Failure) and result.error == "timeout"
    assert time.monotonic() - started < 60, "the read timeout, not the video's 120 s"
    assert len(fault_server.requests("x.mp4")) == 2, "a read timeout is retried"


def test_connection_refused_is_network(gate, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _fetch(f"http://127.0.0.1:{port}/x.mp4", tmp_path / "d", _cfg(retries=1), gate)
    assert isinstance(result, Failure) and result.error == "network"


# ----------------------------------------------------------------------------- not a video, too large


def _not_video_bodies(media) -> dict[str, Fault]:
    html = b"<!DOCTYPE html><html><head><title>Video removed</title></head><body>Sorry.</body></html>"
    return {
        "page.mp4": Fault(body=html, content_type="text/html; charset=utf-8"),
        "api.mp4": Fault(body=b'{"error": "not found", "items": []}' * 4, content_type="application/json"),
        "frame.png": Fault(body=media["png"], content_type="image/png"),
        "png-named.mp4": Fault(body=media["png"], content_type="video/mp4"),
        "notes.mp4": Fault(body=b"this is not a video, just some notes typed by hand\n" * 3, content_type="video/mp4"),
    }


def test_pages_images_and_text_are_not_a_video(fault_server, media, gate, tmp_path):
    for i, (path, fault) in enumerate(_not_video_bodies(media).items()):
        result = _fetch(fault_server.fault(path, fault), tmp_path / f"d{i}", _cfg(), gate)
        assert isinstance(result, Failure) and result.error == "not_a_video", (path, result)
        assert len(fault_server.requests(path)) == 1


def test_announced_size_over_the_cap_is_refused_before_the_body(fault_server, media, gate, tmp_path):
    url = fault_server.add("x.mp4", media["big"])
    result = _fetch(url, tmp_path / "d", _cfg(max_video_bytes=10_000), gate)
    assert isinstance(result, Failure) and result.error == "too_large"
    assert "announced" in result.message and str(len(media["big"])) in result.message


def test_unannounced_size_over_the_cap_is_counted_while_reading(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["big"])
    url = fault_server.fault("x.mp4", Fault(chunked=True))
    result = _fetch(url, tmp_path / "d", _cfg(max_video_bytes=10_000), gate)
    assert isinstance(result, Failure) and result.error == "too_large"
    assert "more than" in result.message


# ----------------------------------------------------------------------------- the host gate


def _fetch_all(urls: list[str], tmp_path: Path, cfg: FetchConfig, gate) -> list:
    results: list = [None] * len(urls)

    def one(i: int) -> None:
        results[i] = fetch_video(urls[i], str(tmp_path / "d"), f"v{i}", cfg, gate)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_gate_limits_downloads_in_flight_per_host(fault_server, media, tmp_path):
    urls = []
    for i in range(6):
        fault_server.add(f"c/{i}.mp4", media["small"])
        urls.append(fault_server.fault(f"c/{i}.mp4", Fault(bandwidth=100_000)))  # ~0.3 s each
    results = _fetch_all(urls, tmp_path, _cfg(), HostGate(concurrency=2, rate=1000.0))
    assert all(isinstance(r, Fetched) for r in results), results
    assert fault_server.max_in_flight("/c/") == 2


class _GrantsGate(HostGate):
    """A real :class:`HostGate` that notes, for each slot it grants, the clock readings around the grant."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grants: list[tuple[float, float]] = []

    def try_acquire(self, host: str) -> float:
        before = time.monotonic()
        wait = super().try_acquire(host)
        if wait == 0.0:
            self.grants.append((before, time.monotonic()))
        return wait


def test_gate_limits_the_request_rate_per_host(fault_server, media, tmp_path):
    urls = [fault_server.add(f"r/{i}.mp4", media["small"]) for i in range(6)]
    gate = _GrantsGate(concurrency=8, rate=5.0)
    began = time.monotonic()
    results = _fetch_all(urls, tmp_path, _cfg(), gate)
    assert all(isinstance(r, Fetched) for r in results), results
    starts = sorted(r.start for r in fault_server.requests())
    # the server sees a request only after the gate let it go, and the gate lets one go per 1/rate: 5 intervals
    assert len(starts) == 6 and starts[-1] - began >= 5 / 5.0, starts
    grants = sorted(gate.grants)
    assert len(grants) == 6
    # consecutive grants are 1/rate apart: the later one returned at least 0.2 s after the earlier one was asked
    assert all(later[1] - earlier[0] >= 1 / 5.0 for earlier, later in zip(grants, grants[1:])), grants


def _granted(gate: HostGate, host: str) -> None:
    """Take a slot of ``host``, waiting out the rate (1 ms here): the slots are full or closed if this fails."""
    for _ in range(100):
        if gate.try_acquire(host) == 0.0:
            return
        time.sleep(0.001)
    raise AssertionError(f"no slot of {host}: in flight {gate.in_flight(host)}")


def test_host_gate_slots_rate_and_back_off():
    gate = HostGate(concurrency=2, rate=1000.0)
    assert gate.try_acquire("a") == 0.0
    _granted(gate, "a")
    assert gate.try_acquire("a") > 0 and gate.in_flight("a") == 2, "both slots are taken"
    assert gate.try_acquire("b") == 0.0, "hosts are counted apart"
    gate.release("a")
    _granted(gate, "a")
    before = time.monotonic()
    gate.back_off("a", 1.0)
    gate.release("a")
    gate.release("a")
    wait = gate.try_acquire("a")
    after = time.monotonic()
    assert gate.in_flight("a") == 0 and 0 < wait and 1.0 - (after - before) <= wait <= 1.0, "closed for 1 s"
    time.sleep(wait + 0.005)
    _granted(gate, "a")
    with pytest.raises(ValueError, match="concurrency"):
        HostGate(concurrency=0, rate=1.0)


def test_host_gate_frees_the_slot_of_a_caller_that_never_released_it_after_the_lease():
    gate, lease = HostGate(concurrency=1, rate=1000.0, lease_s=0.3), 0.3
    asked = time.monotonic()
    assert gate.try_acquire("a") == 0.0
    granted = time.monotonic()
    seen = []  # (before, after, in flight): the slot is held until `asked + lease`, free from `granted + lease`
    while not seen or seen[-1][2]:
        before = time.monotonic()
        held = gate.in_flight("a")
        seen.append((before, time.monotonic(), held))
        assert before < granted + 60, "the slot is never freed"
        time.sleep(0.005)
    assert all(held == 1 for _, after, held in seen if after < asked + lease), seen
    assert all(held == 0 for before, _, held in seen if before > granted + lease), seen
    assert seen[-1][1] >= asked + lease, "freed no earlier than the lease"
    _granted(gate, "a")


def test_host_gate_is_thread_safe_and_holds_exactly_its_limit():
    limit, workers, rounds = 3, 8, 15
    gate = HostGate(concurrency=limit, rate=1e6)
    lock, holding, most, done = threading.Lock(), [0], [0], [0]

    def worker() -> None:
        for _ in range(rounds):
            while gate.try_acquire("h") > 0:
                time.sleep(0.0005)
            with lock:  # counted after the gate said yes and before it is told: never more than the gate allows
                holding[0] += 1
                most[0] = max(most[0], holding[0])
            time.sleep(0.003)  # hold the slot long enough for every other worker to want one
            with lock:
                holding[0] -= 1
                done[0] += 1
            gate.release("h")

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done[0] == workers * rounds and gate.in_flight("h") == 0
    assert most[0] == limit, f"{most[0]} holders at once with a limit of {limit}"


# ----------------------------------------------------------------------------- yt-dlp


def test_ytdlp_generic_extractor_fetches_a_direct_file(fault_server, media, gate, tmp_path):
    cfg = _cfg(http_downloader="yt-dlp")
    url = fault_server.add("direct.mp4", media["big"])
    assert route(url, cfg) == "yt-dlp" and route(url, _cfg()) == "requests"
    _assert_fetched(_fetch(url, tmp_path / "d1", cfg, gate), media["big"])
    missing = _fetch(fault_server.url("missing.mp4"), tmp_path / "d2", cfg, gate)
    assert isinstance(missing, Failure) and missing.error == "http_404"
    page = fault_server.fault("page", Fault(body=b"<html><body>no video here</body></html>", content_type="text/html"))
    assert _fetch(page, tmp_path / "d3", cfg, gate).error == "not_a_video"


def test_ytdlp_errors_are_retried_and_honour_retry_after(fault_server, media, gate, tmp_path):
    fault_server.add("x.mp4", media["small"])
    url = fault_server.fault("x.mp4", Fault(status=429, times=1, headers={"Retry-After": "1"}))
    _assert_fetched(_fetch(url, tmp_path / "d", _cfg(http_downloader="yt-dlp"), gate), media["small"])
    first, second = fault_server.requests("x.mp4")[:2]
    assert first.status == 429 and second.start - first.start >= 0.95
    fault_server.add("y.mp4", media["small"])
    url = fault_server.fault("y.mp4", Fault(status=503))
    result = _fetch(url, tmp_path / "d2", _cfg(http_downloader="yt-dlp", retries=1), gate)
    assert isinstance(result, Failure) and result.error == "http_5xx"
    assert len(fault_server.requests("y.mp4")) == 2


def test_ytdlp_checks_duration_and_size_before_downloading(fault_server, media, gate, tmp_path):
    cfg = _cfg(http_downloader="yt-dlp", max_video_seconds=60.0)
    fault_server.add("long.mp4", media["big"])
    video = fault_server.fault("long.mp4", Fault(bandwidth=50_000))  # the whole file would take ~6 s
    ld = f'{{"@context": "https://schema.org", "@type": "VideoObject", "name": "long", "contentUrl": "{video}", '
    ld += '"duration": "PT3H", "uploadDate": "2020-01-01", "thumbnailUrl": "x.jpg"}'
    html = f'<html><head><script type="application/ld+json">{ld}</script></head><body></body></html>'
    page = fault_server.fault("watch", Fault(body=html.encode(), content_type="text/html"))
    result = _fetch(page, tmp_path / "d1", cfg, gate)
    assert isinstance(result, Failure) and result.error == "too_long", result
    sent = sum(r.sent for r in fault_server.requests("long.mp4"))
    assert sent < len(media["big"]) // 2, f"refused before the video is downloaded, not after {sent} bytes"
    small_cap = _fetch(video, tmp_path / "d2", _cfg(http_downloader="yt-dlp", max_video_bytes=10_000), gate)
    assert isinstance(small_cap, Failure) and small_cap.error == "too_large"


def test_ytdlp_download_is_cut_by_the_timeout(fault_server, media, gate, tmp_path):
    fault_server.add("slow.mp4", media["big"])
    url = fault_server.fault("slow.mp4", Fault(trickle=(4096, 0.25)))
    result = _fetch(url, tmp_path / "d", _cfg(http_downloader="yt-dlp", timeout_s=1.5), gate)
    assert isinstance(result, Failure) and result.error == "timeout", result
    sent = sum(r.sent for r in fault_server.requests("slow.mp4"))
    assert 0 < sent < len(media["big"]) // 2, f"cut at 1.5 s, not read to the end (~15 s): {sent} bytes sent"


@pytest.mark.parametrize("url", [YOUTUBE, "https://youtu.be/dQw4w9WgXcQ", "https://www.youtube.com/shorts/dQw4w9WgXcQ"])
def test_youtube_urls_are_routed_to_the_youtube_extractor(url):
    assert route(url, _cfg()) == "yt-dlp"
    assert site_extractor(url) == "Youtube" and host_key(url) == "youtube"


def test_youtube_unreachable_is_a_fetch_failure_not_a_hang(gate, tmp_path):
    started = time.monotonic()
    result = _fetch(YOUTUBE, tmp_path / "d", _cfg(retries=1), gate)
    assert isinstance(result, Failure) and result.error == "network", result  # no DNS here: a transient code
    assert time.monotonic() - started < 60, "no DNS fails at once; a hang would wait out the timeouts"
    assert result.message.startswith(YOUTUBE + ": ")


# ----------------------------------------------------------------------------- s3:// and file://


def test_s3_source_arrives_byte_identical_and_a_missing_key_is_http_404(s3_bucket, media, gate, tmp_path):
    uri = f"{s3_bucket}/videos/abc.mp4"
    storage.write_bytes(uri, media["big"])
    assert route(uri, _cfg()) == "storage" and host_key(uri) == f"bucket:{s3_bucket[5:]}"
    _assert_fetched(_fetch(uri, tmp_path / "d1", _cfg(), gate), media["big"])
    missing = _fetch(f"{s3_bucket}/videos/nope.mp4", tmp_path / "d2", _cfg(), gate)
    assert isinstance(missing, Failure) and missing.error == "http_404"
    big = _fetch(uri, tmp_path / "d3", _cfg(max_video_bytes=1000), gate)
    assert isinstance(big, Failure) and big.error == "too_large"
    png = f"{s3_bucket}/videos/frame.mp4"
    storage.write_bytes(png, media["png"])
    assert _fetch(png, tmp_path / "d4", _cfg(), gate).error == "not_a_video"


def test_file_source(media, gate, tmp_path):
    src = tmp_path / "src.mp4"
    src.write_bytes(media["small"])
    _assert_fetched(_fetch(f"file://{src}", tmp_path / "d1", _cfg(), gate), media["small"])
    assert _fetch(f"file://{tmp_path}/none.mp4", tmp_path / "d2", _cfg(), gate).error == "http_404"
    for bad in ("ftp://host/x.mp4", "/local/path.mp4"):
        assert _fetch(bad, tmp_path / "d3", _cfg(), gate).error == "fetch_error"


# ----------------------------------------------------------------------------- secrets


def test_cookies_and_proxy_pass_through_and_never_show(fault_server, media, gate, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cookies = tmp_path / "private-cookies.txt"
    cookies.write_text(
        "# Netscape HTTP Cookie File\n"
        ".videos.invalid\tTRUE\t/\tFALSE\t2000000000\tSID\tC00KIEVALUE\n"
        ".youtube.com\tTRUE\t/\tTRUE\t2000000000\tSID\tC00KIEVALUE\n"
    )
    proxy = f"http://agent:Pr0xyPassw0rd@127.0.0.1:{fault_server.port}"
    fault_server.add("a.mp4", media["small"])
    results = []
    for i, downloader in enumerate(("requests", "yt-dlp")):
        cfg = _cfg(proxy=proxy, cookies=str(cookies), http_downloader=downloader, retries=0)
        assert "Pr0xyPassw0rd" not in repr(cfg) and "cookies.txt" not in repr(cfg)
        ok = _fetch("http://videos.invalid/a.mp4", tmp_path / f"ok{i}", cfg, gate)
        _assert_fetched(ok, media["small"])
        results += [ok, _fetch("http://videos.invalid/missing.mp4", tmp_path / f"bad{i}", cfg, gate)]
    results.append(_fetch(YOUTUBE, tmp_path / "yt", _cfg(proxy=proxy, cookies=str(cookies), retries=0), gate))
    assert [getattr(r, "error", "ok") for r in results] == ["ok", "http_404", "ok", "http_404", "network"]

    through = [r for r in fault_server.requests() if r.proxied or r.method == "CONNECT"]
    assert len(through) >= 5 and all(r.header("Proxy-Authorization") for r in through)
    assert any(r.method == "CONNECT" and r.path == "www.youtube.com:443" for r in through)
    ytdlp_gets = [r for r in through if r.proxied and not (r.header("User-Agent") or "").startswith("clipvip")]
    assert any("C00KIEVALUE" in (r.header("Cookie") or "") for r in ytdlp_gets), "yt-dlp sends the cookies"

    shown = " ".join(r.message for r in results if isinstance(r, Failure)) + caplog.text
    shown += " ".join(str(rec.args) for rec in caplog.records)
    for secret in ("Pr0xyPassw0rd", "agent:", "C00KIEVALUE", "private-cookies"):
        assert secret not in shown
    assert cookies.read_text().count("C00KIEVALUE") == 2, "the user's cookies file is not rewritten"


# ----------------------------------------------------------------------------- config and redaction


def test_redact_url_strips_credentials_and_signed_queries():
    assert redact_url("https://user:pw@host.example/v.mp4?x=1#t") == "https://host.example/v.mp4?x=1"
    signed = "https://bucket.s3.amazonaws.com/v.mp4?X-Amz-Credential=AK%2F&X-Amz-Signature=abc&X-Amz-Expires=60"
    assert redact_url(signed) == "https://bucket.s3.amazonaws.com/v.mp4"
    assert redact_url(YOUTUBE) == YOUTUBE


def test_fetch_config_validates_and_selects_the_format():
    cfg = FetchConfig()
    assert (cfg.selector, cfg.format_sort) == ("bv/b/w", ("res:720", "vcodec:h264"))  # no stored size: <= 720p
    assert FetchConfig(audio=True).selector == "bv+ba[ext=m4a]/bv+ba/b/w"
    sized = FetchConfig(stored_short_side=224)
    assert (sized.target_short_side, sized.format_sort) == (480, ("+res:480", "vcodec:h264"))
    assert FetchConfig(stored_short_side=224, margin=1.0).format_sort == ("+res:360", "vcodec:h264")
    given = FetchConfig(format="bv[height<=240]", stored_short_side=224)
    assert (given.selector, given.format_sort) == ("bv[height<=240]", ())
    assert FetchConfig(format="bv", audio=True).selector == "bv+ba[ext=m4a]/bv+ba/b/w"  # format_with_audio unset
    bad = [("retries", -1), ("timeout_s", 0), ("host_concurrency", 0), ("proxy", "nohost"), ("margin", 0.1)]
    for field, value in bad + [("format", " "), ("stored_short_side", 0)]:
        with pytest.raises(ValueError, match=field):
            FetchConfig(**{field: value})
    with pytest.raises(ValueError, match="file name"):
        fetch_video("http://127.0.0.1/x.mp4", "/tmp", "../x", cfg, HostGate(1, 1.0))
