"""Relay a process's stdio between containerd's fifos and the guest agent.

A relay is a process's ProcessIO (runtime/types.py): attached with
``Process.attach_io``, started by the process once it exists in the guest, and
drained by it before the exit is final. Output relays end at the agent's
end-of-stream, so everything the process wrote reaches the fifo before its exit
is reported. Stdin EOF closes the process's stdin in the guest. An agent
policy that keeps a process's stdio in the guest (PermissionDenied) ends that
relay, logged once; the process runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
from collections.abc import Awaitable, Callable

from pykata import errors
from pykata.runtime.container import Process
from pykata.runtime.types import Stdio
from pykata.utils.aio import readable, writable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
EOF_GRACE = (0.02, 0.04, 0.06, 0.08)  # seconds to wait for a writer to come back


async def open_fifo(path: str, flags: int) -> int:
    """Open a fifo without blocking the loop or leaving a thread that could
    keep the process alive (opening blocks until the other end is there)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def deliver(fd: int | None, exc: OSError | None) -> None:
        if fut.cancelled():
            if fd is not None:
                os.close(fd)
        elif exc is not None:
            fut.set_exception(exc)
        else:
            assert fd is not None
            fut.set_result(fd)

    def worker() -> None:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            loop.call_soon_threadsafe(deliver, None, exc)
            return
        loop.call_soon_threadsafe(deliver, fd, None)

    threading.Thread(target=worker, name=f"open {path}", daemon=True).start()
    return await fut


NO_WRITER_POLL = 0.25  # seconds between looks for a stdin writer that is not there yet


def _writer_left(fd: int) -> bool:
    """Whether a writer of the fifo ``fd`` came and went since it was opened
    (Linux reports POLLHUP only then, not for a writer that never came)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))


class FifoOut:
    """The write end of one of containerd's output fifos, never blocking the loop.

    Its reader may go away and come back: containerd restarting reopens the
    fifos of the tasks it finds (CRI does, for the container logs). While no
    reader is there a write fails (EPIPE) and that output is dropped (counted,
    logged once); writing resumes as soon as a reader is back."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.dropped = 0  # bytes written while nobody read the fifo

    @classmethod
    async def open(cls, path: str) -> FifoOut:
        fd = await open_fifo(path, os.O_WRONLY)
        os.set_blocking(fd, False)
        return cls(path, fd)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:  # the reader is behind: wait for it
                await writable(self.fd)
                continue
            except BrokenPipeError:
                if not self.dropped:
                    log.warning("nobody reads %s (containerd restarting?): output is"
                                " dropped until a reader opens it again", self.path)
                self.dropped += len(view)
                return
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioRelay:
    """containerd's fifos (``stdio``) <-> the agent's stdio calls of ``proc``."""

    def __init__(self, proc: Process, stdio: Stdio) -> None:
        self.proc = proc
        self._stdio = stdio
        self._out_tasks: list[asyncio.Task[None]] = []
        self._in_task: asyncio.Task[None] | None = None

    @property
    def stdio(self) -> Stdio:
        return self._stdio

    def start(self) -> None:
        stdin, stdout, stderr = self._stdio.stdin, self._stdio.stdout, self._stdio.stderr
        if stdout:
            self._out_tasks.append(asyncio.ensure_future(
                self._pump_out(stdout, self.proc.read_stdout)))
        if stderr and not self._stdio.terminal:
            self._out_tasks.append(asyncio.ensure_future(
                self._pump_out(stderr, self.proc.read_stderr)))
        if stdin:
            self._in_task = asyncio.ensure_future(self._pump_in(stdin))

    async def _pump_out(self, path: str, read: Callable[[int], Awaitable[bytes]]) -> None:
        out: FifoOut | None = None
        try:
            out = await FifoOut.open(path)
            while data := await read(CHUNK):
                await out.write(data)
        except errors.PermissionDenied as exc:
            # The agent policy keeps this output in the guest (stdio "none" or
            # "own-exec-only"): the end of the stream, not a failure of the process.
            log.info("output of %s relayed no further: %s", self.proc.name, exc)
        except errors.PykataError as exc:
            log.debug("output relay to %s ended: %s", path, exc)
        except OSError as exc:
            log.warning("output relay to %s failed: %s", path, exc)
        finally:
            if out is not None:
                out.close()

    async def _pump_in(self, path: str) -> None:
        fd = -1
        try:
            # Opened without waiting for a writer: a blocking open in a thread
            # would stay blocked for good when the client's writer came and went
            # before it (ctr exec with nothing on its stdin), one thread per exec.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            writer_seen = False
            quiet_eofs = 0
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:  # a writer is there, no data yet
                    writer_seen = True
                    await readable(fd)
                    continue
                if data:
                    writer_seen = True
                    quiet_eofs = 0
                    await self.proc.write_stdin(data)
                    continue
                if not writer_seen:
                    # No writer yet (or it left before we opened: then no
                    # writer ever comes, as with the blocking open).
                    if _writer_left(fd):
                        writer_seen = True
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(readable(fd), NO_WRITER_POLL)
                    continue
                # No writer right now. Clients re-open their end (containerd's fifo
                # library swaps an O_RDWR handle for an O_WRONLY one), so EOF is
                # final only when no writer comes back within a short grace.
                quiet_eofs += 1
                if quiet_eofs > len(EOF_GRACE):
                    break
                await asyncio.sleep(EOF_GRACE[quiet_eofs - 1])
            await self.proc.close_stdin()
        except errors.PermissionDenied as exc:  # the agent policy: no input for it
            log.info("input of %s relayed no further: %s", self.proc.name, exc)
        except errors.PykataError as exc:
            log.debug("stdin relay from %s ended: %s", path, exc)
        except OSError as exc:
            log.debug("stdin relay from %s ended: %s", path, exc)
        finally:
            if fd >= 0:
                os.close(fd)

    async def close_stdin(self) -> None:
        """CloseIO: no more input for this process."""
        if self._in_task is not None and not self._in_task.done():
            self._in_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._in_task
        with contextlib.suppress(errors.PykataError):
            await self.proc.close_stdin()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the output relays have delivered everything (bounded)."""
        if self._out_tasks:
            _, pending = await asyncio.wait(self._out_tasks, timeout=timeout)
            for t in pending:
                t.cancel()

    async def stop(self) -> None:
        for t in [*self._out_tasks, *([self._in_task] if self._in_task else [])]:
            t.cancel()
        for t in [*self._out_tasks, *([self._in_task] if self._in_task else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
