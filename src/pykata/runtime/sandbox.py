"""Sandbox: one VM, its virtiofsd, its agent connection and its containers.

    create() --> RUNNING --stop()--> STOPPED        (any failure in create()
                  |  ^                                tears down what it started)
            pause |  | resume
                  v  |
                 PAUSED

Orchestration only: the VM's size comes from ``sizing``, booting it (cold or
from the template) from ``boot``, growing it from ``resize``, the pod network
watch from ``netwatch``, cleanup after a dead owner from ``cleanup``. What it
is built from (the hypervisor driver, the agent connector, the shared tree) is
in :class:`Parts`, so unit tests run it over the fakes in ``pykata.testing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pykata import errors
from pykata.config import Config
from pykata.hypervisor import make_driver
from pykata.hypervisor.base import Driver, Hypervisor
from pykata.resources import network
from pykata.resources.blockdev import BlockDevices
from pykata.resources.sharedfs import VirtioFsDaemon
from pykata.runtime import boot, sizing
from pykata.runtime.bundle import load_spec
from pykata.runtime.cleanup import remove_memory_file, remove_sandbox_dir
from pykata.runtime.container import Container, Tree
from pykata.runtime.dial import Connector, dial_agent
from pykata.runtime.netwatch import NetworkWatch, configure_guest
from pykata.runtime.resize import Resizer
from pykata.runtime.sharedtree import SharedTree
from pykata.runtime.state import (
    DEFAULT_NAMESPACE,
    SandboxRecord,
    check_id,
    make_sandbox_dir,
    sandbox_dir,
)
from pykata.runtime.types import SandboxAgent, State, Storage
from pykata.utils.process import ProcRef
from pykata.wire import GUEST_SHARED_DIR, SHARED_FS_TAG

log = logging.getLogger(__name__)

__all__ = ["Parts", "Sandbox", "check_id"]


class SandboxTree(Tree, Protocol):
    """The shared tree as the sandbox uses it: made at start, torn down at stop."""

    def setup(self) -> None: ...

    def teardown(self) -> list[str]:
        """Mount points that could not be unmounted."""


@dataclass
class Parts:
    """What a sandbox is built from. The defaults are the real ones; unit tests
    pass fakes (``pykata.testing.fakes``)."""

    driver: Driver | None = None  # None: the configured driver, probed
    connect: Connector = dial_agent
    tree: Callable[[Path], SandboxTree] = SharedTree
    virtiofsd: bool = True  # False: never start virtiofsd (shared_fs is not used)


class Sandbox:
    def __init__(self, sandbox_id: str, config: Config,
                 namespace: str = DEFAULT_NAMESPACE, parts: Parts | None = None) -> None:
        check_id("sandbox", sandbox_id)
        check_id("namespace", namespace)
        self.id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.parts = parts or Parts()
        self.dir = sandbox_dir(config.runtime.state_dir, sandbox_id, namespace)
        self.tree = self.parts.tree(self.dir)
        self.shared_dir = self.dir / "shared"  # what virtiofsd exports (read-only view)
        self._owned = False  # this object made self.dir: only then may it remove it
        self.state = State.CREATING
        self.vm: Hypervisor | None = None
        self.virtiofsd: VirtioFsDaemon | None = None
        self._agent: SandboxAgent | None = None
        self.containers: dict[str, Container] = {}
        self.record = SandboxRecord(sandbox_id, self.state.value, str(self.dir),
                                    namespace=namespace)
        self.accel = ""
        self.size = Resizer(sandbox_id, 0, 0)
        self._base = (0, 0)  # what the configuration gives before any container
        self.netns = ""
        self.network: network.PodNetwork | None = None
        self._netwatch: NetworkWatch | None = None
        self._blockdevs: BlockDevices | None = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    async def create(cls, sandbox_id: str, config: Config, *, hostname: str = "",
                     dns: list[str] | None = None, hosts: str = "", vcpus: int | None = None,
                     memory_mib: int | None = None, netns: str = "",
                     namespace: str = DEFAULT_NAMESPACE, parts: Parts | None = None) -> Sandbox:
        """Boot the VM and bring up the agent; with ``netns``, connect the pod
        network namespace's interfaces to it. On any error nothing is left behind
        (and a sandbox that already exists is left as it is)."""
        sb = cls(sandbox_id, config, namespace, parts)
        sb.netns = netns
        try:
            await sb._start(hostname or sandbox_id[:63], dns or [], hosts, vcpus, memory_mib)
        except BaseException:
            await sb._teardown()
            raise
        return sb

    def _make_dir(self) -> None:
        make_sandbox_dir(self.dir, self.id)
        self._owned = True
        self.record.owner = _ref_json(ProcRef.of(os.getpid()))
        self.persist()

    async def _start(self, hostname: str, dns: list[str], hosts: str, vcpus: int | None,
                     memory_mib: int | None) -> None:
        self._make_dir()
        self.tree.setup()
        q = self.config.vm
        share = q.shared_fs == "virtio-fs"
        vfs_sock = self.dir / "vfs.sock"
        driver = self.parts.driver or await make_driver(self.config)
        self.accel = driver.accel
        if share and self.parts.virtiofsd:
            self.virtiofsd = VirtioFsDaemon(
                q.virtio_fs_daemon, self.shared_dir, vfs_sock, self.dir / "virtiofsd.log",
                cache=q.virtio_fs_cache, extra_args=q.virtio_fs_extra_args,
                sandbox=q.virtio_fs_sandbox, xattr=q.virtio_fs_xattr,
                log_max_bytes=self.config.runtime.log_max_bytes,
            )
        spec = sizing.vm_spec(self.config, self.id, self.namespace, self.dir,
                              channel=driver.agent_channel(q.agent_channel), vcpus=vcpus,
                              memory_mib=memory_mib, shared_fs_socket=vfs_sock if share else None)
        self.size = Resizer(self.id, spec.vcpus, spec.memory_mib)
        self._base = (spec.vcpus, spec.memory_mib)
        how = await boot.start(self, driver, spec)
        self.persist()
        assert self.vm is not None
        self._agent = await self.parts.connect(
            self.vm, float(self.config.agent.dial_timeout),
            float(self.config.runtime.create_container_timeout))
        if how != boot.COLD:
            await boot.plug_clone_devices(self, spec)
        if self.network is not None:
            await configure_guest(self.agent, self.network)
        storages = []
        if share:
            storages.append(Storage("virtiofs", SHARED_FS_TAG, GUEST_SHARED_DIR,
                                    fstype="virtiofs"))
        await self.agent.create_sandbox(
            self.id, hostname, storages, dns=dns, hosts=hosts,
            kernel_modules=self.config.agent.kernel_modules, random_seed=os.urandom(64),
        )
        self.state = State.RUNNING
        self.persist()
        if self.network is not None:
            self._netwatch = NetworkWatch(self.id, self.network, self.vm, self.agent,
                                          self.size.lock)
            self._netwatch.start()
        log.info("sandbox %s running (VM pid %s, %s%s)", self.id, self.vm.pid, self.accel,
                 "" if how == boot.COLD else f", from the {how}")

    @property
    def agent(self) -> SandboxAgent:
        if self._agent is None:
            raise errors.FailedPrecondition(f"sandbox {self.id} has no agent connection")
        return self._agent

    @property
    def key(self) -> str:
        """Unique on the host: the id, qualified by a namespace other than default."""
        return self.id if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}@{self.id}"

    @property
    def vcpus(self) -> int:
        return self.size.vcpus

    @property
    def memory_mib(self) -> int:
        return self.size.memory_mib

    def persist(self) -> None:
        self.record.state = self.state.value
        self.record.containers = {c.id: c.record() for c in self.containers.values()}
        if self.dir.is_dir():
            self.record.save()

    # -- containers ----------------------------------------------------------------
    async def create_container(self, container_id: str, bundle: Path,
                               spec: dict[str, Any] | None = None) -> Container:
        check_id("container", container_id)
        if self.state is not State.RUNNING:
            raise errors.FailedPrecondition(
                f"cannot create a container: sandbox {self.id} is {self.state.value}")
        if container_id in self.containers:
            raise errors.AlreadyExists(f"container {container_id} already exists")
        c = Container(self, container_id, bundle, load_spec(bundle) if spec is None else spec)
        self.containers[container_id] = c
        try:
            await c.create()
        except BaseException:
            self.containers.pop(container_id, None)
            self.persist()
            raise
        self.persist()
        return c

    def block_devices(self) -> BlockDevices:
        """Host block devices hot-plugged into this VM, counted by use."""
        if self._blockdevs is None:
            if self.vm is None:
                raise errors.FailedPrecondition(f"sandbox {self.id} has no VM")
            self._blockdevs = BlockDevices(self.id, self.vm)
        return self._blockdevs

    def container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise errors.NotFound(f"container {container_id} not found") from None

    def forget(self, c: Container) -> None:
        """``c`` was deleted: drop it from the sandbox."""
        self.containers.pop(c.id, None)
        self.persist()

    # -- resources -----------------------------------------------------------------
    def wanted_resources(self) -> tuple[int, int]:
        """(vCPUs, MiB) the VM should have: the configured base plus every
        container's CPU limit (quota/period, rounded up) and memory limit."""
        return sizing.wanted(self._base, [c.resources() for c in self.containers.values()
                                          if c.state is not State.STOPPED])

    def check_resources(self, res: dict[str, Any]) -> None:
        """A container may not ask for more than the VM can ever have."""
        if self.vm is not None:
            sizing.check_limits(self.id, self.vm.spec, res)

    async def fit_resources(self) -> None:
        """Grow the VM towards what its containers ask for (up to its maximum)."""
        if self.vm is not None:
            await self.size.fit(self.vm, self.agent, *self.wanted_resources())

    async def pause(self) -> None:
        if self.vm is None:
            raise errors.FailedPrecondition(f"sandbox {self.id} has no VM")
        await self.vm.pause()
        self.state = State.PAUSED

    async def resume(self) -> None:
        if self.vm is None:
            raise errors.FailedPrecondition(f"sandbox {self.id} has no VM")
        await self.vm.resume()
        self.state = State.RUNNING

    # -- teardown ------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop every container, the VM and virtiofsd; remove all state. Idempotent."""
        await self._teardown()

    async def _teardown(self) -> None:
        if self._netwatch is not None:
            await self._netwatch.stop()
            self._netwatch = None
        if self._agent is not None and self.state is State.RUNNING:
            for c in list(self.containers.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.delete(force=True), 15)
            with contextlib.suppress(Exception):
                await self._agent.destroy_sandbox(timeout=5.0)
        for c in list(self.containers.values()):
            c.unmount_shared()
        self.containers.clear()
        if self._owned:
            left = self.tree.teardown()
            if left:
                log.error("sandbox %s: cannot unmount %s", self.id, ", ".join(left))
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await self._agent.close()
            self._agent = None
        if self.vm is not None:
            await self.vm.stop()
        if self.virtiofsd is not None:
            await self.virtiofsd.stop()
        if self.network is not None:
            await asyncio.to_thread(network.detach, self.network)
            self.network = None
        remove_memory_file(self.record.extra.get("memory_file"))
        self.state = State.STOPPED
        if not self._owned:
            return  # e.g. AlreadyExists: that directory belongs to the sandbox there
        remove_sandbox_dir(self.dir)
        self._owned = False
        log.info("sandbox %s stopped and removed", self.id)


def _ref_json(ref: ProcRef | None) -> dict[str, int] | None:
    return ref.to_json() if ref is not None else None
