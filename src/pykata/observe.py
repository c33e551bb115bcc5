"""Where the host runtime marks what it does: one call both times a phase for the
metrics (``Phases``, e.g. a sandbox's start-up) and, when tracing is on, opens a
span around it (``pykata.tracing`` installs the span factory; without it a phase
costs two clock reads).

    with observe.phase("vm.boot", sandbox.phases, sandbox=sandbox.id):
        ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

# (name, attributes) -> a context manager around the work (an OpenTelemetry span).
SpanFactory = Callable[[str, dict[str, str]], AbstractContextManager[Any]]

_span_factory: SpanFactory | None = None

MAX_PHASES = 64  # distinct phase names one Phases keeps (a bound, not a goal)


def set_span_factory(factory: SpanFactory | None) -> None:
    """Install (or, with None, remove) what opens a span for each phase."""
    global _span_factory
    _span_factory = factory


class Phases:
    """The last duration of each named phase, in seconds, in first-seen order."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        if name in self._seconds or len(self._seconds) < MAX_PHASES:
            self._seconds[name] = seconds

    def items(self) -> list[tuple[str, float]]:
        return list(self._seconds.items())


@contextlib.contextmanager
def phase(name: str, phases: Phases | None = None, **attributes: str) -> Iterator[None]:
    """Time the block into ``phases`` (also when it raises) inside a span if tracing is on."""
    factory = _span_factory
    started = time.monotonic()
    with factory(name, attributes) if factory is not None else contextlib.nullcontext():
        try:
            yield
        finally:
            if phases is not None:
                phases.record(name, time.monotonic() - started)
