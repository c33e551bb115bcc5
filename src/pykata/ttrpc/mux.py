"""Many TCP connections over one byte stream: the port-forward channel.

One side opens connections (the host: ``Mux.forward`` with a client socket
it accepted), the other connects them to a local port (the guest: the
``connector`` it was built with). Both sides run the same per-connection
pumps, so half-close and reset travel both ways the same way.

Frame: a 9-byte header, then ``length`` bytes of payload (at most
``MAX_PAYLOAD``)::

    kind    uint8          OPEN OPENED DATA WINDOW EOF RESET
    conn    uint32 BE      connection id, chosen by the opener (never 0)
    length  uint32 BE

| kind | payload | meaning |
|---|---|---|
| OPEN | port uint16 BE, family uint8 (4, 6; 0: 127.0.0.1 then ::1) | connect to it |
| OPENED | - | connected; both sides may now send DATA |
| DATA | bytes | stream bytes, within the sender's credit |
| WINDOW | uint32 BE > 0 | the receiver wrote that many bytes out: more credit |
| EOF | - | the sender's socket reached end of file (half-close) |
| RESET | reason uint8 | the connection is gone (refused, reset, error) |

Flow control: each direction starts with ``WINDOW`` bytes of credit; a
receiver never holds more than that per connection, and a sender that
exceeds it is a protocol violation (the connection is reset). A connection
ends when EOF went both ways, or at the first RESET. Frames for ids that are
not (or no longer) open are ignored and counted. A frame that cannot be
parsed (unknown kind, payload over ``MAX_PAYLOAD``) ends the whole channel:
every connection is reset. Every byte from the peer is validated and bounded;
nothing from it is buffered beyond a connection's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

HEADER = struct.Struct(">BII")
OPEN_BODY = struct.Struct(">HB")
WINDOW_BODY = struct.Struct(">I")
MAX_PAYLOAD = 64 << 10
CHUNK = 32 << 10  # DATA frames we send (a guest write on virtio-serial is capped at 32 KiB)
WINDOW = 256 << 10
MAX_CONNS = 256
OPEN_TIMEOUT = 10.0

FAMILY_ANY = 0  # 127.0.0.1, then ::1 (what a dial of "localhost" gets)
FAMILY_V4 = 4
FAMILY_V6 = 6
FAMILIES = (FAMILY_ANY, FAMILY_V4, FAMILY_V6)


class Kind(enum.IntEnum):
    OPEN = 1
    OPENED = 2
    DATA = 3
    WINDOW = 4
    EOF = 5
    RESET = 6


_KINDS = frozenset(int(k) for k in Kind)


class Reason(enum.IntEnum):
    RESET = 0  # the other end reset or failed
    REFUSED = 1  # nothing listens on that port
    UNREACHABLE = 2  # any other connect error
    TIMEOUT = 3
    LIMIT = 4  # too many connections
    PROTOCOL = 5  # the peer broke the protocol
    CLOSED = 6  # the channel is going away

    @classmethod
    def of(cls, value: int) -> Reason:
        try:
            return cls(value)
        except ValueError:
            return cls.RESET


class ProtocolError(Exception):
    """The stream cannot be parsed any more: the channel ends."""


class OpenFailed(Exception):
    def __init__(self, reason: Reason) -> None:
        super().__init__(f"connection not opened: {reason.name.lower()}")
        self.reason = reason


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Connector = Callable[[int, int], Awaitable[Streams]]


def encode(kind: Kind, conn: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    return HEADER.pack(kind, conn, len(payload)) + payload


def reason_of_error(exc: BaseException) -> Reason:
    """The RESET reason for a failed connect."""
    if isinstance(exc, ConnectionRefusedError):
        return Reason.REFUSED
    if isinstance(exc, TimeoutError):
        return Reason.TIMEOUT
    return Reason.UNREACHABLE


def abort(writer: asyncio.StreamWriter) -> None:
    """Close a TCP stream with a reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    def __init__(self, mux: Mux, cid: int) -> None:
        self.mux = mux
        self.id = cid
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opening = True
        self.credit = mux.window  # bytes we may still send
        self.credit_changed = asyncio.Event()
        self.held = 0  # bytes received and not yet granted back
        self.unacked = 0  # bytes written to our socket since the last WINDOW
        self.flush = asyncio.Event()
        self.eof_in = False
        self.eof_out = False
        self.opened: asyncio.Future[Reason | None] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tasks: list[asyncio.Task[None]] = []
        self.client: Streams | None = None  # the opener's socket, started at OPENED

    def start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opening = False
        self.tasks = [asyncio.ensure_future(self._outbound()),
                      asyncio.ensure_future(self._acks())]

    async def _outbound(self) -> None:
        """Our socket -> the channel, within the credit the peer gave."""
        assert self.reader is not None
        try:
            while True:
                while self.credit <= 0:
                    self.credit_changed.clear()
                    await self.credit_changed.wait()
                data = await self.reader.read(min(self.credit, CHUNK))
                if not data:
                    break
                self.credit -= len(data)
                await self.mux.send(Kind.DATA, self.id, data)
        except (ConnectionError, OSError):
            self.mux.reset(self, Reason.RESET)
            return
        self.eof_out = True
        await self.mux.send(Kind.EOF, self.id)
        self.mux.maybe_finish(self)

    async def _acks(self) -> None:
        """Bytes that left for our socket become the peer's credit again."""
        assert self.writer is not None
        try:
            while True:
                await self.flush.wait()
                self.flush.clear()
                await self.writer.drain()
                n, self.unacked = self.unacked, 0
                self.held -= n
                if n and not self.eof_in:
                    await self.mux.send(Kind.WINDOW, self.id, WINDOW_BODY.pack(n))
        except (ConnectionError, OSError):
            self.mux.reset(self, Reason.RESET)


