"""Small asyncio helpers on raw fds."""

from __future__ import annotations

import asyncio


async def readable(fd: int) -> None:
    """Until ``fd`` can be read. The fd is watched only while we wait: the loop's
    readers are level-triggered, and data left for later must not keep waking it."""
    await _ready(fd, write=False)


async def writable(fd: int) -> None:
    """Until ``fd`` can be written (watched only while we wait)."""
    await _ready(fd, write=True)


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
