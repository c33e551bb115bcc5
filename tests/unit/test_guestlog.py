"""Guest logs on the host (issue 18): the line sanitiser, the token bucket,
following a capped, rotating console log, and the relay into the shim's log."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from pykata.shim import guestlog
from pykata.shim.guestlog import GuestLogRelay, LogFollower, TokenBucket, read_lines, sanitise
from pykata.utils.logfile import CappedLog


def test_sanitise_escapes_controls_and_caps_length() -> None:
    assert sanitise(b"plain line\r") == "plain line"
    assert sanitise(b"\x1b[2Jclear\x07") == "\\x1b[2Jclear\\x07"
    assert sanitise(b"tab\there") == "tab\\there"
    assert sanitise("bidi \u202e evil".encode()) == "bidi \\u202e evil"
    assert sanitise(b"bad \xff byte") == "bad \ufffd byte"
    long = sanitise(b"x" * 5000, limit=100)
    assert long.startswith("x" * 100 + "...") and "5000 bytes" in long and len(long) < 130
    nuls = sanitise(b"\x00" * 300, limit=100)  # the cap is on what is printed
    assert nuls.startswith("\\x00" * 25 + "...") and len(nuls) < 120


def test_token_bucket_burst_then_rate() -> None:
    now = [100.0]
    b = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [b.take() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.35  # 3.5 tokens
    assert [b.take() for _ in range(4)] == [True] * 3 + [False]
    now[0] += 1000  # never more than the burst
    assert sum(b.take() for _ in range(20)) == 5
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


def test_follower_reads_lines_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    f = LogFollower(path)
    assert f.poll() == []  # not there yet
    log = CappedLog(path, max_bytes=40)
    log.write(b"first line\nsecond ")
    assert f.poll() == [b"first line"]
    # The partial line ends after the move to .1; more rotations follow at once.
    log.write(b"half\n" + b"".join(b"line %02d\n" % i for i in range(12)))
    got = f.poll()
    log.close()
    assert got[0] == b"second half"
    # Only one rotated copy is kept: lines may be lost when the file turns over
    # twice between polls, never repeated or garbled.
    numbers = [int(x.split()[1]) for x in got[1:]]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 11
    assert f.poll() == []
    f.close()


def test_follower_one_rotation_between_polls_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = CappedLog(path, max_bytes=100)
    f = LogFollower(path)
    got: list[bytes] = []
    for i in range(40):
        log.write(b"line %02d\n" % i)  # 8 bytes: a rotation every 12 or 13 lines
        if i % 5 == 4:
            got += f.poll()
    log.close()
    got += f.poll()
    assert got == [b"line %02d" % i for i in range(40)]
    f.close()


def test_follower_caps_long_lines_and_reads_bounded(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"a" * 10000 + b"\nshort\n" + b"b\n" * 1000)
    f = LogFollower(path, max_line=100, max_poll_bytes=1000)
    first = f.poll()
    assert first[0] == b"a" * 400 + b" [line cut]" and b"short" not in first
    rest: list[bytes] = []
    for _ in range(100):
        lines = f.poll()
        if not lines and rest:
            break
        rest += lines
    assert rest[0] == b"short" and rest[1:] == [b"b"] * 1000
    f.close()


def test_follower_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"do not read\n")
    os.symlink(target, tmp_path / "console.log")
    f = LogFollower(tmp_path / "console.log")
    assert f.poll() == []
    os.symlink(target, tmp_path / "c2.log.1")
    (tmp_path / "c2.log").write_bytes(b"mine\n")
    assert list(read_lines(tmp_path / "c2.log")) == [b"mine"]


def test_follower_from_end(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    f = LogFollower(path, from_end=True)
    assert f.poll() == []
    with path.open("ab") as w:
        w.write(b"new\n")
    assert f.poll() == [b"new"]
    f.close()


def test_relay_marks_lines_and_notes_drops(caplog: pytest.LogCaptureFixture) -> None:
    relay = GuestLogRelay("sb1", rate=1, burst=3)
    now = [0.0]
    relay.bucket = TokenBucket(rate=1, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="pykata.shim.guestlog"):
        relay.relay([b"l%d" % i for i in range(10)] + [b"   "])
        now[0] += 1.0
        relay.relay([b"after \x1b"])
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["guest sandbox=sb1: l0", "guest sandbox=sb1: l1", "guest sandbox=sb1: l2",
                    "guest sandbox=sb1: 7 lines dropped (more than 1 a second)",
                    "guest sandbox=sb1: after \\x1b"]


async def test_relay_companion_follows_the_console(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    class Sb:
        dir = tmp_path
        vm = None

    (tmp_path / "console.log").write_bytes(b"boot line\n")
    relay = GuestLogRelay("sb2", interval=0.01)
    with caplog.at_level(logging.INFO, logger="pykata.shim.guestlog"):
        await relay.start(Sb(), {})
        for _ in range(500):
            if relay.relayed:
                break
            await asyncio.sleep(0.01)
        with (tmp_path / "console.log").open("ab") as w:
            w.write(b"last words\n")
        await relay.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["guest sandbox=sb2: boot line", "guest sandbox=sb2: last words"]
    assert guestlog.RATE == 50 and guestlog.BURST == 200
