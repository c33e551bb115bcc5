"""What lives beside a running sandbox in the shim, started once its VM is up and
stopped before it goes: the metrics socket, the guest log relay (issue 18).

A companion never fails the pod: a start that raises is logged and the
companion is dropped; a stop that raises is logged."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from pykata.config import Config

log = logging.getLogger("pykata.shim")


class Companion(Protocol):
    name: str

    async def start(self, sandbox: Any, spec: dict[str, Any]) -> None:
        """``sandbox`` is the shim's runtime sandbox (pykata.runtime.sandbox.Sandbox)
        just booted, ``spec`` the OCI spec of the pod's first container."""

    async def stop(self) -> None: ...


def companions_for(config: Config, sandbox_id: str, namespace: str) -> list[Companion]:
    """The companions of one shim's sandbox, from its configuration."""
    from pykata.metrics.companion import MetricsCompanion  # <sandbox dir>/metrics.sock
    from pykata.shim import debug  # the guest log relay and the debug console socket

    return [MetricsCompanion(), *debug.companions(sandbox_id)]


async def start_all(items: list[Companion], sandbox: Any, spec: dict[str, Any]
                    ) -> list[Companion]:
    """Start each; those that fail are logged and left out of the result."""
    started: list[Companion] = []
    for c in items:
        try:
            await c.start(sandbox, spec)
        except Exception as exc:
            log.warning("%s: not started: %s", c.name, exc)
            continue
        started.append(c)
    return started


async def stop_all(items: list[Companion]) -> None:
    for c in reversed(items):
        try:
            await c.stop()
        except Exception as exc:
            log.warning("%s: stop failed: %s", c.name, exc)
