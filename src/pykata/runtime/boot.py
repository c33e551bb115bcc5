"""Bringing a sandbox's VM up: from the VM cache, as a copy of the VM
template, or cold (the agent is reached through ``dial``, shared with the
template build); and the shared file system beside it (virtiofsd, and what the
guest mounts of it).

Cold: the driver's VM boots the guest image with the pod's NICs and the
virtio-fs device on its command line. Clone: QEMU starts ``incoming`` from a
sparse copy of the template's RAM and its saved state. Cache: a VM the cache
server (``vmcache``) booted is handed over and adopted. What a clone or a
cached VM cannot carry (virtio-fs, NICs) is hot-plugged once the agent answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pykata import errors, observe
from pykata.hypervisor.base import Driver, Hypervisor, NicSpec, VMSpec
from pykata.resources import network
from pykata.resources.sharedfs import VirtioFsDaemon
from pykata.runtime import checkpoint, factory, sizing, vmcache
from pykata.runtime.state import ref_json
from pykata.runtime.types import Storage
from pykata.utils.process import ProcRef
from pykata.wire import GUEST_SHARED_DIR, SHARED_FS_TAG

if TYPE_CHECKING:
    from pykata.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)

COLD, TEMPLATE, CACHE, RESTORE = "cold", "template", "VM cache", "checkpoint"


def shared_fs(sb: Sandbox, make_daemon: bool = True) -> Path | None:
    """The shared file system's socket (None: ``shared_fs = "none"``). The
    virtio-fs daemon exporting the sandbox's shared view is made here (started
    with the VM), unless not ``make_daemon``."""
    vm = sb.config.vm
    if vm.shared_fs != "virtio-fs":
        return None
    sock = sb.dir / "vfs.sock"
    if make_daemon:
        sb.virtiofsd = VirtioFsDaemon(
            vm.virtio_fs_daemon, sb.shared_dir, sock, sb.dir / "virtiofsd.log",
            cache=vm.virtio_fs_cache, extra_args=vm.virtio_fs_extra_args,
            sandbox=vm.virtio_fs_sandbox, xattr=vm.virtio_fs_xattr,
            log_max_bytes=sb.config.runtime.log_max_bytes,
            setting=f"[hypervisor.{sb.config.hypervisor.driver}] virtio_fs_daemon",
        )
    return sock


def guest_storages(spec: VMSpec) -> list[Storage]:
    """What the guest mounts at sandbox creation: the shared file system, if any."""
    if spec.shared_fs_socket is None:
        return []
    return [Storage("virtiofs", SHARED_FS_TAG, GUEST_SHARED_DIR, fstype="virtiofs")]


async def start(sb: Sandbox, driver: Driver, spec: VMSpec) -> str:
    """Bring the VM up, the fastest way available: a VM from the cache, a
    template clone, else a cold boot. Which one (COLD, TEMPLATE or CACHE);
    anything but COLD needs :func:`plug_clone_devices` once the agent answers."""
    if await from_cache(sb, driver, spec):
        return CACHE
    template = await find_template(sb, driver, spec)
    if template is not None:
        await clone(sb, driver, spec, template)
        return TEMPLATE
    await cold(sb, driver, spec)
    return COLD


async def from_cache(sb: Sandbox, driver: Driver, spec: VMSpec) -> bool:
    """Take a VM from the VM cache (``[factory] vm_cache_number``): False, and
    nothing changed, when there is none to take or the handover fails (the
    sandbox then boots by itself; the cache never fails a pod)."""
    if sb.config.factory.vm_cache_number <= 0:
        return False
    taken = await vmcache.take(sb.config, spec, driver, sb.key)
    if taken is None:
        return False
    shape = dataclasses.replace(spec, shared_fs_socket=None, nics=[])
    try:
        vm = driver.adopt_vm(shape, taken.handoff)
    except errors.PykataError as exc:
        taken.abort()
        log.info("sandbox %s boots without the VM cache: cannot adopt %s: %s", sb.id,
                 taken.name, exc)
        return False
    memory_file = taken.info.get("memory_file")
    try:
        with observe.phase("vm.boot", sb.phases, sandbox=sb.id, how=CACHE):
            await vm.start()
        sb.vm = vm
        sb.record.extra["vm_cache"] = taken.name
        if isinstance(memory_file, str):  # a template clone's RAM: ours to remove now
            sb.record.extra["memory_file"] = memory_file
        _record_vm(sb, vm)
        sb.persist()
        await taken.accept()
    except errors.PykataError as exc:
        taken.abort()
        await vm.stop(timeout=1.0)
        sb.vm = None
        sb.record.extra.pop("vm_cache", None)
        if sb.record.extra.get("memory_file") == memory_file:
            sb.record.extra.pop("memory_file", None)
        sb.record.vmm = None
        log.info("sandbox %s boots without the VM cache: the handover of %s failed: %s",
                 sb.id, taken.name, exc)
        return False
    log.debug("sandbox %s: VM %s (pid %s) from the VM cache", sb.id, taken.name, vm.pid)
    await _attach_network(sb, spec)
    await _start_virtiofsd(sb)
    return True


async def find_template(sb: Sandbox, driver: Driver, spec: VMSpec) -> factory.Template | None:
    """The VM template ``sb`` starts from, or None to boot cold."""
    if not sb.config.factory.enable_template:
        return None
    why = factory.eligible(spec)
    if why:
        log.warning("sandbox %s boots cold: %s", sb.id, why)
        return None
    return await factory.Factory(sb.config).ensure(spec, driver)


async def _attach_network(sb: Sandbox, spec: VMSpec) -> None:
    model = sb.config.runtime.internetworking_model
    if sb.netns and model != "none":
        sb.network = await asyncio.to_thread(network.attach, sb.netns, model,
                                             sizing.nic_queues(spec))
        sb.record.extra["netns"] = sb.netns


async def _start_virtiofsd(sb: Sandbox) -> None:
    if sb.virtiofsd is not None:
        with observe.phase("virtiofsd.start", sb.phases, sandbox=sb.id):
            await sb.virtiofsd.start()
        sb.record.virtiofsd = ref_json(sb.virtiofsd.ref)
        sb.persist()  # at once: whoever cleans up after a dead owner finds it


def _record_vm(sb: Sandbox, vm: Hypervisor) -> None:
    sb.record.vmm = ref_json(ProcRef.of(vm.pid) if vm.pid else None)


def _record_on_spawn(sb: Sandbox, vm: Hypervisor) -> None:
    """Record the VMM's pid the moment it exists, not once it answers: a shim
    killed while the VM boots leaves it in state.json for ``cleanup``."""

    def spawned(pid: int) -> None:
        sb.record.vmm = ref_json(ProcRef.of(pid))
        sb.persist()

    vm.on_spawn = spawned


def checkpointable_memory(sb: Sandbox, spec: VMSpec) -> None:
    """With ``[runtime] checkpointable`` and no shared file system, put the
    guest RAM of a cold boot in a file of our own (what a checkpoint packs):
    ``<state dir>/vm/<sandbox>.mem``, recorded for teardown and cleanup before
    it exists. Otherwise (the default) nothing changes."""
    if not sb.config.runtime.checkpointable or spec.shared_fs_socket is not None \
            or spec.memory_file is not None:
        return
    spec.checkpointable = True
    mem = factory.clone_memory_path(sb.config.runtime.state_dir, sb.key)
    sb.record.extra["memory_file"] = str(mem)
    sb.persist()
    _new_memory_file(mem)
    spec.memory_file = mem


def _new_memory_file(mem: Path) -> None:
    """An empty RAM file (QEMU sizes it); a stale one of ours is replaced."""
    try:
        fd = factory.create_private_file(mem)
    except FileExistsError:
        os.unlink(mem)
        fd = factory.create_private_file(mem)
    os.close(fd)


async def cold(sb: Sandbox, driver: Driver, spec: VMSpec) -> None:
    """Boot the guest image, the pod's NICs and virtio-fs on the command line."""
    checkpointable_memory(sb, spec)
    sb.vm = vm = driver.vm(spec)
    await vm.prepare()
    await _attach_network(sb, spec)
    if sb.network is not None:
        spec.nics = [NicSpec(ep.fds, ep.mac) for ep in sb.network.endpoints]
        await vm.prepare()  # the command line now has the NICs
    await _start_virtiofsd(sb)
    _record_on_spawn(sb, vm)
    with observe.phase("vm.boot", sb.phases, sandbox=sb.id, how=COLD):
        await vm.start()
    _record_vm(sb, vm)
    if sb.network is not None:
        sb.network.close_fds()  # the VMM holds them now


