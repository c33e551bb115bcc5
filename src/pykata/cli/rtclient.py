"""Calls from `pykata-runtime` and its stand-ins to a container's keeper (the shim)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

from google.protobuf import message as pb_message

from pykata.ttrpc import Client

TASK = "containerd.task.v2.Task"
M = TypeVar("M", bound=pb_message.Message)


def socket_of(state_dir: Path) -> Path:
    return state_dir / "task.sock"


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
