"""Politeness towards the hosts videos come from: at most N downloads at once and R new requests per second per host.

One :class:`HostGate` serves a whole job. It is plain Python and never blocks: :meth:`HostGate.try_acquire` answers
at once with 0.0 (go) or the seconds to wait before asking again, so the job can wrap one instance in a Ray actor
shared by every shard task (its methods take and return plain values) and a caller on any node sleeps on its own
side. A 429 or 503 with ``Retry-After`` closes the host to everybody until then (:meth:`HostGate.back_off`).

The rate is a token bucket holding one token: consecutive requests to a host start at least ``1 / rate`` seconds
apart. A slot taken by a caller that dies without releasing it is freed after ``lease_s`` (when given), so a killed
task does not shrink a host's concurrency for the rest of the job.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

POLL_S = (0.02, 1.0)
"""Bounds of the wait suggested to a caller that finds every slot of a host taken (no release time is known)."""


@dataclass
class _Host:
    leases: list[float] = field(default_factory=list)
    """Expiry time of each slot held (inf without a lease limit)."""
    next_start: float = 0.0
    """Earliest time the next request may start (rate)."""
    closed_until: float = 0.0
    """No request before this time (Retry-After)."""


class HostGate:
    """Per-host concurrency, request rate and Retry-After, shared by every download of a job (thread-safe)."""

    def __init__(self, concurrency: int, rate: float, lease_s: float | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if lease_s is not None and not lease_s > 0:
            raise ValueError(f"lease_s must be > 0 or None, got {lease_s}")
        self.concurrency, self.rate, self.lease_s = concurrency, float(rate), lease_s
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()

    def try_acquire(self, host: str) -> float:
        """0.0: a slot of ``host`` (and its next request start) is the caller's, to give back with :meth:`release`;
        otherwise the seconds to wait before asking again."""
        now = time.monotonic()
        with self._lock:
            state = self._hosts.setdefault(host, _Host())
            state.leases = [t for t in state.leases if t > now]
            if state.closed_until > now:
                return state.closed_until - now
            if len(state.leases) >= self.concurrency:
                return min(max(1.0 / self.rate, POLL_S[0]), POLL_S[1])
            if state.next_start > now:
                return state.next_start - now
            state.next_start = now + 1.0 / self.rate
            state.leases.append(now + self.lease_s if self.lease_s is not None else float("inf"))
            return 0.0

    def release(self, host: str) -> None:
        """Give back a slot taken with :meth:`try_acquire` (the oldest lease goes; the count is what matters)."""
        with self._lock:
            state = self._hosts.get(host)
            if state is not None and state.leases:
                state.leases.remove(min(state.leases))

    def back_off(self, host: str, seconds: float) -> None:
        """Nobody starts a request to ``host`` for the next ``seconds`` (a 429/503 with Retry-After)."""
        until = time.monotonic() + max(0.0, float(seconds))
        with self._lock:
            state = self._hosts.setdefault(host, _Host())
            state.closed_until = max(state.closed_until, until)

    def in_flight(self, host: str) -> int:
        """Slots of ``host`` held now (for tests and logs)."""
        now = time.monotonic()
        with self._lock:
            state = self._hosts.get(host)
            return 0 if state is None else sum(1 for t in state.leases if t > now)
