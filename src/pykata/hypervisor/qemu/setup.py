"""The QEMU driver as configured by ``[hypervisor.qemu]``: the accelerator
probed once per host (cached in the state directory), the host-side options
every VM of this host shares, the DAX capability checked when asked for."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata import errors
from pykata.config import Config
from pykata.hypervisor.base import Driver, Hypervisor, VMSpec
from pykata.hypervisor.channels import vhost_vsock_available
from pykata.hypervisor.qemu.accel import AccelProbe, probe
from pykata.hypervisor.qemu.caps import check_dax
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.utils.process import stop_child

if TYPE_CHECKING:
    from pykata.hypervisor.handoff import ExportableVM, Handoff

# PCIe root ports on q35 for what is hot-plugged: disks, NICs, and (in a
# template clone) the virtio-fs device.
PCIE_ROOT_PORTS = 6


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self, binary: str, options: QemuOptions, reason: str = "") -> None:
        self.binary = binary
        self.options = options
        self.accel = options.accel
        self.reason = reason  # why this accelerator
        self._version: dict[str, str] | None = None

    @classmethod
    async def probe(cls, config: Config) -> QemuDriver:
        q = config.qemu
        if q.shared_fs == "virtio-fs":
            await asyncio.to_thread(check_dax, q.path, q.virtio_fs_cache_size)
        accel: AccelProbe = await asyncio.to_thread(
            probe, q.path, q.accelerator, Path(config.runtime.state_dir) / "accel.json")
        return cls(q.path, options(config, accel.accel), accel.reason)

    def vm(self, spec: VMSpec) -> Hypervisor:
        return QemuHypervisor(spec, self.binary, self.options)

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "driver": self.name, "qemu": _file_id(self.binary), "accel": o.accel,
            "cpu": o.cpu_model, "machine": o.machine_type,
            "machine_options": o.machine_options, "tb_size": o.tb_size_mib,
            "root_ports": o.pcie_root_ports, "extra": list(o.extra_args),
            "portfwd_port": True,  # the virtio-serial port-forward channel is in the state
        }

    async def version(self) -> dict[str, str]:
        """``qemu --version``'s first line, e.g. "7.2.22" and "Debian
        1:7.2+dfsg-7+deb12u18" (the package string, "" for a plain build)."""
        if self._version is None:
            self._version = await _qemu_version(self.binary)
        return dict(self._version)

    def agent_channel(self, requested: str) -> str:
        if requested == "auto":
            return "vsock" if vhost_vsock_available() else "serial"
        return requested

    def exportable_vm(self, spec: VMSpec) -> ExportableVM:
        from pykata.hypervisor.qemu.adopt import ExportableQemu

        return ExportableQemu(spec, self.binary, self.options)

    def adopt_vm(self, spec: VMSpec, handoff: Handoff) -> Hypervisor:
        from pykata.hypervisor.qemu.adopt import AdoptedQemu

        return AdoptedQemu(spec, self.binary, self.options, handoff)


def options(config: Config, accel: str) -> QemuOptions:
    """The host-side QEMU options of ``config`` for VMs on ``accel``."""
    q = config.qemu
    return QemuOptions(
        accel=accel, cpu_model=q.cpu_model, machine_type=q.machine_type,
        machine_options=q.machine_options,
        tb_size_mib=q.tb_size if accel == "tcg" else 0,
        pcie_root_ports=PCIE_ROOT_PORTS, extra_args=tuple(q.extra_args),
        seccomp_sandbox=q.seccomp_sandbox, run_as_user=q.run_as_user,
        log_max_bytes=config.runtime.log_max_bytes,
        uid_lease_dir=Path(config.runtime.state_dir) / "uids",
    )


_VERSION = re.compile(r"QEMU emulator version (\S+)(?: \((.*)\))?")


async def _qemu_version(binary: str) -> dict[str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        raise errors.NotFound(f"cannot run {binary} --version: {exc.strerror}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 10.0)
    except TimeoutError:
        await stop_child(proc, grace=0.5)
        raise errors.DeadlineExceeded(f"{binary} --version did not answer in 10s") from None
    first = out[:4096].decode(errors="replace").splitlines()[:1]
    m = _VERSION.match(first[0].strip()) if first else None
    if proc.returncode != 0 or m is None:
        raise errors.Internal(f"cannot read the version of {binary}: {first[0] if first else ''!r}")
    return {"driver": "qemu", "version": m.group(1), "package": m.group(2) or ""}


def _file_id(path: str) -> list[Any]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return [real, -1, -1]
    return [real, st.st_size, st.st_mtime_ns]
