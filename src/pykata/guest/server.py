"""Serving the agent protocol on its channel: one event loop's worth of agent.

``AgentServer`` owns the reaper, the services and the ttRPC server, and serves
on a unix socket (development), a vsock port, or a virtio-serial port that is
re-opened whenever the host disconnects (bounded backoff, forever). Channels
are parsed and found by :mod:`pykata.guest.channel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from pykata import __version__
from pykata.guest.channel import SERIAL, Channel, find_serial_port, probe_auto
from pykata.guest.reaper import Reaper
from pykata.guest.service import AGENT_SERVICE, HEALTH_SERVICE, AgentService, HealthService
from pykata.guest.settings import Settings
from pykata.ttrpc import Server
from pykata.ttrpc.streams import open_char_device

log = logging.getLogger(__name__)


async def resolve_auto(wait: float = 3.0) -> Channel:
    """PID 1 without a channel: the serial port if it shows up, else vsock."""
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        timed_out = time.monotonic() >= deadline
        found = probe_auto(vsock=timed_out)
        if found is not None:
            return found
        if timed_out:
            log.warning("neither virtio-serial port %s nor vsock found yet; still looking",
                        SERIAL.address)
            deadline = time.monotonic() + 10 * wait
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


class AgentServer:
    """One event loop's worth of agent: reaper, services, ttRPC server, channel."""

    def __init__(self, settings: Settings, channel: Channel) -> None:
        self.settings = settings
        self.channel = channel
        self.reaper = Reaper()
        self.service = AgentService(settings, self.reaper)
        self.server = Server()
        self.server.register_service(AGENT_SERVICE, self.service)
        self.server.register_service(HEALTH_SERVICE, HealthService())

    async def run(self, stop: asyncio.Event) -> None:
        self.reaper.install()
        serving = asyncio.ensure_future(self._serve())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # raises what broke the channel
        finally:
            serving.cancel()
            stopping.cancel()
            with contextlib.suppress(BaseException):
                await serving
            await self.server.close()
            if not self.settings.init_mode:
                await self.service.shutdown()
            self.reaper.uninstall()

    async def _serve(self) -> None:
        channel = self.channel
        if channel.kind == "auto":
            channel = await resolve_auto()
        log.info("pykata-agent %s serving on %s (pid %d%s)", __version__, channel, os.getpid(),
                 ", init" if self.settings.init_mode else "")
        if channel.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(channel.address)
            Path(channel.address).parent.mkdir(parents=True, exist_ok=True)
            await self.server.serve_unix(channel.address)
            os.chmod(channel.address, 0o600)
            await asyncio.Event().wait()
        elif channel.kind == "vsock":
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.bind((socket.VMADDR_CID_ANY, int(channel.address)))
            sock.listen(16)
            sock.setblocking(False)
            await self.server.serve_socket(sock)
            await asyncio.Event().wait()
        else:
            await self._serve_serial(channel.address)

    async def _serve_serial(self, name: str) -> None:
        """Serve the port; when the host goes away, re-open it (bounded backoff)."""
        delay = 0.02
        while True:
            dev = find_serial_port(name)
            if dev is None:
                log.debug("virtio-serial port %s not present yet", name)
            else:
                try:
                    reader, writer = await open_char_device(dev)
                except OSError as exc:
                    log.warning("cannot open %s (%s): %s", dev, name, exc)
                else:
                    started = time.monotonic()
                    try:
                        await self.server.serve_stream(reader, writer)
                    except Exception as exc:
                        log.warning("channel %s broke: %s", dev, exc)
                        with contextlib.suppress(Exception):
                            writer.close()
                    if time.monotonic() - started > 1.0:
                        # A real session ended (not an unconnected host): reopen quickly.
                        log.info("host disconnected from %s; reopening", dev)
                        delay = 0.02
                    else:
                        log.debug("no host on %s yet", dev)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
