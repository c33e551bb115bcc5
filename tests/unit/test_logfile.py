"""Capped host logs fed by untrusted bytes: cap and rotation, safe creation,
draining a pipe or socket, tail with control characters replaced."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from pykata.utils import logfile
from pykata.utils.process import tail


def on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, logfile.rotated(path)) if p.exists())


def test_cap_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    with logfile.CappedLog(path, 1000) as log:
        for i in range(500):
            log.write(f"line {i:04d}\n".encode())  # 10 bytes each: 5000 in all
            assert path.stat().st_size <= 1000
            assert on_disk(path) <= 2000
        assert log.written == 5000
    assert path.read_bytes().endswith(b"line 0499\n")
    older = logfile.rotated(path).read_bytes()
    assert len(older) == 1000 and older.endswith(b"line 0399\n")
    # A single write bigger than the cap is split; still at most twice the cap.
    with logfile.CappedLog(path, 1000) as log:
        log.write(b"y" * 10_000)
    assert on_disk(path) <= 2000
    assert path.read_bytes() == b"y" * 1000


def test_files_are_private_and_never_followed(tmp_path: Path) -> None:
    path = tmp_path / "qemu.log"
    with logfile.CappedLog(path, 100) as log:
        log.write(b"a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with logfile.CappedLog(path, 100) as log:  # ours from before: appended to
        log.write(b"b")
    assert path.read_bytes() == b"ab"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link.log"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        logfile.CappedLog(link, 100)
    hard = tmp_path / "hard.log"
    os.link(victim, hard)
    with pytest.raises(PermissionError, match="not a private regular file"):
        logfile.CappedLog(hard, 100)
    # A symlink planted as the rotated name is replaced, not written through.
    path2 = tmp_path / "c.log"
    logfile.rotated(path2).symlink_to(victim)
    with logfile.CappedLog(path2, 10) as log:
        log.write(b"0123456789abc")
    assert victim.read_text() == "keep"
    assert not logfile.rotated(path2).is_symlink()


def test_tail_sanitizes_and_reads_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    with logfile.CappedLog(path, 64) as log:
        log.write(b"first line\n" * 5)  # 55 bytes
        log.write(b"\x1b[2J\x1b]0;pwned\x07evil\r\n\tok\xe2\x80\xaeabc\n")  # rotates
    out = tail(path, 3)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\u202e" not in out  # bidi override
    lines = out.splitlines()
    assert lines[-1] == "\tok?abc"
    assert lines[-2] == "?[2J?]0;pwned?evil?"
    assert lines[-3] == "first line"  # from console.log.1
    assert tail(tmp_path / "absent.log") == ""
    assert tail(tmp_path) == ""  # a directory: nothing


def test_drain_a_socket_flood_stays_capped(tmp_path: Path) -> None:
    path = tmp_path / "console.log"

    async def main() -> int:
        ours, theirs = socket.socketpair()
        log = logfile.CappedLog(path, 256 << 10)
        task = asyncio.ensure_future(logfile.drain(ours.detach(), log))

        def flood() -> None:
            chunk = b"x" * 65536
            for _ in range(160):  # 10 MiB
                theirs.sendall(chunk)
            theirs.close()

        await asyncio.gather(asyncio.to_thread(flood), task)
        assert log.closed
        return task.result()

    assert asyncio.run(main()) == 10 << 20
    assert path.stat().st_size <= 256 << 10
    assert on_disk(path) <= 512 << 10


def test_drain_a_pipe_until_eof_and_cancel(tmp_path: Path) -> None:
    async def main() -> None:
        r, w = os.pipe()
        log = logfile.CappedLog(tmp_path / "a.log", 1 << 20)
        task = asyncio.ensure_future(logfile.drain(r, log))
        os.write(w, b"hello\n")
        await asyncio.sleep(0.05)
        assert (tmp_path / "a.log").read_bytes() == b"hello\n"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log.closed
        with pytest.raises(OSError):
            os.fstat(r)  # closed by drain
        os.close(w)

    asyncio.run(main())
