"""Helpers for the trainer tests: moving-shape clips as real JPEG shards, configs, rank processes.

A clip shows one coloured shape moving left, right, up or down over its frames; the caption and
subtitle name colour, shape and direction, so matching a caption to its clip needs frame order.

Runs start real DeepSpeed ranks in one of two ways: `start_launcher` goes through
``launch/pretrain.sh`` and the ``deepspeed`` launcher (used where the launcher itself is under test:
the two-node run), `spawn_ranks` starts the ``python -m train.main`` rank processes directly with
the environment the launcher would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*). Every process
that imports deepspeed costs ~10-15 CPU-seconds on our 2-core machines, and the launcher adds two
such processes per run, so the other tests use `spawn_ranks`. Both are waited on by progress
(`Ranks.wait`, tests/support/progress.py), not by a fixed time limit.
"""

from __future__ import annotations

import glob
import io
import itertools
import os
import signal
import subprocess
import sys
import tempfile

import numpy as np

from pipeline.manifest import Manifest, write_manifest
from pipeline.schema import ClipMeta, ClipSample, TextSource
from pipeline.shards import ShardLimits, ShardWriter
from tests.support.progress import DEFAULT_LIMITS, POLL_S, Limits, wait_progressing

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240), "yellow": (235, 225, 40)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COMBOS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def render_frames(
    colour: str, shape: str, direction: str, rng: np.random.Generator, num_frames: int = 8, size: int = 32
) -> tuple[bytes, ...]:
    """JPEG frames of a shape crossing the frame; the start point is random along both axes."""
    from PIL import Image, ImageDraw

    obj = size // 4
    travel = size - obj - 4
    dx, dy = DIRECTIONS[direction]
    cross = int(rng.integers(2, size - obj - 2))
    offset = int(rng.integers(0, 3))
    frames = []
    for t in range(num_frames):
        along = offset + int(round(t * travel / max(num_frames - 1, 1)))
        along = along if (dx + dy) > 0 else size - obj - along
        x, y = (along, cross) if dx else (cross, along)
        img = Image.new("RGB", (size, size), (30, 30, 30))
        draw = ImageDraw.Draw(img)
        box = (x, y, x + obj, y + obj)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        frames.append(buf.getvalue())
    return tuple(frames)


def moving_clip(
    index: int,
    combo: tuple[str, str, str],
    rng: np.random.Generator,
    num_frames: int = 8,
    size: int = 32,
    prefix: str = "clip",
) -> ClipSample:
    colour, shape, direction = combo
    times = tuple(0.25 * t for t in range(num_frames))
    meta = ClipMeta(
        video_id=f"{prefix}{index}",
        clip_id=f"{prefix}{index}.0.mp4",
        span=(0.0, 0.25 * num_frames),
        source_fps=4.0,
        frame_times=times,
        frame_size=(size, size),
        middle_frame=num_frames // 2,
        source_uri="synthetic",
        subtitle_source=TextSource(kind="given", origin="synthetic"),
        caption_source=TextSource(kind="generated", origin="synthetic"),
    )
    return ClipSample(
        meta=meta,
        frames=render_frames(colour, shape, direction, rng, num_frames, size),
        subtitle=f"the {colour} {shape} goes {direction}",
        caption=f"a {colour} {shape} moving {direction}",
    )


