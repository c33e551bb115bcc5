"""containerd.task.v2.Task for one pod: the first Create boots the VM, later
containers of the pod join it; handlers are thin and map errors in one place
(the ttRPC server turns PykataError kinds into status codes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2, timestamp_pb2

from pykata import config, errors
from pykata.config import Config
from pykata.protos import cgroups_v2_metrics_pb2 as m2
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt
from pykata.protos import runtimeoptions_pb2 as rtopts
from pykata.resources import network
from pykata.runtime.container import Container, Process
from pykata.runtime.sandbox import Sandbox, load_spec
from pykata.runtime.types import ContainerStats, ExitStatus, State
from pykata.shim import rootfs
from pykata.shim.events import Publisher, pack_any
from pykata.shim.stdio import StdioRelay

log = logging.getLogger(__name__)

_STATUS = {
    State.CREATING: tt.CREATED, State.CREATED: tt.CREATED, State.RUNNING: tt.RUNNING,
    State.PAUSED: tt.PAUSED, State.STOPPED: tt.STOPPED,
}


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    if ns:
        t.FromNanoseconds(ns)
    return t


def exit_code(code: int) -> int:
    """An exit status as containerd's uint32 field takes it: ``uint32(status)``, as
    its runc shim does. The guest may report -1 or anything an int32 holds."""
    return code & 0xFFFFFFFF


# Guest-reported exit times outside [year 2000, now + a day] are replaced by the
# host's clock (protobuf does not check them; containerd would show nonsense).
_MIN_EXIT_NS = 946_684_800 * 10**9
_MAX_EXIT_SKEW_NS = 86_400 * 10**9


def _exit_ts(status: ExitStatus | None) -> timestamp_pb2.Timestamp:
    if status is None:
        return _ts(0)
    ns = status.exited_at_ns
    if ns and not _MIN_EXIT_NS <= ns <= time.time_ns() + _MAX_EXIT_SKEW_NS:
        ns = time.time_ns()
    return _ts(ns)


@dataclass
class ExecRecord:
    """An exec containerd announced (Exec) but has not started yet, or has."""

    exec_id: str
    spec: dict[str, Any]
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    process: Process | None = None
    relay: StdioRelay | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit: ExitStatus | None = None
    watcher: asyncio.Task[None] | None = None


@dataclass
class Task:
    id: str
    bundle: Path
    container: Container
    init: ExecRecord
    rootfs_mounted: bool
    execs: dict[str, ExecRecord] = field(default_factory=dict)


class TaskService:
    def __init__(self, sandbox_id: str, namespace: str, config: Config,
                 publisher: Publisher, on_shutdown: asyncio.Event) -> None:
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.publisher = publisher
        self.sandbox: Sandbox | None = None
        self.tasks: dict[str, Task] = {}
        self._lock = asyncio.Lock()
        self._on_shutdown = on_shutdown

    # -- helpers -------------------------------------------------------------------
    def _task(self, tid: str) -> Task:
        try:
            return self.tasks[tid]
        except KeyError:
            raise errors.NotFound(f"task {tid} not found") from None

    def _record(self, tid: str, exec_id: str) -> ExecRecord:
        task = self._task(tid)
        if not exec_id:
            return task.init
        try:
            return task.execs[exec_id]
        except KeyError:
            raise errors.NotFound(f"exec {exec_id} of task {tid} not found") from None

    @property
    def _vm_pid(self) -> int:
        if self.sandbox is not None and self.sandbox.vm is not None and self.sandbox.vm.pid:
            return self.sandbox.vm.pid
        return 0

    async def _watch_exit(self, task: Task, rec: ExecRecord) -> None:
        assert rec.process is not None
        status = await rec.process.wait()
        if rec.relay is not None:
            await rec.relay.drain()
        if status.oom_killed and not rec.exec_id:
            # Before the exit, as containerd's own shims do: CRI then reports OOMKilled.
            self.publisher.publish("/tasks/oom", ev.TaskOOM(container_id=task.id))
        rec.exit = status
        rec.exited.set()
        self.publisher.publish("/tasks/exit", ev.TaskExit(
            container_id=task.id, id=rec.exec_id or task.id, pid=self._vm_pid,
            exit_status=exit_code(status.code), exited_at=_exit_ts(status)))

    # -- Task service ----------------------------------------------------------------
    async def Create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        bundle = Path(req.bundle)
        spec = load_spec(bundle)
        async with self._lock:
            if req.id in self.tasks:
                raise errors.AlreadyExists(f"task {req.id} already exists")
            mounted = rootfs.mount_rootfs(bundle, [
                rootfs.Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs])
            try:
                if self.sandbox is None:
                    self._apply_options(req)
                    self.sandbox = await Sandbox.create(
                        self.sandbox_id, self.config, hostname=spec.get("hostname", ""),
                        netns=network.netns_of(spec), namespace=self.namespace)
                container = await self.sandbox.create_container(req.id, bundle, spec)
            except BaseException:
                if mounted:
                    rootfs.unmount_rootfs(bundle)
                if self.sandbox is not None and not self.sandbox.containers:
                    await self.sandbox.stop()
                    self.sandbox = None
                raise
            init = ExecRecord("", spec.get("process", {}), req.stdin, req.stdout, req.stderr,
                              req.terminal, process=container.init)
            init.relay = StdioRelay(container.init, req.stdin, req.stdout, req.stderr,
                                    req.terminal)
            init.relay.start()
            self.tasks[req.id] = Task(req.id, bundle, container, init, mounted)
        self.publisher.publish("/tasks/create", ev.TaskCreate(
            container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
            io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                         terminal=req.terminal),
            checkpoint=req.checkpoint, pid=self._vm_pid))
        return pb.CreateTaskResponse(pid=self._vm_pid)

    def _apply_options(self, req: pb.CreateTaskRequest) -> None:
        """`ConfigPath` from CRI runtime options or `ctr run --runtime-config-path`."""
        if not req.options.type_url.endswith("runtimeoptions.v1.Options"):
            return
        opts = rtopts.Options.FromString(req.options.value)
        if opts.config_path:
            self.config = config.load(Path(opts.config_path))
        elif opts.config_body:
            self.config = config.parse(opts.config_body.decode(), "runtime options")

    async def Start(self, req: pb.StartRequest) -> pb.StartResponse:
        task = self._task(req.id)
        if not req.exec_id:
            await task.container.start()
            task.init.watcher = asyncio.ensure_future(self._watch_exit(task, task.init))
            self.publisher.publish("/tasks/start", ev.TaskStart(
                container_id=task.id, pid=self._vm_pid))
            return pb.StartResponse(pid=self._vm_pid)
        rec = self._record(req.id, req.exec_id)
        if rec.process is not None:
            raise errors.FailedPrecondition(f"exec {req.exec_id} was already started")
        rec.process = await task.container.exec(rec.exec_id, rec.spec)
        rec.relay = StdioRelay(rec.process, rec.stdin, rec.stdout, rec.stderr, rec.terminal)
        rec.relay.start()
        rec.watcher = asyncio.ensure_future(self._watch_exit(task, rec))
        self.publisher.publish("/tasks/exec-started", ev.TaskExecStarted(
            container_id=task.id, exec_id=rec.exec_id, pid=self._vm_pid))
        return pb.StartResponse(pid=self._vm_pid)

    async def State(self, req: pb.StateRequest) -> pb.StateResponse:
        task = self._task(req.id)
        rec = self._record(req.id, req.exec_id)
        if rec.exec_id:
            st = tt.CREATED if rec.process is None else _STATUS[rec.process.state]
        else:
            st = _STATUS[task.container.state]
        if rec.exit is not None:
            st = tt.STOPPED
        return pb.StateResponse(
            id=req.id, bundle=str(task.bundle), pid=self._vm_pid, status=st, stdin=rec.stdin,
            stdout=rec.stdout, stderr=rec.stderr, terminal=rec.terminal,
            exit_status=exit_code(rec.exit.code) if rec.exit else 0,
            exited_at=_exit_ts(rec.exit) if rec.exit else None, exec_id=req.exec_id)

    async def Wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        rec = self._record(req.id, req.exec_id)
        await rec.exited.wait()
        assert rec.exit is not None
        return pb.WaitResponse(exit_status=exit_code(rec.exit.code), exited_at=_exit_ts(rec.exit))

    async def Kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        rec = self._record(req.id, req.exec_id)
        if rec.exit is not None:
            if req.signal == signal.SIGKILL or req.all:
                return empty_pb2.Empty()  # like runc: killing the dead is no error
            raise errors.NotFound(f"process {req.exec_id or req.id} already finished")
        if task.container.state is State.CREATED and not req.exec_id:
            # Never started: there is nothing to signal; it simply ends.
            await self._end_unstarted(task, req.signal)
            return empty_pb2.Empty()
        if rec.exec_id and rec.process is None:
            raise errors.FailedPrecondition(f"exec {rec.exec_id} was not started")
        await task.container.kill(req.signal, req.all, req.exec_id)
        return empty_pb2.Empty()

    async def _end_unstarted(self, task: Task, sig: int) -> None:
        with contextlib.suppress(errors.PykataError):
            await task.container.sandbox.agent.remove_container(task.id)
        status = ExitStatus(exit_code(128 + sig), time.time_ns())
        task.container.state = State.STOPPED
        task.init.exit = status
        task.init.exited.set()
        self.publisher.publish("/tasks/exit", ev.TaskExit(
            container_id=task.id, id=task.id, pid=self._vm_pid, exit_status=status.code,
            exited_at=_exit_ts(status)))

    async def Delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        task = self._task(req.id)
        if req.exec_id:
            rec = self._record(req.id, req.exec_id)
            if rec.process is not None and rec.exit is None:
                raise errors.FailedPrecondition(f"exec {req.exec_id} is still running")
            if rec.relay is not None:
                await rec.relay.stop()
            task.execs.pop(req.exec_id, None)
            code = exit_code(rec.exit.code) if rec.exit else 0
            return pb.DeleteResponse(pid=self._vm_pid, exit_status=code,
                                     exited_at=_exit_ts(rec.exit))
        if task.container.state in (State.RUNNING, State.PAUSED):
            raise errors.FailedPrecondition(f"cannot delete running task {req.id}")
        async with self._lock:
            await self._remove_task(task)
        rec = task.init
        code = exit_code(rec.exit.code) if rec.exit else 0
        exited = _exit_ts(rec.exit) if rec.exit else _ts(time.time_ns())
        self.publisher.publish("/tasks/delete", ev.TaskDelete(
            container_id=task.id, pid=self._vm_pid, exit_status=code, exited_at=exited,
            id=task.id))
        return pb.DeleteResponse(pid=self._vm_pid, exit_status=code, exited_at=exited)

    async def _remove_task(self, task: Task) -> None:
        for rec in (task.init, *task.execs.values()):
            if rec.relay is not None:
                await rec.relay.stop()
        try:
            await task.container.delete(force=True)
        finally:
            if task.rootfs_mounted:
                rootfs.unmount_rootfs(task.bundle)
            self.tasks.pop(task.id, None)
            # The pod's VM goes with its sandbox container (or its last container).
            if self.sandbox is not None and (task.id == self.sandbox_id or not self.tasks):
                await self._stop_sandbox()

    async def _stop_sandbox(self) -> None:
        for t in list(self.tasks.values()):
            with contextlib.suppress(Exception):
                await self._remove_task(t)
        if self.sandbox is not None:
            sb, self.sandbox = self.sandbox, None
            await sb.stop()

    async def Pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        task = self._task(req.id)
        procs = await task.container.pids()
        out = []
        for p in procs:
            info = None
            if p.exec_id:
                info = pack_any(runcopts.ProcessDetails(exec_id=p.exec_id))
            out.append(tt.ProcessInfo(pid=p.pid, info=info))
        return pb.PidsResponse(processes=out)

    async def Pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self._task(req.id).container.pause()
        self.publisher.publish("/tasks/paused", ev.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        await self._task(req.id).container.resume()
        self.publisher.publish("/tasks/resumed", ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise errors.Unimplemented("checkpoint is not supported by pykata")

    async def Exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        if task.container.state is not State.RUNNING:
            raise errors.FailedPrecondition(
                f"cannot exec in task {req.id}: it is {task.container.state.value}")
        if req.exec_id in task.execs:
            raise errors.AlreadyExists(f"exec {req.exec_id} already exists")
        try:
            spec = json.loads(req.spec.value) if req.spec.value else {}
        except ValueError as exc:
            raise errors.InvalidArgument(f"exec spec is not valid JSON: {exc}") from exc
        spec["terminal"] = req.terminal
        task.execs[req.exec_id] = ExecRecord(req.exec_id, spec, req.stdin, req.stdout,
                                             req.stderr, req.terminal)
        self.publisher.publish("/tasks/exec-added", ev.TaskExecAdded(
            container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        rec = self._record(req.id, req.exec_id)
        if rec.process is None:
            raise errors.FailedPrecondition("process not started")
        await rec.process.resize(req.height, req.width)
        return empty_pb2.Empty()

    async def CloseIO(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        rec = self._record(req.id, req.exec_id)
        if req.stdin and rec.relay is not None:
            await rec.relay.close_stdin()
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        try:
            resources = json.loads(req.resources.value) if req.resources.value else {}
        except ValueError as exc:
            raise errors.InvalidArgument(f"resources are not valid JSON: {exc}") from exc
        await task.container.update(resources)
        return empty_pb2.Empty()

    async def Stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        stats = await self._task(req.id).container.stats()
        return pb.StatsResponse(stats=pack_any(metrics_v2(stats)))

    async def Connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self._vm_pid,
                                  version="pykata")

    async def Shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        if self.tasks and not req.now:
            return empty_pb2.Empty()
        self._on_shutdown.set()
        return empty_pb2.Empty()

    async def close(self) -> None:
        async with self._lock:
            await self._stop_sandbox()


def metrics_v2(s: ContainerStats) -> m2.Metrics:
    mem = s.memory
    return m2.Metrics(
        pids=m2.PidsStat(current=s.pids_current, limit=s.pids_limit),
        cpu=m2.CPUStat(usage_usec=s.cpu.usage_ns // 1000, user_usec=s.cpu.user_ns // 1000,
                       system_usec=s.cpu.kernel_ns // 1000, nr_periods=s.cpu.periods,
                       nr_throttled=s.cpu.throttled_periods,
                       throttled_usec=s.cpu.throttled_time_ns // 1000),
        memory=m2.MemoryStat(
            usage=mem.usage, usage_limit=mem.limit, max_usage=mem.max_usage,
            file=mem.stats.get("file", mem.cache), anon=mem.stats.get("anon", 0),
            kernel_stack=mem.stats.get("kernel_stack", 0), slab=mem.stats.get("slab", 0),
            sock=mem.stats.get("sock", 0), shmem=mem.stats.get("shmem", 0),
            file_mapped=mem.stats.get("file_mapped", 0), file_dirty=mem.stats.get("file_dirty", 0),
            pgfault=mem.stats.get("pgfault", 0), pgmajfault=mem.stats.get("pgmajfault", 0),
            inactive_anon=mem.stats.get("inactive_anon", 0),
            active_anon=mem.stats.get("active_anon", 0),
            inactive_file=mem.stats.get("inactive_file", 0),
            active_file=mem.stats.get("active_file", 0),
        ),
    )
