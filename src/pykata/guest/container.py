"""Containers and their processes in the guest, run by the in-agent engine
(``pykata.guest.engine``, the default) or by crun (``settings.engine``).

State machines (an operation invalid in a state raises FailedPrecondition
naming the state):

    Container: created --start--> running <--pause/resume--> paused
                  |                  |                          |
                  +------------------+--- init exits ---> stopped --remove--> gone
    Process:   created --start/exec--> running --exit--> stopped

Stdio: without a terminal, crun gets pipes as its fds 0/1/2 and the container
process inherits them; the agent keeps the other ends. With a terminal, crun
sends the pty master over a console socket and the agent relays it. The agent
reaps every container process itself (see reaper.py); ``crun exec`` runs with
``--detach`` so the exit status is the process's own. The native engine forks
the processes itself (they are the agent's children) and hands the agent the
other ends of their pipes, or the pty master over a socket pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata import errors
from pykata.guest import cgroups, logs
from pykata.guest import spec as specmod
from pykata.guest.crun import Crun, crun_error, crun_spec, read_log
from pykata.guest.settings import Settings
from pykata.guest.stdio import FdReader, FdWriter

if TYPE_CHECKING:
    from pykata.guest.engine.runner import Engine, NativeContainer, Spawned

log = logging.getLogger(__name__)

_SOCKETS = itertools.count(1)  # console socket names


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


def _recv_console(sock: socket.socket, what: str) -> int:
    """The pty master crun sent over the console socket (crun has exited by now)."""
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        raise errors.Internal(f"{what}: crun did not send the terminal") from None
    with conn:
        conn.settimeout(5.0)
        try:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        except OSError as exc:
            raise errors.Internal(f"{what}: cannot receive the terminal: {exc}") from None
    if not fds:
        raise errors.Internal(f"{what}: crun sent no terminal")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


class _Stdio:
    """The fds one crun call needs, and the agent's ends it keeps afterwards."""

    def __init__(self, terminal: bool, sock_dir: Path, name: str) -> None:
        self.terminal = terminal
        self.child: list[int] = []  # crun's 0, 1, 2
        self.parent: list[int] = []  # agent's stdin (write), stdout (read), stderr (read)
        self.capture_err = -1  # terminal: crun's stderr, read on failure
        self.sock: socket.socket | None = None
        self.sock_path = sock_dir / f"{name}.sock"
        if terminal:
            r, w = os.pipe()
            self.capture_err = r
            self.child = [-1, -1, w]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    self.sock_path.unlink()
                self.sock.bind(str(self.sock_path))
                self.sock.listen(1)
                self.sock.setblocking(False)
            except BaseException:
                self.close_all()
                raise
        else:
            try:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
            except BaseException:
                self.close_all()
                raise
            self.child = [in_r, out_w, err_w]
            self.parent = [in_w, out_r, err_r]

    def child_fds(self) -> tuple[int | None, int | None, int | None]:
        a, b, c = (fd if fd >= 0 else None for fd in self.child)
        return a, b, c

    def close_child(self) -> None:
        for fd in self.child:
            if fd >= 0:
                os.close(fd)
        self.child = []

    def error_output(self) -> bytes:
        fd = self.capture_err if self.terminal else (self.parent[2] if self.parent else -1)
        if fd < 0:
            return b""
        reader = FdReader(fd, owns=False)
        return reader.read_available()

    def close_all(self) -> None:
        self.close_child()
        for fd in [*self.parent, self.capture_err]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.parent = []
        self.capture_err = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                self.sock_path.unlink()