def write_dataset(
    root: str, clips: list[ClipSample], shard_sizes: list[int] | None = None, max_samples: int = 16
) -> str:
    """Write clips as shards (sizes as given, or max_samples each) plus the manifest; returns root."""
    entries = []
    if shard_sizes is None:
        shard_sizes = [max_samples] * ((len(clips) + max_samples - 1) // max_samples)
    assert sum(shard_sizes) >= len(clips) or shard_sizes
    start = 0
    for i, n in enumerate(shard_sizes):
        with ShardWriter(root, f"part{i:02d}", ShardLimits(max_samples=10**6)) as writer:
            for clip in clips[start : start + n]:
                writer.write(clip)
        entries.extend(writer.entries)
        start += n
    write_manifest(root, Manifest(shards=tuple(entries), config={"synthetic": True}))
    return root


def moving_dataset(
    root: str,
    num_clips: int,
    seed: int,
    *,
    num_frames: int = 8,
    size: int = 32,
    shard_sizes: list[int] | None = None,
    max_samples: int = 16,
    prefix: str = "clip",
) -> str:
    rng = np.random.default_rng(seed)
    clips = [moving_clip(i, COMBOS[i % len(COMBOS)], rng, num_frames, size, prefix) for i in range(num_clips)]
    return write_dataset(root, clips, shard_sizes, max_samples)


def tiny_overrides(run_dir: str, train: list[str], *extra: str, eval_: list[str] | None = None) -> list[str]:
    """CLI overrides for a tiny CPU run (the tiny YAML plus data and run folder)."""
    out = [f"run_dir={run_dir}", f"data.train=[{','.join(train)}]"]
    if eval_:
        out.append(f"data.eval=[{','.join(eval_)}]")
    return out + list(extra)


def env() -> dict:
    out = dict(os.environ)
    out.update(
        {
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": REPO,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    out.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))  # DS's CPU op cache
    return out


def rank_env_of(rank: int, nproc: int, port: int | str) -> dict:
    """``env()`` plus what torch.distributed and DeepSpeed read to make ``rank`` one of ``nproc`` local ranks."""
    out = env()
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        out[name] = str(nproc)
    out.update(RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return out


TINY_CONFIG = os.path.join(REPO, "launch/configs/train/tiny.yaml")


def run_single(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """python -m train.main as one rank (no launcher)."""
    cmd = [PYTHON, "-m", "train.main", "--config", TINY_CONFIG, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


class Ranks:
    """The processes of one run (its ranks, or launchers), each in its own session with its output in a log file;
    waited on by progress (tests/support/progress.py): their logs and the run folder must keep changing."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[str], port: int, watched: tuple[str, ...] = ()):
        self.procs, self.logs, self.port, self.watched = procs, logs, port, watched

    @classmethod
    def together(cls, parts: list[Ranks]) -> Ranks:
        """The processes of several (the launchers of a multi-node run) as one group to wait on."""
        watched = tuple(dict.fromkeys(path for part in parts for path in part.watched))
        procs, logs = [p for part in parts for p in part.procs], [log for part in parts for log in part.logs]
        return cls(procs, logs, parts[0].port, watched)

    @property
    def returncode(self) -> int | None:
        codes = [p.poll() for p in self.procs]
        return None if None in codes else max(codes, key=abs)

    def poll(self) -> bool:
        """True once any rank has ended."""
        return any(p.poll() is not None for p in self.procs)

    def wait(self, limits: Limits = DEFAULT_LIMITS) -> int:
        """Every rank's exit (the one furthest from 0), waiting while they progress; killed, with their output in
        the AssertionError, when they stop progressing (tests/support/progress.py, `Limits`)."""
        self.wait_until(lambda: self.returncode is not None, limits)
        return self.returncode

    def wait_until(self, condition, limits: Limits = DEFAULT_LIMITS, poll: float = POLL_S) -> None:
        """Return once ``condition()`` holds (checked every ``poll`` seconds); the limits as for `wait`."""
        wait_progressing(
            condition,
            [*self.logs, *self.watched],
            self._stop_and_report,
            limits,
            failed=lambda: any(p.poll() not in (None, 0) for p in self.procs),
            what=f"{len(self.procs)} process(es) of {self.watched[0] if self.watched else 'a run'}",
            poll=poll,
        )

    def _stop_and_report(self) -> str:
        self.kill()
        return self.output()

    def kill(self) -> None:
        """SIGKILL every rank and its DataLoader workers (the rank's process group)."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait()

    def output(self) -> str:
        parts = []
        for rank, path in enumerate(self.logs):
            with open(path, errors="replace") as f:
                parts.append(f"--- rank {rank} (exit {self.procs[rank].poll()}) ---\n{f.read()[-5000:]}")
        return "\n".join(parts)


def start_ranks(cmd: list[str], envs: list[dict], log_dir: str, watched: tuple[str, ...] = (), port: int = 0) -> Ranks:
    """``cmd`` once per environment in ``envs`` (from REPO), output to ``log_dir/rankN.log``; ``watched``: the
    run folder, whose changes count as progress besides the logs."""
    procs, logs = [], []
    for rank, rank_env in enumerate(envs):
        logs.append(os.path.join(log_dir, f"rank{rank}.log"))
        with open(logs[-1], "w") as log:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return Ranks(procs, logs, port, watched)


def spawn_ranks(overrides: list[str], nproc: int = 2, port: int | None = None, single: bool = False) -> Ranks:
    """Start NPROC ``train.main`` ranks on this machine, as the deepspeed launcher would (gloo on CPU).

    ``single``: one process without any rank variables (train.main then acts as rank 0 of 1).
    """
    from tests.support.s3server import free_port

    port = port or free_port()
    run_dir = run_dir_of(overrides)
    envs = [env() if single else rank_env_of(rank, nproc, port) for rank in range(nproc)]
    cmd = [PYTHON, "-m", "train.main", "--config", TINY_CONFIG, *overrides]
    return start_ranks(cmd, envs, log_dir_beside(run_dir), (run_dir,) if run_dir else (), port)


def run_dir_of(overrides: list[str]) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)


def log_dir_beside(path: str | None) -> str:
    """A new folder for process logs next to ``path`` (a run folder, in the test's tmp_path)."""
    return tempfile.mkdtemp(prefix="rank-logs-", dir=os.path.dirname(path) if path else None)


def shm_buffers(port: int) -> list[str]:
    """DeepSpeed CPU comm buffers in /dev/shm of a run on this master port (there should be none)."""
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def start_launcher(
    overrides: list[str], nproc: int = 2, port: int | None = None, extra_args: list[str] | None = None
) -> Ranks:
    """launch/pretrain.sh with NPROC ranks on this machine (gloo on CPU), as one process to wait on."""
    run_env = env()
    run_env["NPROC_PER_NODE"] = str(nproc)
    if port is not None:
        run_env["MASTER_PORT"] = str(port)
    cmd = [
        "bash",
        os.path.join(REPO, "launch/pretrain.sh"),
        *(extra_args or []),
        "--",
        "--config",
        os.path.join(REPO, "launch/configs/train/tiny.yaml"),
        *overrides,
    ]
    run_dir = run_dir_of(overrides)
    return start_ranks(cmd, [run_env], log_dir_beside(run_dir), (run_dir,) if run_dir else (), port or 0)
