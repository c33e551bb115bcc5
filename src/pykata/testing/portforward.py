"""A client of the CRI streaming server's port-forward protocol (websocket).

The kubelet hands the URL that CRI ``PortForward`` returns to the API
server, which the client then reaches (kubectl speaks SPDY; the streaming
server equally accepts a websocket). One websocket is one forwarded
connection per requested port: ``GET <url>?port=N`` upgraded with
subprotocol ``v4.channel.k8s.io``; every binary message starts with a
channel byte: 0 is the data of the (first) port, 1 its error text. The
server's first message on each channel is the port, uint16 little-endian.
Closing the websocket ends the connection (containerd then closes its
dial after at most a second).

Test and benchmark use only (blocking sockets; one sender thread may run
beside one receiver), loopback URLs only.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import urllib.parse

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
MAX_MESSAGE = 16 << 20


class PortForwardError(Exception):
    pass


class ForwardedConnection:
    """One connection to ``port`` of the pod behind ``url``."""

    def __init__(self, url: str, port: int, timeout: float = 30.0) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise PortForwardError(f"not a loopback http streaming URL: {url}")
        self.port = port
        self.error = b""
        self._preamble: set[int] = {DATA, ERROR}  # channels whose port prefix is unread
        self._buf = b""
        self._send_lock = threading.Lock()
        self._closed = False
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + "?" + urllib.parse.urlencode({"port": port})
        request = (f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n")
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk or len(head) > 65536:
                raise PortForwardError(f"no websocket upgrade from {url}: {head[:200]!r}")
            head += chunk
        head, _, self._buf = head.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise PortForwardError(f"streaming server refused the upgrade: {head[:300]!r}")

    # -- websocket frames -----------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _frame(self) -> tuple[int, bool, bytes]:
        b0, b1 = self._recv_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._recv_exact(8))[0]
        if n > MAX_MESSAGE:
            raise PortForwardError(f"websocket frame of {n} bytes")
        mask = self._recv_exact(4) if b1 & 0x80 else b""
        data = self._recv_exact(n)
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        return b0 & 0x0F, bool(b0 & 0x80), data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        m = int.from_bytes(mask * (n // 4 + 1), "little").to_bytes((n // 4 + 1) * 4, "little")
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes(m[:n], "little")
                  ).to_bytes(n, "little") if n else b""
        with self._send_lock:
            self.sock.sendall(head + mask + masked)

    # -- the port's streams ------------------------------------------------------------------
    def send(self, data: bytes, chunk: int = 32 << 10) -> None:
        for i in range(0, len(data), chunk):
            self._send_frame(OP_BINARY, bytes([DATA]) + data[i:i + chunk])

    def recv(self) -> bytes:
        """The next data bytes; b"" once the connection ended (see ``error``)."""
        message = b""
        while True:
            try:
                op, fin, payload = self._frame()
            except (EOFError, OSError):
                return b""
            if op == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if op == OP_CLOSE:
                return b""
            if op in (OP_BINARY, OP_TEXT, OP_CONT):
                message += payload
                if not fin:
                    continue
                if not message:
                    continue
                channel, body = message[0], message[1:]
                message = b""
                if channel in self._preamble:
                    self._preamble.discard(channel)
                    body = body[2:]  # the port, uint16 little-endian
                if channel == ERROR:
                    self.error += body[:4096]
                    continue
                if channel == DATA and body:
                    return body

    def recv_all(self, limit: int = 1 << 30) -> bytes:
        out = bytearray()
        while len(out) < limit:
            data = self.recv()
            if not data:
                break
            out += data
        return bytes(out)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._send_frame(OP_CLOSE, struct.pack(">H", 1000))
            except OSError:
                pass
            self.sock.close()

    def __enter__(self) -> ForwardedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
