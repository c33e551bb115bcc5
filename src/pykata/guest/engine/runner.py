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
import gc
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pykata import errors
from pykata.guest import sysutil
from pykata.guest.engine import cgroup as cgmod
from pykata.guest.engine import child as childmod
from pykata.guest.engine import devices as devmod
from pykata.guest.engine import plan as planmod
from pykata.guest.engine import seccomp as seccompmod
from pykata.guest.engine import syscalls as sc
from pykata.guest.reaper import DEFAULT_ENV, Reaper
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


_SERVER_CODE = ("import sys; sys.path.insert(0, sys.argv[1]);"
                " from pykata.guest.engine.forkserver import main; main()")


def _lib_dir() -> str:
    import pykata

    return os.path.dirname(os.path.dirname(os.path.abspath(pykata.__file__)))


@dataclass
class _Spare:
    pid: int
    sock: socket.socket
    offered: float  # time.monotonic() when offered: Reaper.watch's ``since``


class ForkServer:
    """The agent's end of the fork server (``forkserver.py``): started once; a
    reader on its socket takes its messages (``S`` ready, ``O`` a spare offered,
    ``P``/``E`` the answer to the one request in flight). Any failure of the
    server itself makes the engine fall back to forking the agent (logged once)."""

    def __init__(self, reaper: Reaper, timeout: float, spares: bool = True) -> None:
        self.reaper = reaper
        self.timeout = timeout
        self.spares = spares
        self.sock: socket.socket | None = None
        self.pid = 0
        self.ready = False
        self.broken = False
        self._lock = asyncio.Lock()
        self._exited: asyncio.Future[int] | None = None
        self._answer: asyncio.Future[bytes] | None = None
        self._spares: list[_Spare] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Spawn the server (it answers ``S`` when it is ready; until then, and if it
        never is, the engine forks the agent)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid, exited = self.reaper.spawn(
                [sys.executable, "-S", "-B", "-c", _SERVER_CODE, _lib_dir()],
                stdin=theirs.fileno(), stdout=None, stderr=2, setsid=True,
                env={**DEFAULT_ENV, "PYKATA_FORKSERVER_SPARE": "1" if self.spares else "0"})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock, self.pid, self._exited = ours, pid, exited
        exited.add_done_callback(self._died)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._readable)
        self._loop.call_later(self.timeout, self._check_ready)

    def _check_ready(self) -> None:
        if not self.ready and not self.broken:
            self._fail(f"no answer from the fork server in {self.timeout:g} s")

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"the fork server's socket failed: {exc}")
                return
            if not msg:
                self._fail("the fork server closed its socket")
                return
            self._message(msg, fds)

    def _message(self, msg: bytes, fds: list[int]) -> None:
        kind = msg[:1]
        if kind == b"O" and len(msg) == 5 and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            self._spares.append(_Spare(struct.unpack("<i", msg[1:5])[0], sock,
                                       time.monotonic()))
            return
        for fd in fds:
            os.close(fd)
        if kind == b"S" and not self.ready:
            self.ready = True
            self._log_ready()
        elif kind in (b"P", b"E") and self._answer is not None and not self._answer.done():
            self._answer.set_result(msg)
        else:
            log.warning("the fork server said %r unasked", msg[:16])

    def _log_ready(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            rss = "?"
            with contextlib.suppress(OSError), open(f"/proc/{self.pid}/status") as f:
                rss = next((ln.split(":", 1)[1].strip() for ln in f
                            if ln.startswith("VmRSS:")), "?")
            log.debug("fork server ready (pid %d, rss %s)", self.pid, rss)

    def _died(self, fut: asyncio.Future[int]) -> None:
        if not self.broken and self.sock is not None:
            status = fut.result() if not fut.cancelled() else -1
            self._fail(f"the fork server exited (status {status})")

    def _fail(self, why: str) -> None:
        if not self.broken:
            log.warning("%s: the engine forks the agent from now on", why)
        self.broken = True
        self.ready = False
        self.close()

    @property
    def usable(self) -> bool:
        return self.ready and not self.broken

    def close(self) -> None:
        """Closing the socket ends the server (its idle worker reads EOF); closing a
        spare's socket ends the spare."""
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for spare in self._spares:
            spare.sock.close()
        self._spares = []
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(errors.Internal("the fork server stopped"))
        if self._exited is not None and not self._exited.done():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    async def fork(self, job: childmod.Job, fds: list[int], pid_ns: str | None) -> \
            tuple[int, asyncio.Future[int]]:
        """One process: its pid (a child of the agent's) and exit future. OSError:
        the server refused (the step is named); Internal or DeadlineExceeded: the
        server itself failed (and is no longer used)."""
        if job.trace:
            job = dataclasses.replace(job, marks=(("agent ready to send", time.monotonic_ns()),))
        data = pickle.dumps((job, pid_ns), protocol=pickle.HIGHEST_PROTOCOL)
        if pid_ns == "new":
            while self._spares:
                spare = self._spares.pop(0)
                try:
                    socket.send_fds(spare.sock, [data], fds)
                except OSError:  # it died: the next, or a worker
                    continue
                finally:
                    spare.sock.close()
                return spare.pid, self.reaper.watch(spare.pid, since=spare.offered)
        async with self._lock:
            task = asyncio.ensure_future(self._fork(data, fds))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # Forked for a request nobody waits for any more: not left running.
                task.add_done_callback(_kill_forked)
                raise

    async def _fork(self, data: bytes, fds: list[int]) -> \
            tuple[int, asyncio.Future[int]]:
        sock = self.sock
        if sock is None or not self.usable or self._loop is None:
            raise errors.Internal("the fork server is not running")
        since = time.monotonic()
        self._answer = answer = self._loop.create_future()
        try:
            socket.send_fds(sock, [data], fds)
            async with asyncio.timeout(self.timeout):
                msg = await answer
        except (OSError, TimeoutError) as exc:
            self._fail(f"the fork server failed: {exc or 'timeout'}")
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"the fork server gave no answer in {self.timeout:g} s") from None
            raise errors.Internal(f"the fork server failed: {exc}") from None
        finally:
            self._answer = None
        if msg[:1] == b"P" and len(msg) == 5:
            pid = struct.unpack("<i", msg[1:5])[0]
            # Same loop step as learning the pid (Reaper.watch); ``since`` keeps a
            # recycled pid's old status from being taken.
            return pid, self.reaper.watch(pid, since=since)
        rep = report_error(msg)
        if rep is None:
            self._fail(f"the fork server answered {msg[:16]!r}")
            raise errors.Internal("the fork server gave a wrong answer")
        raise OSError(rep[0], rep[1])


