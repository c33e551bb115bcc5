"""How long the host's agent calls take, by method: a fixed-bucket histogram
and an error count per method, kept per process (one shim is one sandbox).

Plain counters, no metrics library: observing costs a clock read and a
bisect, and importing this costs nothing at shim start. The shim's metrics
socket (``pykata.metrics``) turns a :meth:`RpcStats.snapshot` into
``pykata_agent_rpc_duration_seconds`` and ``pykata_agent_rpc_errors_total``."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds in seconds (+Inf is implied): a serial-port round trip is ~0.3 ms,
# a container create under TCG can take seconds.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                              0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_METHODS = 64  # distinct method names kept (the agent API has fewer)


@dataclass
class MethodStats:
    """One method: calls per bucket (not cumulative; the last is +Inf), their
    total seconds, and how many ended in an error."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total_seconds: float = 0.0
    count: int = 0
    errors: int = 0


class RpcStats:
    def __init__(self) -> None:
        self._methods: dict[str, MethodStats] = {}

    def observe(self, method: str, seconds: float, failed: bool = False) -> None:
        m = self._methods.get(method)
        if m is None:
            if len(self._methods) >= MAX_METHODS:
                return
            m = self._methods[method] = MethodStats()
        m.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        m.total_seconds += max(seconds, 0.0)
        m.count += 1
        if failed:
            m.errors += 1

    def snapshot(self) -> dict[str, MethodStats]:
        """A copy, by method name."""
        return {name: MethodStats(list(m.buckets), m.total_seconds, m.count, m.errors)
                for name, m in self._methods.items()}

    def clear(self) -> None:
        self._methods.clear()


# The process's calls (AgentClient._call observes into it).
STATS = RpcStats()
