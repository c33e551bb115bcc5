"""Sandbox: one VM, its virtiofsd, its agent connection and its containers.

    create() --> RUNNING --stop()--> STOPPED        (any failure in create()
                  |  ^                                tears down what it started)
            pause |  | resume
                  v  |
                 PAUSED

Orchestration only: the VM's size comes from ``sizing``, booting it (VM
cache, template or cold) and its shared file system from ``boot``, growing it
from ``resize``, the pod network watch from ``netwatch``, taking it all down
from ``teardown``, cleanup after a dead owner from ``cleanup``. What it is built
from (the hypervisor driver, the agent connector, the shared tree) is in
:class:`Parts` (``parts``), so unit tests run it over the fakes in
``pykata.testing``. It reads the hypervisor's settings only through the
driver-neutral ``config.vm``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pykata import errors, observe, tracing
from pykata.config import Config
from pykata.hypervisor import make_driver
from pykata.hypervisor.base import Hypervisor
from pykata.resources import network
from pykata.resources.blockdev import BlockDevices
from pykata.resources.sharedfs import VirtioFsDaemon
from pykata.runtime import agentpolicy, boot, checkpoint, sizing
from pykata.runtime.bundle import load_spec
from pykata.runtime.container import Container
from pykata.runtime.netwatch import NetworkWatch, configure_guest
from pykata.runtime.parts import Parts
from pykata.runtime.resize import Resizer
from pykata.runtime.state import (
    DEFAULT_NAMESPACE,
    SandboxRecord,
    check_id,
    make_sandbox_dir,
    ref_json,
    sandbox_dir,
)
from pykata.runtime.teardown import teardown
from pykata.runtime.types import SandboxAgent, State
from pykata.runtime.watchdog import Watchdog
from pykata.utils.process import ProcRef

log = logging.getLogger(__name__)

__all__ = ["Parts", "Sandbox", "check_id"]


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
        self.owns_dir = False  # this object made self.dir: only then may it remove it
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
        self.netwatch: NetworkWatch | None = None
        self._blockdevs: BlockDevices | None = None
        # Why the sandbox failed on its own (its VM or virtiofsd died: see
        # runtime/watchdog.py); "" while it has not. Its processes then end with
        # status 255 and no container can be created in it.
        self.failure = ""
        self._watchdog: Watchdog | None = None
        # How long each phase of its start-up (and its stop) took: see pykata.observe.
        self.phases = observe.Phases()
        # What CreateSandbox gives the agent (docs/confidential.md): the agent
        # policy and the node's image signature policy (b"": none).
        self.policy = b""
        self.policy_source = ""
        self.image_policy = b""
        # Cleared while quiesced for a checkpoint (quiesce .. unquiesce): the
        # blocking calls the agent ends then are made again once it is set.
        self.resumed = asyncio.Event()
        self.resumed.set()
        # Restored from a checkpoint and not run yet (its VM loaded, paused, no
        # agent connection): ``resume_restored`` runs it.
        self.restored: checkpoint.Manifest | None = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    async def create(cls, sandbox_id: str, config: Config, *, hostname: str = "",
                     dns: list[str] | None = None, hosts: str = "", vcpus: int | None = None,
                     memory_mib: int | None = None, netns: str = "",
                     namespace: str = DEFAULT_NAMESPACE, parts: Parts | None = None,
                     annotations: Mapping[str, str] | None = None) -> Sandbox:
        """Boot the VM and bring up the agent; with ``netns``, connect the pod
        network namespace's interfaces to it. ``annotations``: the pod's (its
        first container's spec), for the agent policy annotation. On any error
        nothing is left behind (and a sandbox that already exists is left as it is)."""
        # The documents for the agent, read and checked before anything starts.
        policy = agentpolicy.agent_policy(config, annotations)
        image_policy = agentpolicy.image_policy(config)
        sb = cls(sandbox_id, config, namespace, parts)
        sb.netns = netns
        sb.policy, sb.image_policy = policy, image_policy
        sb.policy_source = "the pod annotation" if policy and annotations and \
            agentpolicy.POLICY_ANNOTATION in annotations else config.agent.policy_file
        with observe.phase("sandbox.create", sb.phases, sandbox=sandbox_id):
            try:
                await sb._start(hostname or sandbox_id[:63], dns or [], hosts, vcpus,
                                memory_mib)
            except errors.PykataError as exc:
                # The VM or virtiofsd died under the boot: say that, not what it broke.
                why = await sb.why_failed(exc)
                await sb.stop()
                if why:
                    raise errors.Unavailable(
                        f"sandbox {sandbox_id} failed while starting: {why}") from exc
                raise
            except BaseException:
                await sb.stop()
                raise
        if sb._agent is not None:
            await tracing.collect(sb._agent)
        return sb

    @classmethod
    async def restore(cls, sandbox_id: str, config: Config, ckpt: Path, *, netns: str = "",
                      namespace: str = DEFAULT_NAMESPACE, parts: Parts | None = None
                      ) -> Sandbox:
        """The sandbox of checkpoint directory ``ckpt`` (docs/checkpoint-design.md
        §6.5): refused in one line before anything starts unless this host can
        restore it (same guest image, VMM, VM shape); else its VM is started
        with the checkpoint's devices, its RAM unpacked into a file of its own
        and its state loaded, **paused**, with no agent connection yet
        (``resume_restored`` runs it). On any error nothing is left behind."""
        m = await asyncio.to_thread(checkpoint.read_manifest, ckpt)
        if m.sandbox_id != sandbox_id:
            raise errors.FailedPrecondition(
                f"cannot restore checkpoint of sandbox {m.sandbox_id} as sandbox {sandbox_id}:"
                " restore it under the same id")
        sb = cls(sandbox_id, config, namespace, parts)
        sb.netns = netns
        with observe.phase("sandbox.restore", sb.phases, sandbox=sandbox_id):
            try:
                driver = sb.parts.driver or await make_driver(config)
                sb.accel = driver.accel
                host = sizing.vm_spec(config, sandbox_id, namespace, sb.dir,
                                      channel=driver.agent_channel(config.vm.agent_channel))
                spec = checkpoint.restore_spec(m, host)
                await checkpoint.check_host(m, ckpt, config, driver, spec)
                sb._make_dir()
                sb.tree.setup()
                plugged_vcpus = sum(1 for d in spec.restore_devices if d.kind == "vcpu")
                plugged_mib = sum(int(d.props.get("size-mib", 0))
                                  for d in spec.restore_devices if d.kind == "dimm")
                sb.size = Resizer(sandbox_id, spec.vcpus + plugged_vcpus,
                                  spec.memory_mib + plugged_mib)
                sb._base = (spec.vcpus, spec.memory_mib)
                await boot.restore(sb, driver, spec, ckpt, m)
                sb.restored = m
                sb.state = State.PAUSED
                sb.persist()
            except BaseException:
                await sb.stop()
                raise
        log.info("sandbox %s restored from %s (paused until started)", sandbox_id, ckpt)
        return sb

    async def resume_restored(self) -> None:
        """Run a sandbox ``restore`` left paused: the VM runs, the agent is
        dialled and told the clock and fresh entropy (FinishCheckpoint). A
        sandbox not restored, or already run: nothing."""
        m, self.restored = self.restored, None
        if m is None:
            return
        assert self.vm is not None
        await self.vm.resume()
        self.state = State.RUNNING
        self._watchdog = Watchdog(self.id, self.vm, self.virtiofsd, self._failed)
        self._watchdog.start()
        with observe.phase("agent.dial", self.phases, sandbox=self.id):
            self._agent = await self.parts.connect(
                self.vm, float(self.config.agent.dial_timeout),
                float(self.config.runtime.create_container_timeout))
        await self._agent.finish_checkpoint(time.time_ns(), os.urandom(64))
        self.persist()
        log.info("sandbox %s running again from its checkpoint (VM pid %s)", self.id,
                 self.vm.pid)

    async def why_failed(self, exc: errors.PykataError, grace: float = 1.0) -> str:
        """Why the sandbox failed ("" if it did not), for an error ``exc`` an
        operation on it got: its watchdog saw the VM or virtiofsd end; after a
        lost agent connection (Unavailable), which the VM's exit can beat, it is
        given ``grace`` seconds to see it."""
        if self._watchdog is None:
            return ""
        if self._watchdog.fired or not isinstance(exc, errors.Unavailable):
            return self._watchdog.reason
        return await self._watchdog.settled(grace)

    def _make_dir(self) -> None:
        make_sandbox_dir(self.dir, self.id)
        self.owns_dir = True
        self.record.owner = ref_json(ProcRef.of(os.getpid()))
        self.persist()

    async def _start(self, hostname: str, dns: list[str], hosts: str, vcpus: int | None,
                     memory_mib: int | None) -> None:
        self._make_dir()
        self.tree.setup()
        driver = self.parts.driver or await make_driver(self.config)
        self.accel = driver.accel
        spec = sizing.vm_spec(self.config, self.id, self.namespace, self.dir,
                              channel=driver.agent_channel(self.config.vm.agent_channel),
                              vcpus=vcpus, memory_mib=memory_mib,
                              shared_fs_socket=boot.shared_fs(self, self.parts.virtiofsd))
        self.size = Resizer(self.id, spec.vcpus, spec.memory_mib)
        self._base = (spec.vcpus, spec.memory_mib)
        how = await boot.start(self, driver, spec)
        self.persist()
        assert self.vm is not None
        self._watchdog = Watchdog(self.id, self.vm, self.virtiofsd, self._failed)
        self._watchdog.start()
        with observe.phase("agent.dial", self.phases, sandbox=self.id):
            self._agent = await self.parts.connect(
                self.vm, float(self.config.agent.dial_timeout),
                float(self.config.runtime.create_container_timeout))
        if how != boot.COLD:
            await boot.plug_clone_devices(self, spec)
        if self.network is not None:
            await configure_guest(self.agent, self.network)
        with observe.phase("guest.create_sandbox", self.phases, sandbox=self.id):
            await self.agent.create_sandbox(
                self.id, hostname, boot.guest_storages(spec), dns=dns, hosts=hosts,
                kernel_modules=self.config.agent.kernel_modules, random_seed=os.urandom(64),
                debug_console=self.config.agent.debug_console,
                policy=self.policy, image_policy=self.image_policy,
            )
        if self.policy:
            log.info("sandbox %s: agent policy in force (%d bytes, from %s)", self.id,
                     len(self.policy), self.policy_source)
        self.state = State.RUNNING
        self.persist()
        if self.network is not None:
            self.netwatch = NetworkWatch(self.id, self.network, self.vm, self.agent,
                                         self.size.lock)
            self.netwatch.start()
        log.info("sandbox %s running (VM pid %s, %s%s)", self.id, self.vm.pid, self.accel,
                 "" if how == boot.COLD else f", from the {how}")

    async def _failed(self, reason: str) -> None:
        """The watchdog's call: the VM is gone (or was stopped because virtiofsd
        is). Close the agent connection, so every call and every process still
        waited for ends at once (the processes with status 255), and end the
        containers that were created but not started (255 too)."""
        self.failure = reason
        self.resumed.set()  # waiters call again, and see the connection gone
        if self._agent is not None:
            await self._agent.close()
        for c in list(self.containers.values()):
            c.vm_lost()

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
        if self.failure:
            raise errors.Unavailable(f"cannot create container {container_id}: sandbox"
                                     f" {self.id} failed: {self.failure}")
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

    def adopt(self, container_id: str, bundle: Path, spec: dict[str, Any]) -> Container:
        """The container of the checkpoint this sandbox was restored from (not
        run yet): it runs in the guest already (frozen if it was paused at the
        checkpoint); CREATED for containerd until its Start, which resumes it.
        Phase 1: a checkpoint of one container, restored under the same id."""
        m = self.restored
        if m is None:
            raise errors.FailedPrecondition(
                f"cannot restore container {container_id}: sandbox {self.id} was not restored"
                " from a checkpoint (or already runs)")
        ids = [e.id for e in m.containers]
        if len(ids) != 1:
            raise errors.FailedPrecondition(
                f"cannot restore a checkpoint of {len(ids)} containers ({', '.join(ids[:5])}):"
                " pykata restores single-container pods only")
        entry = m.containers[0]
        if entry.id != container_id:
            raise errors.FailedPrecondition(
                f"cannot restore container {entry.id} of the checkpoint as {container_id}:"
                " restore it under the same id")
        check_id("container", container_id)
        c = Container(self, container_id, bundle, spec)
        c.restored = "paused" if entry.state == State.PAUSED.value else "running"
        c.state = State.CREATED
        self.containers[container_id] = c
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

    async def sync_network(self) -> None:
        """Connect what appeared in the pod's network namespace since the last look
        (the rtnetlink watch does it by itself; a caller that knows, e.g. after a
        prestart hook wired it, need not wait). Nothing without a pod network."""
        if self.netwatch is not None:
            await self.netwatch.plug_new()

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

    # -- checkpoint (docs/checkpoint-design.md) ------------------------------------
    async def quiesce(self) -> None:
        """Before the VM is saved: the agent ends its blocking calls (the host's
        waiters hold until ``unquiesce``) and no agent call is left in flight.
        On failure the caller undoes it with ``unquiesce``."""
        self.resumed.clear()
        await self.agent.prepare_checkpoint()

    async def unquiesce(self, time_ns: int = 0, seed: bytes = b"") -> None:
        """The VM runs again: the agent's clock (``time_ns``, 0 = leave it) and
        entropy, blocking calls served and waited for again."""
        try:
            await self.agent.finish_checkpoint(time_ns, seed)
        finally:
            self.resumed.set()

    async def end_checkpointed(self) -> None:
        """After a checkpoint with exit: the VM (saved, stopped) goes, every running
        process ends with 137 (their exits are published), the containers stay
        until deleted; ``stop`` removes the rest."""
        if self._watchdog is not None:
            await self._watchdog.stop()  # the VM stops on purpose
        if self._agent is not None:
            await self._agent.close()  # held and later calls fail at once
        self.resumed.set()
        for c in list(self.containers.values()):
            c.end_checkpointed()
        if self.vm is not None:
            await self.vm.stop()
        self.state = State.STOPPED
        self.persist()

    # -- teardown ------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop every container, the VM and virtiofsd; remove all state. Idempotent."""
        self.resumed.set()  # nothing waits for a resume that will not come
        with observe.phase("sandbox.stop", self.phases, sandbox=self.id):
            if self._watchdog is not None:
                await self._watchdog.stop()  # what follows stops them on purpose
            if self._agent is not None and self.state is State.RUNNING:
                await tracing.collect(self._agent)  # the agent's last spans
            await teardown(self, self._agent)  # which closes the agent connection
            self._agent = None
