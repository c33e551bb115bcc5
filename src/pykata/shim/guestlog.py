"""Guest logs on the host: the guest console (the agent logs there, and the
kernel) relayed into the shim's log, which containerd records for the shim.

The VMM driver writes the console to ``console.log`` in the sandbox's run
directory, a CappedLog that becomes ``console.log.1`` when full. The relay
(:class:`GuestLogRelay`, a shim companion) follows that file: rotation-aware
(what was written to the old file before it moved is read to its end), in
bounded chunks, opening it with O_NOFOLLOW (a regular file of ours only). The
guest writes these bytes, so each line is sanitised (control characters
escaped, length capped) and the lines are rate-limited (a token bucket; a note
says how many were dropped). Each goes to the shim's logger as
``guest sandbox=<id>: <line>``.

``pykata logs`` reads the same files through :func:`read_lines` and
:class:`LogFollower`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pykata.utils.logfile import rotated

log = logging.getLogger("pykata.shim.guestlog")

MAX_LINE = 1024  # characters of one relayed line (bytes read for it: at most 4x)
CHUNK = 64 * 1024  # one read
MAX_POLL_BYTES = 256 * 1024  # read per poll at most: a flood waits for the next one
POLL_INTERVAL = 0.25
RATE = 50.0  # lines a second, on average
BURST = 200  # lines at once

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def sanitise(raw: bytes, limit: int = MAX_LINE) -> str:
    """One guest line, safe for a log line or a terminal: decoded (bad bytes
    replaced), a trailing CR dropped, every non-printable character (ESC, CR,
    tab, bidi overrides, zero-width...) as a ``\\xNN``/``\\uNNNN`` escape, at
    most ``limit`` characters (then "..." and how long it was)."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    head = text[: limit + 1]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(head) <= limit and len(text) <= limit:
        return head
    return head[:limit] + f"...({len(raw)} bytes)"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; take() spends one."""

    def __init__(self, rate: float = RATE, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def open_log(path: Path) -> int | None:
    """``path`` opened for reading (not through a symlink), if it is a regular
    file owned by us; None if it is missing or anything else."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return None
    return fd


class LogFollower:
    """Complete lines appended to a capped log (``path``, rotated to
    ``path.1``) since the last :meth:`poll`. Starts at the beginning of the
    current file, or at its end with ``from_end``."""

    def __init__(self, path: Path, *, from_end: bool = False, max_line: int = MAX_LINE,
                 max_poll_bytes: int = MAX_POLL_BYTES) -> None:
        self.path = path
        self.max_line_bytes = max_line * 4  # UTF-8: up to 4 bytes a character
        self.max_poll_bytes = max_poll_bytes
        self._fd = -1
        self._ident: tuple[int, int] = (0, 0)
        self._pos = 0
        self._partial = b""
        self._skipping = False  # the rest of an over-long line is dropped
        self._from_end = from_end

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> bool:
        fd = open_log(self.path)
        if fd is None:
            return False
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._pos = st.st_size if self._from_end else 0
        self._from_end = False  # a file that replaces it is read from its start
        return True

    def _moved(self) -> bool:
        """The path names another file now (rotated: ours is ``.1``), or none."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def _read(self, budget: int, out: list[bytes]) -> tuple[int, bool]:
        """Read from the current file up to ``budget`` bytes: (bytes read, at EOF)."""
        used = 0
        if os.fstat(self._fd).st_size < self._pos:  # truncated: start again
            self._pos = 0
        while used < budget:
            data = os.pread(self._fd, min(CHUNK, budget - used), self._pos)
            if not data:
                return used, True
            self._pos += len(data)
            used += len(data)
            self._split(data, out)
        return used, False

    def _split(self, data: bytes, out: list[bytes]) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            out.append(line)
        if len(self._partial) > self.max_line_bytes:
            if not self._skipping:
                out.append(self._partial[: self.max_line_bytes] + b" [line cut]")
            self._partial = b""
            self._skipping = True

    def _flush(self, out: list[bytes]) -> None:
        if self._partial and not self._skipping:
            out.append(self._partial)
        self._partial = b""
        self._skipping = False

    def poll(self) -> list[bytes]:
        """The lines completed since the last poll (at most ``max_poll_bytes`` read)."""
        out: list[bytes] = []
        budget = self.max_poll_bytes
        for _ in range(3):  # the current file, then (rotated) the new one
            if self._fd < 0 and not self._open():
                return out
            used, eof = self._read(budget, out)
            budget -= used
            if not eof or budget <= 0:
                return out
            if not self._moved():
                return out
            # Rotated: read what was written to it before it moved, then the new
            # file. A line the cap cut goes on there: the partial one is kept.
            used, eof = self._read(budget, out)
            budget -= used
            if not eof:
                return out
            self.close()
        return out


def read_lines(path: Path, tail: int | None = None, current: bool = True) -> Iterator[bytes]:
    """The lines of ``path.1`` then ``path`` (a capped log and its rotated copy:
    a line cut by the rotation is joined again), or only the last ``tail`` of
    them; files opened as open_log does. Not ``current``: ``path.1`` only."""
    keep: collections.deque[bytes] | None = collections.deque(maxlen=tail) \
        if tail is not None else None
    splitter = LogFollower(path)
    for p in (rotated(path), path) if current else (rotated(path),):
        fd = open_log(p)
        if fd is None:
            continue
        splitter._fd, splitter._pos = fd, 0
        try:
            eof = False
            while not eof:
                lines: list[bytes] = []
                _, eof = splitter._read(CHUNK, lines)
                if keep is not None:
                    keep.extend(lines)
                else:
                    yield from lines
        finally:
            splitter.close()
    last: list[bytes] = []
    splitter._flush(last)  # the unfinished last line
    if keep is not None:
        keep.extend(last)
        yield from keep
    else:
        yield from last


class GuestLogRelay:
    """The shim companion relaying one sandbox's guest console into the shim's log."""

    name = "guest log"

    def __init__(self, sandbox_id: str, rate: float = RATE, burst: int = BURST,
                 interval: float = POLL_INTERVAL) -> None:
        self.sandbox_id = sandbox_id
        self.bucket = TokenBucket(rate, burst)
        self.interval = interval
        self.dropped = 0
        self.relayed = 0
        self._task: asyncio.Task[None] | None = None
        self._follower: LogFollower | None = None

    async def start(self, sandbox: Any, spec: dict[str, Any]) -> None:
        vm = getattr(sandbox, "vm", None)
        path = vm.spec.console_log if vm is not None else Path(sandbox.dir) / "console.log"
        self._follower = LogFollower(Path(path))
        self._task = asyncio.ensure_future(self._run())

    def relay(self, lines: list[bytes]) -> None:
        for raw in lines:
            if not raw.strip():
                continue
            if not self.bucket.take():
                self.dropped += 1
                continue
            if self.dropped:
                log.warning("guest sandbox=%s: %d lines dropped (more than %g a second)",
                            self.sandbox_id, self.dropped, self.bucket.rate)
                self.dropped = 0
            self.relayed += 1
            log.info("guest sandbox=%s: %s", self.sandbox_id, sanitise(raw))

    async def _run(self) -> None:
        assert self._follower is not None
        while True:
            try:
                self.relay(self._follower.poll())
            except OSError as exc:  # the file went away under us: try again later
                log.debug("guest log: %s", exc)
                self._follower.close()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._follower is not None:
            with contextlib.suppress(OSError):  # what the guest said last
                self.relay(self._follower.poll())
            self._follower.close()
