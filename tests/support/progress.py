"""Waiting on test subprocesses by their progress instead of a fixed wall-clock budget.

A fixed limit (``proc.wait(120)``) is either too tight on a loaded 2-core machine, where every
process that imports torch and deepspeed takes several times its idle ~12 s to say anything, or so
loose that a hung run costs the whole budget. `wait_progressing` instead waits as long as the
processes keep writing: any change in the size or modification time of a file under the watched
paths (their logs, a run folder's metrics, checkpoints) is progress. It fails, with the caller's
description of the processes (their output), once the files have not changed for longer than the
`Limits` allow, or after ``Limits.ceiling`` seconds in all, which stays under pytest's ``--timeout``
(setup.cfg) so that this message, not a bare pytest timeout, is what a failure shows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

POLL_S = 0.2


@dataclass(frozen=True)
class Limits:
    """How long processes may go without writing anything, and how long they may run."""

    stall: float = 180.0
    """No file changed for this long (after the first output): hung. A rank's longest silent stretch (imports,
    then the process group's rendezvous) measured ~12 s on 2 idle cores, up to ~90 s at a load average of 5.6."""
    startup: float = 300.0
    """The same before anything is written: starting torch + deepspeed is silent."""
    after_failure: float = 30.0
    """The same once one of the processes has failed: its peers may wait on it in a collective for good."""
    ceiling: float = 840.0
    """Longest wait even while progressing; under pytest's --timeout=900 (setup.cfg)."""


DEFAULT_LIMITS = Limits()


class Watch:
    """What a set of processes has written under ``paths`` (files or folders, which may not exist yet)
    and since when it has not changed."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [os.fspath(p) for p in paths]
        self.started = self.changed = time.monotonic()
        self.last = self.fingerprint()

    def fingerprint(self) -> frozenset:
        """(path, size, mtime) of every file under the paths."""
        found = []
        for root in self.paths:
            if os.path.isfile(root):
                found.append(_stat(root))
            for folder, _, names in os.walk(root):
                found.extend(_stat(os.path.join(folder, name)) for name in names)
        return frozenset(item for item in found if item is not None)

    def idle_s(self) -> float:
        """Seconds since the files last changed (checked now)."""
        now, current = time.monotonic(), self.fingerprint()
        if current != self.last:
            self.last, self.changed = current, now
        return now - self.changed

    def wrote_anything(self) -> bool:
        return any(size > 0 for _, size, _ in self.last)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


def _stat(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # removed between the listing and the stat (checkpoint rotation)
        return None
    return path, st.st_size, st.st_mtime_ns


def wait_progressing(
    done: Callable[[], bool],
    paths: Sequence[str],
    describe: Callable[[], str],
    limits: Limits = DEFAULT_LIMITS,
    *,
    failed: Callable[[], bool] = lambda: False,
    what: str = "the processes",
    poll: float = POLL_S,
) -> None:
    """Return once ``done()`` (checked every ``poll`` seconds). AssertionError naming ``what``, with
    ``describe()``, when the files under ``paths`` have not changed for ``limits.stall`` seconds
    (``startup`` before the first byte, ``after_failure`` once ``failed()``), or after ``limits.ceiling``."""
    watch = Watch(paths)
    while not done():
        idle = watch.idle_s()
        allowed = limits.stall if watch.wrote_anything() else limits.startup
        if failed():
            allowed = min(allowed, limits.after_failure)
        if idle > allowed:
            raise AssertionError(f"{what}: no progress (no output, no file written) for {idle:.0f} s\n{describe()}")
        if watch.elapsed_s() > limits.ceiling:
            raise AssertionError(
                f"{what}: still running after {limits.ceiling:.0f} s, though progressing\n{describe()}"
            )
        time.sleep(poll)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0, poll: float = 0.005) -> None:
    """Return once ``condition()`` is true (checked every ``poll`` seconds); AssertionError naming ``what`` after
    ``timeout`` seconds. The deadline only bounds a wait for something expected to happen, so it is generous: a
    loaded machine makes the test slower, not red."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:g} s")
        time.sleep(poll)
