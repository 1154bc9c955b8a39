"""Killing a command together with everything it started.

A command started with ``start_new_session=True`` leads a session. ``os.killpg`` on its pid reaches its process
group only, and a local Ray cluster's workers each lead a process group of their own (in the same session): they
outlive such a kill by a second or more, long enough to commit a small shard or finish an upload. A kill test that
means "the node died here" kills the whole session and waits until it is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


def session_members(sid: int) -> list[psutil.Process]:
    """The live processes of session ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def kill_session(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL ``proc`` (a session leader) and every process of its session, again until none is left (a raylet
    may start a worker while the others die); return once all are gone."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while members := session_members(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed session {proc.pid} still alive: {members}"
        for member in members:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(members, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    proc.wait(max(1.0, deadline - time.monotonic()))
