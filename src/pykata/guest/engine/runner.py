"""The agent's side of the engine: prepare (plan, cgroup, device program,
seccomp program), fork, read the child's report; then start, exec, signal,
freeze, update and remove through the container's cgroup.

The fork happens synchronously in one event-loop step (pipes made, fork,
the child's ends closed) so no other child of the agent can inherit them.
The pid namespace is the one thing a process cannot enter for itself:
``unshare(CLONE_NEWPID)`` / ``setns(CLONE_NEWPID)`` only change where its
*children* go. So the agent switches its own "pid namespace for children"
just around ``os.fork`` and switches it back at once (same step, signals
blocked): the container's init is then the agent's direct child (pid 1 of
its namespace), reaped by the one reaper like every other child.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from pykata import errors
from pykata.guest.engine import cgroup as cgmod
from pykata.guest.engine import child as childmod
from pykata.guest.engine import devices as devmod
from pykata.guest.engine import plan as planmod
from pykata.guest.engine import seccomp as seccompmod
from pykata.guest.engine import syscalls as sc
from pykata.guest.reaper import Reaper
from pykata.guest.settings import Settings

log = logging.getLogger(__name__)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 40


@dataclass
class Spawned:
    """A forked child: its pid, exit future and the agent's ends of its pipes."""

    pid: int
    exited: asyncio.Future[int]
    report_r: int
    start_w: int = -1
    parent_stdio: list[int] = field(default_factory=list)  # stdin w, stdout r, stderr r
    console_r: socket.socket | None = None

    def close(self) -> None:
        for fd in (self.report_r, self.start_w, *self.parent_stdio):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.report_r = self.start_w = -1
        self.parent_stdio = []
        if self.console_r is not None:
            self.console_r.close()
            self.console_r = None


