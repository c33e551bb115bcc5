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
from pykata.guest import logs, tracing
from pykata.guest.channel import (
    SERIAL,
    Channel,
    EarlyHealth,
    find_serial_port,
    probe_auto,
    stamp,
)
from pykata.guest.reaper import Reaper
from pykata.guest.service import AGENT_SERVICE, HEALTH_SERVICE, AgentService, HealthService
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb
from pykata.ttrpc import Server, frames
from pykata.ttrpc.streams import open_char_device

log = logging.getLogger(__name__)


async def fd_streams(fd: int, pending: bytes = b""
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Reader and writer over an open character device fd (non-blocking), the
    reader starting with ``pending`` (bytes read from it already)."""
    loop = asyncio.get_running_loop()
    rfile = os.fdopen(fd, "rb", buffering=0)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    reader = asyncio.StreamReader(limit=frames.MAX_DATA + frames.HEADER_SIZE)
    if pending:
        reader.feed_data(pending)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, wfile
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _StampedHealth(HealthService):
    """Health that notes the guest uptime of the first Check it answers."""

    def __init__(self, first_check: asyncio.Event) -> None:
        self.first_check = first_check

    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        if not self.first_check.is_set():
            stamp("check")
            self.first_check.set()
        return await super().Check(req)


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

    def __init__(self, settings: Settings, channel: Channel,
                 early: EarlyHealth | None = None) -> None:
        self.settings = settings
        self.channel = channel
        self.early = early
        self.reaper = Reaper()
        self.service = AgentService(settings, self.reaper)
        self.server = Server()
        self.server.call_hook = tracing.RECORDER.hook  # spans of traced calls (TakeSpans)
        self.server.register_service(AGENT_SERVICE, self.service)
        self.first_check = asyncio.Event()
        self._boot_task: asyncio.Future[None] | None = None
        self.server.register_service(HEALTH_SERVICE, _StampedHealth(self.first_check))

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
        handed: tuple[str, int, bytes] | None = None
        if self.early is not None:
            early, self.early = self.early, None  # one handover per boot
            handed = early.handover()
            if early.error:
                log.warning("early Check responder: %s", early.error)
            if early.answered:
                self.first_check.set()
            if handed is not None and channel.kind == "auto":
                channel = SERIAL
            if handed is not None and channel.kind != "serial":
                os.close(handed[1])
                handed = None
        if channel.kind == "auto":
            channel = await resolve_auto()
        stamp("serving")
        log.info("pykata-agent %s serving on %s (pid %d%s)", __version__, channel, os.getpid(),
                 ", init" if self.settings.init_mode else "")
        if self.settings.init_mode:
            self._boot_task = asyncio.ensure_future(self._boot_line())
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
            await self._serve_serial(channel.address, handed)

    async def _boot_line(self) -> None:
        """One info line with the guest uptime of each boot step, once the first
        Check was answered (by the early responder or the service)."""
        await self.first_check.wait()
        log.info("boot: %s", logs.boot_summary())

    async def _serve_serial(self, name: str,
                            handed: tuple[str, int, bytes] | None = None) -> None:
        """Serve the port (first the one the early responder opened, if any);
        when the host goes away, re-open it (bounded backoff)."""
        delay = 0.02
        while True:
            dev = handed[0] if handed else find_serial_port(name)
            if dev is None:
                log.debug("virtio-serial port %s not present yet", name)
            else:
                try:
                    if handed:
                        reader, writer = await fd_streams(handed[1], handed[2])
                    else:
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
            handed = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
