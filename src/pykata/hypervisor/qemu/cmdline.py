"""QEMU command line from a VMSpec: a pure function, unit-tested without QEMU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pykata.hypervisor.base import VMSpec

AGENT_PORT_NAME = "agent.channel.0"
MEMORY_BACKEND_ID = "pykata-mem"
VSOCK_PORT = 1024


@dataclass(frozen=True)
class QemuOptions:
    """Host-side choices that are not part of the VM's shape."""

    accel: str = "tcg"  # kvm | tcg
    cpu_model: str = ""  # "" = host on kvm, max on tcg
    machine_type: str = "q35"
    machine_options: str = ""
    tb_size_mib: int = 0  # TCG translation cache; 0 = QEMU's default
    qmp_socket: Path = Path("qmp.sock")
    agent_socket: Path = Path("agent.sock")
    pcie_root_ports: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)


def kernel_command_line(spec: VMSpec) -> str:
    parts = ["console=ttyS0"]
    if spec.kernel_params:
        parts.append(spec.kernel_params)
    if spec.debug:
        parts = [p for p in " ".join(parts).split() if p not in ("quiet",) and
                 not p.startswith("loglevel=")]
        parts.append("pykata.agent.log=debug")
    return " ".join(parts)


def build_argv(binary: str, spec: VMSpec, opts: QemuOptions) -> list[str]:
    """The argv that starts ``spec`` (QEMU connects to our QMP and agent sockets)."""
    cpu = opts.cpu_model or ("host" if opts.accel == "kvm" else "max")
    machine = [opts.machine_type, f"memory-backend={MEMORY_BACKEND_ID}"]
    if opts.machine_options:
        machine.append(opts.machine_options)
    accel = opts.accel
    if opts.accel == "tcg" and opts.tb_size_mib:
        accel += f",tb-size={opts.tb_size_mib}"

    mem = f"{spec.memory_mib}M"
    if spec.memory_slots and spec.max_memory_mib > spec.memory_mib:
        mem += f",slots={spec.memory_slots},maxmem={spec.max_memory_mib}M"

    argv = [
        binary,
        "-name", f"pykata-{spec.id},debug-threads=on",
        "-machine", ",".join(machine),
        "-accel", accel,
        "-cpu", cpu,
        "-smp", f"{spec.vcpus},maxcpus={max(spec.vcpus, spec.max_vcpus)}",
        "-m", mem,
        # Shared, file-less guest RAM: virtiofsd (vhost-user) must map it.
        "-object", f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={spec.memory_mib}M,share=on",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(spec.kernel),
    ]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.image is not None:
        argv += [
            "-drive", f"if=none,id=rootdisk,file={spec.image},format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=rootdisk",
        ]
    argv += ["-append", kernel_command_line(spec)]
    argv += [
        "-chardev", f"file,id=console,path={spec.console_log}",
        "-serial", "chardev:console",
        # QMP: QEMU connects to the socket the driver already listens on.
        "-chardev", f"socket,id=qmp,path={opts.qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.agent_channel == "vsock":
        argv += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={spec.vsock_cid}"]
    else:
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,path={opts.agent_socket},reconnect=1",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]
    if spec.shared_fs_socket is not None:
        fs = f"vhost-user-fs-pci,chardev=vfs,tag={spec.shared_fs_tag},queue-size=1024"
        if spec.shared_fs_cache_size_mib:
            fs += f",cache-size={spec.shared_fs_cache_size_mib}M"
        argv += ["-chardev", f"socket,id=vfs,path={spec.shared_fs_socket}", "-device", fs]
    for i in range(opts.pcie_root_ports):
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    for i, fd in enumerate(spec.tap_fds):
        nic = f"virtio-net-pci,netdev=net{i}"
        if i < len(spec.tap_macs) and spec.tap_macs[i]:
            nic += f",mac={spec.tap_macs[i]}"
        argv += ["-netdev", f"tap,id=net{i},fd={fd}", "-device", nic]
    argv += list(opts.extra_args)
    return argv
