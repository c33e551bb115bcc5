"""Small asyncio helpers on raw fds."""

from __future__ import annotations

import asyncio


async def readable(fd: int) -> None:
    """Until ``fd`` can be read. The fd is watched only while we wait: the loop's
    readers are level-triggered, and data left for later must not keep waking it."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
