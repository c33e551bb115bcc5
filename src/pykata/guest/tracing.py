"""The agent's side of tracing, without OpenTelemetry (the guest image has none,
and no network path to a collector): a request whose ttRPC metadata carries a
W3C ``traceparent`` gets one span, a child of the caller's span, recorded here;
the host takes what was recorded with ``TakeSpans`` and exports it with its own.

The buffer is capped: when full, the oldest span goes and ``dropped`` counts it.
Times are taken with the monotonic clock (a clock step in the guest cannot make a
span end before it starts) and turned into Unix time when the span ends.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from pykata.protos import agent_pb2 as pb
from pykata.ttrpc import tracecontext

MAX_SPANS = 1024  # spans kept between two TakeSpans
MAX_ERROR = 256  # characters of an error kept in a span

# Calls not worth a span: the host's own collection, health probes, and the
# stream and event polls that run as long as a process does, again and again.
UNRECORDED = frozenset({"TakeSpans", "Check", "Version", "ReadStdout", "ReadStderr",
                        "WriteStdin", "GetOOMEvent", "GetMetrics"})


def new_span_id() -> bytes:
    while True:
        span_id = os.urandom(8)
        if any(span_id):
            return span_id


class Recorder:
    def __init__(self, cap: int = MAX_SPANS) -> None:
        self.cap = max(1, cap)
        self._spans: collections.deque[pb.TraceSpan] = collections.deque()
        self.dropped = 0

    def add(self, span: pb.TraceSpan) -> None:
        if len(self._spans) >= self.cap:
            self._spans.popleft()
            self.dropped += 1
        self._spans.append(span)

    def take(self) -> pb.TraceSpans:
        """What was recorded since the last take, then forgotten."""
        out = pb.TraceSpans(spans=list(self._spans), dropped=min(self.dropped, 0xFFFFFFFF))
        self._spans.clear()
        self.dropped = 0
        return out

    def hook(self, service: str, method: str, request: Any,
             metadata: Mapping[str, list[str]]) -> AbstractContextManager[None] | None:
        """The ttRPC server's call hook: a span around a traced call, else None."""
        if method in UNRECORDED:
            return None
        parent = tracecontext.from_metadata(metadata)
        if parent is None or not parent.sampled:
            return None
        attributes = {"rpc.system": "ttrpc", "rpc.service": service, "rpc.method": method}
        container_id = getattr(request, "container_id", "")
        if isinstance(container_id, str) and container_id:
            attributes["container.id"] = container_id
        exec_id = getattr(request, "exec_id", "")
        if isinstance(exec_id, str) and exec_id:
            attributes["exec.id"] = exec_id
        return self.span(f"agent.{method}", parent, attributes)

    @contextlib.contextmanager
    def span(self, name: str, parent: tracecontext.TraceParent,
             attributes: dict[str, str]) -> Iterator[None]:
        started = time.monotonic_ns()
        error = ""
        try:
            yield
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
            raise
        finally:
            ended = time.monotonic_ns()
            offset = time.time_ns() - ended  # monotonic -> Unix, at the end
            self.add(pb.TraceSpan(
                trace_id=parent.trace_id, span_id=new_span_id(),
                parent_span_id=parent.span_id, name=name,
                start_unix_nano=max(0, started + offset), end_unix_nano=max(0, ended + offset),
                attributes=attributes, error=error))


# The agent's one recorder: the ttRPC server's call hook and TakeSpans share it.
RECORDER = Recorder()
