"""Port forwarding, guest side: the host's connections to the pod's loopback.

The host catches what containerd's CRI PortForward dials (``localhost:PORT``
in the pod's network namespace on the host) and carries each connection over
a channel of its own (virtio-serial port ``wire.PORTFWD_SERIAL_PORT_NAME``,
or vsock port ``wire.PORTFWD_VSOCK_PORT``), framed by ``pykata.ttrpc.mux``.
Here each OPEN becomes a TCP connection to 127.0.0.1 or ::1 in the VM's
network namespace, which is the pod's (every container shares it). Started
once, lazily, by CreateSandbox; nothing listens in the guest for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from pykata import wire
from pykata.guest.channel import find_serial_port
from pykata.ttrpc import mux
from pykata.ttrpc.streams import open_char_device

log = logging.getLogger(__name__)

_ADDRESSES = {mux.FAMILY_V4: ("127.0.0.1",), mux.FAMILY_V6: ("::1",),
              mux.FAMILY_ANY: ("127.0.0.1", "::1")}
_task: asyncio.Task[None] | None = None


async def connect_loopback(port: int, family: int) -> mux.Streams:
    """A connection to ``port`` on the loopback of ``family`` (ANY: IPv4, then
    IPv6 when that fails, as a dial of "localhost" does)."""
    last: OSError | None = None
    for host in _ADDRESSES[family]:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=mux.CHUNK)
        except OSError as exc:
            last = exc
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer
    assert last is not None
    raise last


def start() -> None:
    """Serve the port-forward channel from now on (idempotent)."""
    global _task
    if _task is None:
        _task = asyncio.ensure_future(serve())


async def serve(ports_dir: str | None = None) -> None:
    """The virtio-serial port if the VM has one, else vsock (if there is any)."""
    dev = (find_serial_port(wire.PORTFWD_SERIAL_PORT_NAME) if ports_dir is None
           else find_serial_port(wire.PORTFWD_SERIAL_PORT_NAME, ports_dir))
    if dev is not None:
        await _serve_serial(dev)
    elif hasattr(socket, "AF_VSOCK"):
        await _serve_vsock()


async def _serve_serial(dev: str) -> None:
    """One channel for the life of the VM (the host keeps its end open)."""
    delay = 0.05
    while True:
        try:
            reader, writer = await open_char_device(dev)
        except OSError as exc:
            log.warning("port forwarding: cannot open %s: %s", dev, exc)
            return
        log.debug("port forwarding on %s", dev)
        await mux.Mux(reader, writer, connector=connect_loopback, name="portfwd").run()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def _serve_vsock() -> None:
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.bind((socket.VMADDR_CID_ANY, wire.PORTFWD_VSOCK_PORT))
        sock.listen(4)
        sock.setblocking(False)
    except OSError as exc:
        log.debug("port forwarding: no vsock (%s)", exc)
        return

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await mux.Mux(reader, writer, connector=connect_loopback, name="portfwd").run()

    server = await asyncio.start_server(one, sock=sock, limit=mux.MAX_PAYLOAD + 64)
    log.debug("port forwarding on vsock port %d", wire.PORTFWD_VSOCK_PORT)
    async with server:
        await server.serve_forever()