class Mux:
    """One channel. ``run()`` reads it until it ends; ``forward()`` (opener)
    carries one accepted connection; with ``connector`` the peer's OPENs are
    connected locally."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 connector: Connector | None = None, name: str = "portfwd",
                 window: int = WINDOW, max_conns: int = MAX_CONNS,
                 open_timeout: float = OPEN_TIMEOUT) -> None:
        self.reader = reader
        self.writer = writer
        self.connector = connector
        self.name = name
        self.window = window
        self.max_conns = max_conns
        self.open_timeout = open_timeout
        self.conns: dict[int, _Conn] = {}
        self.closed = False
        self._next = 0
        self.stats = {"opened": 0, "failed": 0, "ignored": 0, "violations": 0}

    # -- sending ---------------------------------------------------------------------
    async def send(self, kind: Kind, cid: int, payload: bytes = b"") -> None:
        if self.closed:
            raise ConnectionResetError("the port-forward channel is closed")
        self.writer.write(encode(kind, cid, payload))
        await self.writer.drain()

    def _send_now(self, kind: Kind, cid: int, payload: bytes = b"") -> None:
        """A control frame from the read loop (no waiting: bounded by the
        connections that exist, one RESET or OPENED each)."""
        if not self.closed:
            self.writer.write(encode(kind, cid, payload))

    # -- the opener --------------------------------------------------------------------
    def _new_id(self) -> int:
        for _ in range(self.max_conns + 1):
            self._next = self._next % 0xFFFFFFFF + 1
            if self._next not in self.conns:
                return self._next
        raise OpenFailed(Reason.LIMIT)

    async def forward(self, port: int, family: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Carry one connection to the peer's ``port``; returns when it ended.
        OpenFailed if the peer could not connect (the caller resets its client)."""
        if self.closed:
            raise OpenFailed(Reason.CLOSED)
        if len(self.conns) >= self.max_conns:
            raise OpenFailed(Reason.LIMIT)
        conn = _Conn(self, self._new_id())
        conn.client = (reader, writer)
        self.conns[conn.id] = conn
        try:
            await self.send(Kind.OPEN, conn.id, OPEN_BODY.pack(port, family))
            reason = await asyncio.wait_for(asyncio.shield(conn.opened), self.open_timeout)
        except TimeoutError:
            self.reset(conn, Reason.TIMEOUT)
            raise OpenFailed(Reason.TIMEOUT) from None
        except (ConnectionError, OSError):
            self._drop(conn)
            raise OpenFailed(Reason.CLOSED) from None
        except BaseException:
            self.reset(conn, Reason.CLOSED)
            raise
        if reason is not None:
            self.stats["failed"] += 1
            raise OpenFailed(reason)
        self.stats["opened"] += 1
        try:
            await asyncio.shield(conn.done)
        except asyncio.CancelledError:
            self.reset(conn, Reason.CLOSED)
            raise

    # -- the read loop ---------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(HEADER.size)
                kind, cid, length = HEADER.unpack(head)
                if length > MAX_PAYLOAD:
                    raise ProtocolError(f"frame of {length} bytes (at most {MAX_PAYLOAD})")
                if kind not in _KINDS:
                    raise ProtocolError(f"unknown frame kind {kind}")
                payload = await self.reader.readexactly(length) if length else b""
                self._dispatch(Kind(kind), cid, payload)
        except asyncio.IncompleteReadError:
            log.debug("%s: channel closed by the peer", self.name)
        except (ConnectionError, OSError) as exc:
            log.info("%s: channel broke: %s", self.name, exc)
        except ProtocolError as exc:
            self.stats["violations"] += 1
            log.warning("%s: closing the channel: %s", self.name, exc)
        finally:
            self.close()

    def _dispatch(self, kind: Kind, cid: int, payload: bytes) -> None:
        if kind is Kind.OPEN:
            self._on_open(cid, payload)
            return
        conn = self.conns.get(cid)
        if conn is None:
            self.stats["ignored"] += 1  # e.g. in flight when we reset it
            return
        if kind is Kind.RESET:
            reason = Reason.of(payload[0]) if len(payload) == 1 else Reason.RESET
            if conn.opening and not conn.opened.done():
                conn.opened.set_result(reason)
                self._drop(conn)
            else:
                self._abort(conn)
        elif kind is Kind.OPENED:
            if (not conn.opening or conn.client is None or payload
                    or conn.opened.done()):
                self._violation(conn, "unexpected OPENED")
            else:
                conn.start(*conn.client)  # before any DATA that follows is read
                conn.opened.set_result(None)
        elif kind is Kind.DATA:
            if conn.opening or conn.eof_in or not payload:
                self._violation(conn, "DATA before OPENED, after EOF or empty")
            elif conn.held + len(payload) > self.window:
                self._violation(conn, f"DATA beyond the window ({conn.held} + {len(payload)})")
            else:
                assert conn.writer is not None
                conn.held += len(payload)
                conn.unacked += len(payload)
                conn.writer.write(payload)
                conn.flush.set()
        elif kind is Kind.WINDOW:
            n = WINDOW_BODY.unpack(payload)[0] if len(payload) == WINDOW_BODY.size else 0
            if n <= 0 or conn.opening or conn.credit + n > self.window:
                self._violation(conn, "bad WINDOW")
            else:
                conn.credit += n
                conn.credit_changed.set()
        elif kind is Kind.EOF:
            if conn.opening or conn.eof_in or payload:
                self._violation(conn, "unexpected EOF")
            else:
                assert conn.writer is not None
                conn.eof_in = True
                if conn.writer.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        conn.writer.write_eof()  # after what is buffered: a half-close
                self.maybe_finish(conn)

    def _on_open(self, cid: int, payload: bytes) -> None:
        if self.connector is None or cid == 0 or cid in self.conns:
            self.stats["violations"] += 1
            if cid and cid not in self.conns:
                self._send_now(Kind.RESET, cid, bytes([Reason.PROTOCOL]))
            return
        if len(payload) != OPEN_BODY.size:
            self.stats["violations"] += 1
            self._send_now(Kind.RESET, cid, bytes([Reason.PROTOCOL]))
            return
        port, family = OPEN_BODY.unpack(payload)
        if port == 0 or family not in FAMILIES:
            self.stats["violations"] += 1
            self._send_now(Kind.RESET, cid, bytes([Reason.PROTOCOL]))
            return
        if len(self.conns) >= self.max_conns:
            self.stats["failed"] += 1
            self._send_now(Kind.RESET, cid, bytes([Reason.LIMIT]))
            return
        conn = _Conn(self, cid)
        self.conns[cid] = conn
        conn.tasks = [asyncio.ensure_future(self._connect(conn, port, family))]

    async def _connect(self, conn: _Conn, port: int, family: int) -> None:
        assert self.connector is not None
        try:
            reader, writer = await asyncio.wait_for(self.connector(port, family),
                                                    self.open_timeout)
        except (OSError, TimeoutError) as exc:
            self.stats["failed"] += 1
            if self.conns.get(conn.id) is conn:
                self._send_now(Kind.RESET, conn.id, bytes([reason_of_error(exc)]))
                self._drop(conn)
            return
        if self.conns.get(conn.id) is not conn or self.closed:
            abort(writer)  # reset by the opener while we connected
            return
        self.stats["opened"] += 1
        conn.tasks = []
        conn.start(reader, writer)
        self._send_now(Kind.OPENED, conn.id)

    # -- ending connections ------------------------------------------------------------------
    def _violation(self, conn: _Conn, what: str) -> None:
        self.stats["violations"] += 1
        if self.stats["violations"] <= 10:
            log.warning("%s: connection %d reset: %s", self.name, conn.id, what)
        self.reset(conn, Reason.PROTOCOL)

    def reset(self, conn: _Conn, reason: Reason) -> None:
        """End ``conn`` with a reset both ways (idempotent)."""
        if self.conns.get(conn.id) is not conn:
            return
        self._send_now(Kind.RESET, conn.id, bytes([reason]))
        self._abort(conn)

    def _abort(self, conn: _Conn) -> None:
        if conn.writer is not None:
            abort(conn.writer)
        if not conn.opened.done():
            conn.opened.set_result(Reason.RESET)
        self._drop(conn)

    def maybe_finish(self, conn: _Conn) -> None:
        """EOF went both ways: close our socket (after what is buffered)."""
        if conn.eof_in and conn.eof_out and self.conns.get(conn.id) is conn:
            assert conn.writer is not None
            conn.writer.close()
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if self.conns.get(conn.id) is conn:
            del self.conns[conn.id]
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current:
                t.cancel()
        if not conn.done.done():
            conn.done.set_result(None)

    def close(self) -> None:
        """End the channel: every connection is reset."""
        if self.closed:
            return
        for conn in list(self.conns.values()):
            self._abort(conn)
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()
