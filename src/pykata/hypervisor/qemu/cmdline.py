"""QEMU command line from a VMSpec: a pure function, unit-tested without QEMU.

QEMU may run unprivileged (``run_as_user``) in a seccomp filter, while the
sandbox directory is root-only: so the command line names no file or socket
there. Everything QEMU needs from it comes as an inherited fd (:class:`QemuFds`,
same numbers in the child): QMP, the agent and console chardevs, virtio-fs,
vhost-vsock, guest RAM, kernel and initrd (``/proc/self/fd/N``: QEMU reopens
the file we opened, whatever directory it is in) and a root disk image (an fd
set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pykata.hypervisor.base import VMSpec
from pykata.wire import AGENT_LOG_PARAM, PORTFWD_SERIAL_PORT_NAME, SERIAL_PORT_NAME

MEMORY_BACKEND_ID = "pykata-mem"


@dataclass(frozen=True)
class QemuOptions:
    """Host-side choices that are not part of the VM's shape."""

    accel: str = "tcg"  # kvm | tcg
    cpu_model: str = ""  # "" = host on kvm, max on tcg
    machine_type: str = "q35"
    machine_options: str = ""
    tb_size_mib: int = 0  # TCG translation cache; 0 = QEMU's default
    pcie_root_ports: int = 0
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # Confinement: QEMU's seccomp filter ("-sandbox" value, "" = off) and the
    # unprivileged user it runs as ("" = stay root). See docs/security.md.
    seccomp_sandbox: str = ""
    run_as_user: str = ""
    # Where each VM leases its own uid/gid from run_as_user's subordinate range
    # (None: every QEMU runs as run_as_user's own uid). See qemu/uids.py.
    uid_lease_dir: Path | None = None
    log_max_bytes: int = 1 << 20  # cap of qemu.log and console.log (each, plus one .1)


# -add-fd sets given on the command line (hot-plugged disks get others from QEMU)
ROOT_DISK_FDSET = 1
CONSOLE_FDSET = 2


@dataclass(frozen=True)
class QemuFds:
    """fds QEMU inherits, by number (-1: none). Each is the QEMU end: a
    socketpair half, a socket connected to virtiofsd, an open file."""

    qmp: int
    console: int  # write end of a pipe the host drains
    agent: int = -1  # virtio-serial agent channel
    vhost_vsock: int = -1  # /dev/vhost-vsock, opened by the host
    shared_fs: int = -1  # connected to virtiofsd's vhost-user socket
    memory: int = -1  # spec.memory_file, opened read-write
    image: int = -1  # spec.image, opened read-only
    image_bytes: int = 0  # its size (a pmem device maps the whole file)
    kernel: int = -1  # spec.kernel and spec.initrd, opened read-only (-1: by path)
    initrd: int = -1
    portfwd: int = -1  # virtio-serial port-forward channel (serial agent channel only)

    def all(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.qmp, self.console, self.agent, self.vhost_vsock,
                                   self.shared_fs, self.memory, self.image, self.kernel,
                                   self.initrd, self.portfwd) if fd >= 0)


def _by_fd(fd: int, path: object) -> str:
    """What QEMU opens: the magic link to our open file, or else the path."""
    return f"/proc/self/fd/{fd}" if fd >= 0 else str(path)


def kernel_command_line(spec: VMSpec) -> str:
    parts = ["console=ttyS0"]
    if spec.kernel_params:
        parts.append(spec.kernel_params)
    if spec.debug:
        parts = [p for p in " ".join(parts).split() if p not in ("quiet",) and
                 not p.startswith("loglevel=")]
        parts.append(f"{AGENT_LOG_PARAM}=debug")
    return " ".join(parts)


