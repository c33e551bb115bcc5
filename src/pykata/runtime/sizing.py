"""How big a sandbox's VM is: its boot size and ceilings from the configuration
(or the pod's request), and what each container's OCI limits add. Pure."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.config import LEAN_KERNEL_PARAMS, Config
from pykata.hypervisor.base import VMSpec
from pykata.wire import (
    AGENT_ENGINE_PARAM,
    ROOT_BLK_DEVICE,
    ROOT_IMAGE_DATA_OFFSET,
    ROOT_PMEM_DEVICE,
)

MAX_NIC_QUEUES = 4
MEMORY_BLOCK_MIB = 128  # the guest's memory hotplug block on x86_64


def vm_spec(config: Config, sandbox_id: str, namespace: str, run_dir: Path, *,
            channel: str, vcpus: int | None = None, memory_mib: int | None = None,
            shared_fs_socket: Path | None = None) -> VMSpec:
    """The VM of a sandbox: ``vcpus``/``memory_mib`` (else the configured
    defaults) at boot, up to the configured maxima (default: the host's)."""
    q = config.vm
    n = vcpus or q.default_vcpus
    mem = memory_mib or q.default_memory
    max_cpus, max_mem = maxima(config, n, mem)
    # Hot-plugged memory comes up online by itself (the agent still checks).
    params = (q.kernel_params or LEAN_KERNEL_PARAMS) + " memhp_default_state=online"
    if config.agent.container_engine != "native":  # the guest's default
        params += f" {AGENT_ENGINE_PARAM}={config.agent.container_engine}"
    image = config.root_image_path()
    device = q.rootfs_device
    if image is not None:
        params += " " + root_params(device)
    return VMSpec(
        id=sandbox_id, run_dir=run_dir, kernel=config.kernel_path(),
        initrd=config.initrd_path(), kernel_params=params, vcpus=n,
        max_vcpus=max_cpus, memory_mib=mem, max_memory_mib=max_mem,
        image=image, image_device=device,
        image_offset=ROOT_IMAGE_DATA_OFFSET if device == "virtio-blk" else 0,
        memory_slots=q.memory_slots, shared_fs_socket=shared_fs_socket,
        shared_fs_cache_size_mib=q.virtio_fs_cache_size, agent_channel=channel,
        vsock_cid=vsock_cid(namespace, sandbox_id),
        debug=q.enable_debug or config.agent.enable_debug,
        free_page_reporting=q.reclaim_guest_freed_memory,
    )


def maxima(config: Config, vcpus: int, memory_mib: int) -> tuple[int, int]:
    """(vCPUs, MiB) a VM booted with ``vcpus``/``memory_mib`` can grow to: the
    configured maxima, by default the host's."""
    q = config.vm
    host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    return (max(vcpus, q.default_maxvcpus or (os.cpu_count() or 1)),
            max(memory_mib, q.default_maxmemory or host_mem))


def check_limits_before_boot(sandbox_id: str, config: Config, res: dict[str, Any]) -> None:
    """The first container's limits against what the sandbox's VM could ever
    have, before it boots (``check_limits`` asks again of the booted VM)."""
    q = config.vm
    max_cpus, max_mem = maxima(config, q.default_vcpus, q.default_memory)
    _refuse_beyond(sandbox_id, max_cpus, max_mem, res)


def root_params(device: str, fstype: str = "erofs") -> str:
    """Kernel parameters that tell the early initrd where the root image is:
    pmem devices are mounted with DAX (the guest reads the host's page cache)."""
    if device == "virtio-blk":
        return f"root={ROOT_BLK_DEVICE} rootfstype={fstype}"
    return f"root={ROOT_PMEM_DEVICE} rootfstype={fstype} rootflags=dax"


def vsock_cid(namespace: str, sandbox_id: str) -> int:
    """A CID per sandbox, stable across restarts of its shim (3 and up)."""
    return 3 + zlib.crc32(f"{namespace}/{sandbox_id}".encode()) % 0x7FFFFFF0


def nic_queues(spec: VMSpec) -> int:
    """Tap queues per NIC: one per vCPU the VM can have, at most 4."""
    return max(1, min(spec.max_vcpus, MAX_NIC_QUEUES)) if spec.max_vcpus > 1 else 1


def needs(res: dict[str, Any]) -> tuple[int, int]:
    """(CPUs, MiB) one container's OCI resources ask for (0: no limit): the CPU
    quota over its period rounded up, the memory limit rounded up to MiB."""
    cpu = res.get("cpu") or {}
    quota, period = cpu.get("quota") or 0, cpu.get("period") or 100000
    cpus = -(-quota // period) if quota > 0 and period > 0 else 0
    limit = (res.get("memory") or {}).get("limit") or 0
    return cpus, -(-limit // (1 << 20)) if limit > 0 else 0


def wanted(base: tuple[int, int], limits: list[dict[str, Any]]) -> tuple[int, int]:
    """(vCPUs, MiB) a VM should have: ``base`` plus every running container's limits."""
    cpus, mem = base
    for res in limits:
        more_cpus, more_mem = needs(res)
        cpus += more_cpus
        mem += more_mem
    return cpus, mem


def check_limits(sandbox_id: str, spec: VMSpec, res: dict[str, Any]) -> None:
    """A container may not ask for more than the VM can ever have."""
    _refuse_beyond(sandbox_id, spec.max_vcpus, spec.max_memory_mib, res)


def _refuse_beyond(sandbox_id: str, max_vcpus: int, max_memory_mib: int,
                   res: dict[str, Any]) -> None:
    cpus, mem = needs(res)
    if cpus > max_vcpus:
        raise errors.InvalidArgument(
            f"a CPU limit of {cpus} vCPUs is impossible: sandbox {sandbox_id} can have at most"
            f" {max_vcpus} (default_maxvcpus)")
    if mem > max_memory_mib:
        raise errors.InvalidArgument(
            f"a memory limit of {mem} MiB is impossible: sandbox {sandbox_id} can have at most"
            f" {max_memory_mib} MiB (default_maxmemory)")


def memory_to_add(present_mib: int, wanted_mib: int) -> int:
    """Whole hotplug blocks to add to reach ``wanted_mib`` (0: less than a block short)."""
    short = wanted_mib - present_mib
    return short // MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB if short >= MEMORY_BLOCK_MIB else 0
