"""Tracing of sandbox and container lifecycle (``[runtime] enable_tracing``).

When on, the shim opens an OpenTelemetry span for each ``pykata.observe`` phase;
every agent call made inside one carries the W3C ``traceparent`` in its ttRPC
metadata; the agent records a span per traced call (``pykata.guest.tracing``) and
hands them over on ``TakeSpans``, which :func:`collect` calls after each lifecycle
operation, exporting them as spans of the same trace. All of a sandbox's phases
belong to one trace: a phase with no span around it (a new containerd request)
becomes a child of the sandbox's first span.

Off (the default), this package costs nothing: OpenTelemetry is not even
imported, ``collect`` returns at once, and ``pykata.observe`` and the ttRPC
client see no hook. Tracing never fails a pod: an exporter that cannot export
is logged once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pykata.config import RuntimeConfig

if TYPE_CHECKING:
    from pykata.tracing.host import Tracing

log = logging.getLogger(__name__)

_active: Tracing | None = None


def setup(runtime: RuntimeConfig, service: str = "pykata-shim") -> bool:
    """Start tracing as ``runtime`` says; True if it is on. Never raises: a set-up
    that fails is one warning, and tracing stays off."""
    global _active
    if not runtime.enable_tracing or _active is not None:
        return _active is not None
    if not runtime.tracing_endpoint and not runtime.tracing_file:
        log.warning("[runtime] enable_tracing is set but neither tracing_endpoint nor"
                    " tracing_file: tracing stays off")
        return False
    try:
        from pykata.tracing.host import Tracing

        tracing = Tracing(service, endpoint=runtime.tracing_endpoint,
                          file=runtime.tracing_file)
    except Exception as exc:
        log.warning("tracing stays off: cannot set it up: %s", exc)
        return False
    tracing.install()
    _active = tracing
    return True


def enabled() -> bool:
    return _active is not None


async def collect(agent: object) -> None:
    """Take the spans the agent of ``agent`` (a ``pykata.agent.AgentClient``)
    recorded since the last call, and export them. Nothing when tracing is off
    or for anything else (a test's fake agent); never raises an error."""
    tracing = _active
    if tracing is not None:
        await tracing.collect(agent)


def shutdown(timeout: float = 5.0) -> None:
    """Export what is still queued (waiting at most about ``timeout`` seconds per
    exporter) and stop tracing."""
    global _active
    tracing, _active = _active, None
    if tracing is not None:
        tracing.close(timeout)
