"""containerd.task.v2.Task for one pod: the first Create boots the VM, later
containers of the pod join it.

The runtime owns the task state (runtime/container.py: Container and Process
and their state machines); this service keeps none of its own beyond the
rootfs mounts it made from containerd's request. Each handler looks the
container or process up, asks the runtime, converts (shim/convert.py) and
publishes the event. Errors are PykataError kinds; the ttRPC server maps them to
status codes in one place.

Event order is containerd's: create, start, then exit (published before any
Wait returns: the exit callback runs before the process's waiters wake), then
delete; an OOM kill of the init is published just before its exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from pykata import errors
from pykata.config import Config
from pykata.hypervisor.base import Hypervisor
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import checkpoint, hooks, sizing, specconv
from pykata.runtime.bundle import load_spec, spec_annotations
from pykata.runtime.container import Container, PodSettings, Process, guest_pull_of
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.state import DEFAULT_NAMESPACE
from pykata.runtime.types import ExitStatus
from pykata.shim import companions as companionsmod
from pykata.shim import convert, rootfs
from pykata.shim.portforward import PortForward
from pykata.shim.stdio import StdioRelay

log = logging.getLogger(__name__)
T = TypeVar("T")

# pykata-runtime's keeper environment (cli/runtime/hookrun.py; the shim may not
# import the CLI): the pod netns it made, and "caller" when it runs the hooks.
NETNS_ENV = "PYKATA_RUNTIME_NETNS"
HOOKS_ENV = "PYKATA_RUNTIME_HOOKS"


class Pod(Protocol):
    """What the service uses of its sandbox (runtime.sandbox.Sandbox, or
    pykata.testing.fakes.FakeSandbox)."""

    @property
    def containers(self) -> Mapping[str, Container]: ...

    @property
    def vm(self) -> Hypervisor | None: ...

    @property
    def failure(self) -> str:
        """Why the pod failed on its own (its VM or virtiofsd died), else ""."""

    async def why_failed(self, exc: errors.PykataError, grace: float = 1.0) -> str: ...

    def container(self, container_id: str) -> Container: ...

    async def create_container(self, container_id: str, bundle: Path,
                               spec: dict[str, Any] | None = None) -> Container: ...

    async def sync_network(self) -> None: ...

    async def stop(self) -> None: ...

    async def quiesce(self) -> None: ...

    async def unquiesce(self, time_ns: int = 0, seed: bytes = b"") -> None: ...

    async def end_checkpointed(self) -> None: ...

    async def resume_restored(self) -> None: ...

    def adopt(self, container_id: str, bundle: Path, spec: dict[str, Any]) -> Container: ...


RUNC_CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"


def _entry(c: Container) -> checkpoint.ContainerEntry:
    """What a checkpoint's manifest says of one container."""
    try:
        digest = hashlib.sha256((c.bundle / "config.json").read_bytes()).hexdigest()
    except OSError:
        digest = ""
    return checkpoint.ContainerEntry(id=c.id, guest_id=c.id, spec_digest=digest,
                                     state=c.state.value, exec_ids=sorted(c.execs))


def _drop_consumed(ckpt: Path) -> None:
    """containerd 1.6 leaves the directory it unpacked a checkpoint into for
    Create (/tmp/ctrd-checkpointNNN) behind: the restored VM has its own copy
    of the RAM, so the largest file goes at once (best effort, never followed)."""
    if not ckpt.name.startswith("ctrd-checkpoint"):
        return
    try:
        dfd = checkpoint.open_dir(ckpt)
    except errors.PykataError:
        return
    try:
        for name in (checkpoint.MEMORY, checkpoint.VMSTATE):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)


def checkpoint_exit(options: any_pb2.Any) -> bool:
    """Whether a Checkpoint request asks the pod to stop afterwards: runc's
    CheckpointOptions ``exit`` (containerd's Go client; ctr 1.6 sends it only
    for ``ctr c checkpoint --task``, always false). No options: leave it running.
    TCP, unix sockets and file locks need nothing: the VM keeps them all."""
    if not options.type_url:
        return False
    if not options.type_url.endswith(RUNC_CHECKPOINT_OPTIONS):
        raise errors.InvalidArgument(
            f"checkpoint options of type {options.type_url[:100]!r} are not understood"
            f" (only {RUNC_CHECKPOINT_OPTIONS})")
    try:
        opts = runcopts.CheckpointOptions.FromString(options.value)
    except Exception as exc:
        raise errors.InvalidArgument(f"undecodable checkpoint options: {exc}") from None
    for name in ("image_path", "work_path"):
        if getattr(opts, name):
            raise errors.InvalidArgument(
                f"checkpoint option {name} is not supported: pykata writes the checkpoint"
                " where containerd asks")
    return opts.exit


