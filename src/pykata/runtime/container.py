"""Container and Process: explicit states, each operation checks it may run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata import errors
from pykata.resources import blockdev
from pykata.runtime import specconv
from pykata.runtime.state import ContainerRecord
from pykata.runtime.types import (
    ContainerStats,
    Device,
    ExitStatus,
    ProcessInfo,
    State,
    Storage,
)

if TYPE_CHECKING:
    from pykata.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)


def _require(what: str, current: State, *allowed: State) -> None:
    if current not in allowed:
        raise errors.FailedPrecondition(
            f"cannot {what}: it is {current.value} (needs {' or '.join(s.value for s in allowed)})"
        )


class Process:
    """The init process (exec_id "") or an exec'd process of a container."""

    def __init__(self, container: Container, exec_id: str, spec: dict[str, Any]) -> None:
        self.container = container
        self.exec_id = exec_id
        self.spec = spec
        self.pid = 0
        self.state = State.CREATED
        self.exit: ExitStatus | None = None
        self._exited = asyncio.Event()
        self._waiter: asyncio.Task[None] | None = None

    @property
    def terminal(self) -> bool:
        return bool(self.spec.get("terminal"))

    @property
    def _agent(self) -> Any:
        return self.container.sandbox.agent

    @property
    def _ids(self) -> tuple[str, str]:
        return self.container.id, self.exec_id

    def _started(self, pid: int) -> None:
        self.pid = pid
        self.state = State.RUNNING
        self._waiter = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            status = await self._agent.wait_process(*self._ids)
        except errors.PykataError as exc:
            log.warning("lost process %s/%s: %s", *self._ids, exc)
            status = ExitStatus(255, 0)
        self.exit = status
        self.state = State.STOPPED
        self._exited.set()
        self.container._process_exited(self)

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    async def signal(self, sig: int) -> None:
        if self.state is State.STOPPED:
            raise errors.NotFound(f"process {self.container.id}/{self.exec_id or 'init'}"
                                  " has already exited")
        await self._agent.signal_process(*self._ids, sig)

    async def write_stdin(self, data: bytes) -> int:
        result: int = await self._agent.write_stdin(*self._ids, data)
        return result

    async def close_stdin(self) -> None:
        await self._agent.close_stdin(*self._ids)

    async def read_stdout(self, size: int = 65536) -> bytes:
        data: bytes = await self._agent.read_stdout(*self._ids, size)
        return data

    async def read_stderr(self, size: int = 65536) -> bytes:
        data: bytes = await self._agent.read_stderr(*self._ids, size)
        return data

    async def resize(self, rows: int, cols: int) -> None:
        await self._agent.resize_tty(*self._ids, rows, cols)

    def cancel_watch(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()


class Container:
    def __init__(self, sandbox: Sandbox, container_id: str, bundle: Path,
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

    def resources(self) -> dict[str, Any]:
        """The container's OCI linux.resources (as last created or updated)."""
        linux = self.spec.get("linux") or {}
        res: dict[str, Any] = linux.get("resources") or {}
        return res

    @property
    def shared_dir(self) -> Path:
        """The container's part of the (read-only) tree the guest sees."""
        return self.sandbox.shared_dir / self.id

    def record(self) -> ContainerRecord:
        return ContainerRecord(self.id, str(self.bundle), self.state.value,
                               [str(p) for p in self._host_mounts])

    async def create(self) -> None:
        """Share the root filesystem and bind mounts, hot-plug block volumes, then
        create it in the guest. On any error nothing is left behind."""
        specconv.validate(self.spec, self.bundle)
        self.sandbox.check_resources(self.resources())
        plan = specconv.plan(
            self.spec, self.id, self.bundle,
            guest_empty_dir=not self.sandbox.config.runtime.disable_guest_empty_dir)
        try:
            self._mount_shared(plan.host_mounts)
            self.sandbox.persist()
            await self.sandbox.fit_resources()
            storages, devices = await self._attach_blocks(plan.blocks)
            # The pod's sandbox container owns the pod's pid namespace; containers
            # that join a pid namespace (shareProcessNamespace) get that one.
            share_pid = specconv.is_pod_sandbox(self.spec) or specconv.joins_pid_namespace(
                self.spec)
            await self.sandbox.agent.create_container(
                self.id, plan.spec, storages=[*plan.storages, *storages], devices=devices,
                sandbox_pidns=share_pid,
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

    def _mount_shared(self, host_mounts: list[specconv.HostMount]) -> None:
        """Bind the root filesystem and volumes into the sandbox's host-only tree
        (through fds: see runtime/sharedtree.py); the guest sees them read-only
        arranged, each one writable or not as the spec says."""
        for hm in host_mounts:
            point, _ = self.sandbox.tree.share(hm.source, hm.target, hm.readonly)
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

    async def start(self) -> int:
        _require(f"start container {self.id}", self.state, State.CREATED)
        pid = await self.sandbox.agent.start_container(self.id)
        self.init._started(pid)
        self.state = State.RUNNING
        self.sandbox.persist()
        return pid

    def _process_exited(self, proc: Process) -> None:
        if proc is self.init:
            self.state = State.STOPPED
            with contextlib.suppress(Exception):
                self.sandbox.persist()

    async def exec(self, exec_id: str, process: dict[str, Any]) -> Process:
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
        try:
            pid = await self.sandbox.agent.exec_process(self.id, exec_id, process)
        except BaseException:
            del self.execs[exec_id]
            raise
        proc._started(pid)
        return proc

    def process(self, exec_id: str = "") -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errors.NotFound(f"exec {exec_id} not found in container {self.id}") from None

    async def kill(self, sig: int, all_processes: bool = False, exec_id: str = "") -> None:
        if exec_id:
            await self.process(exec_id).signal(sig)
            return
        if self.state is State.STOPPED:
            raise errors.NotFound(f"container {self.id}: process already finished")
        await self.sandbox.agent.signal_process(self.id, "", sig, all_processes)

    async def wait(self) -> ExitStatus:
        return await self.init.wait()

    async def pause(self) -> None:
        _require(f"pause container {self.id}", self.state, State.RUNNING)
        await self.sandbox.agent.pause(self.id)
        self.state = State.PAUSED

    async def resume(self) -> None:
        _require(f"resume container {self.id}", self.state, State.PAUSED)
        await self.sandbox.agent.resume(self.id)
        self.state = State.RUNNING

    async def stats(self) -> ContainerStats:
        stats: ContainerStats = await self.sandbox.agent.stats(self.id)
        return stats

    async def update(self, resources: dict[str, Any]) -> None:
        _require(f"update container {self.id}", self.state, State.CREATED, State.RUNNING,
                 State.PAUSED)
        self.sandbox.check_resources(resources)
        linux = self.spec.setdefault("linux", {})
        merged = dict(linux.get("resources") or {})
        merged.update({k: v for k, v in resources.items() if v is not None})
        linux["resources"] = merged
        # Grow the VM first, so a raised limit has CPUs and memory behind it.
        await self.sandbox.fit_resources()
        await self.sandbox.agent.update(self.id, resources)

    async def pids(self) -> list[ProcessInfo]:
        procs: list[ProcessInfo] = await self.sandbox.agent.list_processes(self.id)
        return procs

    async def delete(self, force: bool = False) -> ExitStatus | None:
        """Remove from the guest and unshare its files. Running: only with force."""
        if self.state in (State.RUNNING, State.PAUSED) and not force:
            raise errors.FailedPrecondition(
                f"cannot delete container {self.id}: it is {self.state.value}")
        try:
            await self.sandbox.agent.remove_container(self.id)
        except errors.NotFound:
            pass
        except errors.Unavailable as exc:
            log.warning("container %s: agent gone during delete: %s", self.id, exc)
        for p in (self.init, *self.execs.values()):
            p.cancel_watch()
        self.unmount_shared()
        self.state = State.STOPPED
        self.sandbox._forget(self)
        # Last: the agent has unmounted and ejected the disks; bounded either way.
        await self._detach_blocks()
        return self.init.exit
