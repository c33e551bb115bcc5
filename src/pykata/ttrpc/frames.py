"""ttRPC framing: a 10-byte big-endian header, then the message data.

    +----------------+----------------+--------+--------+------------------+
    | length (u32)   | stream id (u32)| type u8| flags u8| data (length)   |
    +----------------+----------------+--------+--------+------------------+
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from pykata import errors

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_DATA = 4 << 20  # 4 MiB
# A frame announcing more than this is no message a sane peer sends: the
# connection is given up instead of reading (and discarding) up to 4 GiB.
MAX_DISCARD = 4 * MAX_DATA

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes
    oversize: int = 0  # >0: the peer sent this many bytes, more than MAX_DATA; data dropped


def encode(stream_id: int, type_: int, data: bytes, flags: int = 0) -> bytes:
    """One frame as bytes. The caller checks the size limit first."""
    return HEADER.pack(len(data), stream_id, type_, flags) + data


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read one frame. Raises asyncio.IncompleteReadError at EOF (also mid-frame).

    A frame larger than MAX_DATA is read in small chunks and thrown away, so the
    stream stays in sync; the returned Frame has ``oversize`` set and no data.
    One larger than MAX_DISCARD raises ResourceExhausted: the caller closes the
    connection. Nothing larger than MAX_DATA is ever buffered.
    """
    header = await reader.readexactly(HEADER_SIZE)
    length, stream_id, type_, flags = HEADER.unpack(header)
    if length > MAX_DISCARD:
        raise errors.ResourceExhausted(
            f"ttrpc frame of {length} bytes on stream {stream_id} (maximum {MAX_DATA}):"
            " closing the connection")
    if length > MAX_DATA:
        remaining = length
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 16))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(chunk)
        return Frame(stream_id, type_, flags, b"", oversize=length)
    data = await reader.readexactly(length) if length else b""
    return Frame(stream_id, type_, flags, data)
