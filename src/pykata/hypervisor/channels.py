"""Host ends of the agent channel: virtio-serial (a unix socket QEMU connects
to) and vsock (we connect to the guest's port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

from pykata import errors
from pykata.hypervisor.base import AgentChannel
from pykata.ttrpc.frames import HEADER_SIZE, MAX_DATA

_LIMIT = MAX_DATA + HEADER_SIZE


class SerialChannel(AgentChannel):
    """The driver listens on ``path`` before the VMM starts; the VMM's
    virtio-serial chardev connects to it. One connection = the agent stream."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: asyncio.Server | None = None
        self._conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._conns.put((r, w))

        self._server = await asyncio.start_unix_server(on_conn, path=str(self.path), limit=_LIMIT)

    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(self._conns.get(), timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"the VM did not open its agent channel within {timeout:g}s"
            ) from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        while not self._conns.empty():
            _, w = self._conns.get_nowait()
            w.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class VsockChannel(AgentChannel):
    def __init__(self, cid: int, port: int) -> None:
        self.cid = cid
        self.port = port

    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        deadline = time.monotonic() + timeout
        delay = 0.01
        last: OSError | None = None
        while time.monotonic() < deadline:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (self.cid, self.port))
                return await asyncio.open_connection(sock=sock, limit=_LIMIT)
            except OSError as exc:
                sock.close()
                last = exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        raise errors.DeadlineExceeded(
            f"agent on vsock {self.cid}:{self.port} not reachable within {timeout:g}s: {last}"
        )


def vhost_vsock_available() -> bool:
    return os.path.exists("/dev/vhost-vsock") and os.access("/dev/vhost-vsock", os.R_OK | os.W_OK)
