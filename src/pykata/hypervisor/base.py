"""The one hypervisor contract. Drivers override what they support; the rest
raises Unimplemented naming the driver and the operation."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata.errors import Unimplemented
from pykata.wire import SHARED_FS_TAG

if TYPE_CHECKING:
    from pykata.hypervisor.handoff import ExportableVM, Handoff


@dataclass
class NicSpec:
    """A guest NIC backed by a host tap (or macvtap): one fd per queue."""

    fds: list[int]
    mac: str = ""

    @property
    def queues(self) -> int:
        return len(self.fds)


@dataclass
class PluggedDevice:
    """A device hot-plugged into a running VM. A VM restoring that VM's saved
    state has it on its command line with the same id and bus (the state is
    matched to devices by address): a vCPU (``id`` cpu-N, the VMM's CPU type in
    ``driver`` and its topology in ``props``), a NIC (``id`` its netdev id,
    on root port ``bus``, with ``mac`` and ``queues``; ``fds``: the new tap
    queues at restore) or private memory (``id`` dimmN, ``props["size-mib"]``)."""

    kind: str  # "vcpu" | "nic" | "dimm"
    id: str
    bus: str = ""
    driver: str = ""
    props: dict[str, int] = field(default_factory=dict)
    mac: str = ""
    queues: int = 1
    fds: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint manifest keeps (no fds: they are the host's of the day)."""
        return {"kind": self.kind, "id": self.id, "bus": self.bus, "driver": self.driver,
                "props": dict(self.props), "mac": self.mac, "queues": self.queues}


@dataclass
class VMSpec:
    """What the runtime asks of a hypervisor, in its own terms (not QEMU's)."""

    id: str
    # Per-VM directory (root-only): console and QEMU logs. QEMU opens nothing in
    # it by path; the driver hands it fds.
    run_dir: Path
    kernel: Path
    initrd: Path | None = None
    # A read-only root file system image (with an early initrd that mounts it):
    # on an NVDIMM or virtio-pmem (mapped from the host file, DAX in the guest)
    # or a virtio-blk disk reading from image_offset on.
    image: Path | None = None
    image_device: str = "virtio-blk"  # nvdimm | virtio-pmem | virtio-blk
    image_offset: int = 0  # virtio-blk: where the file system starts in the file
    kernel_params: str = ""
    vcpus: int = 1
    max_vcpus: int = 1
    memory_mib: int = 512
    max_memory_mib: int = 512
    memory_slots: int = 0
    shared_fs_socket: Path | None = None  # vhost-user-fs socket of virtiofsd (we connect)
    shared_fs_tag: str = SHARED_FS_TAG
    shared_fs_cache_size_mib: int = 0  # DAX window
    agent_channel: str = "serial"  # serial | vsock
    vsock_cid: int = 0
    debug: bool = False
    nics: list[NicSpec] = field(default_factory=list)  # pod network, on the command line
    # Guest RAM in this file (shared mapping) instead of an anonymous memfd: a
    # template's RAM, or a clone's copy of it. It must exist (0600, root-only
    # directory); the driver opens it and gives it to QEMU's user.
    memory_file: Path | None = None
    incoming: bool = False  # start paused, waiting for restore()
    free_page_reporting: bool = False  # virtio-balloon: freed guest pages go back to the host
    # The runtime may checkpoint this VM ([runtime] checkpointable): memory
    # hot-plugged while it has no vhost-user device is private (anonymous), so
    # the saved state carries it (shared memory is skipped, x-ignore-shared).
    checkpointable: bool = False
    # What was hot-plugged into the VM whose state an ``incoming`` VM loads:
    # repeated on the command line, same ids and buses (runtime/checkpoint.py).
    restore_devices: list[PluggedDevice] = field(default_factory=list)

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"