class Engine:
    """One per agent: facts read once, the fork server, and the fork of the agent
    itself (the fallback) with its pid namespace switch."""

    def __init__(self, settings: Settings, reaper: Reaper) -> None:
        self.settings = settings
        self.reaper = reaper
        self.last_cap = _last_cap()
        self._own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.trace = log.isEnabledFor(logging.DEBUG)
        if settings.init_mode:
            favor_dynmods(str(settings.cgroup_root))
        self.server: ForkServer | None = None
        mode = fork_server_mode()
        if mode != "off":
            self.server = ForkServer(reaper, settings.crun_timeout, spares=mode == "on")
            try:
                self.server.start()
            except (OSError, errors.PykataError) as exc:
                log.warning("cannot start the fork server (%s): the engine forks the agent",
                            exc)
                self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _fork(self, job: childmod.Job, pid_ns: str | None) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, range(1, signal.NSIG))
        gc_was = gc.isenabled()
        gc.disable()
        try:
            childmod.enter_pid_ns(pid_ns)
            switched = bool(pid_ns)
            childmod.RESET_SIGNALS = childmod.changed_signals()
            try:
                pid = os.fork()
                if pid == 0:
                    childmod.run(job)  # never returns
            finally:
                if switched:
                    sc.setns(self._own_pidns, planmod.CLONE_NEWPID,
                             "return to the agent's pid namespace")
        finally:
            if gc_was:
                gc.enable()
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return pid

    async def spawn(self, job: childmod.Job, pid_ns: str | None, terminal: bool,
                    with_start: bool) -> Spawned:
        """Pipes, fork (by the fork server, else the agent), the child's ends closed.
        The fds are made without an await before the fork, so no other child of
        the agent can inherit them (they are CLOEXEC, and a fork server worker
        receives only its own job's)."""
        mine: list[int] = []
        theirs: list[int] = []
        console_r: socket.socket | None = None
        console_w: socket.socket | None = None
        job.trace = self.trace
        childmod.cap_steps(job)
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
            server = self.server
            if server is not None and server.usable:
                fds, sent = _indexed(job)
                pid, exited = await server.fork(sent, fds, pid_ns)
            else:
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