class Process:
    """The container's init (exec_id "") or one exec'd process."""

    def __init__(self, container: Container, exec_id: str, proc: dict[str, Any]) -> None:
        self.container = container
        self.exec_id = exec_id
        self.spec = proc
        self.terminal = specmod.terminal(proc)
        self.pid = 0
        self.state = State.CREATED
        self.stdin: FdWriter | None = None
        self.stdout: FdReader | None = None
        self.stderr: FdReader | None = None
        self.tty_fd = -1
        self.status: int | None = None
        self.exited_at = 0
        self.oom_killed = False
        self._done = asyncio.Event()
        self._monitor: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        if self.exec_id:
            return f"exec {self.exec_id} of container {self.container.id}"
        return f"container {self.container.id}"

    def _take_stdio(self, parent: list[int], master: int = -1) -> None:
        """The agent's ends: the pty master, or [stdin w, stdout r, stderr r] (taken:
        ``parent`` is emptied)."""
        if self.terminal:
            self.tty_fd = master
            self.stdout = FdReader(os.dup(master), pty=True)
            self.stdin = FdWriter(os.dup(master))
        else:
            in_w, out_r, err_r = parent
            parent.clear()
            self.stdin = FdWriter(in_w)
            self.stdout = FdReader(out_r)
            self.stderr = FdReader(err_r)

    def attach(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self._monitor = asyncio.ensure_future(self._watch(exited))

    async def _watch(self, exited: asyncio.Future[int]) -> None:
        status = await exited
        self.status = status
        self.exited_at = time.time_ns()
        self.state = State.STOPPED
        if self.stdin is not None:
            # Nobody reads it any more; pending writes fail instead of hanging.
            self.stdin.close()
        try:
            self.container._process_exited(self)
        finally:
            log.info("%s (pid %d) exited with status %d", self.name, self.pid, status)
            self._done.set()

    async def wait(self) -> Process:
        await self._done.wait()
        return self

    @property
    def exited(self) -> bool:
        return self._done.is_set()

    def signal(self, sig: int) -> None:
        if self.state is State.STOPPED or self.pid <= 0 or self.exited:
            raise errors.NotFound(f"{self.name}: process already finished")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise errors.NotFound(f"{self.name}: process already finished") from None

    def resize(self, rows: int, cols: int) -> None:
        if not self.terminal or self.tty_fd < 0:
            raise errors.FailedPrecondition(f"{self.name} has no terminal")
        fcntl.ioctl(self.tty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close_stdin(self) -> None:
        if self.stdin is None or self.stdin.closed:
            return
        if self.terminal:
            # Closing a pty master hangs the session up; send end-of-file instead.
            with contextlib.suppress(OSError):
                os.write(self.tty_fd, b"\x04")
            return
        self.stdin.close()

    def close_stdio(self) -> None:
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        if self.tty_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.tty_fd)
            self.tty_fd = -1

    def abandon(self) -> None:
        """Stop watching a process that would not die; its waiters get 128 + SIGKILL."""
        if self._monitor is not None and not self._monitor.done():
            self._monitor.cancel()
        if not self._done.is_set():
            self.status = 128 + signal.SIGKILL
            self.exited_at = time.time_ns()
            self.state = State.STOPPED
            self._done.set()


class Container:
    def __init__(self, container_id: str, spec: dict[str, Any], settings: Settings,
                 crun: Crun, on_exit: Callable[[Container], None] | None = None) -> None:
        self.id = container_id
        self.spec = spec
        self.settings = settings
        self.crun = crun
        self.bundle = settings.containers_dir / container_id
        self.state = State.CREATED
        self.init = Process(self, "", spec["process"])
        self.execs: dict[str, Process] = {}
        self.lock = asyncio.Lock()
        self.storages: list[str] = []  # guest mount points made for this container
        self.disks: list[str] = []  # serials of the hot-plugged disks it uses
        self.image_digest = ""  # the manifest digest the agent verified (guest pull)
        self.oom_baseline = 0  # oom_kill count when created: WaitProcess's oom_killed
        self.oom_seen = 0  # last count reported as an OOM event
        self._on_exit = on_exit
        self._seq = itertools.count(1)
        self.native: NativeContainer | None = None  # the engine's state (engine "native")

    @property
    def uses_native(self) -> bool:
        return self.settings.engine == "native"

    @property
    def cgroup(self) -> Path:
        parent = self.settings.cgroup_parent.strip("/")
        return self.settings.cgroup_root / parent / self.id if parent else \
            self.settings.cgroup_root / self.id

    def require(self, op: str, *states: State) -> None:
        if self.state not in states:
            raise errors.FailedPrecondition(
                f"cannot {op} container {self.id}: it is {self.state.value}")

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errors.NotFound(f"exec {exec_id} not found in container {self.id}") from None

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    # -- lifecycle ------------------------------------------------------------------------

    async def create(self, guest_spec: dict[str, Any]) -> None:
        """Create the init process, stopped before execve until start; on any error
        nothing is left behind."""
        if self.uses_native:
            await self._native_create(guest_spec)
            return
        settings = self.settings
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.bundle.mkdir(parents=True, mode=0o700)
        try:
            (self.bundle / "config.json").write_text(json.dumps(crun_spec(guest_spec, self.id)))
            extra = ["--no-pivot"] if settings.no_pivot else []
            pid = await self._crun_spawn(
                self.init, "create", [*extra, "--bundle", str(self.bundle)],
                f"create container {self.id}")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.crun.run("delete", "--force", self.id, timeout=10)
            shutil.rmtree(self.bundle, ignore_errors=True)
            raise
        self.oom_baseline = self.oom_seen = cgroups.oom_kill_count(self.cgroup)
        log.info("container %s created (init pid %d)", self.id, pid)

    async def _native_create(self, guest_spec: dict[str, Any]) -> None:
        from pykata.guest.engine.runner import NativeContainer

        started = time.monotonic()
        nc = NativeContainer(native_engine(self.crun), self.id, guest_spec)
        sp = await nc.create()
        self.native = nc
        self._attach_native(self.init, nc, sp)
        self.oom_baseline = self.oom_seen = cgroups.oom_kill_count(self.cgroup)
        log.info("container %s created (init pid %d) in %.1f ms (prepare %.1f, fork %.1f,"
                 " fork to ready %.1f)", self.id, sp.pid, (time.monotonic() - started) * 1000,
                 nc.timings.get("prepare_ms", 0.0), nc.timings.get("fork_ms", 0.0),
                 nc.timings.get("fork_to_ready_ms", 0.0))

    def _attach_native(self, proc: Process, nc: NativeContainer, sp: Spawned,
                       master: int = -1) -> None:
        if proc.terminal and master < 0:
            master = nc.take_master(sp, f"create container {self.id}")
        proc.attach(sp.pid, sp.exited)
        proc._take_stdio(sp.parent_stdio, master)

    async def _crun_spawn(self, proc: Process, op: str, args: Sequence[str], what: str) -> int:
        """``crun create``/``crun exec --detach``: the process gets its stdio, we its pid."""
        n = next(self._seq)
        pid_file = self.bundle / f"{op}-{n}.pid"
        log_file = self.crun.log_file(self.bundle, op)
        sock_dir = self.settings.console_sockets_dir
        if proc.terminal:
            sock_dir.mkdir(parents=True, exist_ok=True)
        stdio = _Stdio(proc.terminal, sock_dir, str(next(_SOCKETS)))
        try:
            argv = [op, *args, "--pid-file", str(pid_file)]
            if proc.terminal:
                argv += ["--console-socket", str(stdio.sock_path)]
            cmd = self.crun.argv(*argv, self.id, log_file=log_file)
            stdin, stdout, stderr = stdio.child_fds()
            started = time.monotonic()
            crun_pid, exited = self.crun.reaper.spawn(cmd, stdin=stdin, stdout=stdout,
                                                      stderr=stderr)
            stdio.close_child()
            try:
                async with asyncio.timeout(self.settings.crun_timeout):
                    status = await asyncio.shield(exited)
            except BaseException as exc:
                await self.crun.reaper.kill_and_wait(crun_pid, exited)
                if isinstance(exc, TimeoutError):
                    raise errors.DeadlineExceeded(
                        f"{what}: crun {op} gave no answer in {self.settings.crun_timeout:g} s"
                    ) from None
                raise
            if status != 0:
                msg = crun_error(read_log(log_file), stdio.error_output(), status)
                raise errors.InvalidArgument(f"cannot {what}: {msg}")
            read_log(log_file)
            master = -1
            if proc.terminal:
                assert stdio.sock is not None
                master = _recv_console(stdio.sock, what)
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError) as exc:
                if master >= 0:
                    os.close(master)
                raise errors.Internal(f"{what}: no pid from crun: {exc}") from None
            # No await between reading the pid and watching it (see Reaper.watch).
            proc.attach(pid, self.crun.reaper.watch(pid, since=started))
            proc._take_stdio(stdio.parent, master)
            return pid
        finally:
            stdio.close_all()
            with contextlib.suppress(OSError):
                pid_file.unlink()

    async def start(self) -> int:
        self.require("start", State.CREATED)
        if self.native is not None:
            started = time.monotonic()
            if self.init.exited:
                raise errors.FailedPrecondition(
                    f"cannot start container {self.id}: its process already exited")
            await self.native.start()
            log.debug("container %s: start took %.1f ms", self.id,
                      (time.monotonic() - started) * 1000)
        else:
            await self._crun_start()
        if self.init.state is State.CREATED:
            self.init.state = State.RUNNING
        if self.state is State.CREATED:
            self.state = State.RUNNING
        log.info("container %s started (pid %d)", self.id, self.init.pid)
        return self.init.pid

    async def _crun_start(self) -> None:
        res = await self.crun.run("start", self.id)
        if not res.ok:
            if self.init.exited:
                raise errors.FailedPrecondition(
                    f"cannot start container {self.id}: its process already exited")
            raise errors.Internal(
                f"cannot start container {self.id}: {crun_error('', res.stderr, res.status)}")

    async def exec(self, exec_id: str, proc_spec: dict[str, Any]) -> Process:
        self.require("exec in", State.RUNNING)
        if exec_id in self.execs:
            raise errors.AlreadyExists(f"exec {exec_id} already exists in container {self.id}")
        proc = Process(self, exec_id, proc_spec)
        self.execs[exec_id] = proc
        if self.native is not None:
            started = time.monotonic()
            try:
                sp, master = await self.native.exec(exec_id, proc_spec)
            except BaseException:
                del self.execs[exec_id]
                raise
            self._attach_native(proc, self.native, sp, master)
            proc.state = State.RUNNING
            log.info("exec %s started in container %s (pid %d) in %.1f ms", exec_id, self.id,
                     proc.pid, (time.monotonic() - started) * 1000)
            return proc
        n = next(self._seq)
        proc_file = self.bundle / f"exec-{n}.json"
        try:
            proc_file.write_text(json.dumps(proc_spec))
            await self._crun_spawn(proc, "exec", ["--detach", "--process", str(proc_file)],
                                   f"exec {exec_id} in container {self.id}")
        except BaseException:
            del self.execs[exec_id]
            raise
        finally:
            with contextlib.suppress(OSError):
                proc_file.unlink()
        if proc.state is State.CREATED:
            proc.state = State.RUNNING
        log.info("exec %s started in container %s (pid %d)", exec_id, self.id, proc.pid)
        return proc

    def _process_exited(self, proc: Process) -> None:
        if proc is not self.init:
            return
        proc.oom_killed = cgroups.oom_kill_count(self.cgroup) > self.oom_baseline
        self.state = State.STOPPED
        if self._on_exit is not None:
            self._on_exit(self)

    async def signal(self, exec_id: str, sig: int, all_procs: bool) -> None:
        if all_procs and not exec_id:
            if self.state is State.STOPPED and self.init.exited:
                pids = cgroups.procs(self.cgroup)
                if not pids:
                    raise errors.NotFound(f"container {self.id}: process already finished")
            if self.native is not None:
                if self.native.signal_all(sig) == 0 and self.init.exited:
                    raise errors.NotFound(f"container {self.id}: process already finished")
                return
            res = await self.crun.run("kill", "--all", self.id, str(sig))
            if not res.ok:
                if self.init.exited:
                    raise errors.NotFound(f"container {self.id}: process already finished")
                raise errors.Internal(
                    f"cannot signal container {self.id}: "
                    f"{crun_error('', res.stderr, res.status)}")
            return
        self.process(exec_id).signal(sig)

    async def pause(self) -> None:
        self.require("pause", State.RUNNING)
        if self.native is not None:
            await self.native.freeze(True)
        else:
            await self.crun.check(f"cannot pause container {self.id}", "pause", self.id)
        if self.state is State.RUNNING:
            self.state = State.PAUSED

    async def resume(self) -> None:
        self.require("resume", State.PAUSED)
        if self.native is not None:
            await self.native.freeze(False)
        else:
            await self.crun.check(f"cannot resume container {self.id}", "resume", self.id)
        if self.state is State.PAUSED:
            self.state = State.RUNNING

    async def update(self, resources: dict[str, Any]) -> None:
        self.require("update", State.CREATED, State.RUNNING, State.PAUSED)
        if self.native is not None:
            self.native.update(resources)
            return
        f = self.bundle / f"resources-{next(self._seq)}.json"
        f.write_text(json.dumps(resources))
        try:
            await self.crun.check(f"cannot update container {self.id}", "update",
                                  "--resources", str(f), self.id, kind=errors.InvalidArgument)
        finally:
            with contextlib.suppress(OSError):
                f.unlink()

    def pids(self) -> list[tuple[int, str, str]]:
        """(pid, exec id, command) of every process in the container."""
        known = {p.pid: p.exec_id for p in self.processes() if p.pid > 0 and not p.exited}
        pids = cgroups.procs(self.cgroup)
        if pids is None:
            pids = sorted(known)
        out = []
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            out.append((pid, known.get(pid, ""), comm))
        return out

    async def remove(self, timeout: float) -> None:
        """Kill whatever still runs, ``crun delete``, drop the bundle and stdio."""
        if self.native is not None:
            await self._native_remove(timeout)
            return
        if self.state is State.PAUSED:
            with contextlib.suppress(Exception):
                await self.crun.run("resume", self.id, timeout=10)
        live = [p for p in self.processes() if p.pid > 0 and not p.exited]
        if live:
            with contextlib.suppress(Exception):
                await self.crun.run("kill", "--all", self.id, "KILL", timeout=10)
            for p in live:
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(p.wait() for p in live))
            except TimeoutError:
                left = ", ".join(str(p.pid) for p in live if not p.exited)
                log.warning("container %s: pids %s still alive after SIGKILL", self.id, left)
        res = await self.crun.run("delete", "--force", self.id, timeout=30)
        if not res.ok:
            state = await self.crun.run("state", self.id, timeout=10)
            if state.ok:
                raise errors.Internal(f"cannot delete container {self.id}: "
                                      f"{crun_error('', res.stderr, res.status)}")
        for p in self.processes():
            p.close_stdio()
            p.abandon()
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.state = State.STOPPED
        log.info("container %s removed", self.id)

    async def _native_remove(self, timeout: float) -> None:
        assert self.native is not None
        live = [p for p in self.processes() if p.pid > 0 and not p.exited]
        with contextlib.suppress(OSError):
            if self.state is State.PAUSED:
                await self.native.freeze(False)
        self.native.signal_all(signal.SIGKILL)
        for p in live:
            with contextlib.suppress(OSError):
                os.kill(p.pid, signal.SIGKILL)
        if live:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*(p.wait() for p in live))
            except TimeoutError:
                left = ", ".join(str(p.pid) for p in live if not p.exited)
                log.warning("container %s: pids %s still alive after SIGKILL", self.id, left)
        await self.native.remove()
        for p in self.processes():
            p.close_stdio()
            p.abandon()
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.state = State.STOPPED
        log.info("container %s removed", self.id)

    def log_context(self) -> None:
        logs.container_id.set(self.id)


def native_engine(crun: Crun) -> Engine:
    """The agent's one engine (made on the first native create: imported lazily)."""
    if crun.engine is None:
        from pykata.guest.engine.runner import Engine

        crun.engine = Engine(crun.settings, crun.reaper)
    engine: Engine = crun.engine
    return engine