class AgentChannel(abc.ABC):
    """How the host reaches the agent in this VM."""

    @abc.abstractmethod
    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the agent, once it can be had (or DeadlineExceeded)."""

    async def close(self) -> None:
        """Release what the channel holds on the host (listening sockets)."""


class Hypervisor(abc.ABC):
    """One VM. ``start`` launches it, ``stop`` always leaves no process behind."""

    name = "hypervisor"
    # Set by the VM's owner before start(); drivers call it with the VMM's pid as
    # soon as the process exists (before start() returns), so the owner can
    # record it: an owner killed while the VM boots still leaves a pid to clean.
    on_spawn: Callable[[int], None] | None = None

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec

    def _unsupported(self, what: str) -> Unimplemented:
        return Unimplemented(f"{self.name} driver does not support {what}")

    async def prepare(self) -> None:
        """Check assets and create what the VMM needs before it starts."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, timeout: float = 5.0) -> None:
        """Graceful, then forced; returns once the VMM process is reaped."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the VMM process to exit; its exit status."""

    @property
    @abc.abstractmethod
    def pid(self) -> int | None: ...

    @abc.abstractmethod
    def agent_channel(self) -> AgentChannel: ...

    def portfwd_channel(self) -> AgentChannel:
        """The port-forward channel to the guest (``pykata.ttrpc.mux`` runs on it)."""
        raise self._unsupported("port forwarding")

    async def pause(self) -> None:
        raise self._unsupported("pause")

    async def resume(self) -> None:
        raise self._unsupported("resume")

    async def hotplug_vcpus(self, total: int) -> int:
        """Grow to ``total`` vCPUs; returns the number now present."""
        raise self._unsupported("CPU hotplug")

    async def hotplug_memory(self, size_mib: int) -> int:
        """Add ``size_mib`` of memory; returns the MiB actually added."""
        raise self._unsupported("memory hotplug")

    async def hotplug_block(self, drive_id: str, path: Path, readonly: bool = False,
                            serial: str = "") -> str:
        """Attach a block device (the guest finds it by ``serial``); returns the
        guest-visible address (PCI path or port)."""
        raise self._unsupported("block device hotplug")

    async def unplug_block(self, drive_id: str, timeout: float = 20.0) -> None:
        """Detach a block device, waiting at most ``timeout`` for the guest."""
        raise self._unsupported("block device unplug")

    async def hotplug_shared_fs(self, socket_path: Path, tag: str) -> str:
        """Attach a vhost-user-fs device served at ``socket_path`` (the host
        connects, the VMM gets the connected fd); the port used."""
        raise self._unsupported("shared filesystem hotplug")

    async def hotplug_nic(self, nic_id: str, fds: list[int], mac: str) -> str:
        """Attach a NIC backed by tap queue ``fds`` (one per queue); the port used."""
        raise self._unsupported("network device hotplug")

    async def save(self, path: Path) -> None:
        """Pause the VM and write its device state to ``path`` (a new file, 0600,
        created by the host); RAM stays in ``spec.memory_file``."""
        raise self._unsupported("save")

    async def restore(self, path: Path) -> None:
        """Load device state from ``path`` into a VM started with ``incoming``
        (RAM from ``spec.memory_file``), then run it."""
        raise self._unsupported("restore")

    # -- checkpoint (runtime/checkpoint.py) ------------------------------------------
    def saveable(self) -> str:
        """Why this VM's state cannot be saved and loaded into a new VMM ("" = it
        can): devices the VMM cannot migrate, RAM not in ``spec.memory_file``,
        hot-plugged devices whose content the saved state would not carry."""
        return f"the {self.name} driver cannot save a VM"

    async def save_to(self, fd: int) -> None:
        """Pause the VM and write its device state into the open file ``fd`` (the
        caller's: the driver uses its own copy); RAM stays in ``spec.memory_file``.
        The VM stays paused: ``resume()`` runs it again."""
        raise self._unsupported("checkpoint")

    async def load(self, fd: int) -> None:
        """Load device state from the open file ``fd`` (the caller's) into a VM
        started with ``incoming`` (RAM from ``spec.memory_file``). The VM stays
        paused: ``resume()`` runs it."""
        raise self._unsupported("restore from a checkpoint")

    async def checkpoint_info(self) -> dict[str, Any]:
        """What a restore needs besides the VMSpec, from the running VMM: its
        version, machine, device list and ``plugged`` (the hot-plugged devices,
        :meth:`PluggedDevice.to_json` each, in the order they were added)."""
        raise self._unsupported("checkpoint")


class Driver(abc.ABC):
    """A hypervisor as configured on this host, probed once (accelerator,
    capabilities): it makes the VMs. The runtime sees only this and
    :class:`Hypervisor`; ``pykata.hypervisor.make_driver`` picks the driver."""

    name = "hypervisor"
    accel = ""  # how its VMs run, e.g. "kvm" or "tcg"
    binary = ""  # the VMM executable

    @abc.abstractmethod
    def vm(self, spec: VMSpec) -> Hypervisor:
        """A VM for ``spec``, not started yet."""

    def identity(self) -> dict[str, Any]:
        """What besides the VMSpec shapes a VM's saved state (binary, machine,
        accelerator...): a VM saved under another identity cannot be restored."""
        return {"driver": self.name, "accel": self.accel}

    async def version(self) -> dict[str, str]:
        """The VMM's version as this host runs it (a checkpoint is restored only
        by the same version): string fields, compared one by one."""
        return {"driver": self.name}

    def agent_channel(self, requested: str) -> str:
        """The agent channel kind a VM uses for ``requested`` (auto | vsock | serial)."""
        return "serial" if requested == "auto" else requested

    def exportable_vm(self, spec: VMSpec) -> ExportableVM:
        """A VM for ``spec`` (not started) that can be handed to another process
        once it runs (the VM cache; ``pykata.hypervisor.handoff``)."""
        raise Unimplemented(f"the {self.name} driver cannot hand VMs to another process")

    def adopt_vm(self, spec: VMSpec, handoff: Handoff) -> Hypervisor:
        """This driver's Hypervisor for a VM another process booted and handed
        over: it takes ownership of the handoff's fds (closed on error).
        ``start()`` connects to the running VM; ``stop()`` stops it as any VM."""
        handoff.close()
        raise Unimplemented(f"the {self.name} driver cannot adopt a VM")
