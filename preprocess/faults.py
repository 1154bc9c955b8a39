"""Fault injection for tests of the real system: where a shard task dies, hangs or raises, set by environment
variables that the driver reads once (preprocess/job.py) and hands to every task in its settings.

The hooks are called by preprocess/shard_task.py at the points they name; each one that makes a worker exit once
writes a marker file first, so the rerun of the task (or of the whole command) goes past it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import storage

log = logging.getLogger(__name__)

FAULT_EXIT_ENV = "VIDPROXY_FAULT_EXIT_SHARD"
"""``<shard index>:<marker file>`` makes the worker os._exit() once at the start of that shard."""
FAULT_EXIT_WRITE_ENV = "VIDPROXY_FAULT_EXIT_WRITE"
"""``<shard index>:<samples>:<marker file>`` makes the worker os._exit() once in that shard's tar write, right
after its ``<samples>``-th sample went into the local temp tar."""
FAULT_EXIT_UPLOAD_ENV = "VIDPROXY_FAULT_EXIT_UPLOAD"
"""``<shard index>:<marker file>`` makes the worker os._exit() once, right after the first part of an S3
multipart upload of that shard's task was sent (the upload is left in progress)."""
FAULT_RAISE_ENV = "VIDPROXY_FAULT_RAISE_SHARD"
"""``<shard index>:<attempts>:<count file>``: the first ``<attempts>`` attempts at that shard raise RuntimeError
once their first sample is written; each attempt that raises appends a line to the count file."""
FAULT_HANG_ENV = "VIDPROXY_FAULT_HANG_VIDEO"
"""A video id whose decode hangs (sleeps) until the job's timeout kills it."""
FAULT_EXIT_VIDEO_ENV = "VIDPROXY_FAULT_EXIT_VIDEO"
"""A video id at which the worker os._exit()s on every attempt (a video that kills its worker), as soon as it
starts the video: before its report to the driver's board is sent."""
FAULT_DELAY_ENV = "VIDPROXY_FAULT_DELAY_S"
"""Seconds to sleep at the start of every shard (widens timing windows in tests)."""


@dataclass(frozen=True)
class FaultPoint:
    """Where a fault fires: at shard ``shard``, after ``count`` (samples written, or attempts that raise), with
    ``file`` recording that it fired."""

    shard: int
    count: int
    file: str

    @classmethod
    def parse(cls, name: str, value: str, counted: bool) -> FaultPoint:
        """``<shard>:<count>:<file>`` (``<shard>:<file>`` when not ``counted``: count 1)."""
        parts = value.split(":", 2 if counted else 1)
        if len(parts) != (3 if counted else 2) or not parts[-1]:
            form = "<shard>:<count>:<file>" if counted else "<shard>:<file>"
            raise ValueError(f"{name}={value!r}: expected {form}")
        return cls(shard=int(parts[0]), count=int(parts[1]) if counted else 1, file=parts[-1])

    def armed(self, shard: int) -> bool:
        """Whether an exit-once fault at ``shard`` has not fired yet."""
        return self.shard == shard and not os.path.exists(self.file)


@dataclass(frozen=True, kw_only=True)
class Faults:
    """The faults of a run (none by default), and the hooks the shard task calls."""

    exit_start: FaultPoint | None = None
    exit_write: FaultPoint | None = None
    exit_upload: FaultPoint | None = None
    raise_shard: FaultPoint | None = None
    hang_video: str | None = None
    exit_video: str | None = None
    delay_s: float = 0.0

    @classmethod
    def from_env(cls) -> Faults:
        env = os.environ
        points = {
            field: FaultPoint.parse(name, env[name], counted) if env.get(name) else None
            for field, name, counted in (
                ("exit_start", FAULT_EXIT_ENV, False),
                ("exit_write", FAULT_EXIT_WRITE_ENV, True),
                ("exit_upload", FAULT_EXIT_UPLOAD_ENV, False),
                ("raise_shard", FAULT_RAISE_ENV, True),
            )
        }
        return cls(
            hang_video=env.get(FAULT_HANG_ENV) or None,
            exit_video=env.get(FAULT_EXIT_VIDEO_ENV) or None,
            delay_s=float(env.get(FAULT_DELAY_ENV) or 0.0),
            **points,
        )

    def at_start(self, shard: int) -> None:
        """The start of a shard task: the exit fault, then the delay."""
        if self.exit_start and self.exit_start.armed(shard):
            _exit_once(self.exit_start.file, f"on shard {shard}")
        time.sleep(self.delay_s)

    def in_write(self, shard: int, written: int) -> None:
        """The write and raise faults, after ``written`` samples of ``shard`` went into its temp tar."""
        point = self.exit_write
        if point and point.count == written and point.armed(shard):
            _exit_once(point.file, f"in the tar write of shard {shard}, after {written} samples")
        point = self.raise_shard
        if point and point.shard == shard and written == 1:
            attempts = _lines(point.file)
            if attempts < point.count:
                with open(point.file, "a") as f:
                    f.write(f"worker {os.getpid()} raises in shard {shard}\n")
                raise RuntimeError(f"fault injection: shard {shard} raises (attempt {attempts + 1})")

    @contextlib.contextmanager
    def in_upload(self, shard: int) -> Iterator[None]:
        """Within the block, the upload fault of ``shard``: exit once the first part of a multipart upload is sent."""
        point = self.exit_upload
        if point is None or not point.armed(shard):
            yield
            return

        def exit_after_part(**_) -> None:
            _exit_once(point.file, f"in a multipart upload of shard {shard}, after its first part")

        with storage.s3_hook("after-call.s3.UploadPart", exit_after_part):
            yield

    def at_video(self, video_id: str, excluded) -> None:
        """The video that kills its worker, on every attempt that decodes it (not once given up: in ``excluded``)."""
        if self.exit_video == video_id and video_id not in excluded:
            log.warning("fault injection: the worker exits at video %s", video_id)
            os._exit(17)

    def in_decode(self, video_id: str) -> None:
        """The video whose decode hangs."""
        if self.hang_video == video_id:
            log.warning("fault injection: video %s hangs", video_id)
            time.sleep(3600)


def _exit_once(marker: str, what: str) -> None:
    with open(marker, "w") as f:
        f.write(f"worker {os.getpid()} exits {what}\n")
    log.warning("fault injection: worker exits %s", what)
    os._exit(17)


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