def build_argv(binary: str, spec: VMSpec, opts: QemuOptions, fds: QemuFds) -> list[str]:
    """The argv that starts ``spec``, its host resources passed as ``fds``."""
    cpu = opts.cpu_model or ("host" if opts.accel == "kvm" else "max")
    machine = [opts.machine_type, f"memory-backend={MEMORY_BACKEND_ID}"]
    if opts.machine_options:
        machine.append(opts.machine_options)
    pmem = spec.image is not None and spec.image_device in ("nvdimm", "virtio-pmem")
    if pmem and spec.image_device == "nvdimm":
        machine.append("nvdimm=on")
    accel = opts.accel
    if opts.accel == "tcg" and opts.tb_size_mib:
        accel += f",tb-size={opts.tb_size_mib}"
        if spec.max_vcpus > spec.vcpus:
            # Multi-threaded TCG aborts when a hot-plugged vCPU's new thread finds
            # no free cache region; one thread for all vCPUs never needs one.
            accel += ",thread=single"

    mem = f"{spec.memory_mib}M"
    slots, maxmem = 0, spec.max_memory_mib
    if spec.memory_slots and spec.max_memory_mib > spec.memory_mib:
        slots = spec.memory_slots
    if pmem:
        # The root image is a memory device too: one more slot, and room above
        # what memory hotplug may add (so hotplug keeps its whole range).
        slots, maxmem = slots + 1, max(maxmem, spec.memory_mib) + -(-fds.image_bytes >> 20)
    if slots:
        mem += f",slots={slots},maxmem={maxmem}M"

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
        "-object", memory_backend(spec, fds.memory),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", _by_fd(fds.kernel, spec.kernel),
    ]
    if opts.seccomp_sandbox:
        argv[1:1] = ["-sandbox", opts.seccomp_sandbox]
    if spec.initrd is not None:
        argv += ["-initrd", _by_fd(fds.initrd, spec.initrd)]
    if spec.image is not None:
        argv += root_image(spec, fds)
    argv += ["-append", kernel_command_line(spec)]
    argv += [
        # The console goes into a pipe the host drains into a capped log. A pipe
        # (not a socket): the UART writes a byte at a time, and a pipe packs them.
        # A full pipe makes QEMU hold the guest's UART, it never blocks.
        "-add-fd", f"fd={fds.console},set={CONSOLE_FDSET},opaque=console",
        "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on",
        "-serial", "chardev:console",
        # QMP over a socketpair: nothing in the file system to connect to.
        "-chardev", f"socket,id=qmp,fd={fds.qmp}",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.agent_channel == "vsock":
        _need(fds.vhost_vsock, "/dev/vhost-vsock")
        argv += ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={spec.vsock_cid},"
                            f"vhostfd={fds.vhost_vsock}"]
    else:
        _need(fds.agent, "the agent channel")
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,fd={fds.agent}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={SERIAL_PORT_NAME}",
        ]
        if fds.portfwd >= 0:
            argv += ["-chardev", f"socket,id=portfwd,fd={fds.portfwd}",
                     "-device", "virtserialport,bus=vser0.0,chardev=portfwd,"
                                f"name={PORTFWD_SERIAL_PORT_NAME}"]
    if spec.shared_fs_socket is not None:
        _need(fds.shared_fs, "the virtio-fs socket")
        fs = f"vhost-user-fs-pci,chardev=vfs,tag={spec.shared_fs_tag},queue-size=1024"
        if spec.shared_fs_cache_size_mib:
            fs += f",cache-size={spec.shared_fs_cache_size_mib}M"
        argv += ["-chardev", f"socket,id=vfs,fd={fds.shared_fs}", "-device", fs]
    if spec.free_page_reporting:
        argv += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    for i in range(opts.pcie_root_ports):
        argv += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    for i, nic in enumerate(spec.nics):
        argv += _tap_nic(f"net{i}", nic.fds, nic.queues, nic.mac)
    argv += restore_devices(spec)
    if spec.incoming:
        argv += ["-incoming", "defer"]
    argv += list(opts.extra_args)
    return argv


