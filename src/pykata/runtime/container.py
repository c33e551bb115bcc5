"""Container and Process: explicit states, each operation checks it may run.

    Container:  CREATING --create--> CREATED --start--> RUNNING <--pause/resume--> PAUSED
                                        |                  |
                                        +---kill---+   init exits
                                                   v       v
                                                    STOPPED --delete--> (gone from its sandbox)

    Process:    CREATED --start--> RUNNING --exit final--> STOPPED
                (the init is started by its container; an exec is CREATED from
                add_exec until its own start)

A process's exit is final once the agent reported it and, when stdio is
attached (``attach_io``), the output reached the host: only then does the
process become STOPPED, are the ``on_exit`` callbacks called (in that order,
before any ``wait()`` returns), and, for the init, does the container stop.

The runtime owns this state; callers (the shim, the admin CLI) read it and ask
for transitions, they never set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal as signals
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from pykata import errors, observe, tracing
from pykata.config import Config
from pykata.hypervisor.base import Hypervisor
from pykata.resources import blockdev, network
from pykata.runtime import specconv
from pykata.runtime.state import ContainerRecord
from pykata.runtime.types import (
    ContainerAgent,
    ContainerStats,
    Device,
    ExitStatus,
    GuestPull,
    ProcessInfo,
    ProcessIO,
    State,
    Stdio,
    Storage,
    quiesced,
)
from pykata.utils.files import read_capped
from pykata.wire import GUEST_SHARED_DIR

log = logging.getLogger(__name__)

LOST_STATUS = 255  # the exit status of a process whose VM (or agent) went away

# Guest pull (issue 19, docs/guest-pull.md): a pod (or a container) asks with
# GUEST_PULL_ANNOTATION = "true" (else [guest_pull] enabled turns it on for
# every container); the image is GUEST_PULL_IMAGE_ANNOTATION (which alone also
# asks: ctr sets no image annotation) or CRI's image name.
GUEST_PULL_ANNOTATION = "io.pykata.guest-pull"
GUEST_PULL_IMAGE_ANNOTATION = "io.pykata.guest-pull.image"
CRI_IMAGE_ANNOTATION = "io.kubernetes.cri.image-name"


def guest_pull_of(spec: dict[str, Any], cfg: Config) -> GuestPull | None:
    """The image the agent pulls itself for this container, or None (the host
    shares its root filesystem). A pod's sandbox (pause) container always runs
    from the host's root: CRI names no image for it. Credentials: containerd
    hands the shim none (the CRI request's auth stays in containerd's CRI
    plugin), so only public or unauthenticated registries work through CRI."""
    ann = spec.get("annotations")
    ann = ann if isinstance(ann, dict) else {}
    asked = str(ann.get(GUEST_PULL_ANNOTATION, "")).lower()
    if asked not in ("", "true", "false"):
        raise errors.InvalidArgument(
            f"annotation {GUEST_PULL_ANNOTATION} must be true or false, not {asked[:40]!r}")
    named = str(ann.get(GUEST_PULL_IMAGE_ANNOTATION) or "")
    wanted = asked == "true" or (asked != "false" and (cfg.guest_pull.enabled or bool(named)))
    if not wanted or specconv.is_pod_sandbox(spec):
        return None
    image = named or str(ann.get(CRI_IMAGE_ANNOTATION) or "")
    if not image:
        raise errors.InvalidArgument(
            f"guest pull: the container names no image (annotation {GUEST_PULL_IMAGE_ANNOTATION}"
            f" or {CRI_IMAGE_ANNOTATION}; ctr sets neither: pass --annotation"
            f" {GUEST_PULL_IMAGE_ANNOTATION}=<image>)")
    return GuestPull(image=image,
                     plain_http_registries=tuple(cfg.guest_pull.plain_http_registries),
                     storage_bytes=cfg.guest_pull.storage_mib << 20)


class Tree(Protocol):
    """The sandbox's shared tree as a container uses it (runtime/sharedtree.py)."""

    def share(self, source: Path, rel: str, readonly: bool, *, recursive: bool = True,
              recursive_ro: bool = False, receive: bool = False) -> tuple[str, list[str]]: ...

    def unshare(self, points: list[str]) -> list[str]: ...

    def clear(self, rel: str) -> list[str]: ...


