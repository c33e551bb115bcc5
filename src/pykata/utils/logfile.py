"""Host log files fed by untrusted bytes (the guest console, QEMU, virtiofsd).

A :class:`CappedLog` never grows past its cap: when a write would pass
``max_bytes``, the file becomes ``<name>.1`` (replacing the older one) and a new
one is started, so at most twice the cap is on disk. Files are made with
``O_EXCL|O_NOFOLLOW`` and mode 0600 (an existing one is reused only if it is a
regular file of ours with one link). :func:`drain` copies a pipe or socket
into one, in bounded reads, until EOF. :func:`tail` reads the end back with
control characters replaced, so guest-printed bytes cannot put terminal escapes
or forged lines into an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import unicodedata
from pathlib import Path

from pykata.utils.aio import readable

CHUNK = 64 * 1024  # one read from the source; one write at most this big
# After a short read, wait this long before reading again: a writer that sends a
# byte at a time (QEMU's serial port does) then costs us one read per interval
# instead of one per byte. The source's socket or pipe buffer holds the rest.
COALESCE = 0.01

_CREATE = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def open_private(path: Path, flags: int = _CREATE, mode: int = 0o600) -> int:
    """Create ``path`` (0600, not through a symlink) or reopen a regular file of
    ours there with ``_REOPEN``-like flags; the fd."""
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        pass
    fd = os.open(path, (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise PermissionError(f"{path} is not a private regular file: refusing to use it")
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class CappedLog:
    """An append-only log of at most ``max_bytes`` (plus one rotated copy)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"log cap must be positive, not {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0  # bytes accepted in total (across rotations)
        self._fd = open_private(path, _CREATE)
        self._size = os.fstat(self._fd).st_size

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        self.written += len(view)
        while view:
            if self._fd < 0:
                return
            room = self.max_bytes - self._size
            if room <= 0:
                self._rotate()
                continue
            n = os.write(self._fd, view[:room])
            self._size += n
            view = view[n:]

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        os.replace(self.path, rotated(self.path))
        self._fd = open_private(self.path, _CREATE)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CappedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def drain(fd: int, log: CappedLog, chunk: int = CHUNK,
                coalesce: float = COALESCE) -> int:
    """Copy what arrives on ``fd`` (a pipe or a stream socket) into ``log`` until
    EOF; bytes read. Both are owned: closed here. Each read is at most ``chunk``,
    and after a short one the next waits ``coalesce`` seconds: a flood neither
    grows memory nor keeps the loop busy (the writer blocks on a full buffer).
    Cancelling stops it (the fd is closed all the same)."""
    total = 0
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, chunk)
            except BlockingIOError:
                await readable(fd)
                continue
            except ConnectionResetError:
                break
            if not data:
                break
            total += len(data)
            try:
                log.write(data)
            except OSError:
                # The log cannot take it (disk full, removed): keep reading so the
                # writer never blocks on us, drop the bytes.
                pass
            await asyncio.sleep(coalesce if len(data) < chunk else 0)
    finally:
        os.close(fd)
        log.close()
    return total


def _clean(text: str) -> str:
    """Control and format characters (C0, DEL, C1, bidi overrides, zero-width)
    become '?'; newlines and tabs stay."""
    out = []
    for ch in text:
        if ch in "\n\t" or (ch >= " " and unicodedata.category(ch) not in ("Cc", "Cf")):
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


def _read_end(path: Path, max_bytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        size = os.lseek(fd, 0, os.SEEK_END)
        start = max(0, size - max_bytes)
        return os.pread(fd, size - start, start)
    finally:
        os.close(fd)


def tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log (and of its ``.1`` if the current file is
    short), at most ``max_bytes`` read, control characters replaced; "" if
    there is nothing readable."""
    data = b""
    with contextlib.suppress(OSError):
        data = _read_end(path, max_bytes)
    if len(data) < max_bytes and data.count(b"\n") < lines:
        with contextlib.suppress(OSError):
            data = _read_end(rotated(path), max_bytes - len(data)) + data
    text = _clean(data.decode(errors="replace"))
    return "\n".join(text.splitlines()[-lines:])
