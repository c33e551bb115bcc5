"""Host processes: start time identity (so a recycled pid is never killed),
terminate-then-kill, and reaping for children and non-children alike."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from pykata.utils import logfile


@dataclass(frozen=True)
class ProcRef:
    """A process by pid and kernel start time (clock ticks since boot)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        st = start_time(pid)
        return None if st is None else cls(pid, st)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start_time

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: dict[str, int] | None) -> ProcRef | None:
        if not data:
            return None
        return cls(int(data["pid"]), int(data["start_time"]))


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such (non-zombie) process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    if rest[0] == "Z":
        return None
    return int(rest[19])


async def wait_gone(ref: ProcRef, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while ref.alive():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


async def terminate(ref: ProcRef, grace: float = 3.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL and wait for it to go.

    Works for processes that are not our children (after a restart); our own
    children must still be reaped by their owner.
    """
    if not ref.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGTERM)
    if await wait_gone(ref, grace):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGKILL)
    await wait_gone(ref, 10.0)


async def stop_child(proc: asyncio.subprocess.Process, grace: float = 3.0) -> int:
    """SIGTERM then SIGKILL an asyncio child and reap it; its exit status."""
    if proc.returncode is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        return await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    return await proc.wait()


def tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    """The last lines of a log file ("" if unreadable), control characters
    replaced (see :func:`pykata.utils.logfile.tail`)."""
    return logfile.tail(path, lines, max_bytes)


def reap(pid: int) -> int | None:
    """Collect ``pid``'s exit if it is our child and has exited: its wait status;
    None if it is not our child or still runs. Never blocks."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done == pid else None
