"""asyncio streams over things that are not sockets (virtio-serial character devices)."""

from __future__ import annotations

import asyncio
import os

from pykata.ttrpc import frames


async def open_char_device(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Reader and writer over a character device such as /dev/vport1p1."""
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    rfile = os.fdopen(fd, "rb", buffering=0)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    reader = asyncio.StreamReader(limit=frames.MAX_DATA + frames.HEADER_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, wfile
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