def _tap_nic(netdev_id: str, fds: Sequence[int], queues: int, mac: str,
             placement: str = "") -> list[str]:
    """``-netdev tap`` on the given fds and its ``virtio-net-pci`` (multi-queue
    when ``queues`` > 1); ``placement`` adds the device's id and bus."""
    taps = ":".join(str(fd) for fd in fds)
    netdev = (f"tap,id={netdev_id},fd={taps}" if queues == 1
              else f"tap,id={netdev_id},fds={taps}")
    dev = f"virtio-net-pci,netdev={netdev_id}{placement}"
    if mac:
        dev += f",mac={mac}"
    if queues > 1:
        dev += f",mq=on,vectors={2 * queues + 2}"
    return ["-netdev", netdev, "-device", dev]


def restore_devices(spec: VMSpec) -> list[str]:
    """The devices hot-plugged into the VM whose state this one loads, with the
    ids and buses they had (after the root ports they sit on), in the order
    they were plugged: vCPUs as ``-device <type>,id=cpu-N,<topology>``, NICs
    as a tap netdev with the new fds and ``virtio-net-pci,id=dev-<id>,bus=<port>``
    (as ``hotplug_nic`` adds them), private memory as a RAM backend and a
    ``pc-dimm`` (the same order gives the same addresses)."""
    argv: list[str] = []
    for d in spec.restore_devices:
        if d.kind == "vcpu":
            if not d.driver:
                raise ValueError(f"restored vCPU {d.id} has no CPU type")
            props = "".join(f",{k}={v}" for k, v in d.props.items())
            argv += ["-device", f"{d.driver},id={d.id}{props}"]
        elif d.kind == "nic":
            if not d.fds or len(d.fds) != d.queues:
                raise ValueError(f"restored NIC {d.id} needs {d.queues} tap fds, has"
                                 f" {len(d.fds)}")
            argv += _tap_nic(d.id, d.fds, d.queues, d.mac, f",id=dev-{d.id},bus={d.bus}")
        elif d.kind == "dimm":
            size = d.props.get("size-mib", 0)
            if size <= 0:
                raise ValueError(f"restored memory {d.id} has no size")
            argv += ["-object", f"memory-backend-ram,id=mem-{d.id},size={size}M",
                     "-device", f"pc-dimm,id={d.id},memdev=mem-{d.id}"]
        else:
            raise ValueError(f"cannot restore a hot-plugged {d.kind!r} device ({d.id})")
    return argv


def root_image(spec: VMSpec, fds: QemuFds) -> list[str]:
    """The read-only root image: on a pmem device, the host file mapped into the
    guest (read-only, shared: every VM maps the same page cache; unarmed, as an
    NVDIMM over a read-only backend must be), or a read-only virtio-blk disk."""
    _need(fds.image, "the root image")
    if spec.image_device in ("nvdimm", "virtio-pmem"):
        if fds.image_bytes <= 0:
            raise ValueError("the root image's size is unknown")
        backend = (f"memory-backend-file,id=rootimg,mem-path=/proc/self/fd/{fds.image},"
                   f"size={fds.image_bytes},share=on,readonly=on")
        device = ("nvdimm,id=rootnv,memdev=rootimg,unarmed=on"
                  if spec.image_device == "nvdimm" else
                  "virtio-pmem-pci,id=rootpmem,memdev=rootimg")
        return ["-object", backend, "-device", device]
    drive = f"if=none,id=rootdisk,file=/dev/fdset/{ROOT_DISK_FDSET},format=raw,readonly=on"
    if spec.image_offset:
        drive += f",offset={spec.image_offset}"
    return ["-add-fd", f"fd={fds.image},set={ROOT_DISK_FDSET},opaque=rootdisk",
            "-drive", drive, "-device", "virtio-blk-pci,drive=rootdisk"]


def _need(fd: int, what: str) -> None:
    if fd < 0:
        raise ValueError(f"no fd for {what}")


def memory_backend(spec: VMSpec, fd: int = -1) -> str:
    if spec.memory_file is not None:
        # QEMU opens mem-path itself: the magic link reaches the file we opened
        # without QEMU being able to walk the root-only directory it is in.
        _need(fd, "the guest memory file")
        return (f"memory-backend-file,id={MEMORY_BACKEND_ID},size={spec.memory_mib}M,"
                f"mem-path=/proc/self/fd/{fd},share=on")
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