class Engine:
    """One per agent: facts read once and the fork with its pid namespace switch."""

    def __init__(self, settings: Settings, reaper: Reaper) -> None:
        self.settings = settings
        self.reaper = reaper
        self.last_cap = _last_cap()
        self._own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def _fork(self, job: childmod.Job, pid_ns: str | None) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, range(1, signal.NSIG))
        try:
            switched = False
            if pid_ns == "new":
                sc.unshare(planmod.CLONE_NEWPID)
                switched = True
            elif pid_ns:
                fd = os.open(pid_ns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    sc.setns(fd, planmod.CLONE_NEWPID, f"join the pid namespace {pid_ns}")
                finally:
                    os.close(fd)
                switched = True
            try:
                pid = os.fork()
                if pid == 0:
                    childmod.run(job)  # never returns
            finally:
                if switched:
                    sc.setns(self._own_pidns, planmod.CLONE_NEWPID,
                             "return to the agent's pid namespace")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return pid

    def spawn(self, job: childmod.Job, pid_ns: str | None, terminal: bool,
              with_start: bool) -> Spawned:
        """Pipes, fork, the child's ends closed: one synchronous step."""
        mine: list[int] = []
        theirs: list[int] = []
        console_r: socket.socket | None = None
        console_w: socket.socket | None = None
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
            mine.append(report_r)
            theirs.append(report_w)
            start_r = start_w = -1
            if with_start:
                start_r, start_w = os.pipe2(os.O_CLOEXEC)
                mine.append(start_w)
                theirs.append(start_r)
            parent_stdio: list[int] = []
            if terminal:
                console_r, console_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                job.console_w = console_w.fileno()
            else:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                parent_stdio = [in_w, out_r, err_r]
                mine += parent_stdio
                theirs += [in_r, out_w, err_w]
                job.stdio = (in_r, out_w, err_w)
            job.report_w, job.start_r = report_w, start_r
            pid = self._fork(job, pid_ns)
            exited = self.reaper.watch(pid)
        except BaseException:
            for fd in mine:
                os.close(fd)
            if console_r is not None:
                console_r.close()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
            if console_w is not None:
                console_w.close()
        os.set_blocking(report_r, False)
        return Spawned(pid, exited, report_r, start_w, parent_stdio, console_r)


async def read_report(fd: int, until_eof: bool, timeout: float) -> bytes:
    """What the child wrote: the first message, or everything up to EOF."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    buf = bytearray()

    def readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if not chunk:
                if not done.done():
                    done.set_result(None)
                return
            buf.extend(chunk)
            if not until_eof and buf[:1] == b"R" and not done.done():
                done.set_result(None)
                return

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    finally:
        loop.remove_reader(fd)
    return bytes(buf)


def report_error(data: bytes) -> tuple[int, str] | None:
    """(errno, message) of an ``E`` report; None for none."""
    if data[:1] != b"E" or len(data) < 5:
        return None
    err = struct.unpack("<i", data[1:5])[0]
    return err, data[5:].decode(errors="replace")


def _error(what: str, data: bytes, status: int | None) -> errors.PykataError:
    rep = report_error(data)
    if rep is not None:
        err, msg = rep
        text = f"cannot {what}: {msg}"
        if err == errno.ENOENT and "executable" not in msg:
            return errors.InvalidArgument(text)
        return errors.InvalidArgument(text)
    how = f" (status {status})" if status is not None else ""
    return errors.Internal(f"cannot {what}: its process died while being set up{how}")


def _recv_master(sock: socket.socket, what: str) -> int:
    sock.setblocking(False)
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 4)
    except OSError as exc:
        raise errors.Internal(f"{what}: no terminal from the container: {exc}") from None
    if not fds:
        raise errors.Internal(f"{what}: no terminal from the container")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


class NativeContainer:
    """The engine's state of one container."""

    def __init__(self, engine: Engine, container_id: str, spec: dict[str, Any]) -> None:
        self.engine = engine
        self.id = container_id
        self.plan = planmod.plan(spec, engine.last_cap)
        self.cgroup_dir = os.path.join(str(engine.settings.cgroup_root), self.plan.cgroup_path)
        self.seccomp: bytes | None = None
        self.init: Spawned | None = None
        self.timings: dict[str, float] = {}

    @property
    def timeout(self) -> float:
        return self.engine.settings.crun_timeout

    def _prepare_cgroup(self) -> None:
        root = str(self.engine.settings.cgroup_root)
        try:
            path = cgmod.create(root, self.plan.cgroup_path)
        except FileExistsError:
            cgmod.remove(self.cgroup_dir)  # left by an earlier container of this id
            path = cgmod.create(root, self.plan.cgroup_path)
        try:
            cgmod.apply(path, list(self.plan.cgroup_writes))
            if self.plan.device_rules:
                devmod.attach(path, devmod.program(list(self.plan.device_rules)))
        except BaseException:
            cgmod.remove(path)
            raise

    async def create(self) -> Spawned:
        """Cgroup, programs, fork; returns when the child waits for start."""
        what = f"create container {self.id}"
        t0 = time.monotonic()
        try:
            if self.plan.seccomp is not None:
                self.seccomp = seccompmod.compile_bpf(self.plan.seccomp)
            self._prepare_cgroup()
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot {what}: {exc.strerror or exc}") from None
        p = self.plan
        job = childmod.Job(
            proc=p.process, plan=p, report_w=-1,
            cgroup_procs=os.path.join(self.cgroup_dir, "cgroup.procs"),
            cgroup_dir=self.cgroup_dir,
            join=tuple((planmod.NAMESPACES[k][0], path, k) for k, path in p.join_ns),
            unshare=p.new_ns, no_pivot=self.engine.settings.no_pivot, seccomp=self.seccomp,
            seccomp_flags=p.seccomp.flags if p.seccomp else 0, last_cap=self.engine.last_cap)
        t1 = time.monotonic()
        try:
            sp = self.engine.spawn(job, p.pid_ns, p.process.terminal, with_start=True)
        except OSError as exc:
            cgmod.remove(self.cgroup_dir)
            raise errors.InvalidArgument(f"cannot {what}: {exc.strerror or exc}") from None
        t2 = time.monotonic()
        try:
            data = await read_report(sp.report_r, until_eof=False, timeout=self.timeout)
            if data[:1] != b"R":
                status = await self._status(sp)
                raise _error(what, data, status)
        except BaseException as exc:
            await self._kill(sp)
            sp.close()
            cgmod.remove(self.cgroup_dir)
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"cannot {what}: no answer in {self.timeout:g} s") from None
            raise
        self.timings = {"prepare_ms": (t1 - t0) * 1000, "fork_ms": (t2 - t1) * 1000,
                        "fork_to_ready_ms": (time.monotonic() - t1) * 1000}
        self.init = sp
        return sp

    async def _status(self, sp: Spawned) -> int | None:
        try:
            async with asyncio.timeout(2.0):
                return await asyncio.shield(sp.exited)
        except TimeoutError:
            return None

    async def _kill(self, sp: Spawned) -> None:
        await self.engine.reaper.kill_and_wait(sp.pid, sp.exited)

    def take_master(self, sp: Spawned, what: str) -> int:
        assert sp.console_r is not None
        try:
            return _recv_master(sp.console_r, what)
        finally:
            sp.console_r.close()
            sp.console_r = None

    async def start(self) -> None:
        sp = self.init
        what = f"start container {self.id}"
        if sp is None or sp.start_w < 0:
            raise errors.FailedPrecondition(f"cannot {what}: it was not created")
        try:
            os.write(sp.start_w, b"S")
        except BrokenPipeError:
            raise errors.FailedPrecondition(f"cannot {what}: its process already exited") \
                from None
        finally:
            os.close(sp.start_w)
            sp.start_w = -1
        try:
            data = await read_report(sp.report_r, until_eof=True, timeout=self.timeout)
        finally:
            os.close(sp.report_r)
            sp.report_r = -1
        if data:
            raise _error(what, data, None)

    async def exec(self, exec_id: str, proc_spec: dict[str, Any]) -> tuple[Spawned, int]:
        """Fork into the running container; returns when the process is exec'd."""
        what = f"exec {exec_id} in container {self.id}"
        assert self.init is not None
        proc = planmod.process_plan(proc_spec, "process", self.engine.last_cap)
        init_pid = self.init.pid
        names = [k for k in planmod.JOIN_ORDER if k in self.plan.ns_types and k != "network"]
        job = childmod.Job(
            proc=proc, plan=None, report_w=-1,
            cgroup_procs=os.path.join(self.cgroup_dir, "cgroup.procs"),
            cgroup_dir=self.cgroup_dir,
            join=tuple((planmod.NAMESPACES[k][0], f"/proc/{init_pid}/ns/{planmod.NAMESPACES[k][1]}",
                        k) for k in names),
            seccomp=self.seccomp,
            seccomp_flags=self.plan.seccomp.flags if self.plan.seccomp else 0,
            last_cap=self.engine.last_cap)
        pid_ns = f"/proc/{init_pid}/ns/pid" if "pid" in self.plan.ns_types else None
        try:
            sp = self.engine.spawn(job, pid_ns, proc.terminal, with_start=False)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot {what}: {exc.strerror or exc}") from None
        try:
            data = await read_report(sp.report_r, until_eof=True, timeout=self.timeout)
            if data:
                raise _error(what, data, await self._status(sp))
            master = self.take_master(sp, what) if proc.terminal else -1
        except BaseException as exc:
            await self._kill(sp)
            sp.close()
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"cannot {what}: no answer in {self.timeout:g} s") from None
            raise
        finally:
            with contextlib.suppress(OSError):
                if sp.report_r >= 0:
                    os.close(sp.report_r)
            sp.report_r = -1
        return sp, master

    def signal_all(self, sig: int) -> int:
        return cgmod.signal_all(self.cgroup_dir, sig)

    async def freeze(self, frozen: bool) -> None:
        try:
            cgmod.freeze(self.cgroup_dir, frozen)
        except OSError as exc:
            raise errors.Internal(f"cannot {'pause' if frozen else 'resume'} container"
                                  f" {self.id}: {exc.strerror}") from None
        deadline = time.monotonic() + 5.0
        while frozen and not cgmod.is_frozen(self.cgroup_dir):
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(f"container {self.id} did not freeze in 5 s")
            await asyncio.sleep(0.01)

    def update(self, resources: dict[str, Any]) -> None:
        if resources.get("devices"):
            # CRI sends the whole resources object back: the same rules are no change.
            wanted = devmod.effective_rules(devmod.parse_rules(resources["devices"]),
                                            [n for n in self.plan.nodes
                                             if n not in devmod.DEFAULT_NODES])
            if tuple(wanted) != self.plan.device_rules:
                # Without BPF_F_ALLOW_MULTI a second attach replaces the program.
                try:
                    devmod.attach(self.cgroup_dir, devmod.program(wanted) if wanted
                                  else devmod.program([devmod.Rule(True, 0, -1, -1, 7)]))
                except OSError as exc:
                    raise errors.InvalidArgument(
                        f"cannot update container {self.id}: {exc.strerror or exc}") from None
                self.plan = dataclasses.replace(self.plan, device_rules=tuple(wanted))
        writes = cgmod.resource_writes(resources)
        try:
            cgmod.apply(self.cgroup_dir, writes)
        except OSError as exc:
            raise errors.InvalidArgument(
                f"cannot update container {self.id}: {exc.strerror or exc}") from None

    async def remove(self) -> None:
        if self.init is not None:
            self.init.close()
        with contextlib.suppress(OSError):
            if cgmod.is_frozen(self.cgroup_dir):
                cgmod.freeze(self.cgroup_dir, False)
        self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                cgmod.remove(self.cgroup_dir)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise errors.Internal(f"cannot remove the cgroup of container {self.id}:"
                                          f" {exc.strerror}") from None
            self.signal_all(signal.SIGKILL)
            await asyncio.sleep(0.02)