async def clone(sb: Sandbox, driver: Driver, spec: VMSpec, template: factory.Template) -> None:
    """Start the VM as a copy of the template: its RAM copied (sparse) into a file
    of our own while the VMM and virtiofsd start, its device state restored."""
    mem = factory.clone_memory_path(sb.config.runtime.state_dir, sb.key)
    sb.record.extra["memory_file"] = str(mem)
    sb.persist()
    shape = dataclasses.replace(spec, shared_fs_socket=None, nics=[], memory_file=mem,
                                incoming=True)
    # A clone without virtio-fs has its RAM in a file: checkpointable if asked.
    shape.checkpointable = sb.config.runtime.checkpointable and spec.shared_fs_socket is None
    copying = asyncio.ensure_future(asyncio.to_thread(factory.sparse_copy,
                                                      template.memory, mem))
    try:
        sb.vm = vm = driver.vm(shape)
        await vm.prepare()
        await _attach_network(sb, spec)
        await _start_virtiofsd(sb)
    finally:
        await asyncio.wait({copying})
    try:
        copied = copying.result()
    except OSError as exc:
        raise errors.ResourceExhausted(
            f"cannot copy the VM template's memory to {mem}: {exc.strerror}"
            f" ({mem.parent} needs {template.memory_bytes >> 20} MiB free)") from None
    _record_on_spawn(sb, vm)
    with observe.phase("vm.boot", sb.phases, sandbox=sb.id, how=TEMPLATE):
        await vm.start()
        _record_vm(sb, vm)
        sb.persist()
        await vm.restore(template.state)
    log.debug("sandbox %s: cloned from template %s (%d MiB of RAM copied)", sb.id,
              template.key, copied >> 20)