class PodFactory(Protocol):
    """Boots the pod's sandbox: ``Sandbox.create``."""

    def __call__(self, sandbox_id: str, config: Config, *, hostname: str = "",
                 netns: str = "", namespace: str = DEFAULT_NAMESPACE,
                 annotations: Mapping[str, str] | None = None) -> Awaitable[Pod]: ...


class RestoreFactory(Protocol):
    """Restores the pod's sandbox from a checkpoint: ``Sandbox.restore``."""

    def __call__(self, sandbox_id: str, config: Config, ckpt: Path, *, netns: str = "",
                 namespace: str = DEFAULT_NAMESPACE) -> Awaitable[Pod]: ...


class EventSink(Protocol):
    """Where events go: shim.events.Publisher (a list in unit tests)."""

    def publish(self, topic: str, event: Message) -> None: ...


class TaskService:
    def __init__(self, sandbox_id: str, namespace: str, config: Config,
                 publisher: EventSink, on_shutdown: asyncio.Event,
                 make_sandbox: PodFactory | None = None,
                 restore_sandbox: RestoreFactory | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.publisher = publisher
        self.sandbox: Pod | None = None
        self._make_sandbox: PodFactory = make_sandbox or Sandbox.create
        self._restore_sandbox: RestoreFactory = restore_sandbox or Sandbox.restore
        self._rootfs: set[str] = set()  # containers whose rootfs this shim mounted
        self._lock = asyncio.Lock()
        self._on_shutdown = on_shutdown
        # Set by pykata-runtime for its keeper (cli/runtime/hookrun.py): the network
        # namespace it made for a spec asking a new one, and that it runs the
        # hooks itself (with its stand-in's pid). Under containerd both are ours.
        self._default_netns = os.environ.get(NETNS_ENV, "")
        self._run_hooks = os.environ.get(HOOKS_ENV, "") != "caller"
        self._portfwd: PortForward | None = None  # CRI PortForward into the VM
        self._booting: asyncio.Task[Any] | None = None  # the first Create, while it boots
        self._companions: list[companionsmod.Companion] = []  # running beside the sandbox

    # -- lookups -------------------------------------------------------------------
    def _container(self, tid: str) -> Container:
        if self.sandbox is not None:
            with contextlib.suppress(errors.NotFound):
                return self.sandbox.container(tid)
        raise errors.NotFound(f"task {tid} not found")

    def _process(self, tid: str, exec_id: str) -> tuple[Container, Process]:
        c = self._container(tid)
        return c, c.process(exec_id)

    @property
    def _pid(self) -> int:
        """The task pid containerd sees: the VM's."""
        vm = self.sandbox.vm if self.sandbox is not None else None
        return (vm.pid or 0) if vm is not None else 0

    def _exited(self, proc: Process) -> None:
        """A process's exit is final (called by the runtime before its waiters wake)."""
        assert proc.exit is not None
        if proc.exit.oom_killed and not proc.exec_id:
            # Before the exit, as containerd's own shims do: CRI then reports OOMKilled.
            self.publisher.publish("/tasks/oom", ev.TaskOOM(container_id=proc.container.id))
        self.publisher.publish("/tasks/exit", convert.exit_event(proc, self._pid))

    # -- Task service ----------------------------------------------------------------
    async def Create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        if req.parent_checkpoint:
            raise errors.Unimplemented(
                f"cannot create task {req.id}: a parent checkpoint (pre-dump) is not"
                " supported by pykata")
        if req.checkpoint:
            return await self._create_restored(req)
        bundle = Path(req.bundle)
        spec = load_spec(bundle)
        async with self._lock:
            if self.sandbox is not None and req.id in self.sandbox.containers:
                raise errors.AlreadyExists(f"task {req.id} already exists")
            cfg = self.config if self.sandbox is not None else (
                convert.runtime_config(req.options) or self.config)
            if guest_pull_of(spec, cfg) is not None:
                # The agent pulls the image itself: containerd's snapshot is never
                # mounted (the empty rootfs directory satisfies the spec's root).
                mounted = False
                if req.rootfs:
                    (bundle / "rootfs").mkdir(exist_ok=True)
            else:
                mounted = rootfs.mount_rootfs(bundle, convert.rootfs_mounts(req.rootfs))
            try:
                if self.sandbox is None:
                    self.config = cfg
                    # Refused before a VM boots: a malformed spec, the version, hooks,
                    # host namespaces.
                    specconv.validate(spec, bundle)
                    specconv.check_spec(spec, self.config.agent.container_engine)
                    specconv.check_namespaces(spec, specconv.PodNamespaces())
                    sizing.check_limits_before_boot(
                        self.sandbox_id, self.config,
                        (spec.get("linux") or {}).get("resources") or {})
                    pod = PodSettings.of(spec)
                    self._booting = asyncio.current_task()  # Shutdown cancels it
                    try:
                        self.sandbox = await self._make_sandbox(
                            self.sandbox_id, self.config, hostname=pod.hostname,
                            netns=pod.netns or self._default_netns, namespace=self.namespace,
                            annotations=spec.get("annotations") or {})
                        self._portfwd = await PortForward.start(self.sandbox_id, pod.netns,
                                                                self.sandbox.vm)
                        self._companions = await companionsmod.start_all(
                            companionsmod.companions_for(self.config, self.sandbox_id,
                                                         self.namespace),
                            self.sandbox, spec)
                    finally:
                        self._booting = None
                container = await self._explained(
                    self.sandbox.create_container(req.id, bundle, spec),
                    f"create container {req.id}")
                try:
                    await self._hooks(container, ("prestart", "createRuntime"), fail=True)
                    if self.sandbox.failure:  # the VM died while the hooks ran
                        raise errors.Unavailable(
                            f"cannot create container {req.id}: sandbox {self.sandbox_id}"
                            f" failed: {self.sandbox.failure}")
                except BaseException:
                    with contextlib.suppress(Exception):
                        await container.delete(force=True)
                    raise
            except BaseException:
                if mounted:
                    rootfs.unmount_rootfs(bundle)
                if self.sandbox is not None and not self.sandbox.containers:
                    sb, self.sandbox = self.sandbox, None
                    await self._stop_companions()
                    await self._stop_portfwd()
                    await sb.stop()
                raise
            if mounted:
                self._rootfs.add(req.id)
            container.init.on_exit(self._exited)
            container.init.attach_io(StdioRelay(container.init, convert.stdio(req)))
        self.publisher.publish("/tasks/create", convert.create_event(req, self._pid))
        return pb.CreateTaskResponse(pid=self._pid)

    async def _create_restored(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        """Create from a checkpoint (``ctr c restore --live``): the pod's VM is
        restored, paused, instead of booted (docs/checkpoint-design.md §6.5); its
        Start runs it. Only the pod's first task. Nothing is mounted: a
        checkpointed pod shares no files with the host."""
        bundle = Path(req.bundle)
        ckpt = Path(req.checkpoint)
        spec = load_spec(bundle)
        async with self._lock:
            if self.sandbox is not None:
                raise errors.FailedPrecondition(
                    f"cannot restore task {req.id} into a running pod: pykata restores whole"
                    " pods")
            if req.id != self.sandbox_id:
                raise errors.FailedPrecondition(
                    f"cannot restore task {req.id}: restore the pod's sandbox container"
                    f" ({self.sandbox_id}); pykata restores whole pods")
            cfg = convert.runtime_config(req.options) or self.config
            specconv.validate(spec, bundle)
            if guest_pull_of(spec, cfg) is not None and req.rootfs:
                (bundle / "rootfs").mkdir(exist_ok=True)
            pod = PodSettings.of(spec)
            self.config = cfg
            self._booting = asyncio.current_task()  # Shutdown cancels it
            try:
                sb = await self._restore_sandbox(
                    self.sandbox_id, cfg, ckpt, netns=pod.netns or self._default_netns,
                    namespace=self.namespace)
            finally:
                self._booting = None
            try:
                container = sb.adopt(req.id, bundle, spec)
            except BaseException:
                await sb.stop()
                raise
            self.sandbox = sb
            container.init.on_exit(self._exited)
            container.init.attach_io(StdioRelay(container.init, convert.stdio(req)))
        _drop_consumed(ckpt)
        self.publisher.publish("/tasks/create", convert.create_event(req, self._pid))
        return pb.CreateTaskResponse(pid=self._pid)

    async def Start(self, req: pb.StartRequest) -> pb.StartResponse:
        c, proc = self._process(req.id, req.exec_id)
        if not req.exec_id and self.sandbox is not None:
            # A pod restored from a checkpoint runs from its first Start.
            await self._explained(self.sandbox.resume_restored(),
                                  f"start restored container {c.id}")
        if not req.exec_id:
            await self._sync_network()
            await self._explained(c.start(), f"start container {c.id}")
            self.publisher.publish("/tasks/start", ev.TaskStart(container_id=c.id,
                                                                pid=self._pid))
            await self._hooks(c, ("poststart",), fail=False)
        else:
            await self._explained(proc.start(), f"start exec {proc.exec_id} in container {c.id}")
            self.publisher.publish("/tasks/exec-started", ev.TaskExecStarted(
                container_id=c.id, exec_id=proc.exec_id, pid=self._pid))
        return pb.StartResponse(pid=self._pid)

    async def State(self, req: pb.StateRequest) -> pb.StateResponse:
        c, proc = self._process(req.id, req.exec_id)
        return convert.state_response(c, proc, self._pid)

    async def Wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        _, proc = self._process(req.id, req.exec_id)
        return convert.wait_response(await proc.wait())

    async def Kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        await c.kill(req.signal, req.all, req.exec_id)
        return empty_pb2.Empty()

    async def Delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        c = self._container(req.id)
        if req.exec_id:
            return convert.delete_response(await c.remove_exec(req.exec_id), self._pid)
        async with self._lock:
            status = await self._remove_task(c)
        await self._hooks(c, ("poststop",), fail=False)
        # (0 once the pod's VM went with its last container, as before.)
        self.publisher.publish("/tasks/delete", convert.delete_event(c, status, self._pid))
        return convert.task_delete_response(status, self._pid)

    async def _explained(self, op: Awaitable[T], what: str) -> T:
        """``op``; an error it raises because the pod's VM died (or was stopped:
        runtime/watchdog.py) becomes one line saying so."""
        try:
            return await op
        except errors.PykataError as exc:
            why = await self.sandbox.why_failed(exc) if self.sandbox is not None else ""
            if why:
                raise errors.Unavailable(f"cannot {what}: sandbox {self.sandbox_id} failed:"
                                         f" {why}") from exc
            raise

    async def _hooks(self, c: Container, kinds: tuple[str, ...], *, fail: bool) -> None:
        """The container's host hooks of ``kinds`` (runtime/hooks.py), with the task
        pid containerd sees in their state; failures raised with ``fail``, else logged."""
        if not self._run_hooks:
            return
        parsed = hooks.parse(c.spec)
        for kind in kinds:
            if not parsed.get(kind):
                continue
            st = hooks.state(c.id, hooks.STATUS[kind], self._pid, str(c.bundle),
                             spec_annotations(c.spec), str(c.spec.get("ociVersion") or ""))
            await hooks.run_kind(parsed, kind, st, fail=fail)

    async def _sync_network(self) -> None:
        """Connect what appeared in the pod's network namespace since the last
        look (a prestart hook wired it, as Docker's does) before the init runs."""
        if self.sandbox is None:
            return
        try:
            await self.sandbox.sync_network()
        except (errors.PykataError, OSError) as exc:
            log.error("sandbox %s: cannot connect the pod network: %s", self.sandbox_id, exc)

    async def _remove_task(self, c: Container) -> ExitStatus | None:
        """Delete a container that is not running, unmount its rootfs; the pod's VM
        goes with its sandbox container (or its last container)."""
        c.check_deletable()
        try:
            return await c.delete()
        finally:
            self._unmount_rootfs(c)
            if self.sandbox is not None and (c.id == self.sandbox_id
                                             or not self.sandbox.containers):
                await self._stop_sandbox()

    def _unmount_rootfs(self, c: Container) -> None:
        if c.id in self._rootfs:
            self._rootfs.discard(c.id)
            rootfs.unmount_rootfs(c.bundle)

    async def _stop_portfwd(self) -> None:
        pf, self._portfwd = self._portfwd, None
        if pf is not None:
            await pf.stop()

    async def _stop_companions(self) -> None:
        items, self._companions = self._companions, []
        await companionsmod.stop_all(items)

    async def _stop_sandbox(self) -> None:
        sb, self.sandbox = self.sandbox, None
        await self._stop_companions()
        await self._stop_portfwd()
        if sb is None:
            return
        for c in list(sb.containers.values()):
            with contextlib.suppress(Exception):
                try:
                    await c.delete(force=True)
                finally:
                    self._unmount_rootfs(c)
        await sb.stop()

    async def Pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        return convert.pids_response(await self._container(req.id).pids())

    async def Pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self._container(req.id).pause()
        self.publisher.publish("/tasks/paused", ev.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        await self._container(req.id).resume()
        self.publisher.publish("/tasks/resumed", ev.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def Checkpoint(self, req: pb.CheckpointTaskRequest) -> empty_pb2.Empty:
        """Save the whole pod (its VM: devices, RAM, every container) into
        ``req.path`` (docs/checkpoint-design.md). Refused with one line, nothing
        changed, unless its VM can be saved; on any later error the pod runs on
        and what was written into ``req.path`` is removed."""
        async with self._lock:
            c = self._container(req.id)
            if c.id != self.sandbox_id:
                raise errors.FailedPrecondition(
                    f"cannot checkpoint task {req.id}: checkpoint the pod's sandbox container"
                    f" ({self.sandbox_id}); pykata checkpoints whole pods")
            sb = self.sandbox
            assert sb is not None
            exit_after = checkpoint_exit(req.options)
            assert isinstance(sb, Sandbox)
            why = checkpoint.eligible(sb)
            if why:
                raise errors.FailedPrecondition(f"cannot checkpoint sandbox {self.sandbox_id}:"
                                                f" {why}")
            dest = Path(req.path)
            if not req.path or not dest.is_dir() or dest.is_symlink():
                raise errors.InvalidArgument(
                    f"cannot checkpoint sandbox {self.sandbox_id}: {req.path[:200]!r} is not"
                    " a directory")
            before = set(os.listdir(dest))
            started = time.monotonic()
            try:
                await sb.quiesce()
                await checkpoint.save(
                    sb, dest, containers=[_entry(x) for x in sb.containers.values()],
                    next_stream_id=sb.agent.next_stream_id,
                    extra={"sandbox_id": self.sandbox_id, "namespace": self.namespace})
            except BaseException as exc:
                await self._undo_checkpoint(sb, dest, before)
                if isinstance(exc, errors.PykataError):
                    text = exc.message
                    if not text.startswith("cannot checkpoint"):
                        text = f"cannot checkpoint sandbox {self.sandbox_id}: {text}"
                    raise type(exc)(text) from exc
                if isinstance(exc, OSError):
                    raise errors.Internal(f"cannot checkpoint sandbox {self.sandbox_id}:"
                                          f" {exc}") from exc
                raise
            if exit_after:
                await sb.end_checkpointed()
            else:
                await self._run_again(sb)
        log.info("sandbox %s checkpointed into %s in %.2fs%s", self.sandbox_id, dest,
                 time.monotonic() - started, " and stopped" if exit_after else "")
        return empty_pb2.Empty()

    async def _run_again(self, sb: Pod) -> None:
        """After a checkpoint (or a failed one): the VM runs, the agent's clock
        and entropy are fixed, the waits and reads held go on."""
        try:
            if sb.vm is not None:
                await sb.vm.resume()
        finally:
            await sb.unquiesce(time.time_ns(), os.urandom(64))

    async def _undo_checkpoint(self, sb: Pod, dest: Path, before: set[str]) -> None:
        """A checkpoint failed: the pod runs on (logged, never raised) and what
        it wrote into ``dest`` goes."""
        try:
            await self._run_again(sb)
        except Exception as exc:
            log.error("sandbox %s: not running again after a failed checkpoint: %s",
                      self.sandbox_id, exc)
        with contextlib.suppress(OSError):
            for name in set(os.listdir(dest)) - before:
                path = dest / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()

    async def Exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        proc = c.add_exec(req.exec_id, convert.exec_spec(req))
        proc.on_exit(self._exited)
        proc.attach_io(StdioRelay(proc, convert.stdio(req)))
        self.publisher.publish("/tasks/exec-added", ev.TaskExecAdded(
            container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def ResizePty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        _, proc = self._process(req.id, req.exec_id)
        await proc.resize(req.height, req.width)
        return empty_pb2.Empty()

    async def CloseIO(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        _, proc = self._process(req.id, req.exec_id)
        if req.stdin:
            await proc.end_input()
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        await self._container(req.id).update(convert.resources(req))
        return empty_pb2.Empty()

    async def Stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        return convert.stats_response(await self._container(req.id).stats())

    async def Connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self._pid, version="pykata")

    async def Shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        if self.sandbox is not None and self.sandbox.containers and not req.now:
            return empty_pb2.Empty()
        if self._booting is not None:
            # containerd gave up on the pod's first Create (its client went away or
            # timed out: it deletes the task, then shuts us down). The boot would
            # only be torn down once done: stop it now, nothing is left either way.
            log.info("sandbox %s: shutdown while its VM boots: boot abandoned",
                     self.sandbox_id)
            self._booting.cancel()
        self._on_shutdown.set()
        return empty_pb2.Empty()

    async def close(self) -> None:
        async with self._lock:
            await self._stop_sandbox()
