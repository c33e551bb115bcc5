"""Host ends of the agent channel: virtio-serial (a socketpair with QEMU) and
vsock (we connect to the guest's port)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from pykata import errors
from pykata.hypervisor.base import AgentChannel
from pykata.ttrpc.frames import HEADER_SIZE, MAX_DATA

_LIMIT = MAX_DATA + HEADER_SIZE


class SerialChannel(AgentChannel):
    """The host end of a socketpair whose other end is QEMU's virtio-serial
    chardev: connected before the VMM starts, no listening socket anywhere.
    Bytes written before the guest opens its port wait in the socket; the
    agent stream is this one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock, self._sock = self._sock, None
        if sock is None:
            raise errors.FailedPrecondition("the VM's agent channel is closed or already in use")
        try:
            return await asyncio.wait_for(asyncio.open_connection(sock=sock, limit=_LIMIT),
                                          timeout)
        except TimeoutError:
            sock.close()
            raise errors.DeadlineExceeded(
                f"the VM did not open its agent channel within {timeout:g}s"
            ) from None
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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
