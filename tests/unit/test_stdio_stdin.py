"""The shim's stdin relay opens containerd's stdin fifo without a thread: a
client whose writer is gone before the shim looks (ctr exec with nothing on its
stdin) must not leave a thread blocked in open(2) for every exec."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, cast

from pykata.runtime.types import Stdio
from pykata.shim.stdio import StdioRelay


class FakeProc:
    def __init__(self) -> None:
        self.data = b""
        self.closed = asyncio.Event()

    async def write_stdin(self, data: bytes) -> None:
        self.data += data

    async def close_stdin(self) -> None:
        self.closed.set()


def _relay(fifo: Path) -> tuple[StdioRelay, FakeProc]:
    proc = FakeProc()
    return StdioRelay(cast(Any, proc), Stdio(stdin=str(fifo))), proc


async def test_a_writer_that_comes_later_is_relayed_then_eof(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    relay, proc = _relay(fifo)
    relay.start()
    await asyncio.sleep(0.4)  # the relay polls: no writer yet
    assert not proc.closed.is_set()
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"hello")
    os.close(fd)
    await asyncio.wait_for(proc.closed.wait(), 5)
    assert proc.data == b"hello"
    await relay.stop()


async def test_a_writer_there_first_is_relayed(tmp_path: Path) -> None:
    fifo = tmp_path / "stdin"
    os.mkfifo(fifo)
    keep = os.open(fifo, os.O_RDWR)  # as containerd's fifo library opens it
    fd = os.open(fifo, os.O_WRONLY)
    relay, proc = _relay(fifo)
    relay.start()
    await asyncio.sleep(0.1)
    os.close(keep)
    os.write(fd, b"abc")
    os.close(fd)
    await asyncio.wait_for(proc.closed.wait(), 5)
    assert proc.data == b"abc"
    await relay.stop()


async def test_no_writer_ever_leaves_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    relays = []
    for i in range(5):
        fifo = tmp_path / f"stdin{i}"
        os.mkfifo(fifo)
        relay, proc = _relay(fifo)
        relay.start()
        relays.append((relay, proc))
    await asyncio.sleep(0.3)
    for p in tmp_path.iterdir():
        p.unlink()  # the client went away and removed its fifos
    assert threading.active_count() == before
    for relay, proc in relays:
        await relay.stop()
        assert not proc.closed.is_set()
    assert threading.active_count() == before