async def restore(sb: Sandbox, driver: Driver, spec: VMSpec, ckpt: Path,
                  m: checkpoint.Manifest) -> None:
    """Start the VM of checkpoint ``ckpt`` (manifest ``m``, already checked by
    ``checkpoint.check_host``): its RAM unpacked into a file of our own while
    the VMM is prepared and the pod network attached, then the VMM started
    ``incoming`` with the checkpoint's devices and its state loaded. The VM is
    left **paused** (``sb.vm.resume()`` runs it). NICs are matched to the
    pod's interfaces by MAC: the ones on the checkpointed VM's command line in
    their order, the hot-plugged ones on their root ports."""
    mem = factory.clone_memory_path(sb.config.runtime.state_dir, sb.key)
    sb.record.extra["memory_file"] = str(mem)
    sb.persist()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(mem)  # a stale one of ours
    shape = dataclasses.replace(spec, memory_file=mem, incoming=True, nics=[],
                                shared_fs_socket=None)
    unpacking = asyncio.ensure_future(asyncio.to_thread(
        checkpoint.unpack_memory, ckpt / checkpoint.MEMORY, mem, m.memory))
    try:
        sb.vm = vm = driver.vm(shape)
        await vm.prepare()
        await _attach_network(sb, spec)
        _restore_nics(sb, shape, m)
    finally:
        await asyncio.wait({unpacking})
    try:
        unpacking.result()
    except OSError as exc:
        raise errors.ResourceExhausted(
            f"cannot unpack the checkpoint's memory to {mem}: {exc.strerror}"
            f" ({mem.parent} needs {m.memory.data_bytes >> 20} MiB free)") from None
    await vm.prepare()  # the command line now has the NICs
    dfd = checkpoint.open_dir(ckpt)
    try:
        state = checkpoint.open_entry(dfd, checkpoint.VMSTATE, ckpt)
    finally:
        os.close(dfd)
    try:
        _record_on_spawn(sb, vm)
        with observe.phase("vm.boot", sb.phases, sandbox=sb.id, how=RESTORE):
            await vm.start()
            _record_vm(sb, vm)
            sb.persist()
            await vm.load(state)
    finally:
        os.close(state)
        if sb.network is not None:
            sb.network.close_fds()  # the VMM holds them now
    log.debug("sandbox %s: restored from %s (%d MiB of RAM)", sb.id, ckpt,
              m.memory.data_bytes >> 20)


def _restore_nics(sb: Sandbox, shape: VMSpec, m: checkpoint.Manifest) -> None:
    """The pod's interfaces (by MAC) as the checkpointed VM had them: on the
    command line (``shape.nics``) or hot-plugged (``shape.restore_devices``)."""
    by_mac = {ep.mac.lower(): ep for ep in (sb.network.endpoints if sb.network else [])}
    wanted = [mac.lower() for mac in m.cold_nics] + [
        d.mac.lower() for d in shape.restore_devices if d.kind == "nic"]
    missing = [mac for mac in wanted if mac not in by_mac]
    if missing:
        raise errors.FailedPrecondition(
            f"cannot restore sandbox {sb.id}: its VM had a NIC with MAC {missing[0]}, and"
            f" the pod network namespace {sb.netns or '(none)'} has no interface with it;"
            " restore into the same network namespace")
    if len(by_mac) > len(wanted):
        extra = sorted(set(by_mac) - set(wanted))
        log.warning("sandbox %s: interfaces %s of its network namespace were not in the"
                    " checkpoint; they stay unconnected", sb.id, ", ".join(extra))
    shape.nics = [NicSpec(by_mac[mac.lower()].fds, by_mac[mac.lower()].mac)
                  for mac in m.cold_nics]
    for d in shape.restore_devices:
        if d.kind == "nic":
            ep = by_mac[d.mac.lower()]
            if len(ep.fds) != d.queues:
                raise errors.FailedPrecondition(
                    f"cannot restore sandbox {sb.id}: NIC {d.id} had {d.queues} queues,"
                    f" the new tap has {len(ep.fds)}")
            d.fds = list(ep.fds)


async def plug_clone_devices(sb: Sandbox, spec: VMSpec) -> None:
    """What a template cannot carry: the shared filesystem and the NICs."""
    assert sb.vm is not None
    if spec.shared_fs_socket is not None:
        await sb.vm.hotplug_shared_fs(spec.shared_fs_socket, SHARED_FS_TAG)
    if sb.network is not None:
        for i, ep in enumerate(sb.network.endpoints):
            await sb.vm.hotplug_nic(f"net{i}", ep.fds, ep.mac)
        sb.network.close_fds()