def _kill_forked(task: asyncio.Future[tuple[int, asyncio.Future[int]]]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    with contextlib.suppress(OSError):
        os.kill(task.result()[0], signal.SIGKILL)  # the reaper reaps it


def _indexed(job: childmod.Job) -> tuple[list[int], childmod.Job]:
    """The fds to send and a copy of ``job`` whose fd fields are their indices."""
    fds: list[int] = []

    def index(fd: int) -> int:
        if fd < 0:
            return -1
        fds.append(fd)
        return len(fds) - 1
    sent = dataclasses.replace(job, report_w=index(job.report_w), start_r=index(job.start_r),
                               console_w=index(job.console_w))
    if job.stdio is not None:
        a, b, c = job.stdio
        sent.stdio = (index(a), index(b), index(c))
    return fds, sent


def favor_dynmods(root: str) -> None:
    """cgroup2 ``favordynmods`` on the guest's hierarchy (the VM's own, as PID 1
    only): without it every move into a cgroup (each container process joins its
    cgroup) waits for an RCU grace period, 10-13 ms under TCG."""
    try:
        sysutil.mount("", root, None, sysutil.MS_REMOUNT, "favordynmods")
    except OSError as exc:
        log.debug("cgroup2 favordynmods not set on %s: %s", root, exc)
    else:
        log.debug("cgroup2 favordynmods set on %s", root)


def fork_server_mode() -> str:
    """``on`` (the default): fork server with a spare process; ``nospare``: fork
    server only; ``off``: the engine forks the agent itself. From
    ``pykata.agent.forkserver=`` on the kernel command line, or PYKATA_FORKSERVER in
    a development agent's environment (for comparisons)."""
    value = os.environ.get("PYKATA_FORKSERVER")
    if value is None:
        try:
            with open("/proc/cmdline") as f:
                for word in f.read().split():
                    if word.startswith("pykata.agent.forkserver="):
                        value = word.partition("=")[2]
        except OSError:
            pass
    if value in ("0", "off", "no", "false"):
        return "off"
    return "nospare" if value == "nospare" else "on"


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
            if not until_eof and split_marks(bytes(buf))[1][:1] == b"R" \
                    and not done.done():
                done.set_result(None)
                return

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    finally:
        loop.remove_reader(fd)
    return bytes(buf)


def split_marks(data: bytes) -> tuple[list[tuple[str, int]], bytes]:
    """The child's leading ``T`` records (debug stamps) and what follows them."""
    marks: list[tuple[str, int]] = []
    while data[:1] == b"T" and len(data) >= 3:
        n = struct.unpack("<H", data[1:3])[0]
        if len(data) < 3 + n:
            break
        for item in data[3:3 + n].decode(errors="replace").split(";"):
            label, _, ns = item.partition("=")
            with contextlib.suppress(ValueError):
                marks.append((label, int(ns)))
        data = data[3 + n:]
    return marks, data


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
        self.plan = planmod.plan(spec, engine.last_cap, container_id)
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
        # The child's part of the plan only (it is pickled to the fork server).
        child_plan = dataclasses.replace(p, seccomp=None, device_rules=(), cgroup_writes=(),
                                         annotations={})
        # The child runs the createContainer hooks before it reports ready.
        timeout = self.timeout + planmod.hook_timeout(p, "createContainer")
        job = childmod.Job(
            proc=p.process, plan=child_plan, report_w=-1,
            cgroup_procs=os.path.join(self.cgroup_dir, "cgroup.procs"),
            cgroup_dir=self.cgroup_dir,
            join=tuple((planmod.NAMESPACES[k][0], path, k) for k, path in p.join_ns),
            unshare=p.new_ns, no_pivot=self.engine.settings.no_pivot, seccomp=self.seccomp,
            seccomp_flags=p.seccomp.flags if p.seccomp else 0, last_cap=self.engine.last_cap)
        t1 = time.monotonic()
        try:
            sp = await self.engine.spawn(job, p.pid_ns, p.process.terminal, with_start=True)
        except BaseException as exc:
            cgmod.remove(self.cgroup_dir)
            if isinstance(exc, OSError):
                raise errors.InvalidArgument(f"cannot {what}: {exc.strerror or exc}") from None
            raise
        t2 = time.monotonic()
        try:
            data = await read_report(sp.report_r, until_eof=False, timeout=timeout)
            marks, data = split_marks(data)
            self._log_marks("create", marks, t1)
            if data[:1] != b"R":
                status = await self._status(sp)
                raise _error(what, data, status)
        except BaseException as exc:
            await self._kill(sp)
            sp.close()
            cgmod.remove(self.cgroup_dir)
            if isinstance(exc, TimeoutError):
                raise errors.DeadlineExceeded(
                    f"cannot {what}: no answer in {timeout:g} s") from None
            raise
        self.timings = {"prepare_ms": (t1 - t0) * 1000, "fork_ms": (t2 - t1) * 1000,
                        "fork_to_ready_ms": (time.monotonic() - t1) * 1000}
        self.init = sp
        return sp

    def _log_marks(self, what: str, marks: list[tuple[str, int]], since: float) -> None:
        """Debug: the child's steps, each as ms since the previous stamp (``since``,
        time.monotonic of the request, first)."""
        if not marks:
            return
        prev = int(since * 1e9)
        parts = []
        for label, ns in marks:
            parts.append(f"{label} {(ns - prev) / 1e6:.1f}")
            prev = ns
        log.debug("container %s %s steps (ms): %s", self.id, what, ", ".join(parts))

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
        t0 = time.monotonic()
        # The child runs the startContainer hooks before its execve.
        timeout = self.timeout + planmod.hook_timeout(self.plan, "startContainer")
        try:
            data = await read_report(sp.report_r, until_eof=True, timeout=timeout)
        except TimeoutError:
            await self._kill(sp)
            raise errors.DeadlineExceeded(f"cannot {what}: no answer in {timeout:g} s") \
                from None
        finally:
            os.close(sp.report_r)
            sp.report_r = -1
        marks, data = split_marks(data)
        self._log_marks("start", marks, t0)
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
        t0 = time.monotonic()
        try:
            sp = await self.engine.spawn(job, pid_ns, proc.terminal, with_start=False)
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot {what}: {exc.strerror or exc}") from None
        try:
            data = await read_report(sp.report_r, until_eof=True, timeout=self.timeout)
            marks, data = split_marks(data)
            self._log_marks(f"exec {exec_id}", marks, t0)
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
