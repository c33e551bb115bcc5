"""Reading a file whose size nobody vouches for."""

from __future__ import annotations

import os


def read_capped(fd: int, limit: int) -> bytes:
    """What ``fd`` holds from its offset, at most ``limit + 1`` bytes: more than
    ``limit`` means the file is too large (the caller says so), and never more
    than that is read into memory. OSError as ``os.read`` raises it."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = os.read(fd, limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
