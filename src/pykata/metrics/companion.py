"""The shim's metrics companion (pykata.shim.companions): a server on
``<sandbox dir>/metrics.sock`` for as long as the sandbox runs.

The server starts at once; prometheus_client, which takes a tenth of a second
to import, is only imported by the first scrape."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata.metrics.server import MetricsServer

if TYPE_CHECKING:
    from pykata.metrics.collector import SandboxCollector

SOCKET_NAME = "metrics.sock"


class MetricsCompanion:
    name = "metrics"

    def __init__(self) -> None:
        self._server: MetricsServer | None = None
        self._collector: SandboxCollector | None = None
        self._sandbox: Any = None
        self._spec: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def start(self, sandbox: Any, spec: dict[str, Any]) -> None:
        self._sandbox, self._spec = sandbox, spec
        server = MetricsServer(Path(sandbox.dir) / SOCKET_NAME, self._render)
        await server.start()
        self._server = server

    async def _render(self) -> bytes:
        # One scrape at a time: a second one waits and gets a fresh look.
        async with self._lock:
            if self._collector is None:
                mod = await asyncio.to_thread(importlib.import_module,
                                              "pykata.metrics.collector")
                self._collector = mod.SandboxCollector(self._sandbox, self._spec)
            from pykata.metrics.collector import scrape
            return await scrape(self._collector)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
