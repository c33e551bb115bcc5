"""Reading a process's output to its end in tests, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def read_all(read: Callable[[], Awaitable[bytes]], limit: float = 60.0) -> bytes:
    """Call ``read`` until it returns b"" (end of stream), at most ``limit`` seconds."""
    out = b""
    async with asyncio.timeout(limit):
        while chunk := await read():
            out += chunk
    return out
