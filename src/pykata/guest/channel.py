"""Where the agent listens: ``unix:PATH`` (development), ``vsock:PORT`` (any
CID), ``serial:NAME`` (the virtio-serial port named NAME) or ``auto`` (PID 1
without a channel: the port ``wire.SERIAL_PORT_NAME`` if the VM has one, else
vsock port ``wire.VSOCK_PORT``).

Cheap to import (the agent parses its channel before the serving code is
loaded); serving on a channel is :mod:`pykata.guest.server`'s job. Until the
serving code is imported, :class:`EarlyHealth` answers the host's Health/Check
on the serial port (stdlib builtins only) and hands the open port, with what
it read past the Checks, to the server.
"""

from __future__ import annotations

import os
import time

from pykata import wire

# Guest uptime (CLOCK_BOOTTIME) of the agent's boot steps, for its "boot:" line.
BOOT_STAMPS: dict[str, float] = {}


def stamp(name: str) -> float:
    """Record the guest uptime of a boot step once; the recorded value."""
    return BOOT_STAMPS.setdefault(name, time.clock_gettime(time.CLOCK_BOOTTIME))

VIRTIO_PORTS = "/sys/class/virtio-ports"


class Channel:
    """Where the agent listens: kind "unix", "vsock", "serial" or "auto"."""

    __slots__ = ("address", "kind")

    def __init__(self, kind: str, address: str = "") -> None:
        self.kind = kind
        self.address = address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channel) and (self.kind, self.address) == (
            other.kind, other.address)

    def __hash__(self) -> int:
        return hash((self.kind, self.address))

    def __repr__(self) -> str:
        return f"Channel({self.kind!r}, {self.address!r})"

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}" if self.address else self.kind


def parse_channel(text: str) -> Channel:
    """``unix:/path``, ``vsock:PORT``, ``serial:NAME`` or ``auto``."""
    if text == "auto":
        return Channel("auto")
    kind, sep, addr = text.partition(":")
    if not sep or not addr:
        raise ValueError(f"invalid channel {text!r}: expected unix:PATH, vsock:PORT or "
                         "serial:NAME")
    if kind == "unix":
        return Channel("unix", addr)
    if kind == "vsock":
        port = addr.rpartition(":")[2]  # accept vsock:CID:PORT too; the CID is ignored
        if not port.isdigit() or not 0 < int(port) < 2**32:
            raise ValueError(f"invalid vsock port {addr!r}")
        return Channel("vsock", port)
    if kind == "serial":
        return Channel("serial", addr)
    raise ValueError(f"unknown channel kind {kind!r} (unix, vsock or serial)")


def find_serial_port(name: str, ports_dir: str = VIRTIO_PORTS) -> str | None:
    """/dev/vportNpM of the virtio-serial port called ``name``, if present."""
    try:
        entries = sorted(os.listdir(ports_dir))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(ports_dir, entry, "name")) as f:
                port_name = f.read().strip()
        except OSError:
            continue
        if port_name == name:
            dev = f"/dev/{entry}"
            return dev if os.path.exists(dev) else None
    return None


def vsock_available() -> bool:
    import socket

    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


SERIAL = Channel("serial", wire.SERIAL_PORT_NAME)
VSOCK = Channel("vsock", str(wire.VSOCK_PORT))


def probe_auto(vsock: bool) -> Channel | None:
    """One look for the ``auto`` channel: the serial port if present, else vsock
    when ``vsock`` (the serial port had its time to show up) and available."""
    if find_serial_port(SERIAL.address):
        return SERIAL
    if vsock and vsock_available():
        return VSOCK
    return None


# -- the early Health/Check responder -------------------------------------------------

_HEADER = 10  # ttRPC frame header: length u32, stream id u32, type u8, flags u8
_TYPE_REQUEST = 1
_TYPE_RESPONSE = 2
# Response{payload: HealthCheckResponse{status: SERVING}}: field 2 (bytes) holding
# field 1 (varint) = 1. The same bytes the full service's protobuf answer has.
CHECK_RESPONSE = b"\x12\x02\x08\x01"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def request_method(data: bytes) -> tuple[str, str]:
    """(service, method) of a ttRPC Request message (fields 1 and 2), without
    protobuf; ValueError if it is not well formed."""
    service = method = ""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            if field in (1, 2):
                text = data[pos:pos + size].decode()
                if field == 1:
                    service = text
                else:
                    method = text
            pos += size
        else:
            raise ValueError(f"wire type {kind}")
        if pos > len(data):
            raise ValueError("truncated field")
    return service, method


