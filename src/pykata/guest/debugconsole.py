"""The debug console: processes in the guest outside any container.

`pykata exec SANDBOX` reaches them through the shim (DebugExec, then the usual
stdio, signal, resize and wait calls with container_id ""). They run as the
agent's children in the guest's own namespaces and root, with a pty (a session
of their own, the pty their controlling terminal) or pipes. Allowed only when
the sandbox was created with ``debug_console`` (fixed at CreateSandbox: the host
cannot turn it on later); otherwise every call is refused with one line.

At most MAX_PROCESSES are kept: finished ones are forgotten first, oldest
first, when a new one needs room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import struct
import termios
from typing import Any, cast

from pykata import errors
from pykata.guest.container import Process, State
from pykata.guest.reaper import DEFAULT_ENV, Reaper

log = logging.getLogger(__name__)

MAX_PROCESSES = 16
REFUSED = ("the debug console is off for this sandbox: it is allowed only when the sandbox"
           " is started with [agent] debug_console = true")
_DEFAULT_SIGNALS = tuple(s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP))


class DebugProcess(Process):
    """One debug console process (container_id "")."""

    @property
    def name(self) -> str:
        return f"debug process {self.exec_id}"


def check_process(proc: Any) -> tuple[list[str], list[str], bool, tuple[int, int]]:
    """(args, env, terminal, (rows, cols)) of an OCI process object, or InvalidArgument."""
    if not isinstance(proc, dict):
        raise errors.InvalidArgument("DebugExec: the process must be a JSON object")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise errors.InvalidArgument("DebugExec: args must be a non-empty list of strings")
    env = proc.get("env") or []
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise errors.InvalidArgument("DebugExec: env must be a list of NAME=VALUE strings")
    if any("\0" in a for a in (*args, *env)):
        raise errors.InvalidArgument("DebugExec: args and env must not contain NUL characters")
    terminal = proc.get("terminal", False)
    if not isinstance(terminal, bool):
        raise errors.InvalidArgument("DebugExec: terminal must be a boolean")
    size = proc.get("consoleSize") or {}
    rows, cols = (size.get("height", 0), size.get("width", 0)) if isinstance(size, dict) \
        else (0, 0)
    if not all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in (rows, cols)):
        raise errors.InvalidArgument("DebugExec: consoleSize must be within 65535x65535")
    return args, env, terminal, (rows, cols)


def _environment(env: list[str]) -> dict[str, str]:
    out = dict(DEFAULT_ENV, HOME="/root")
    for item in env:
        k, _, v = item.partition("=")
        if k:
            out[k] = v
    return out


class DebugConsole:
    def __init__(self, reaper: Reaper) -> None:
        self.reaper = reaper
        self.enabled = False  # set by CreateSandbox, from the host's configuration
        self.procs: collections.OrderedDict[str, DebugProcess] = collections.OrderedDict()
        self.id = ""  # what a Process calls its container's id
        self.spawn = os.posix_spawn  # a fake in tests that must not run anything

    def _process_exited(self, proc: Process) -> None:
        """Process's callback when one ends: nothing more to do."""

    def require(self) -> None:
        if not self.enabled:
            raise errors.FailedPrecondition(REFUSED)

    def process(self, exec_id: str) -> Process:
        self.require()
        try:
            return self.procs[exec_id]
        except KeyError:
            raise errors.NotFound(f"debug process {exec_id} not found") from None

    async def signal(self, exec_id: str, sig: int, all_procs: bool) -> None:
        p = self.process(exec_id)
        if all_procs and p.pid > 0 and not p.exited:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # its session: what it started too
            return
        p.signal(sig)

    def _make_room(self) -> None:
        if len(self.procs) < MAX_PROCESSES:
            return
        for eid, p in list(self.procs.items()):
            if p.exited:
                p.close_stdio()
                del self.procs[eid]
                if len(self.procs) < MAX_PROCESSES:
                    return
        raise errors.ResourceExhausted(
            f"DebugExec: {MAX_PROCESSES} debug processes are running already")

    def exec(self, exec_id: str, proc_spec: Any) -> DebugProcess:
        """Start a process; refused unless the sandbox allows the debug console."""
        self.require()
        if not exec_id:
            raise errors.InvalidArgument("exec id must not be empty")
        if exec_id in self.procs:
            raise errors.AlreadyExists(f"debug process {exec_id} already exists")
        args, env, terminal, (rows, cols) = check_process(proc_spec)
        self._make_room()
        environ = _environment(env)
        path = args[0] if "/" in args[0] else shutil.which(args[0], path=environ["PATH"])
        if not path:
            raise errors.InvalidArgument(f"DebugExec: {args[0]!r} not found in the guest")
        proc = DebugProcess(cast(Any, self), exec_id, {"args": args, "terminal": terminal})
        if terminal:
            pid, parent, master = self._spawn_pty(path, args, environ, rows, cols)
        else:
            pid, parent, master = self._spawn_pipes(path, args, environ)
        # No await between the spawn and watching its pid (see Reaper.watch).
        proc.attach(pid, self.reaper.watch(pid))
        proc._take_stdio(parent, master)
        proc.state = State.RUNNING
        self.procs[exec_id] = proc
        log.info("debug process %s started (pid %d, %s): %s", exec_id, pid,
                 "terminal" if terminal else "pipes", " ".join(args)[:200])
        return proc

    def _spawn_pty(self, path: str, args: list[str], environ: dict[str, str], rows: int,
                   cols: int) -> tuple[int, list[int], int]:
        master, slave = os.openpty()
        try:
            if rows and cols:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            name = os.ttyname(slave)
            # A new session, then the pty opened afresh: its controlling terminal
            # (job control, ^C) rather than a mere inherited fd.
            pid = self.spawn(
                path, args, environ, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, name, os.O_RDWR, 0),
                              (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
        except OSError as exc:
            os.close(master)
            raise errors.Internal(f"DebugExec: cannot run {path}: {exc.strerror}") from None
        finally:
            os.close(slave)
        return pid, [], master

    def _spawn_pipes(self, path: str, args: list[str], environ: dict[str, str]
                     ) -> tuple[int, list[int], int]:
        fds: list[int] = []
        try:
            for _ in range(3):
                fds += os.pipe()
            in_r, in_w, out_r, out_w, err_r, err_w = fds
            pid = self.spawn(
                path, args, environ, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                              (os.POSIX_SPAWN_DUP2, err_w, 2)])
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise errors.Internal(f"DebugExec: cannot run {path}: {exc.strerror}") from None
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        return pid, [in_w, out_r, err_r], -1

    async def kill_all(self) -> None:
        """SIGKILL every debug process still running and forget them all."""
        live = [p for p in self.procs.values() if p.pid > 0 and not p.exited]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        if live:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*(p.wait() for p in live))
        for p in self.procs.values():
            p.close_stdio()
        self.procs.clear()