# Without a shared file system a bind of a regular file up to this size is
# copied into the VM (podman's /etc/hosts, /etc/resolv.conf, /etc/hostname,
# /run/.containerenv); anything else bound from the host is refused.
BIND_FILE_MAX = 1 << 20


@dataclass(frozen=True)
class HostFile:
    """A host file read for a copy into the guest."""

    data: bytes
    mode: int
    uid: int
    gid: int


def read_bind_file(hm: specconv.HostMount, limit: int = BIND_FILE_MAX) -> HostFile:
    """The content of the bind source ``hm.source`` when it is a regular file of
    at most ``limit`` bytes, read without following a link in its last
    component (nor opening anything but a regular file); else one line saying
    why it cannot reach a VM without a shared file system."""
    what = f"bind mount {hm.destination or hm.target} (source {hm.source})"
    need = f"{what} needs a shared file system; this pod has shared_fs = none"
    try:
        st = os.lstat(hm.source)
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise errors.FailedPrecondition(f"{need} (it is a symbolic link; only regular files"
                                        " are copied into the VM)")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise errors.FailedPrecondition(f"{need} (it is {kind}; only regular files are"
                                        " copied into the VM)")
    try:
        fd = os.open(hm.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                     | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since the lstat
            raise errors.FailedPrecondition(f"{need} (it is not a regular file)")
        data = read_capped(fd, limit)
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise errors.FailedPrecondition(
            f"{need} (it is larger than {limit >> 10} KiB, the most copied into the VM)")
    return HostFile(data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


class PodSandbox(Protocol):
    """What a Container needs of its sandbox: ``runtime.sandbox.Sandbox``, or
    ``pykata.testing.fakes.FakeSandbox`` in unit tests."""

    @property
    def id(self) -> str: ...

    @property
    def config(self) -> Config: ...

    @property
    def agent(self) -> ContainerAgent: ...

    @property
    def tree(self) -> Tree: ...

    @property
    def shared_dir(self) -> Path: ...

    # The pod's VM (its pid names the pod's namespaces in CRI specs), the network
    # namespace it is connected to, and its containers.
    vm: Hypervisor | None
    netns: str
    containers: dict[str, Container]
    # Set while the sandbox runs; cleared while it is quiesced for a checkpoint:
    # a blocking call the agent ended then (wire.QUIESCED) is made again once set.
    resumed: asyncio.Event

    def persist(self) -> None: ...

    def check_resources(self, res: dict[str, Any]) -> None: ...

    async def fit_resources(self) -> None: ...

    def block_devices(self) -> blockdev.BlockDevices: ...

    def forget(self, c: Container) -> None:
        """``c`` was deleted: drop it from the sandbox."""


@dataclass(frozen=True)
class PodSettings:
    """What the spec of a pod's first container says about the sandbox made for it."""

    hostname: str = ""
    netns: str = ""  # the network namespace to connect the VM to ("" = none)

    @classmethod
    def of(cls, spec: dict[str, Any]) -> PodSettings:
        return cls(hostname=str(spec.get("hostname") or ""), netns=network.netns_of(spec))


def _require(what: str, current: State, *allowed: State) -> None:
    if current not in allowed:
        raise errors.FailedPrecondition(
            f"cannot {what}: it is {current.value} (needs {' or '.join(s.value for s in allowed)})"
        )


ExitCallback = Callable[["Process"], None]

QUIESCED_RETRY = 0.1  # seconds between calls the agent keeps ending while the gate is open

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", "Container", "Process")


def _traced(name: str) -> Callable[[Callable[Concatenate[T, P], Awaitable[R]]],
                                   Callable[Concatenate[T, P], Awaitable[R]]]:
    """Run a lifecycle operation as the phase ``name`` (a span when tracing is on),
    then export what the agent recorded for it."""

    def decorate(fn: Callable[Concatenate[T, P], Awaitable[R]]
                 ) -> Callable[Concatenate[T, P], Awaitable[R]]:
        async def wrapper(self: T, /, *args: P.args, **kwargs: P.kwargs) -> R:
            c = self if isinstance(self, Container) else self.container
            try:
                with observe.phase(name, sandbox=c.sandbox.id, container=c.id):
                    return await fn(self, *args, **kwargs)
            finally:
                await c.collect_spans()

        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


class Process:
    """The init process (exec_id "") or an exec'd process of a container."""

    def __init__(self, container: Container, exec_id: str, spec: dict[str, Any]) -> None:
        self.container = container
        self.exec_id = exec_id
        self.spec = spec
        self.pid = 0
        self.state = State.CREATED
        self.exit: ExitStatus | None = None
        self.io: ProcessIO | None = None
        self._io_started = False
        self._starting = False
        self._on_exit: list[ExitCallback] = []
        self._exited = asyncio.Event()
        self._waiter: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Process {self.name} {self.state.value}>"

    @property
    def name(self) -> str:
        return f"{self.container.id}/{self.exec_id or 'init'}"

    @property
    def terminal(self) -> bool:
        return bool(self.spec.get("terminal"))

    @property
    def stdio(self) -> Stdio:
        """Where its stdio goes on the host (nothing until ``attach_io``)."""
        return self.io.stdio if self.io is not None else Stdio(terminal=self.terminal)

    @property
    def started(self) -> bool:
        return self.state is not State.CREATED

    @property
    def _agent(self) -> ContainerAgent:
        return self.container.sandbox.agent

    @property
    def _ids(self) -> tuple[str, str]:
        return self.container.id, self.exec_id

    @property
    def _in_guest(self) -> bool:
        """The agent knows this process: a started exec, or the init of a created container."""
        if self.exec_id:
            return self.started
        if self.container.restored:
            return False  # its stdio starts at its Start, when the VM runs
        return self.container.state is not State.CREATING

    def _what(self, verb: str) -> str:
        kind = f"exec {self.exec_id} of container" if self.exec_id else "init of container"
        return f"{verb} {kind} {self.container.id}"

    # -- stdio and exit callbacks -----------------------------------------------------
    def attach_io(self, io: ProcessIO) -> None:
        """Have ``io`` carry this process's stdio. It starts as soon as the process
        exists in the guest (now, for the init of a created container; at start,
        for an exec); the exit is final only after ``io`` has drained."""
        _require(self._what("attach stdio to"), self.state, State.CREATED, State.RUNNING)
        if self.io is not None:
            raise errors.AlreadyExists(f"process {self.name} already has its stdio attached")
        self.io = io
        if self._in_guest:
            self._start_io()

    def _start_io(self) -> None:
        if self.io is not None and not self._io_started:
            self._io_started = True
            self.io.start()

    def on_exit(self, callback: ExitCallback) -> None:
        """Call ``callback(process)`` once the exit is final, before ``wait()``
        returns (callbacks run in the order registered; they must not block)."""
        if self.exit is not None:
            raise errors.FailedPrecondition(f"process {self.name} has already exited")
        self._on_exit.append(callback)

    async def close_io(self) -> None:
        """Stop relaying stdio (the process is being removed)."""
        if self.io is not None:
            await self.io.stop()

    # -- lifecycle --------------------------------------------------------------------
    @_traced("container.exec")
    async def start(self) -> int:
        """Run this exec in the guest; its pid there. (The init is started by
        ``Container.start``.)"""
        if not self.exec_id:
            raise errors.FailedPrecondition(
                f"the init of container {self.container.id} starts with its container")
        _require(self._what("start"), self.state, State.CREATED)
        if self._starting:
            raise errors.FailedPrecondition(f"exec {self.exec_id} of container"
                                            f" {self.container.id} is being started")
        _require(f"start exec {self.exec_id} in container {self.container.id}",
                 self.container.state, State.RUNNING)
        self._starting = True
        try:
            pid = await self._agent.exec_process(self.container.id, self.exec_id, self.spec)
        finally:
            self._starting = False
        self._started(pid)
        return pid

    def _started(self, pid: int) -> None:
        self.pid = pid
        self.state = State.RUNNING
        self._start_io()
        self._waiter = asyncio.ensure_future(self._watch())

    async def _again(self, call: Callable[[], Awaitable[R]]) -> R:
        """A blocking agent call, made again when a checkpoint's quiesce ended it
        (wire.QUIESCED): once the sandbox runs again. Never an exit or an end of
        stream."""
        while True:
            try:
                return await call()
            except errors.Unavailable as exc:
                if not quiesced(exc):
                    raise
            resumed = self.container.sandbox.resumed
            if resumed.is_set():
                await asyncio.sleep(QUIESCED_RETRY)
            else:
                log.debug("process %s: agent quiesced; waiting for the sandbox", self.name)
                await resumed.wait()

    async def _watch(self) -> None:
        try:
            status = await self._again(lambda: self._agent.wait_process(*self._ids))
        except errors.PykataError as exc:
            # The agent (its VM) is gone: 255 as Kata reports it, exited now.
            log.warning("lost process %s/%s: %s", *self._ids, exc)
            status = ExitStatus(LOST_STATUS, time.time_ns())
        if self.io is not None:
            try:
                await self.io.drain()
            except Exception as exc:  # the exit must be reported whatever the relay did
                log.warning("process %s: output not drained: %s", self.name, exc)
        self._finish(status)

    def _finish(self, status: ExitStatus) -> None:
        """The exit is final: record it, tell the container, the callbacks, the waiters."""
        if self.exit is not None:
            return
        self.exit = status
        self.state = State.STOPPED
        self.container._process_exited(self)
        for callback in self._on_exit:
            try:
                callback(self)
            except Exception:
                log.exception("process %s: exit callback failed", self.name)
        self._exited.set()

    async def wait(self) -> ExitStatus:
        """Its exit status, once final (see the module docstring)."""
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    async def signal(self, sig: int, all_processes: bool = False) -> None:
        """Send ``sig``. A finished process: SIGKILL (or ``all_processes``) is no
        error, as with runc; any other signal is NotFound."""
        if self.state is State.STOPPED:
            if sig == signals.SIGKILL or all_processes:
                return
            raise errors.NotFound(f"process {self.name} has already exited")
        if self.exec_id and not self.started:
            raise errors.FailedPrecondition(f"exec {self.exec_id} of container"
                                            f" {self.container.id} was not started")
        await self._agent.signal_process(*self._ids, sig, all_processes)

    def _require_started(self, what: str) -> None:
        if self.exec_id and not self.started:
            raise errors.FailedPrecondition(
                f"cannot {what} exec {self.exec_id} of container {self.container.id}:"
                " it was not started")

    async def write_stdin(self, data: bytes) -> int:
        return await self._agent.write_stdin(*self._ids, data)

    async def close_stdin(self) -> None:
        """Close its stdin in the guest."""
        await self._agent.close_stdin(*self._ids)

    async def end_input(self) -> None:
        """No more input (containerd's CloseIO): through the attached stdio if
        any (it stops feeding first), else directly."""
        if self.io is not None:
            await self.io.close_stdin()
        elif self.state is State.RUNNING:
            await self.close_stdin()

    async def read_stdout(self, size: int = 65536) -> bytes:
        return await self._again(lambda: self._agent.read_stdout(*self._ids, size))

    async def read_stderr(self, size: int = 65536) -> bytes:
        return await self._again(lambda: self._agent.read_stderr(*self._ids, size))

    async def resize(self, rows: int, cols: int) -> None:
        self._require_started("resize the terminal of")
        await self._agent.resize_tty(*self._ids, rows, cols)

    def cancel_watch(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()


class Container:
    def __init__(self, sandbox: PodSandbox, container_id: str, bundle: Path,
                 spec: dict[str, Any]) -> None:
        self.sandbox = sandbox
        self.id = container_id
        self.bundle = bundle
        self.spec = spec
        self.state = State.CREATING
        self.init = Process(self, "", spec.get("process", {}))
        self.execs: dict[str, Process] = {}
        self._host_mounts: list[Path] = []
        self._disks: list[str] = []  # serials of hot-plugged block volumes, one per use
        # Restored from a checkpoint and not started yet: "running" or "paused"
        # (its state in the checkpoint); its processes run in the guest already.
        self.restored = ""

    def __repr__(self) -> str:
        return f"<Container {self.id} {self.state.value}>"

    def resources(self) -> dict[str, Any]:
        """The container's OCI linux.resources (as last created or updated)."""
        linux = self.spec.get("linux") or {}
        res: dict[str, Any] = linux.get("resources") or {}
        return res

    def pod_namespaces(self) -> specconv.PodNamespaces:
        """What this container's namespace paths may name (specconv.check_namespaces)."""
        vm = self.sandbox.vm
        others = [c for c in self.sandbox.containers if c != self.id]
        return specconv.PodNamespaces(vm_pid=(vm.pid or 0) if vm is not None else 0,
                                      netns=self.sandbox.netns, first=not others)

    @property
    def shared_dir(self) -> Path:
        """The container's part of the (read-only) tree the guest sees."""
        return self.sandbox.shared_dir / self.id

    @property
    def _agent(self) -> ContainerAgent:
        return self.sandbox.agent

    def record(self) -> ContainerRecord:
        return ContainerRecord(self.id, str(self.bundle), self.state.value,
                               [str(p) for p in self._host_mounts])

    async def collect_spans(self) -> None:
        """Export the spans the agent recorded (nothing when tracing is off)."""
        if tracing.enabled():
            with contextlib.suppress(errors.PykataError):
                await tracing.collect(self.sandbox.agent)

    @_traced("container.create")
    async def create(self) -> None:
        """Share the root filesystem and bind mounts, hot-plug block volumes, then
        create it in the guest. On any error nothing is left behind."""
        _require(f"create container {self.id}", self.state, State.CREATING)
        specconv.validate(self.spec, self.bundle)
        specconv.check_spec(self.spec, self.sandbox.config.agent.container_engine)
        specconv.check_namespaces(self.spec, self.pod_namespaces())
        self.sandbox.check_resources(self.resources())
        plan = specconv.plan(
            self.spec, self.id, self.bundle,
            guest_empty_dir=not self.sandbox.config.runtime.disable_guest_empty_dir)
        guest_pull = guest_pull_of(self.spec, self.sandbox.config)
        host_mounts = plan.host_mounts
        if guest_pull is not None:  # the guest never sees the host's root filesystem
            host_mounts = [hm for hm in host_mounts if hm.target != f"{self.id}/rootfs"]
            log.info("container %s: the guest pulls %s", self.id, guest_pull.image)
        copies: list[tuple[str, HostFile]] = []
        if self.sandbox.config.vm.shared_fs != "virtio-fs":
            # No shared file system: small files are copied in, the rest refused.
            copies = self._file_copies(host_mounts)
            host_mounts = []
        try:
            self._mount_shared(host_mounts)
            self.sandbox.persist()
            await self.sandbox.fit_resources()
            for path, f in copies:
                await self._agent.copy_file(path, f.data, f.mode, f.uid, f.gid)
            storages, devices = await self._attach_blocks(plan.blocks)
            # The pod's sandbox container owns the pod's pid namespace; containers
            # that join a pid namespace (shareProcessNamespace) get that one.
            share_pid = specconv.is_pod_sandbox(self.spec) or specconv.joins_pid_namespace(
                self.spec)
            await self._agent.create_container(
                self.id, plan.spec, storages=[*plan.storages, *storages], devices=devices,
                sandbox_pidns=share_pid, guest_pull=guest_pull,
                timeout=self.sandbox.config.runtime.create_container_timeout)
        except BaseException:
            self.unmount_shared()
            await self._detach_blocks()
            raise
        self.state = State.CREATED

    async def _attach_blocks(self, blocks: list[specconv.BlockVolume]
                             ) -> tuple[list[Storage], list[Device]]:
        """Hot-plug the container's block volumes: what the agent mounts, and the
        device nodes it fills in."""
        storages: list[Storage] = []
        devices: list[Device] = []
        if not blocks:
            return storages, devices
        reg = self.sandbox.block_devices()
        for b in blocks:
            serial = await reg.attach(b.host_path, b.readonly)
            self._disks.append(serial)
            if b.mount_point:
                storages.append(Storage("blk", serial, b.mount_point, b.fstype, b.options))
            else:
                devices.append(Device(serial, "blk", b.container_path))
        return storages, devices

    async def _detach_blocks(self) -> None:
        """Unplug the container's disks (bounded per disk; never raises)."""
        serials, self._disks = self._disks, []
        if serials:
            await blockdev.detach_all(self.sandbox.block_devices(), serials)

    def _file_copies(self, host_mounts: list[specconv.HostMount]) -> list[tuple[str, HostFile]]:
        """``shared_fs = "none"``: what the guest gets instead of the host's binds,
        a copy of each (small, regular) file at the guest path the spec names;
        anything else is refused in one line before anything changes."""
        out = []
        for hm in host_mounts:
            if hm.target == f"{self.id}/rootfs":
                raise errors.FailedPrecondition(
                    f"cannot create container {self.id}: its root filesystem {hm.source}"
                    " needs a shared file system; this pod has shared_fs = none (have the"
                    f" guest pull its image: annotation {GUEST_PULL_IMAGE_ANNOTATION})")
            out.append((f"{GUEST_SHARED_DIR}/{hm.target}", read_bind_file(hm)))
        return out

    def _mount_shared(self, host_mounts: list[specconv.HostMount]) -> None:
        """Bind the root filesystem and volumes into the sandbox's host-only tree
        (through fds: see runtime/sharedtree.py); the guest sees them read-only
        arranged, each one writable or not as the spec says."""
        for hm in host_mounts:
            point, _ = self.sandbox.tree.share(hm.source, hm.target, hm.readonly,
                                               recursive=hm.recursive,
                                               recursive_ro=hm.recursive_ro, receive=hm.receive)
            self._host_mounts.append(Path(point))

    def unmount_shared(self) -> None:
        """Unmount what this container shared (the recorded mount points, then
        anything left below its own directory of the tree) and remove it."""
        tree = self.sandbox.tree
        failed = tree.unshare([str(p) for p in self._host_mounts])
        failed += tree.clear(self.id)
        if failed:
            log.error("container %s: cannot unmount %s", self.id, ", ".join(failed))
        self._host_mounts.clear()

    @_traced("container.start")
    async def start(self) -> int:
        _require(f"start container {self.id}", self.state, State.CREATED)
        if self.restored:
            return await self._start_restored()
        try:
            pid = await self._agent.start_container(self.id)
        except errors.PykataError:
            # A failed start (a startContainer hook, ...) leaves nothing: the container
            # ends, as runc's does, and only waits for delete.
            await self._end_unstarted(signals.SIGKILL)
            raise
        self.init._started(pid)
        self.state = State.RUNNING
        self.sandbox.persist()
        return pid

    async def _start_restored(self) -> int:
        """Start of a container restored from a checkpoint (its sandbox runs
        again): thawed if it was paused, then watched and relayed as a
        started one. Its pid in the guest is not known: 0."""
        if self.restored == "paused":
            await self._agent.resume(self.id)
        self.restored = ""
        self.init._started(0)
        self.state = State.RUNNING
        self.sandbox.persist()
        return 0

    def _process_exited(self, proc: Process) -> None:
        if proc is self.init:
            self.state = State.STOPPED
            with contextlib.suppress(Exception):
                self.sandbox.persist()

    # -- execs ------------------------------------------------------------------------
    def add_exec(self, exec_id: str, process: dict[str, Any]) -> Process:
        """Announce an exec (containerd's Exec): a CREATED process, run by its
        ``start``; ``remove_exec`` forgets it."""
        _require(f"exec in container {self.id}", self.state, State.RUNNING)
        if not exec_id:
            raise errors.InvalidArgument("exec id must not be empty")
        if exec_id in self.execs:
            raise errors.AlreadyExists(f"exec {exec_id} already exists in container {self.id}")
        args = process.get("args")
        if not isinstance(args, list) or not args:
            raise errors.InvalidArgument("exec process.args must be a non-empty list")
        proc = Process(self, exec_id, process)
        self.execs[exec_id] = proc
        return proc

    async def exec(self, exec_id: str, process: dict[str, Any]) -> Process:
        """Add and start an exec at once; on failure it is forgotten again."""
        proc = self.add_exec(exec_id, process)
        try:
            await proc.start()
        except BaseException:
            self.execs.pop(exec_id, None)
            raise
        return proc

    async def remove_exec(self, exec_id: str) -> ExitStatus | None:
        """Forget an exec that is not running (never started, or exited); its
        exit status if it had one."""
        if not exec_id:
            raise errors.InvalidArgument("exec id must not be empty")
        proc = self.process(exec_id)
        if proc.state is State.RUNNING or proc._starting:
            raise errors.FailedPrecondition(
                f"cannot delete exec {exec_id} of container {self.id}: it is still running")
        self.execs.pop(exec_id, None)
        await proc.close_io()
        return proc.exit

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errors.NotFound(f"exec {exec_id} not found in container {self.id}") from None

    # -- signals and the rest ---------------------------------------------------------
    @_traced("container.kill")
    async def kill(self, sig: int, all_processes: bool = False, exec_id: str = "") -> None:
        """Signal the init (with ``all_processes``: every process) or one exec.
        A container that was never started has nothing to signal: it ends at
        once, with status 128+sig. See Process.signal for a finished process."""
        if exec_id:
            await self.process(exec_id).signal(sig)
            return
        _require(f"kill container {self.id}", self.state, State.CREATED, State.RUNNING,
                 State.PAUSED, State.STOPPED)
        if self.state is State.CREATED:
            await self._end_unstarted(sig)
            return
        await self.init.signal(sig, all_processes)

    def end_checkpointed(self, status: int = 137) -> None:
        """The pod was checkpointed and stopped (checkpoint with exit): its
        running processes end now, as runc's do (137), execs first."""
        now = time.time_ns()
        for p in (*self.execs.values(), self.init):
            if p.state is State.RUNNING:
                p.cancel_watch()
                p._finish(ExitStatus(status, now))

    def vm_lost(self) -> None:
        """Its VM is gone (runtime/watchdog.py): a container that was never started
        ends now, with LOST_STATUS; started processes end as their waits fail."""
        if self.state is State.CREATED:
            self.init._finish(ExitStatus(LOST_STATUS, time.time_ns()))

    async def _end_unstarted(self, sig: int) -> None:
        with contextlib.suppress(errors.PykataError):
            await self._agent.remove_container(self.id)
        self.init._finish(ExitStatus(128 + sig, time.time_ns()))

    async def wait(self) -> ExitStatus:
        return await self.init.wait()

    async def pause(self) -> None:
        _require(f"pause container {self.id}", self.state, State.RUNNING)
        await self._agent.pause(self.id)
        self.state = State.PAUSED

    async def resume(self) -> None:
        _require(f"resume container {self.id}", self.state, State.PAUSED)
        await self._agent.resume(self.id)
        self.state = State.RUNNING

    async def stats(self) -> ContainerStats:
        _require(f"get the stats of container {self.id}", self.state, State.CREATED,
                 State.RUNNING, State.PAUSED, State.STOPPED)
        return await self._agent.stats(self.id)

    async def update(self, resources: dict[str, Any]) -> None:
        _require(f"update container {self.id}", self.state, State.CREATED, State.RUNNING,
                 State.PAUSED)
        resources, _ = specconv.strip_resources(resources, self.id)
        self.sandbox.check_resources(resources)
        linux = self.spec.setdefault("linux", {})
        merged = dict(linux.get("resources") or {})
        merged.update({k: v for k, v in resources.items() if v is not None})
        linux["resources"] = merged
        # Grow the VM first, so a raised limit has CPUs and memory behind it.
        await self.sandbox.fit_resources()
        await self._agent.update(self.id, resources)

    async def pids(self) -> list[ProcessInfo]:
        _require(f"list the processes of container {self.id}", self.state, State.CREATED,
                 State.RUNNING, State.PAUSED, State.STOPPED)
        return await self._agent.list_processes(self.id)

    # -- deletion ---------------------------------------------------------------------
    def check_deletable(self, force: bool = False) -> None:
        """FailedPrecondition unless ``delete(force)`` may run now."""
        if self.state in (State.RUNNING, State.PAUSED) and not force:
            raise errors.FailedPrecondition(
                f"cannot delete container {self.id}: it is {self.state.value}")

    @_traced("container.delete")
    async def delete(self, force: bool = False) -> ExitStatus | None:
        """Remove from the guest and unshare its files; running or paused only with
        ``force``. Afterwards the container is gone from its sandbox even if the
        agent failed (that error is raised once the host side is cleaned up)."""
        self.check_deletable(force)
        for p in (self.init, *self.execs.values()):
            p.cancel_watch()
            with contextlib.suppress(Exception):
                await p.close_io()
        try:
            await self._agent.remove_container(self.id)
        except errors.NotFound:
            pass
        except errors.Unavailable as exc:
            log.warning("container %s: agent gone during delete: %s", self.id, exc)
        finally:
            self.unmount_shared()
            self.state = State.STOPPED
            self.sandbox.forget(self)
            # Last: the agent has unmounted and ejected the disks; bounded either way.
            await self._detach_blocks()
        return self.init.exit
