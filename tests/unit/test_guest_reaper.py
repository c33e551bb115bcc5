"""The agent's reaper and non-blocking stdio with real (unprivileged) processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pykata import errors
from pykata.guest.reaper import Reaper, RunResult, exit_code
from pykata.guest.stdio import FdReader, FdWriter

pytestmark = pytest.mark.timeout(30)


@pytest_asyncio.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.install()
    try:
        yield r
    finally:
        r.uninstall()


def test_exit_code() -> None:
    assert exit_code(7 << 8) == 7
    assert exit_code(signal.SIGTERM) == 143
    assert exit_code(signal.SIGKILL) == 137


async def test_run_captures_output_and_status(reaper: Reaper) -> None:
    res = await reaper.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.status, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
    assert res.error_line() == "err"
    assert not res.ok


async def test_run_input(reaper: Reaper) -> None:
    res = await reaper.run(["cat"], input=b"abc")
    assert res.ok and res.stdout == b"abc"


async def test_run_timeout_kills(reaper: Reaper) -> None:
    t0 = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="sleep"):
        await reaper.run(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - t0 < 5


async def test_run_missing_binary(reaper: Reaper) -> None:
    with pytest.raises(errors.Internal, match="cannot run"):
        await reaper.run(["/nonexistent/binary"])


async def test_signal_status_and_many_watchers(reaper: Reaper) -> None:
    pid, fut = reaper.spawn(["sleep", "30"])
    other = reaper.watch(pid)
    os.kill(pid, signal.SIGTERM)
    assert await asyncio.wait_for(fut, 10) == 143
    assert await asyncio.wait_for(other, 10) == 143


async def test_children_get_default_signals(reaper: Reaper) -> None:
    # Python ignores SIGPIPE; a child must not inherit that.
    res = await reaper.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    assert res.ok
    for line in res.stdout.decode().splitlines():
        assert int(line.split()[1], 16) & 0x7FFFFFFF == 0, line  # standard signals


async def test_orphan_status_kept_until_watched(reaper: Reaper) -> None:
    since = time.monotonic()
    pid, fut = reaper.spawn(["true"])
    assert await asyncio.wait_for(fut, 10) == 0
    # An unwatched child: its status waits in the unclaimed table.
    pid2, _ = reaper.spawn(["sh", "-c", "exit 9"])
    reaper._watchers.pop(pid2)
    for _ in range(200):
        if pid2 in reaper._unclaimed:
            break
        await asyncio.sleep(0.01)
    assert await reaper.watch(pid2, since=since) == 9
    # A status older than "since" is stale (a recycled pid): not taken.
    pid3, _ = reaper.spawn(["sh", "-c", "exit 4"])
    reaper._watchers.pop(pid3)
    for _ in range(200):
        if pid3 in reaper._unclaimed:
            break
        await asyncio.sleep(0.01)
    stale = reaper.watch(pid3, since=time.monotonic() + 1)
    assert not stale.done()
    assert pid not in reaper._unclaimed


async def test_fd_reader_long_poll_and_eof() -> None:
    r, w = os.pipe()
    reader = FdReader(r)
    task = asyncio.ensure_future(reader.read(100))
    await asyncio.sleep(0.05)
    assert not task.done()
    os.write(w, b"hello")
    assert await asyncio.wait_for(task, 5) == b"hello"
    os.write(w, b"tail")
    os.close(w)
    assert await reader.read(100) == b"tail"
    assert await reader.read(100) == b""
    assert reader.closed
    assert await reader.read(100) == b""


async def test_fd_reader_close_wakes_reader() -> None:
    r, w = os.pipe()
    reader = FdReader(r)
    task = asyncio.ensure_future(reader.read(100))
    await asyncio.sleep(0.05)
    reader.close()
    assert await asyncio.wait_for(task, 5) == b""
    os.close(w)


async def test_fd_writer_waits_when_full_and_reports_closed_reader() -> None:
    r, w = os.pipe()
    writer = FdWriter(w)
    big = b"x" * (1 << 20)
    task = asyncio.ensure_future(writer.write(big))
    got = 0
    reader = FdReader(r)
    while got < len(big):
        got += len(await reader.read(65536))
    assert await asyncio.wait_for(task, 5) == len(big)
    reader.close()
    with pytest.raises(errors.FailedPrecondition, match="stdin is closed"):
        await writer.write(b"more")
    writer.close()
    with pytest.raises(errors.FailedPrecondition, match="stdin is closed"):
        await writer.write(b"more")


def test_run_result_error_line() -> None:
    assert RunResult(("crun", "x"), 1, b"", b"").error_line() == "crun exited with status 1"
    assert RunResult(("crun",), 1, b"a\nb\n\n", b"").error_line() == "b"
