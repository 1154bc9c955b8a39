"""The text join's cost (preprocess/text/join.py on Ray Data): wall time and per-worker peak RSS at 100k and 1M clips.

Inputs are bench/scale.py's release-shaped corpus (metadata parts, subtitles.jsonl, captions.jsonl; generated once
under its cache). The clip rows ``{shard, position, clip_id}`` are written to parquet files first (one per part,
positions in metadata order, ``--clips-per-shard`` per shard) and read back with Ray Data, as the job builds
them from its shard slices. The join runs on a fresh local Ray cluster of ``--cpus`` CPUs; every Ray worker process
of that cluster (its ``ray::`` processes: parse, join and write tasks, shuffle workers) has its peak RSS (VmHWM)
read from /proc every 50 ms, so the table shows the largest and the median worker peak, next to a worker's RSS at
rest, and the tasks the largest worker ran.

    python bench/text_join.py                       # 100k and 1M
    python bench/text_join.py --sizes 1M --partition-mb 8,32     # one run per partition size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from scale import SIZES, CorpusFiles, CorpusSpec, corpus  # noqa: E402


def clip_rows_files(files: CorpusFiles, clips_per_shard: int, folder: Path) -> int:
    """Write the clip rows of the corpus's metadata parts to parquet files, one per part (so Ray Data reads them
    in as many tasks); returns the clip count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("shard", pa.int64()), ("position", pa.int64()), ("clip_id", pa.string())])
    folder.mkdir()
    position = 0
    for index, part in enumerate(files.parts):
        ids = []
        with open(part, "rb") as stream:
            for line in stream:
                ids += [c["clip_id"] for c in json.loads(line)["clip"]]
        positions = list(range(position, position + len(ids)))
        shards = [p // clips_per_shard for p in positions]
        pq.write_table(pa.table([shards, positions, ids], schema=schema), folder / f"part-{index:03d}.parquet")
        position += len(ids)
    return position


class WorkerPeaks:
    """Peak RSS (VmHWM) of every ``ray::`` process under this process, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.05):
        self.every, self.peaks, self.names, self._stop = every, {}, {}, threading.Event()
        self.by_task: dict[str, float] = {}
        self.private_by_task: dict[str, float] = {}
        """Task name (without arguments) -> the largest RSS seen while a worker ran it."""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                if not proc.cmdline() or not proc.cmdline()[0].startswith("ray::"):
                    continue
                with open(f"/proc/{proc.pid}/status") as status:
                    fields = dict(
                        line.split(":", 1) for line in status if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:"))
                    )
                hwm, rss, anon = (int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS", "RssAnon"))
            except (OSError, KeyError, ValueError, psutil.Error):
                continue
            name = proc.cmdline()[0]
            if name != "ray::IDLE":
                task = name.split("(")[0]
                self.names.setdefault(proc.pid, set()).add(task)
                self.by_task[task] = max(self.by_task.get(task, 0.0), rss / 1024)
                self.private_by_task[task] = max(self.private_by_task.get(task, 0.0), anon / 1024)
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), hwm / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()


def measure(files: CorpusFiles, work: Path, *, cpus: int, partition_mb: int, clips_per_shard: int) -> dict:
    """Run the join once on a fresh local cluster; returns its numbers."""
    import ray

    from pipeline.layout import DatasetLayout
    from preprocess.job import join_texts

    rows_path = work / "clips"
    clips = clip_rows_files(files, clips_per_shard, rows_path)
    sources = {"subtitles": str(files.subtitles), "captions": str(files.captions)}
    text_bytes = sum(os.path.getsize(p) for p in sources.values())
    partitions = max(2, -(-text_bytes // (partition_mb << 20)))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with WorkerPeaks() as peaks:
            time.sleep(2.0)
            peaks.sample()
            at_rest = statistics.median(peaks.peaks.values()) if peaks.peaks else 0.0
            started = time.monotonic()
            result = join_texts(
                ray.data.read_parquet(str(rows_path)), sources, 2000, DatasetLayout(str(work / "out")), partitions
            )
            wall = time.monotonic() - started
            peaks.sample()
    finally:
        ray.shutdown()
    worker = sorted(peaks.peaks.values())
    top = max(peaks.peaks, key=peaks.peaks.get) if peaks.peaks else None
    return {
        "clips": clips,
        "text_mb": text_bytes / 1e6,
        "partitions": partitions,
        "partition_mb": partition_mb,
        "seconds": wall,
        "shards": result.shards,
        "texts": sum(result.texts.values()),
        "workers": len(worker),
        "max_worker_mb": worker[-1] if worker else 0.0,
        "median_worker_mb": statistics.median(worker) if worker else 0.0,
        "rest_worker_mb": at_rest,
        "max_worker_tasks": sorted(peaks.names.get(top, ())),
        "peak_by_task_mb": {k.removeprefix("ray::"): round(v) for k, v in sorted(peaks.by_task.items())},
        "private_by_task_mb": {k.removeprefix("ray::"): round(v) for k, v in sorted(peaks.private_by_task.items())},
        "driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


PRIVATE_COLUMNS = ("MapBatches", "JoinShuffleMapLeft", "JoinShuffleReduce", "HashShuffleReduce")
"""Task kinds whose private memory the table shows: parse, the join's map of the text rows, the join's reduce, and
the group-by-shard reduce that writes the files."""


def print_table(rows: list[dict]) -> None:
    """Worker memory two ways: peak RSS (which counts the object-store pages a worker maps: shared, bounded by the
    object store, spilled beyond it) and peak private memory (RssAnon) per task kind: what a task itself holds."""
    kinds = " / ".join(PRIVATE_COLUMNS)
    print(
        "| clips | text files | partitions (MB of text each) | join wall | worker peak RSS: max / median (at rest) "
        f"| worker peak private MB: {kinds} | driver peak RSS | shard files |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        private = " / ".join(str(r["private_by_task_mb"].get(k, "-")) for k in PRIVATE_COLUMNS)
        print(
            f"| {r['clips']:,} | {r['text_mb']:,.0f} MB | {r['partitions']} ({r['partition_mb']}) "
            f"| {r['seconds']:.1f} s | {r['max_worker_mb']:,.0f} / {r['median_worker_mb']:,.0f} MB "
            f"({r['rest_worker_mb']:,.0f}) | {private} | {r['driver_mb']:,.0f} MB | {r['shards']:,} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100k,1M", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vidproxy-bench-scale"))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--partition-mb", default="32", help="MB of text per join partition (comma-separated: each)")
    parser.add_argument("--clips-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    rows = []
    for name in args.sizes.split(","):
        files = corpus(CorpusSpec(SIZES[name]), Path(args.cache), os.cpu_count() or 1)
        for mb in (int(m) for m in args.partition_mb.split(",")):
            with tempfile.TemporaryDirectory(prefix="vidproxy-textjoin-") as work:
                row = measure(files, Path(work), cpus=args.cpus, partition_mb=mb, clips_per_shard=args.clips_per_shard)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
