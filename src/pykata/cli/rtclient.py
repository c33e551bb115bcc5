"""Calls from `pykata-runtime` and its stand-ins to a container's keeper (the shim)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from google.protobuf import message as pb_message

from pykata.ttrpc import Client

TASK = "containerd.task.v2.Task"
M = TypeVar("M", bound=pb_message.Message)


SHORT_SOCKET_DIR = Path("/run/pykata-runtime/s")
_MAX_SOCKET_PATH = 100  # AF_UNIX allows 107 bytes


def socket_of(state_dir: Path) -> Path:
    """The keeper's socket: in the state dir, or, when that path would be too long
    for AF_UNIX (Docker passes a deep --root), a short path derived from it."""
    path = state_dir / "task.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    import hashlib

    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:32]
    return SHORT_SOCKET_DIR / f"{digest}.sock"


async def acall(state_dir: Path, method: str, req: pb_message.Message, resp: type[M],
                timeout: float | None = 30.0) -> M:
    client = await Client.connect_unix(socket_of(state_dir))
    try:
        return await client.call(TASK, method, req, resp, timeout=timeout)
    finally:
        await client.close()


def call(state_dir: Path, method: str, req: pb_message.Message, resp: type[M],
         timeout: float | None = 30.0) -> M:
    return asyncio.run(acall(state_dir, method, req, resp, timeout))
