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
    # Confinement: QEMU's seccomp filter ("-sandbox" value, "" = off) and the
    # unprivileged user it runs as ("" = stay root). See docs/security.md.
    seccomp_sandbox: str = ""
    run_as_user: str = ""
    log_max_bytes: int = 1 << 20  # cap of qemu.log and console.log (each, plus one .1)


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
        # Shared guest RAM (virtiofsd, a vhost-user process, maps it): file-less,
        # or in a file a template can be saved from and a clone started from.
        "-object", memory_backend(spec),
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
    if spec.free_page_reporting:
        argv += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    for i in range(opts.pcie_root_ports):
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    for i, nic in enumerate(spec.nics):
        fds = ":".join(str(fd) for fd in nic.fds)
        netdev = f"tap,id=net{i},fd={fds}" if nic.queues == 1 else f"tap,id=net{i},fds={fds}"
        dev = f"virtio-net-pci,netdev=net{i}"
        if nic.mac:
            dev += f",mac={nic.mac}"
        if nic.queues > 1:
            dev += f",mq=on,vectors={2 * nic.queues + 2}"
        argv += ["-netdev", netdev, "-device", dev]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    argv += list(opts.extra_args)
    return argv


def memory_backend(spec: VMSpec) -> str:
    if spec.memory_file is not None:
        return (f"memory-backend-file,id={MEMORY_BACKEND_ID},size={spec.memory_mib}M,"
                f"mem-path={spec.memory_file},share=on")
    return f"memory-backend-memfd,id={MEMORY_BACKEND_ID},size={spec.memory_mib}M,share=on"


def tap_netdev(nic_id: str, fds: list[str]) -> dict[str, object]:
    """QMP netdev_add arguments for a tap with one fd (by name) per queue."""
    args: dict[str, object] = {"type": "tap", "id": nic_id}
    if len(fds) == 1:
        args["fd"] = fds[0]
    else:
        args["fds"] = ":".join(fds)
    return args


def nic_device(nic_id: str, mac: str, queues: int, port: str) -> dict[str, object]:
    """QMP device_add arguments for a virtio-net NIC on root port ``port``."""
    dev: dict[str, object] = {"driver": "virtio-net-pci", "id": f"dev-{nic_id}",
                              "netdev": nic_id, "bus": port}
    if mac:
        dev["mac"] = mac
    if queues > 1:
        # One RX and one TX vector per queue, plus config and control.
        dev.update({"mq": True, "vectors": 2 * queues + 2})
    return dev
