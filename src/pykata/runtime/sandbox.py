"""Sandbox: one VM, its virtiofsd, its agent connection and its containers.

    create() --> RUNNING --stop()--> STOPPED        (any failure in create()
                  |  ^                                tears down what it started)
            pause |  | resume
                  v  |
                 PAUSED
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.agent import AgentClient
from pykata.config import LEAN_KERNEL_PARAMS, Config
from pykata.hypervisor.base import Hypervisor, NicSpec, VMSpec
from pykata.hypervisor.channels import vhost_vsock_available
from pykata.hypervisor.qemu import QemuHypervisor
from pykata.hypervisor.qemu.accel import probe
from pykata.hypervisor.qemu.caps import check_dax
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.resources import network
from pykata.resources.blockdev import BlockDevices
from pykata.resources.sharedfs import GUEST_SHARED_DIR, SHARED_TAG, VirtioFsDaemon
from pykata.runtime import factory
from pykata.runtime.container import Container
from pykata.runtime.sharedtree import SharedTree
from pykata.runtime.state import DEFAULT_NAMESPACE, SandboxRecord, sandbox_dir
from pykata.runtime.types import State, Storage
from pykata.ttrpc import Client
from pykata.utils import mounts
from pykata.utils.process import ProcRef, tail, terminate

log = logging.getLogger(__name__)

PCIE_ROOT_PORTS = 6  # for hot-plugged disks, NICs and (in clones) virtio-fs
MAX_NIC_QUEUES = 4

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_id(kind: str, value: str) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise errors.InvalidArgument(
            f"invalid {kind} id {value!r}: use 1-128 letters, digits, '_', '.', '-'"
        )


class Sandbox:
    def __init__(self, sandbox_id: str, config: Config,
                 namespace: str = DEFAULT_NAMESPACE) -> None:
        check_id("sandbox", sandbox_id)
        check_id("namespace", namespace)
        self.id = sandbox_id
        self.namespace = namespace
        self.config = config
        self.dir = sandbox_dir(config.runtime.state_dir, sandbox_id, namespace)
        self.tree = SharedTree(self.dir)
        self.shared_dir = self.tree.shared  # what virtiofsd exports (read-only view)
        self._owned = False  # this object made self.dir: only then may it remove it
        self.state = State.CREATING
        self.vm: Hypervisor | None = None
        self.virtiofsd: VirtioFsDaemon | None = None
        self._agent: AgentClient | None = None
        self.containers: dict[str, Container] = {}
        self.record = SandboxRecord(sandbox_id, self.state.value, str(self.dir),
                                    namespace=namespace)
        self.accel = ""
        self.vcpus = 0  # present vCPUs
        self.memory_mib = 0  # boot memory + hot-plugged DIMMs
        self._base = (0, 0)  # what the configuration gives before any container
        self._resize_lock = asyncio.Lock()
        self.netns = ""
        self.network: network.PodNetwork | None = None
        self._netwatch: asyncio.Future[None] | None = None
        self._blockdevs: BlockDevices | None = None

    # -- creation ------------------------------------------------------------------
    @classmethod
    async def create(cls, sandbox_id: str, config: Config, *, hostname: str = "",
                     dns: list[str] | None = None, hosts: str = "", vcpus: int | None = None,
                     memory_mib: int | None = None, netns: str = "",
                     namespace: str = DEFAULT_NAMESPACE) -> Sandbox:
        """Boot the VM and bring up the agent; with ``netns``, connect the pod
        network namespace's interfaces to it. On any error nothing is left behind
        (and a sandbox that already exists is left as it is)."""
        sb = cls(sandbox_id, config, namespace)
        sb.netns = netns
        try:
            await sb._start(hostname or sandbox_id[:63], dns or [], hosts, vcpus, memory_mib)
        except BaseException:
            await sb._teardown()
            raise
        return sb

    async def _start(self, hostname: str, dns: list[str], hosts: str, vcpus: int | None,
                     memory_mib: int | None) -> None:
        for attempt in range(3):
            # The namespace's directory goes when its last sandbox does: make it
            # again if that happened between the two mkdirs.
            self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.mkdir(self.dir, 0o700)
                break
            except FileExistsError:
                raise errors.AlreadyExists(
                    f"sandbox {self.id} already exists ({self.dir})") from None
            except FileNotFoundError:
                if attempt == 2:
                    raise errors.Unavailable(f"cannot create {self.dir}: its parent"
                                             " keeps disappearing") from None
        self._owned = True
        self.record.owner = _ref_json(ProcRef.of(os.getpid()))
        self.persist()
        self.tree.setup()
        q = self.config.qemu
        share = q.shared_fs == "virtio-fs"
        vfs_sock = self.dir / "vfs.sock"
        if share:
            await asyncio.to_thread(check_dax, q.path, q.virtio_fs_cache_size)
            self.virtiofsd = VirtioFsDaemon(
                q.virtio_fs_daemon, self.shared_dir, vfs_sock, self.dir / "virtiofsd.log",
                cache=q.virtio_fs_cache, extra_args=q.virtio_fs_extra_args,
                sandbox=q.virtio_fs_sandbox, xattr=q.virtio_fs_xattr,
                log_max_bytes=self.config.runtime.log_max_bytes,
            )
        spec = self._vm_spec(vcpus, memory_mib, vfs_sock if share else None)
        self.vcpus, self.memory_mib = spec.vcpus, spec.memory_mib
        self._base = (spec.vcpus, spec.memory_mib)
        options = await self._qemu_options()
        template = await self._template(spec, options)
        if template is not None:
            await self._start_clone(spec, options, template)
        else:
            await self._start_cold(spec, options)
        self.persist()
        await self._connect_agent()
        if template is not None:
            await self._plug_clone_devices(spec)
        if self.network is not None:
            for ep in self.network.endpoints:
                await self.agent.update_interface(ep.name, ep.mac, ep.mtu, ep.addresses)
            await self.agent.update_routes([(r.dest, r.gateway, r.device, r.family)
                                            for r in self.network.routes])
        storages = []
        if share:
            storages.append(Storage("virtiofs", SHARED_TAG, GUEST_SHARED_DIR, fstype="virtiofs"))
        await self.agent.create_sandbox(
            self.id, hostname, storages, dns=dns, hosts=hosts,
            kernel_modules=self.config.agent.kernel_modules, random_seed=os.urandom(64),
        )
        self.state = State.RUNNING
        self.persist()
        if self.network is not None:
            self._netwatch = asyncio.ensure_future(self._watch_network())
        log.info("sandbox %s running (VM pid %s, %s%s)", self.id,
                 self.vm.pid if self.vm else None, self.accel,
                 ", from a template" if template is not None else "")

    async def _qemu_options(self) -> QemuOptions:
        q = self.config.qemu
        accel = await asyncio.to_thread(
            probe, q.path, q.accelerator, Path(self.config.runtime.state_dir) / "accel.json")
        self.accel = accel.accel
        log.debug("sandbox %s: accelerator %s (%s)", self.id, accel.accel, accel.reason)
        return QemuOptions(
            accel=accel.accel, cpu_model=q.cpu_model, machine_type=q.machine_type,
            machine_options=q.machine_options, tb_size_mib=q.tb_size if accel.accel == "tcg"
            else 0, pcie_root_ports=PCIE_ROOT_PORTS, extra_args=tuple(q.extra_args),
            seccomp_sandbox=q.seccomp_sandbox, run_as_user=q.run_as_user,
            log_max_bytes=self.config.runtime.log_max_bytes,
            uid_lease_dir=Path(self.config.runtime.state_dir) / "uids",
        )

    def _vm_spec(self, vcpus: int | None, memory_mib: int | None,
                 vfs_sock: Path | None) -> VMSpec:
        q = self.config.qemu
        host_cpus = os.cpu_count() or 1
        n = vcpus or q.default_vcpus
        max_cpus = max(n, q.default_maxvcpus or host_cpus)
        mem = memory_mib or q.default_memory
        host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        max_mem = max(mem, q.default_maxmemory or host_mem)
        channel = q.agent_channel
        if channel == "auto":
            channel = "vsock" if vhost_vsock_available() else "serial"
        # Hot-plugged memory comes up online by itself (the agent still checks).
        params = (q.kernel_params or LEAN_KERNEL_PARAMS) + " memhp_default_state=online"
        return VMSpec(
            id=self.id, run_dir=self.dir, kernel=self.config.kernel_path(),
            initrd=self.config.initrd_path(), kernel_params=params, vcpus=n,
            max_vcpus=max_cpus, memory_mib=mem, max_memory_mib=max_mem,
            memory_slots=q.memory_slots, shared_fs_socket=vfs_sock,
            shared_fs_cache_size_mib=q.virtio_fs_cache_size, agent_channel=channel,
            vsock_cid=_vsock_cid(self.namespace, self.id),
            debug=q.enable_debug or self.config.agent.enable_debug,
            free_page_reporting=q.reclaim_guest_freed_memory,
        )

    async def _attach_network(self, queues: int) -> None:
        model = self.config.runtime.internetworking_model
        if self.netns and model != "none":
            self.network = await asyncio.to_thread(network.attach, self.netns, model, queues)
            self.record.extra["netns"] = self.netns

    def _queues(self, spec: VMSpec) -> int:
        """Tap queues per NIC: one per vCPU the VM can have, at most 4."""
        return max(1, min(spec.max_vcpus, MAX_NIC_QUEUES)) if spec.max_vcpus > 1 else 1

    async def _start_cold(self, spec: VMSpec, options: QemuOptions) -> None:
        """Boot the guest kernel and initrd."""
        self.vm = QemuHypervisor(spec, self.config.qemu.path, options)
        await self.vm.prepare()
        await self._attach_network(self._queues(spec))
        if self.network is not None:
            spec.nics = [NicSpec(ep.fds, ep.mac) for ep in self.network.endpoints]
            await self.vm.prepare()  # the command line now has the NICs
        if self.virtiofsd is not None:
            await self.virtiofsd.start()
            self.record.virtiofsd = _ref_json(self.virtiofsd.ref)
        await self.vm.start()
        self.record.qemu = _ref_json(ProcRef.of(self.vm.pid) if self.vm.pid else None)
        if self.network is not None:
            self.network.close_fds()  # QEMU holds them now

    async def _template(self, spec: VMSpec, options: QemuOptions) -> factory.Template | None:
        """The VM template to start from, or None to boot cold."""
        if not self.config.factory.enable_template:
            return None
        why = factory.eligible(spec)
        if why:
            log.warning("sandbox %s boots cold: %s", self.id, why)
            return None
        return await factory.Factory(self.config).ensure(spec, self.config.qemu.path, options)

    async def _start_clone(self, spec: VMSpec, options: QemuOptions,
                           template: factory.Template) -> None:
        """Start QEMU as a copy of the template: its RAM copied (sparse) into a
        file of our own, its device state restored. virtio-fs and NICs follow."""
        mem = factory.clone_memory_path(self.config.runtime.state_dir, self.key)
        self.record.extra["memory_file"] = str(mem)
        self.persist()
        clone = dataclasses.replace(spec, shared_fs_socket=None, nics=[], memory_file=mem,
                                    incoming=True)
        copying = asyncio.ensure_future(asyncio.to_thread(factory.sparse_copy,
                                                          template.memory, mem))
        try:
            self.vm = QemuHypervisor(clone, self.config.qemu.path, options)
            await self.vm.prepare()
            await self._attach_network(self._queues(spec))
            if self.virtiofsd is not None:
                await self.virtiofsd.start()
                self.record.virtiofsd = _ref_json(self.virtiofsd.ref)
        finally:
            await asyncio.wait({copying})
        try:
            copied = copying.result()
        except OSError as exc:
            raise errors.ResourceExhausted(
                f"cannot copy the VM template's memory to {mem}: {exc.strerror}"
                f" ({mem.parent} needs {template.memory_bytes >> 20} MiB free)") from None
        await self.vm.start()
        self.record.qemu = _ref_json(ProcRef.of(self.vm.pid) if self.vm.pid else None)
        self.persist()
        await self.vm.restore(template.state)
        log.debug("sandbox %s: cloned from template %s (%d MiB of RAM copied)", self.id,
                  template.key, copied >> 20)

    async def _plug_clone_devices(self, spec: VMSpec) -> None:
        """What a template cannot carry: the shared filesystem and the NICs."""
        assert self.vm is not None
        if spec.shared_fs_socket is not None:
            await self.vm.hotplug_shared_fs(spec.shared_fs_socket, SHARED_TAG)
        if self.network is not None:
            for i, ep in enumerate(self.network.endpoints):
                await self.vm.hotplug_nic(f"net{i}", ep.fds, ep.mac)
            self.network.close_fds()

    async def _watch_network(self) -> None:
        """Interfaces added to the pod's namespace later (a second network) are
        connected and hot-plugged into the VM. Driven by rtnetlink events."""
        assert self.network is not None
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.to_thread(network.event_socket, self.network.netns)
        except errors.PykataError as exc:
            log.warning("sandbox %s: not watching %s: %s", self.id, self.network.netns, exc)
            return
        changed = asyncio.Event()

        def readable() -> None:
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            changed.set()

        loop.add_reader(sock.fileno(), readable)
        try:
            while True:
                await changed.wait()
                await asyncio.sleep(0.2)  # let CNI finish: link, address, routes
                changed.clear()
                try:
                    await self._plug_new_interfaces()
                except (errors.PykataError, OSError) as exc:
                    log.error("sandbox %s: cannot connect a new interface: %s", self.id, exc)
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    async def _plug_new_interfaces(self) -> None:
        assert self.network is not None and self.vm is not None
        net = self.network
        async with self._resize_lock:
            first = len(net.endpoints)
            new = await asyncio.to_thread(network.attach_new, net, self._queues(self.vm.spec))
            for i, ep in enumerate(new, start=first):
                try:
                    await self.vm.hotplug_nic(f"net{i}", ep.fds, ep.mac)
                finally:
                    for fd in ep.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    ep.fds = []
                await self.agent.update_interface(ep.name, ep.mac, ep.mtu, ep.addresses)
                log.info("sandbox %s: interface %s (%s) hot-plugged", self.id, ep.name, ep.mac)
            names = {ep.name for ep in new}
            routes = [(r.dest, r.gateway, r.device, r.family) for r in net.routes
                      if r.device in names]
            if routes:
                await self.agent.update_routes(routes)

    async def _connect_agent(self) -> None:
        assert self.vm is not None
        timeout = float(self.config.agent.dial_timeout)
        channel = self.vm.agent_channel()
        dial = asyncio.ensure_future(channel.connect(timeout))
        died = asyncio.ensure_future(self.vm.wait())
        done, _ = await asyncio.wait({dial, died}, return_when=asyncio.FIRST_COMPLETED)
        if died in done:
            dial.cancel()
            raise errors.VMLaunchError(f"VM of sandbox {self.id} exited while booting",
                                       exit_code=died.result(),
                                       console_tail=tail(self.dir / "console.log"))
        died.cancel()
        reader, writer = dial.result()
        self._agent = AgentClient(Client(reader, writer),
                                  default_timeout=float(self.config.runtime.create_container_timeout))
        try:
            await self._agent.check(timeout=timeout)
        except errors.PykataError as exc:
            raise errors.Unavailable(
                f"agent in sandbox {self.id} did not answer: {exc}; console: "
                f"{tail(self.dir / 'console.log', 3) or 'empty'}"
            ) from exc

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise errors.FailedPrecondition(f"sandbox {self.id} has no agent connection")
        return self._agent

    @property
    def key(self) -> str:
        """Unique on the host: the id, qualified by a namespace other than default."""
        return self.id if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}@{self.id}"

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
        if spec is None:
            spec = load_spec(bundle)
        c = Container(self, container_id, bundle, spec)
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
    @staticmethod
    def _needs(res: dict[str, Any]) -> tuple[int, int]:
        """(CPUs, MiB) one container's OCI resources ask for (0: no limit)."""
        cpu = res.get("cpu") or {}
        quota, period = cpu.get("quota") or 0, cpu.get("period") or 100000
        cpus = -(-quota // period) if quota > 0 and period > 0 else 0
        limit = (res.get("memory") or {}).get("limit") or 0
        return cpus, -(-limit // (1 << 20)) if limit > 0 else 0

    def wanted_resources(self) -> tuple[int, int]:
        """(vCPUs, MiB) the VM should have: the configured base plus every
        container's CPU limit (quota/period, rounded up) and memory limit."""
        cpus, mem = self._base
        for c in self.containers.values():
            if c.state is not State.STOPPED:
                more_cpus, more_mem = self._needs(c.resources())
                cpus += more_cpus
                mem += more_mem
        return cpus, mem

    def check_resources(self, res: dict[str, Any]) -> None:
        """A container may not ask for more than the VM can ever have."""
        if self.vm is None:
            return
        spec = self.vm.spec
        cpus, mem = self._needs(res)
        if cpus > spec.max_vcpus:
            raise errors.InvalidArgument(
                f"a CPU limit of {cpus} vCPUs is impossible: sandbox {self.id} can have at most"
                f" {spec.max_vcpus} (default_maxvcpus)")
        if mem > spec.max_memory_mib:
            raise errors.InvalidArgument(
                f"a memory limit of {mem} MiB is impossible: sandbox {self.id} can have at most"
                f" {spec.max_memory_mib} MiB (default_maxmemory)")

    async def fit_resources(self) -> None:
        """Grow the VM towards what its containers ask for (up to its maximum):
        hot-plug vCPUs and memory and have the agent bring them online. It never
        shrinks; the limits inside the guest do that."""
        if self.vm is None:
            return
        async with self._resize_lock:
            spec = self.vm.spec
            cpus, mem = self.wanted_resources()
            cpus = min(cpus, spec.max_vcpus)
            mem = min(mem, spec.max_memory_mib)
            if cpus > self.vcpus:
                self.vcpus = await self.vm.hotplug_vcpus(cpus)
                online = await self._settle(lambda o, _t: o >= self.vcpus, cpu_only=True)
                log.info("sandbox %s: %d vCPUs present, %d online", self.id, self.vcpus, online[0])
            block = 128  # MiB, the guest's memory block size on x86_64
            if mem - self.memory_mib >= block:
                add = (mem - self.memory_mib) // block * block
                _, before = await self.agent.online_cpu_mem()
                self.memory_mib += await self.vm.hotplug_memory(add)
                want = before + (add << 20) * 9 // 10
                _, total = await self._settle(lambda _o, t: t >= want)
                log.info("sandbox %s: memory %d MiB (guest sees %d MiB)", self.id,
                         self.memory_mib, total >> 20)

    async def _settle(self, done: Callable[[int, int], bool], cpu_only: bool = False,
                      timeout: float = 10.0) -> tuple[int, int]:
        """Have the agent online what was hot-plugged until ``done(cpus, mem)``: the
        guest adds hot-plugged CPUs and memory blocks asynchronously."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            online, total = await self.agent.online_cpu_mem(cpu_only=cpu_only)
            if done(online, total) or asyncio.get_running_loop().time() > deadline:
                if not done(online, total):
                    log.warning("sandbox %s: hot-plugged resources not all online after"
                                " %gs (cpus %d, memory %d MiB)", self.id, timeout, online,
                                total >> 20)
                return online, total
            await asyncio.sleep(0.1)

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
            self._netwatch.cancel()
            with contextlib.suppress(BaseException):
                await self._netwatch
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
        _remove_memory_file(self.record.extra.get("memory_file"))
        self.state = State.STOPPED
        if not self._owned:
            return  # e.g. AlreadyExists: that directory belongs to the sandbox there
        remove_sandbox_dir(self.dir)
        self._owned = False
        log.info("sandbox %s stopped and removed", self.id)


async def init_template(config: Config) -> factory.Template:
    """Build (or find) the VM template a default-sized sandbox starts from."""
    sb = Sandbox("template-init", config)
    spec = sb._vm_spec(None, None, None)
    why = factory.eligible(spec)
    if why:
        raise errors.FailedPrecondition(f"cannot build a VM template: {why}")
    return await factory.Factory(config).ensure(spec, config.qemu.path, await sb._qemu_options())


def remove_sandbox_dir(d: Path) -> None:
    """Unmount what is mounted below ``d`` (exact mount points, never a resolved
    path) and remove it without following a symlink or crossing a mount; then its
    namespace directory if that is now empty."""
    if not d.exists():
        return
    failed = mounts.umount_all(d)
    if failed:
        raise errors.Internal(f"cannot unmount {', '.join(failed)}; left {d} in place")
    try:
        mounts.remove_tree(d)
    except OSError as exc:
        raise errors.Internal(f"cannot remove {d}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        os.rmdir(d.parent)


def _remove_memory_file(path: Any) -> None:
    if isinstance(path, str) and path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _ref_json(ref: ProcRef | None) -> dict[str, int] | None:
    return ref.to_json() if ref is not None else None


def _vsock_cid(namespace: str, sandbox_id: str) -> int:
    import zlib

    return 3 + zlib.crc32(f"{namespace}/{sandbox_id}".encode()) % 0x7FFFFFF0


def load_spec(bundle: Path) -> dict[str, Any]:
    import json

    path = bundle / "config.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise errors.InvalidArgument(f"bundle {bundle} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise errors.InvalidArgument(f"cannot read {path}: {exc}") from exc
    return data


async def cleanup(state_dir: str | Path, sandbox_id: str,
                  namespace: str = DEFAULT_NAMESPACE, *, force: bool = False) -> bool:
    """Clean up a sandbox whose owner is gone: kill its VMM and virtiofsd, unmount,
    remove its state. True if there was something to clean. A sandbox whose owner
    (its shim) still runs is left alone unless ``force``."""
    check_id("sandbox", sandbox_id)
    check_id("namespace", namespace)
    d = sandbox_dir(state_dir, sandbox_id, namespace)
    if not d.exists():
        return False
    try:
        rec = SandboxRecord.load(d)
    except (errors.NotFound, ValueError, TypeError, KeyError):
        rec = None
    owner = ProcRef.from_json(rec.owner) if rec is not None else None
    if owner is not None and owner.pid != os.getpid() and owner.alive() and not force:
        log.info("sandbox %s/%s is in use by pid %d: left alone", namespace, sandbox_id,
                 owner.pid)
        return False
    if rec is not None:
        for data in (rec.qemu, rec.virtiofsd):
            ref = ProcRef.from_json(data)
            if ref is not None:
                await terminate(ref, grace=2.0)
        _remove_memory_file(rec.extra.get("memory_file"))
    remove_sandbox_dir(d)
    return True


def cleanup_container_mounts(state_dir: str | Path, sandbox_id: str, container_id: str,
                             namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Unmount and remove what a container shared with its VM (after its shim died);
    what could not be unmounted."""
    check_id("sandbox", sandbox_id)
    check_id("container", container_id)
    check_id("namespace", namespace)
    return SharedTree(sandbox_dir(state_dir, sandbox_id, namespace)).clear(container_id)
