"""Where the agent listens: ``unix:PATH`` (development), ``vsock:PORT`` (any
CID), ``serial:NAME`` (the virtio-serial port named NAME) or ``auto`` (PID 1
without a channel: the port ``wire.SERIAL_PORT_NAME`` if the VM has one, else
vsock port ``wire.VSOCK_PORT``).

Cheap to import (the agent parses its channel before the serving code is
loaded); serving on a channel is :mod:`pykata.guest.server`'s job.
"""

from __future__ import annotations

import os

from pykata import wire

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
