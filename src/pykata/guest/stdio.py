"""Non-blocking file descriptors on the event loop: long-poll reads and full writes.

Reads happen only when someone asks (ReadStdout), so a process that writes
faster than the host reads blocks on its pipe instead of filling the agent's
memory.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

from pykata import errors


class _LoopFd:
    """A non-blocking fd whose readiness (read or write) is awaited on the loop;
    close() wakes a waiter, which then sees the fd closed."""

    _for_writing = False

    def __init__(self, fd: int, *, owns: bool = True) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._owns = owns
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[None] | None = None

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _watch(self, loop: asyncio.AbstractEventLoop, fd: int, ready: Callable[[], None]) -> None:
        if self._for_writing:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)

    def _unwatch(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        if self._for_writing:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)

    async def _ready(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = self._fd
        self._watch(loop, fd, ready)
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None
            self._unwatch(loop, fd)

    def close(self) -> None:
        """Close now; a caller waiting in read or write wakes up and sees it."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        try:
            self._unwatch(asyncio.get_running_loop(), fd)
        except RuntimeError:
            pass
        if self._owns:
            try:
                os.close(fd)
            except OSError:
                pass


class FdReader(_LoopFd):
    """Reads from a pipe or a pty master; b"" once at end of stream, then always."""

    def __init__(self, fd: int, *, pty: bool = False, owns: bool = True) -> None:
        super().__init__(fd, owns=owns)
        self._pty = pty

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes as soon as any are available; b"" at EOF."""
        async with self._lock:
            while self._fd >= 0:
                try:
                    data = os.read(self._fd, size)
                except BlockingIOError:
                    await self._ready()
                    continue
                except OSError as exc:
                    # A pty master reads EIO once every slave is closed: that is EOF.
                    if exc.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    self.close()
                return data
            return b""

    async def read_all(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            data = await self.read(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def read_available(self) -> bytes:
        """Whatever can be read right now without waiting."""
        chunks = []
        while self._fd >= 0:
            try:
                data = os.read(self._fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


class FdWriter(_LoopFd):
    """Writes all of the data to a pipe or pty master, waiting while it is full."""

    _for_writing = True

    async def write(self, data: bytes) -> int:
        async with self._lock:
            view = memoryview(data)
            done = 0
            while done < len(view):
                if self._fd < 0:
                    raise errors.FailedPrecondition("stdin is closed")
                try:
                    done += os.write(self._fd, view[done:])
                except BlockingIOError:
                    await self._ready()
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EIO):
                        raise errors.FailedPrecondition(
                            "stdin is closed: the process stopped reading") from None
                    raise
            return done
