"""A very small HTTP/1.1 server on a unix socket: ``GET /metrics`` answers the
Prometheus text exposition, anything else an error. One request per
connection (``Connection: close``); the request head is bounded in size
(``MAX_HEAD``) and time (``HEAD_TIMEOUT``), and so is the number of
connections served at once (``MAX_CONNECTIONS``: more are closed unanswered).

The socket is made 0600 in a root-only directory: whoever can connect is root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from pykata import errors
from pykata.utils.unixsock import bind_private

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192  # bytes of request line and headers
HEAD_TIMEOUT = 5.0  # seconds to send them
RENDER_TIMEOUT = 20.0  # seconds a scrape may take (the guest's part has its own deadline)
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 8

Render = Callable[[], Awaitable[bytes]]


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


def parse_head(head: bytes) -> tuple[str, str] | None:
    """(method, path without query) of a request head; None if malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    line, _, _ = text.partition("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target = parts[0], parts[1]
    if not method.isalpha() or not target.startswith("/"):
        return None
    return method, target.partition("?")[0]


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` on the unix socket ``path``."""

    def __init__(self, path: Path, render: Render) -> None:
        self.path = path
        self.render = render
        self._server: asyncio.AbstractServer | None = None
        self._active = 0
        self._ino: tuple[int, int] | None = None  # (dev, ino) of the socket we made

    async def start(self) -> None:
        """Bind and listen (errors.Unavailable if the socket cannot be made). A
        stale socket file of an earlier shim is replaced; anything else there is
        left alone and refused."""
        try:
            # The shim has threads: no umask swap; the sandbox directory is root-only.
            sock = bind_private(self.path, 16, umask=False)
        except (OSError, errors.FailedPrecondition) as exc:
            raise errors.Unavailable(f"cannot serve metrics on {self.path}: {exc}") from exc
        try:
            st = os.lstat(self.path)
            self._ino = (st.st_dev, st.st_ino)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as exc:
            sock.close()
            self._remove()
            raise errors.Unavailable(f"cannot serve metrics on {self.path}: {exc}") from exc

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._remove()

    def _remove(self) -> None:
        """Unlink the socket if it is still the one this server made."""
        if self._ino is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        self._ino = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            reply = await self._answer(reader)
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await asyncio.wait_for(self._read_head(reader), HEAD_TIMEOUT)
        except TimeoutError:
            return _response("408 Request Timeout", b"request timeout\n")
        if head is None:
            return _response("431 Request Header Fields Too Large", b"request too large\n")
        req = parse_head(head)
        if req is None:
            return _response("400 Bad Request", b"bad request\n")
        method, path = req
        if path != "/metrics":
            return _response("404 Not Found", b"not found\n")
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"method not allowed\n")
        try:
            body = await asyncio.wait_for(self.render(), RENDER_TIMEOUT)
        except Exception as exc:
            log.warning("metrics %s: %s", self.path, exc or type(exc).__name__)
            return _response("500 Internal Server Error", b"cannot collect metrics\n")
        return _response("200 OK", body, CONTENT_TYPE, head_only=method == "HEAD")

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
        """The request head (up to the blank line); None if longer than MAX_HEAD.
        A body is never read: a scrape has none."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await reader.read(MAX_HEAD + 1 - len(buf))
            if not chunk:
                raise asyncio.IncompleteReadError(buf, None)
            buf += chunk
            if len(buf) > MAX_HEAD:
                return None if b"\r\n\r\n" not in buf[:MAX_HEAD] else buf
        return buf
