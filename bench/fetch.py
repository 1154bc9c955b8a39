"""Downloads hidden behind decoding: one shard task with ``--fetch`` vs fetch alone and decode alone.

A corpus of 640x360 H.264 sources (made once with ffmpeg, cached in the temp folder) is served by the loopback
HTTP server of the fetch tests (tests/preprocess/http_faults.py) with each connection throttled. Three runs of
the same shard, alternated round by round (the machine is noisy) and timed by wall clock:

- decode only: preprocess/shard_task.py ``process_shard`` with the sources in a local folder;
- fetch only: preprocess/fetching/fetch.py ``fetch_video`` on every source URL in turn (what the task downloads);
- fetch + decode: ``process_shard`` with ``--fetch`` (the next ``--prefetch`` videos download while one decodes),
  and once more with no prefetch (download, then decode, in turn) for reference.

It prints the medians and the ratio (fetch + decode) / max(fetch only, decode only): 1.0 would hide every
download, 2.0 hides none (target <= 1.15). The throttle is 20 MB/s per connection (``--mb-per-s``), or with
``--balanced`` the rate that makes fetch only as long as decode only (the hardest case for overlap). The peak
bytes of the task's scratch folder are sampled every 5 ms, next to ``(prefetch + 1) x`` the largest source.

    python bench/fetch.py                 # 16 sources, 3 rounds, 20 MB/s per connection (~2 minutes)
    python bench/fetch.py --balanced      # downloads as slow as decoding
    python bench/fetch.py --quick         # 4 sources, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


CLIPS = 4
"""Clips per source (2 s each, spread over it)."""


def seconds(index: int) -> int:
    """Source ``index``'s length: 16 to 32 s. One pattern at one quality: size and decode time grow together with
    the length, as with a site's fixed bitrate ladder."""
    return 16 + 4 * (index % 5)


def make_corpus(root: Path, sources: int) -> Path:
    """``sources`` 640x360 H.264 videos (GOP 2 s) under ``root/videos``; returns the folder."""
    folder = root / "videos-v2"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(sources):
        out = folder / f"src{k:02d}.mp4"
        if out.exists():
            continue
        pattern = f"testsrc2=size=640x360:rate=25,hue=h={37 * k}"
        args = f"-f lavfi -i {pattern} -t {seconds(k)} -c:v libx264 -preset veryfast -g 50 -crf 20"
        tmp = out.with_suffix(".part.mp4")
        cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", *args.split(), "-pix_fmt", "yuv420p", str(tmp)]
        subprocess.run(cmd, check=True, timeout=300)
        tmp.rename(out)
    return folder