def check_reply(buffer: bytes) -> tuple[bytes, int] | None:
    """If ``buffer`` starts with a whole Health/Check request frame: (the response
    frame, bytes consumed). None for anything else (another call, another frame
    type, a frame not complete yet): that is the full server's to read."""
    if len(buffer) < _HEADER:
        return None
    length = int.from_bytes(buffer[0:4], "big")
    stream = int.from_bytes(buffer[4:8], "big")
    if buffer[8] != _TYPE_REQUEST or stream % 2 == 0 or len(buffer) < _HEADER + length:
        return None
    try:
        service, method = request_method(buffer[_HEADER:_HEADER + length])
    except ValueError:
        return None
    if service != wire.HEALTH_SERVICE or method != "Check":
        return None
    reply = (len(CHECK_RESPONSE).to_bytes(4, "big") + stream.to_bytes(4, "big")
             + bytes((_TYPE_RESPONSE, 0)) + CHECK_RESPONSE)
    return reply, _HEADER + length


class EarlyHealth:
    """Answers Health/Check on the virtio-serial port ``name`` from a thread while
    the agent imports its serving code, so the host knows the guest is up a second
    sooner. It answers nothing else: the first other request (and everything after
    it) stays unread in the port or in :attr:`buffer` until :meth:`handover` gives
    the port to the full server, which then serves it; a CreateSandbox sent right
    after the Check waits for the full service, it never fails for being early.

    Only builtin modules (``_thread``, ``select``, ``posix``): nothing slow to import.
    """

    POLL_MS = 20

    def __init__(self, name: str, ports_dir: str = VIRTIO_PORTS) -> None:
        self.name = name
        self.ports_dir = ports_dir
        self.fd = -1
        self.device = ""
        self.buffer = b""
        self.answered = 0
        self.error = ""
        self._stop = False
        self._blocked = False  # a request that is not a Check is waiting
        import _thread

        self._done = _thread.allocate_lock()

    def start(self) -> None:
        import _thread

        self._done.acquire()
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the full server takes over whatever happened
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.release()

    def _serve(self) -> None:
        import select

        while self.fd < 0:
            if self._stop:
                return
            dev = find_serial_port(self.name, self.ports_dir)
            if dev is not None:
                try:
                    self.fd = os.open(dev, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                    self.device = dev
                    stamp("port_open")
                    break
                except OSError:
                    pass
            time.sleep(0.005)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop and not self._blocked:
            events = poller.poll(self.POLL_MS)
            if self._stop:
                return
            if not events:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # no host on the port yet (virtio-serial reads EOF then)
                time.sleep(self.POLL_MS / 1000)
                continue
            self.buffer += chunk
            while True:
                reply = check_reply(self.buffer)
                if reply is None:
                    break
                self._write(reply[0])
                self.buffer = self.buffer[reply[1]:]
                self.answered += 1
                stamp("early_check")
            if len(self.buffer) >= _HEADER and check_reply(self.buffer) is None:
                length = int.from_bytes(self.buffer[0:4], "big")
                if len(self.buffer) >= _HEADER + length or self.buffer[8] != _TYPE_REQUEST:
                    self._blocked = True  # not ours: leave it (and what follows) alone

    def _write(self, data: bytes) -> None:
        import select

        while data:
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                select.select([], [self.fd], [], 0.1)

    def handover(self, timeout: float = 5.0) -> tuple[str, int, bytes] | None:
        """Stop answering; (device, open fd, bytes read but not answered) for the
        full server, or None if the port was never opened."""
        self._stop = True
        if self._done.acquire(timeout=timeout):
            self._done.release()
        else:  # cannot happen short of a wedged write: the server opens the port itself
            return None
        if self.fd < 0:
            return None
        return self.device, self.fd, self.buffer
