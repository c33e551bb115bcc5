"""The one place children are reaped: SIGCHLD -> waitpid(-1, WNOHANG) loop.

The agent is PID 1 (or a child subreaper in development), so orphaned
container processes come to it. Every exit status is dispatched by pid to
whoever watches that pid; a status that arrives before anyone watches (a
container init that exits before the agent read its pid file) is kept until
asked for. Nothing else may call wait*: children are spawned with
:func:`Reaper.spawn` and waited for with :meth:`Reaper.watch`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pykata import errors
from pykata.guest.stdio import FdReader

log = logging.getLogger(__name__)

# Signals reset to their default in children (the agent ignores some, e.g. SIGPIPE).
_DEFAULT_SIGNALS = tuple(
    s for s in range(1, 32) if s not in (signal.SIGKILL, signal.SIGSTOP)
)
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}


def exit_code(wait_status: int) -> int:
    """A wait status as a shell would report it: the exit code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


@dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.status == 0

    def error_line(self) -> str:
        """The last non-empty line of stderr (or stdout), or the exit status."""
        for stream in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in stream.decode(errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                return lines[-1]
        return f"{os.path.basename(self.argv[0])} exited with status {self.status}"


class Reaper:
    """Reaps every child of this process and hands statuses to their watchers."""

    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self._watchers: dict[int, list[asyncio.Future[int]]] = {}
        # pid -> (status, time.monotonic() when reaped)
        self._unclaimed: collections.OrderedDict[int, tuple[int, float]] = \
            collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Handle SIGCHLD on ``loop`` (the running loop by default) and reap once."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self._dispatch(pid, exit_code(status))

    def _dispatch(self, pid: int, code: int) -> None:
        watchers = self._watchers.pop(pid, None)
        if not watchers:
            log.debug("reaped pid %d (status %d)", pid, code)
            self._unclaimed[pid] = (code, time.monotonic())
            self._unclaimed.move_to_end(pid)
            while len(self._unclaimed) > self.MAX_UNCLAIMED:
                self._unclaimed.popitem(last=False)
            return
        for fut in watchers:
            if not fut.done():
                fut.set_result(code)

    def watch(self, pid: int, since: float | None = None) -> asyncio.Future[int]:
        """A future for the exit status of ``pid`` (exit code, or 128 + signal).

        Call it in the same loop step that learnt the pid (no await in between)
        for a child just spawned. For an orphan (a container process whose pid
        came from crun's pid file) the status may be here already: ``since``
        (a ``time.monotonic()`` taken before the process was created) keeps a
        stale status of an earlier process with a recycled pid from being taken.
        """
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        early = self._unclaimed.pop(pid, None)
        if early is not None and (since is None or early[1] >= since):
            fut.set_result(early[0])
            return fut
        self._watchers.setdefault(pid, []).append(fut)
        return fut

    def forget(self, pid: int) -> None:
        """Drop a status nobody will ask for any more."""
        self._unclaimed.pop(pid, None)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        setsid: bool = False,
    ) -> tuple[int, asyncio.Future[int]]:
        """posix_spawn ``argv`` with the given fds as 0/1/2 (/dev/null for None).

        Returns the pid and the future of its exit status.
        """
        actions: list[tuple[int, int, int] | tuple[int, int, str, int, int]] = []
        devnull = -1
        if None in (stdin, stdout, stderr):
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                src = devnull if fd is None else fd
                actions.append((os.POSIX_SPAWN_DUP2, src, target))
            path = argv[0]
            try:
                pid = os.posix_spawnp(
                    path, list(argv), dict(env if env is not None else DEFAULT_ENV),
                    file_actions=actions, setsigdef=_DEFAULT_SIGNALS, setsigmask=(),
                    setsid=setsid,
                )
            except OSError as exc:
                raise errors.Internal(f"cannot run {path}: {exc.strerror}") from exc
        finally:
            if devnull >= 0:
                os.close(devnull)
        return pid, self.watch(pid)

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """Run a command to completion, capturing its output (killed on timeout)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r = in_w = -1
        if input is not None:
            in_r, in_w = os.pipe()
        try:
            pid, exited = self.spawn(argv, stdin=in_r if in_r >= 0 else None, stdout=out_w,
                                     stderr=err_w, env=env)
        except BaseException:
            for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        if in_r >= 0:
            os.close(in_r)
        out, err = FdReader(out_r), FdReader(err_r)
        try:
            if in_w >= 0:
                assert input is not None
                try:
                    os.write(in_w, input)  # small inputs only (fits in the pipe)
                finally:
                    os.close(in_w)
                    in_w = -1
            async with asyncio.timeout(timeout):
                stdout, stderr = await asyncio.gather(out.read_all(), err.read_all())
                status = await asyncio.shield(exited)
        except BaseException as exc:
            await self.kill_and_wait(pid, exited)
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"{os.path.basename(argv[0])} {' '.join(argv[1:3])}: no answer in"
                    f" {timeout:g} s") from None
            raise
        finally:
            out.close()
            err.close()
            if in_w >= 0:
                os.close(in_w)
        return RunResult(tuple(argv), status, stdout, stderr)

    async def kill_and_wait(self, pid: int, exited: asyncio.Future[int],
                            timeout: float = 5.0) -> None:
        """SIGKILL a child we spawned and wait for the reaper (used on error paths)."""
        if exited.done():
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("pid %d did not exit after SIGKILL", pid)