class Server:
    """The fault server of the tests in a process of its own (a server thread in this process would take the GIL
    from the decoder, which a remote host does not)."""

    def __init__(self, root: Path, bandwidth: float):
        code = (
            "import sys, time; sys.path.insert(0, sys.argv[1]); "
            "from tests.preprocess.http_faults import FaultServer; "
            "s = FaultServer(sys.argv[2], bandwidth=float(sys.argv[3])); print(s.port, flush=True); sys.stdin.read()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(ROOT), str(root), str(bandwidth)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.proc.stdout.readline())

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait()


def write_metadata(path: Path, sources: list[Path], server: Server) -> None:
    lines = []
    for k, source in enumerate(sources):
        step = seconds(k) / CLIPS
        clips = [{"clip_id": f"{source.stem}.{c}", "span": [c * step + 1, c * step + 3]} for c in range(CLIPS)]
        lines.append({"video_id": source.stem, "url": server.url(source.name), "clip": clips})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


class ScratchPeak:
    """The most bytes of source videos found under a folder, sampled every ``every`` seconds (the shard's own tar,
    written there too, is counted apart in ``tar_peak``)."""

    def __init__(self, folder: str, every: float = 0.005):
        self.folder, self.every, self.peak, self._stop = folder, every, 0, threading.Event()
        self.tar_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScratchPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            sources = tars = 0
            for dirpath, _, names in os.walk(self.folder):
                for name in names:
                    try:
                        size = os.path.getsize(os.path.join(dirpath, name))
                    except OSError:
                        continue
                    if name.endswith(".tar"):
                        tars += size
                    else:
                        sources += size
            self.peak, self.tar_peak = max(self.peak, sources), max(self.tar_peak, tars)


def shard_run(meta: Path, out: Path, videos: Path | None, prefetch: int | None) -> tuple[float, tuple[int, int]]:
    """One shard task over the whole corpus; (wall seconds, peak scratch bytes of sources and of the tar)."""
    from pipeline.layout import DatasetLayout
    from preprocess.config import Layout
    from preprocess.decode import DecodeConfig
    from preprocess.fetching.config import FetchConfig
    from preprocess.fetching.host_gate import HostGate
    from preprocess.plan import plan_shards
    from preprocess.shard_task import ShardSettings, ShardTask, process_shard

    fetch = None if prefetch is None else FetchConfig(prefetch=prefetch, host_rate=100.0)
    settings = ShardSettings(
        output=str(out),
        metadata=(str(meta),),
        videos=str(videos) if videos else None,
        layout=Layout.SOURCE,
        decode=DecodeConfig(num_frames=12, threads=1),
        max_shard_bytes=1 << 30,
        fetch=fetch,
    )
    (piece,) = plan_shards([str(meta)], 1_000_000, Layout.SOURCE)
    root = os.path.join(tempfile.gettempdir(), "vidproxy-scratch")
    scratch = DatasetLayout(str(out)).scratch(root, 0)
    gate = HostGate(4, 100.0)
    with ScratchPeak(os.path.dirname(scratch)) as peak:
        started = time.perf_counter()
        stats = process_shard(ShardTask(index=0, slice=piece), settings, gate=gate)
        wall = time.perf_counter() - started
    assert stats.ok == stats.clips, stats
    return wall, (peak.peak, peak.tar_peak)


def fetch_only(urls: list[str], folder: Path) -> float:
    from preprocess.fetching.config import FetchConfig
    from preprocess.fetching.fetch import Fetched, fetch_video
    from preprocess.fetching.host_gate import HostGate

    cfg, gate = FetchConfig(host_rate=100.0), HostGate(4, 100.0)
    started = time.perf_counter()
    for k, url in enumerate(urls):
        got = fetch_video(url, str(folder), f"v{k}", cfg, gate)
        assert isinstance(got, Fetched), got
        os.remove(got.path)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb-per-s", type=float, default=20.0, help="throttle per connection, MB/s")
    parser.add_argument(
        "--balanced", action="store_true", help="throttle so that fetch only takes as long as decode only"
    )
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 sources, 1 round")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vidproxy-bench-fetch"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sources, args.rounds = 4, 1
    videos = make_corpus(Path(args.cache), args.sources)
    sources = sorted(videos.iterdir())[: args.sources]
    sizes = [p.stat().st_size for p in sources]
    with tempfile.TemporaryDirectory(prefix="vidproxy-bench-fetch-") as work:
        work = Path(work)
        with Server(videos, 1e12) as fast:  # the metadata names one server's URLs: write it for a warm-up run
            write_metadata(work / "meta.jsonl", sources, fast)
            warm = shard_run(work / "meta.jsonl", work / "warm", videos, None)[0]  # and the pace of decoding
        rate = sum(sizes) / warm if args.balanced else args.mb_per_s * 1e6
        with Server(videos, rate) as server:
            write_metadata(work / "meta.jsonl", sources, server)
            urls = [server.url(p.name) for p in sources]
            times: dict[str, list[float]] = {"decode only": [], "fetch only": [], "fetch + decode": [], "serial": []}
            peaks = []
            for r in range(args.rounds):
                times["decode only"].append(shard_run(work / "meta.jsonl", work / f"d{r}", videos, None)[0])
                times["fetch only"].append(fetch_only(urls, work))
                wall, peak = shard_run(work / "meta.jsonl", work / f"f{r}", None, args.prefetch)
                times["fetch + decode"].append(wall)
                peaks.append(peak)
                times["serial"].append(shard_run(work / "meta.jsonl", work / f"s{r}", None, 0)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = max(med["decode only"], med["fetch only"])
    print(
        f"{args.sources} sources of 16-32 s, {sum(sizes) / 1e6:.1f} MB, {CLIPS} clips each; "
        f"throttle {rate / 1e6:.2f} MB/s per connection; prefetch {args.prefetch}; {args.rounds} round(s)"
    )
    print("| run | median wall | runs |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {med[name]:.2f} s | {', '.join(f'{v:.2f}' for v in values)} |")
    print(
        f"fetch + decode / max(fetch only, decode only) = {med['fetch + decode'] / bound:.3f} (target <= 1.15); "
        f"without prefetch: {med['serial'] / bound:.3f}"
    )
    print(
        f"peak scratch: {max(p[0] for p in peaks) / 1e6:.2f} MB of source videos (bound: (prefetch + 1) x largest "
        f"source = {(args.prefetch + 1) * max(sizes) / 1e6:.2f} MB), {max(p[1] for p in peaks) / 1e6:.2f} MB of the "
        "shard's tar being written"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
