"""Bringing a sandbox's VM up, cold or as a copy of the VM template (the
agent is reached through ``dial``, shared with the template build).

Cold: the driver's VM boots the guest image with the pod's NICs and the
virtio-fs device on its command line. Clone: QEMU starts ``incoming`` from a
sparse copy of the template's RAM and its saved state; what a template cannot
carry (virtio-fs, NICs) is hot-plugged once the agent answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from pykata import errors
from pykata.hypervisor.base import Driver, Hypervisor, NicSpec, VMSpec
from pykata.resources import network
from pykata.runtime import factory, sizing
from pykata.utils.process import ProcRef
from pykata.wire import SHARED_FS_TAG

if TYPE_CHECKING:
    from pykata.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)

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
        await sb.virtiofsd.start()
        sb.record.virtiofsd = _ref_json(sb.virtiofsd.ref)


def _record_vm(sb: Sandbox, vm: Hypervisor) -> None:
    sb.record.qemu = _ref_json(ProcRef.of(vm.pid) if vm.pid else None)


async def cold(sb: Sandbox, driver: Driver, spec: VMSpec) -> None:
    """Boot the guest image, the pod's NICs and virtio-fs on the command line."""
    sb.vm = vm = driver.vm(spec)
    await vm.prepare()
    await _attach_network(sb, spec)
    if sb.network is not None:
        spec.nics = [NicSpec(ep.fds, ep.mac) for ep in sb.network.endpoints]
        await vm.prepare()  # the command line now has the NICs
    await _start_virtiofsd(sb)
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
    await vm.start()
    _record_vm(sb, vm)
    sb.persist()
    await vm.restore(template.state)
    log.debug("sandbox %s: cloned from template %s (%d MiB of RAM copied)", sb.id,
              template.key, copied >> 20)


async def plug_clone_devices(sb: Sandbox, spec: VMSpec) -> None:
    """What a template cannot carry: the shared filesystem and the NICs."""
    assert sb.vm is not None
    if spec.shared_fs_socket is not None:
        await sb.vm.hotplug_shared_fs(spec.shared_fs_socket, SHARED_FS_TAG)
    if sb.network is not None:
        for i, ep in enumerate(sb.network.endpoints):
            await sb.vm.hotplug_nic(f"net{i}", ep.fds, ep.mac)
        sb.network.close_fds()


def _ref_json(ref: ProcRef | None) -> dict[str, int] | None:
    return ref.to_json() if ref is not None else None
