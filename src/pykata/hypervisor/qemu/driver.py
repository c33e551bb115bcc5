"""QEMU driver: launch, QMP (through qemu.qmp), stop, pause/resume, hotplug.

Confinement: QEMU starts as ``run_as_user`` (never root, unless configured so)
under its own seccomp filter (``-sandbox``, which forbids setuid and exec, so
it cannot drop privileges itself: it is started unprivileged). The sandbox
directory stays root-only; QEMU gets every resource as an fd the driver opened
(QMP and agent over socketpairs, the console into a pipe, virtio-fs connected
by the driver, guest RAM, kernel and initrd via ``/proc/self/fd``, disks
through ``add-fd``, migration through ``getfd``). What QEMU and the guest
print is drained into capped logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import grp
import logging
import os
import pwd
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from pykata import errors
from pykata.hypervisor.base import AgentChannel, Hypervisor, PluggedDevice, VMSpec
from pykata.hypervisor.channels import SerialChannel, VsockChannel
from pykata.hypervisor.qemu.cmdline import (
    QemuFds,
    QemuOptions,
    build_argv,
    nic_device,
    tap_netdev,
)
from pykata.hypervisor.qemu.uids import UidLease, lease_for
from pykata.utils.logfile import CappedLog, drain
from pykata.utils.process import stop_child, tail
from pykata.utils.unixsock import addressable
from pykata.wire import PORTFWD_VSOCK_PORT, VSOCK_PORT

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 15.0
QMP_READ_LIMIT = 1 << 20  # largest QMP message we accept from QEMU
EVENT_QUEUE = 64  # events a scoped listener keeps (older ones are dropped)
DRAIN_GRACE = 2.0  # seconds stop() waits for the logs to reach EOF

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
CONSOLE_PIPE_SIZE = 1 << 20  # bytes the guest console may be ahead of our drain


class _QMP(QMPClient):
    """qemu.qmp's client without its default all-events listener: nobody reads
    it, and its queue and history grow with every event (the guest can cause
    them, e.g. RTC_CHANGE). Only the scoped, bounded listeners below remain."""

    def __init__(self, name: str) -> None:
        super().__init__(name, readbuflen=QMP_READ_LIMIT)
        with contextlib.suppress(ValueError):
            self._listeners.remove(self.events)


class _Listener(EventListener):
    """A listener for ``names`` that keeps at most ``maxsize`` events (dropping
    the oldest) and no history."""

    def __init__(self, names: tuple[str, ...], maxsize: int = EVENT_QUEUE) -> None:
        super().__init__(names)
        self._maxsize = maxsize

    async def put(self, event: Any) -> None:
        if not self.accept(event):
            return
        while self._queue.qsize() >= self._maxsize:
            self._queue.get_nowait()
        self._queue.put_nowait(event)


@dataclass(frozen=True)
class Credentials:
    """Who QEMU runs as: ``user``'s own uid and gid, or (``leased``) one pair
    of its subordinate range."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    leased: bool = False

    def __str__(self) -> str:
        return f"uid {self.uid} of {self.user}'s range" if self.leased else self.user


def qemu_credentials(user: str, accel: str) -> Credentials | None:
    """The unprivileged identity for QEMU (None: stay root). Supplementary
    groups: only kvm, for /dev/kvm, when the VM uses KVM."""
    if not user:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise errors.FailedPrecondition(
            f"QEMU is to run as user {user!r} ([hypervisor.qemu] run_as_user), which does not"
            f" exist: run 'make setup' or 'useradd --system --no-create-home --shell"
            f" /usr/sbin/nologin {user}' (or set run_as_user = \"\" to run QEMU as root)"
        ) from None
    groups: tuple[int, ...] = ()
    if accel == "kvm":
        with contextlib.suppress(KeyError):
            groups = (grp.getgrnam("kvm").gr_gid,)
    return Credentials(user, pw.pw_uid, pw.pw_gid, groups)


def permits(st: os.stat_result, cred: Credentials, want: int) -> bool:
    """Whether ``cred`` has permission bits ``want`` (r=4, w=2, x=1) on ``st``."""
    if st.st_uid == cred.uid:
        return (st.st_mode >> 6) & want == want
    if st.st_gid == cred.gid or st.st_gid in cred.groups:
        return (st.st_mode >> 3) & want == want
    return st.st_mode & want == want


@dataclass
class _Fds:
    """What one start() opens: QEMU's ends (closed here once QEMU has them) and
    ours (kept on success); on failure everything is closed, each exactly once."""

    child: list[int] = field(default_factory=list)
    host: list[socket.socket] = field(default_factory=list)
    host_fds: list[int] = field(default_factory=list)

    def give(self, fd: int) -> int:
        self.child.append(fd)
        return fd

    def pair(self) -> tuple[socket.socket, int]:
        """(our end, QEMU's end) of a new stream socketpair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host.append(ours)
        return ours, self.give(theirs.detach())

    def pipe(self, size: int = 0) -> tuple[int, int]:
        """(our read end, QEMU's write end) of a new pipe of about ``size`` bytes."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self.host_fds.append(r)
        self.give(w)
        if size:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
        return r, w

    def close_child(self) -> None:
        for fd in self.child:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child = []

    def close_all(self) -> None:
        self.close_child()
        for s in self.host:
            s.close()
        for fd in self.host_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.host, self.host_fds = [], []


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def __init__(self, spec: VMSpec, binary: str, options: QemuOptions) -> None:
        super().__init__(spec)
        self.binary = binary
        self.options = options
        self.argv: list[str] = []
        self.credentials: Credentials | None = None
        self._lease: UidLease | None = None  # held from prepare() until stop()
        self._prepared = False
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: _QMP | None = None
        self._channel: AgentChannel | None = None
        self._portfwd: AgentChannel | None = None
        self._portfwd_sock: socket.socket | None = None
        self._drains: list[asyncio.Task[int]] = []
        # Read ends of QEMU's output and console pipes while they are drained
        # (a VM handed to another process passes them on: qemu/adopt.py).
        self.log_fds: tuple[int, int] = (-1, -1)
        self._vcpus = spec.vcpus
        self._dimms = 0
        self._ports: dict[str, str] = {}  # hot-plugged device id -> PCIe root port
        # vCPUs and NICs hot-plugged (or, restored, on the command line as such):
        # what a checkpoint of this VM must repeat (checkpoint_info).
        self._plugged: list[PluggedDevice] = [
            dataclasses.replace(d, fds=[]) for d in spec.restore_devices]
        self._shared_dimms = 0  # hot-plugged memory a saved state would not carry
        for d in self._plugged:
            if d.kind == "nic":
                self._ports[d.id] = d.bus
            elif d.kind == "vcpu":
                self._vcpus += 1
            elif d.kind == "dimm":
                self._dimms += 1
        self._fdsets: dict[str, int] = {}  # hot-plugged disk -> its add-fd set
        self.log_path = spec.run_dir / "qemu.log"

    # -- lifecycle -----------------------------------------------------------------
    async def prepare(self) -> None:
        """Check the binary, the guest assets (readable by QEMU's user), /dev/kvm
        and the user itself; lease QEMU's uid (held until stop()); make the run
        directory."""
        if not os.path.isfile(self.binary) or not os.access(self.binary, os.X_OK):
            raise errors.NotFound(
                f"QEMU binary {self.binary} not found: install qemu-system-x86"
                " (apt-get install qemu-system-x86) or set [hypervisor.qemu] path"
            )
        for what, p in (("guest kernel", self.spec.kernel), ("guest initrd", self.spec.initrd),
                        ("guest image", self.spec.image)):
            if p is not None and not Path(p).is_file():
                raise errors.NotFound(
                    f"{what} {p} not found: build it with 'pykata image build'"
                )
        cred = await self._credentials()
        try:
            self._check_access(cred)
        except BaseException:
            self._release_uid()
            raise
        self.credentials = cred
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepared = True

    async def _credentials(self) -> Credentials | None:
        """Who QEMU will run as: a uid and gid leased for this VM (kept across
        repeated prepare() calls), else the user's own (no subordinate range)."""
        base = qemu_credentials(self.options.run_as_user, self.options.accel)
        if base is None:
            return None
        if self._lease is None:
            self._lease = await asyncio.to_thread(
                lease_for, base.user, base.uid, self.options.uid_lease_dir)
        if self._lease is None:
            return base
        return dataclasses.replace(base, uid=self._lease.uid, gid=self._lease.gid, leased=True)

    def _release_uid(self) -> None:
        """Give the leased uid back (QEMU is gone, or never started)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()
        self._prepared = False

    def _check_access(self, cred: Credentials | None) -> None:
        """Whether ``cred`` may read the kernel and initrd (and use /dev/kvm)."""
        if cred is not None:
            # QEMU reopens -kernel and -initrd through /proc/self/fd: the files
            # themselves must be readable by its user (not the directories).
            # A pmem root image is reopened the same way (memory-backend-file).
            for what, p in (("guest kernel", self.spec.kernel),
                            ("guest initrd", self.spec.initrd),
                            ("guest root image", self.spec.image
                             if self.spec.image_device != "virtio-blk" else None)):
                if p is not None and not permits(os.stat(p), cred, 4):
                    raise errors.FailedPrecondition(
                        f"QEMU runs as {cred} and cannot read the {what} {p}: make it"
                        " readable by others (chmod o+r), or set [hypervisor.qemu]"
                        " run_as_user = \"\"")
            if self.options.accel == "kvm":
                try:
                    ok = permits(os.stat("/dev/kvm"), cred, 6)
                except OSError:
                    ok = True  # the accelerator probe reports a missing /dev/kvm
                if not ok:
                    raise errors.FailedPrecondition(
                        f"QEMU runs as {cred}, who cannot use /dev/kvm: give /dev/kvm"
                        " to group kvm with mode 0660 (udev does on most distributions),"
                        " or set [hypervisor.qemu] run_as_user = \"\"")

    def _open_memory(self, fds: _Fds) -> int:
        """The guest RAM file, opened by us (no symlink, a single-link regular file)
        and handed to QEMU's user: QEMU reopens it through /proc/self/fd."""
        assert self.spec.memory_file is not None
        try:
            fd = fds.give(os.open(self.spec.memory_file, os.O_RDWR | _NOFOLLOW))
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot open the guest memory file {self.spec.memory_file}:"
                f" {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise errors.FailedPrecondition(
                f"guest memory file {self.spec.memory_file} is not a private regular file")
        cred = self.credentials
        if cred is not None:
            os.fchown(fd, cred.uid, cred.gid)
        os.fchmod(fd, 0o600)
        return fd

    async def _open_resources(self, fds: _Fds) -> tuple[QemuFds, socket.socket, int,
                                                       socket.socket | None]:
        """Everything QEMU gets as an fd: (QEMU's fds, our QMP, console and agent ends)."""
        qmp, qmp_vm = fds.pair()
        console, console_vm = fds.pipe(CONSOLE_PIPE_SIZE)
        agent: socket.socket | None = None
        agent_vm = vsock_fd = vfs_fd = mem_fd = image_fd = portfwd_vm = -1
        self._portfwd_sock = None
        if self.spec.agent_channel == "vsock":
            try:
                vsock_fd = fds.give(os.open("/dev/vhost-vsock", os.O_RDWR | os.O_CLOEXEC))
            except OSError as exc:
                raise errors.FailedPrecondition(
                    f"cannot open /dev/vhost-vsock: {exc.strerror} (use agent_channel ="
                    " \"serial\")") from exc
        else:
            agent, agent_vm = fds.pair()
            self._portfwd_sock, portfwd_vm = fds.pair()
        if self.spec.shared_fs_socket is not None:
            vfs_fd = fds.give((await _connect_unix(self.spec.shared_fs_socket)).detach())
        if self.spec.memory_file is not None:
            mem_fd = self._open_memory(fds)
        image_fd, kernel_fd, initrd_fd = (
            fds.give(_open_asset(what, p)) if p is not None else -1
            for what, p in (("guest image", self.spec.image), ("guest kernel", self.spec.kernel),
                            ("guest initrd", self.spec.initrd)))
        return (QemuFds(qmp=qmp_vm, console=console_vm, agent=agent_vm,
                        vhost_vsock=vsock_fd, shared_fs=vfs_fd, memory=mem_fd,
                        image=image_fd, image_bytes=os.fstat(image_fd).st_size
                        if image_fd >= 0 else 0, kernel=kernel_fd, initrd=initrd_fd,
                        portfwd=portfwd_vm),
                qmp, console, agent)

    async def start(self) -> None:
        if not self._prepared:
            await self.prepare()
        fds = _Fds()
        logs: list[CappedLog] = []
        try:
            qemu_fds, qmp_sock, console_r, agent_sock = await self._open_resources(fds)
            self.argv = build_argv(self.binary, self.spec, self.options, qemu_fds)
            logs = [CappedLog(self.log_path, self.options.log_max_bytes),
                    CappedLog(self.spec.console_log, self.options.log_max_bytes)]
            out_r, out_w = fds.pipe()
            cred = self.credentials
            ids: dict[str, Any] = {}
            if cred is not None:
                ids = {"user": cred.uid, "group": cred.gid, "extra_groups": list(cred.groups)}
            log.debug("starting VM %s%s: %s", self.spec.id,
                      f" as {cred}" if cred else "", " ".join(self.argv))
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=out_w,
                    pass_fds=qemu_fds.all() + tuple(fd for nic in self.spec.nics
                                                    for fd in nic.fds)
                    + tuple(fd for d in self.spec.restore_devices for fd in d.fds),
                    cwd="/", **ids)
            except OSError as exc:
                raise errors.VMLaunchError(
                    f"cannot start {self.binary}: {exc.strerror}", self.argv) from exc
            if self.on_spawn is not None:
                self.on_spawn(self._proc.pid)
            fds.close_child()  # QEMU has its ends now
            # Ours from here on: the drains own the two pipes' read ends.
            fds.host_fds.remove(out_r)
            fds.host_fds.remove(console_r)
            self._drains = [asyncio.ensure_future(drain(out_r, logs[0])),
                            asyncio.ensure_future(drain(console_r, logs[1]))]
            self.log_fds = (out_r, console_r)
            logs = []
            if agent_sock is not None:
                fds.host.remove(agent_sock)
                self._channel = SerialChannel(agent_sock)
            else:
                self._channel = VsockChannel(self.spec.vsock_cid, VSOCK_PORT)
            if self._portfwd_sock is not None:
                fds.host.remove(self._portfwd_sock)
                self._portfwd = SerialChannel(self._portfwd_sock)
            else:
                self._portfwd = VsockChannel(self.spec.vsock_cid, PORTFWD_VSOCK_PORT)
            fds.host.remove(qmp_sock)
            self._qmp = _QMP(f"pykata-{self.spec.id}")
            await self._greet(self._qmp, qmp_sock)
        except BaseException:
            fds.close_all()
            for cap in logs:
                cap.close()
            await self.stop(timeout=1.0)
            raise

    async def _greet(self, qmp: _QMP, sock: socket.socket) -> None:
        """The QMP handshake over our end of the socketpair, racing QEMU's exit."""
        assert self._proc is not None
        greet = asyncio.ensure_future(qmp.connect(sock))
        died = asyncio.ensure_future(self._proc.wait())
        done, _ = await asyncio.wait(
            {greet, died}, timeout=QMP_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if greet in done and greet.exception() is None:
            died.cancel()
            log.info("VM %s started (pid %d)", self.spec.id, self._proc.pid)
            return
        greet.cancel()
        with contextlib.suppress(BaseException):
            await greet
        code: int | None = None
        if died in done or self._proc.returncode is not None:
            code = await died
            msg = f"QEMU exited while starting VM {self.spec.id}"
        else:
            died.cancel()
            msg = f"QEMU did not come up for VM {self.spec.id}"
        sock.close()
        await self.stop(timeout=1.0)  # reaps QEMU; the logs reach EOF
        qemu_err = tail(self.log_path, 5)
        raise errors.VMLaunchError(
            msg, self.argv, code, qemu_err or tail(self.spec.console_log)
        )

    async def _qmp_cmd(self, cmd: str, args: dict[str, Any] | None = None,
                       timeout: float = 10.0) -> Any:
        if self._qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout)
        except ExecuteError as exc:
            raise errors.Internal(f"QMP {cmd} failed: {exc}") from exc
        except QMPError as exc:  # the connection went: most likely QEMU itself
            raise await self._lost(cmd, exc) from exc
        except TimeoutError:
            raise errors.DeadlineExceeded(f"QMP {cmd} got no answer in {timeout:g}s") from None

    async def _lost(self, cmd: str, exc: Exception) -> errors.PykataError:
        """The error for a QMP connection lost during ``cmd``: QEMU's exit and
        the end of its log if it died (bounded wait), else the QMP error."""
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 2.0)
            if proc.returncode is not None:
                why = tail(self.log_path, 3) or tail(self.spec.console_log, 3)
                return errors.Unavailable(
                    f"QEMU of VM {self.spec.id} exited (status {proc.returncode}) during"
                    f" {cmd}" + (f": {why}" if why else ""))
        return errors.Internal(f"QMP {cmd} failed: {exc}")

    def _send_fd(self, fd: int) -> None:
        if self._qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise errors.Internal(f"cannot pass an fd to QEMU: {exc}") from exc

    async def stop(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None and self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.execute("quit"), 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout)
        if proc is not None:
            await stop_child(proc, grace=2.0)
        await self._release()
        self._release_uid()  # QEMU is reaped: nothing runs as that uid any more

    async def _release(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._portfwd is not None:
            await self._portfwd.close()
            self._portfwd = None
        drains, self._drains = self._drains, []
        if drains:
            # QEMU is gone: its ends are closed, so the drains see EOF (unless
            # something else still holds them: then they are cancelled).
            _, pending = await asyncio.wait(drains, timeout=DRAIN_GRACE)
            for t in pending:
                t.cancel()
            await asyncio.gather(*drains, return_exceptions=True)

    async def wait(self) -> int:
        if self._proc is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} was not started")
        return await self._proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def portfwd_channel(self) -> AgentChannel:
        if self._portfwd is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} is not running")
        return self._portfwd

    def agent_channel(self) -> AgentChannel:
        if self._channel is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} is not running")
        return self._channel

    # -- runtime operations ---------------------------------------------------------
    async def pause(self) -> None:
        await self._qmp_cmd("stop")

    async def resume(self) -> None:
        await self._qmp_cmd("cont")

    async def status(self) -> str:
        res = await self._qmp_cmd("query-status")
        return str(res["status"])

    async def hotplug_vcpus(self, total: int) -> int:
        slots = await self._qmp_cmd("query-hotpluggable-cpus")
        free = sorted(
            (s for s in slots if "qom-path" not in s),
            key=lambda s: tuple(s["props"].get(k, 0) for k in ("socket-id", "core-id",
                                                               "thread-id")),
        )
        present = len(slots) - len(free)
        for s in free:
            if present >= total:
                break
            args = {"driver": s["type"], "id": f"cpu-{present}", **s["props"]}
            await self._qmp_cmd("device_add", args)
            self._plugged.append(PluggedDevice(
                "vcpu", f"cpu-{present}", driver=str(s["type"]),
                props={str(k): int(v) for k, v in s["props"].items()
                       if k != "node-id" and isinstance(v, int)}))
            present += 1
        self._vcpus = present
        return present

    async def hotplug_memory(self, size_mib: int) -> int:
        if not self.spec.memory_slots or self._dimms >= self.spec.memory_slots:
            raise errors.ResourceExhausted(f"VM {self.spec.id} has no free memory slot")
        n = self._dimms
        # Shared (vhost-user devices map all guest RAM), unless the VM may be
        # checkpointed and has none: then private, carried in the saved state.
        private = self._private_memory()
        backend: dict[str, Any] = {
            "qom-type": "memory-backend-memfd", "id": f"mem-dimm{n}",
            "size": size_mib << 20, "share": True,
        }
        if private:
            backend = {"qom-type": "memory-backend-ram", "id": f"mem-dimm{n}",
                       "size": size_mib << 20}
        await self._qmp_cmd("object-add", backend)
        try:
            await self._qmp_cmd("device_add", {
                "driver": "pc-dimm", "id": f"dimm{n}", "memdev": f"mem-dimm{n}",
            })
        except errors.PykataError:
            with contextlib.suppress(errors.PykataError):
                await self._qmp_cmd("object-del", {"id": f"mem-dimm{n}"})
            raise
        self._dimms += 1
        if private:
            self._plugged.append(PluggedDevice("dimm", f"dimm{n}",
                                               props={"size-mib": size_mib}))
        else:
            self._shared_dimms += 1
        return size_mib

    def _private_memory(self) -> bool:
        """Whether memory hot-plugged now is private: a checkpointable VM without
        a vhost-user device (virtio-fs, on the command line or hot-plugged)."""
        return (self.spec.checkpointable and self.spec.shared_fs_socket is None
                and "vfs" not in self._ports)

    def _claim_port(self, owner: str) -> str:
        """A free PCIe root port for a hot-plugged device (disk, NIC, virtio-fs)."""
        free = [f"rp{i}" for i in range(self.options.pcie_root_ports)
                if f"rp{i}" not in self._ports.values()]
        if not free:
            raise errors.ResourceExhausted(
                f"VM {self.spec.id} has no free PCIe root port for {owner}"
                f" ({self.options.pcie_root_ports} in use)")
        self._ports[owner] = free[0]
        return free[0]

    async def _add_fd(self, path: Path, readonly: bool, opaque: str) -> int:
        """Open ``path`` here (no symlink) and put it in a new QEMU fd set; its id.
        QEMU then opens ``/dev/fdset/<id>`` instead of the path."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | _NOFOLLOW
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise errors.FailedPrecondition(f"cannot open {path}: {exc.strerror}") from exc
        try:
            self._send_fd(fd)
            res = await self._qmp_cmd("add-fd", {"opaque": opaque})
        finally:
            os.close(fd)
        return int(res["fdset-id"])

    async def _remove_fdset(self, drive_id: str) -> None:
        fdset = self._fdsets.pop(drive_id, None)
        if fdset is not None:
            with contextlib.suppress(errors.PykataError):
                await self._qmp_cmd("remove-fd", {"fdset-id": fdset})

    async def hotplug_block(self, drive_id: str, path: Path, readonly: bool = False,
                            serial: str = "") -> str:
        """Attach ``path`` as a virtio-blk disk on a free root port; the port's name.
        ``serial`` (at most 20 characters) lets the guest find the disk in
        /sys/block/*/serial. The host opens the device; QEMU gets it by fd."""
        if len(serial) > 20:
            raise errors.InvalidArgument(f"virtio-blk serial {serial!r} is longer than 20")
        port = self._claim_port(drive_id)
        try:
            self._fdsets[drive_id] = await self._add_fd(path, readonly, drive_id)
            await self._qmp_cmd("blockdev-add", {
                "node-name": drive_id, "driver": "raw", "read-only": readonly,
                "file": {"driver": "host_device" if path.is_block_device() else "file",
                         "filename": f"/dev/fdset/{self._fdsets[drive_id]}",
                         "read-only": readonly},
            })
        except errors.PykataError:
            self._ports.pop(drive_id, None)
            await self._remove_fdset(drive_id)
            raise
        dev: dict[str, Any] = {"driver": "virtio-blk-pci", "id": f"dev-{drive_id}",
                               "drive": drive_id, "bus": port}
        if serial:
            dev["serial"] = serial
        try:
            await self._qmp_cmd("device_add", dev)
        except errors.PykataError:
            self._ports.pop(drive_id, None)
            with contextlib.suppress(errors.PykataError):
                await self._qmp_cmd("blockdev-del", {"node-name": drive_id})
            await self._remove_fdset(drive_id)
            raise
        return port

    async def unplug_block(self, drive_id: str, timeout: float = 20.0) -> None:
        """Ask the guest to release the disk, wait (at most ``timeout``) until it has
        (DEVICE_DELETED), then drop the backend and its fd set. A disk the guest
        ejected itself (the agent powers its slot off) is already gone: only the
        backend is dropped. On timeout the disk and its port stay taken until the
        VM stops."""
        qmp = self._qmp
        if qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        dev = f"dev-{drive_id}"
        listener = _Listener(("DEVICE_DELETED",))
        with qmp.listen(listener):
            try:
                await asyncio.wait_for(qmp.execute("device_del", {"id": dev}), 10.0)
                gone = False
            except ExecuteError as exc:
                if exc.error_class != "DeviceNotFound":
                    raise errors.Internal(f"QMP device_del {dev} failed: {exc}") from exc
                gone = True
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"QMP device_del {dev} got no answer in 10s") from None
            if not gone:
                try:
                    async with asyncio.timeout(timeout):
                        async for event in listener:
                            # Events are qemu.qmp Messages: mappings, not dicts.
                            data = event.get("data") if isinstance(event, Mapping) else None
                            if isinstance(data, Mapping) and data.get("device") == dev:
                                break
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"the guest did not release block device {drive_id} within"
                        f" {timeout:g}s") from None
        self._ports.pop(drive_id, None)
        # A device the guest ejected is gone from the QOM tree before QEMU drops its
        # reference to the backend: "in use" for a moment. Retry, bounded.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            try:
                await asyncio.wait_for(qmp.execute("blockdev-del", {"node-name": drive_id}),
                                       10.0)
                break
            except ExecuteError as exc:
                if "in use" not in str(exc) or loop.time() > deadline:
                    raise errors.Internal(f"QMP blockdev-del {drive_id} failed: {exc}") from exc
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"QMP blockdev-del {drive_id} got no answer in 10s") from None
            await asyncio.sleep(0.05)
        await self._remove_fdset(drive_id)

    async def _getfd(self, fd: int, name: str) -> None:
        """Give QEMU ``fd`` under ``name`` (QMP getfd); our copy stays ours."""
        self._send_fd(fd)
        await self._qmp_cmd("getfd", {"fdname": name})

    async def _closefd(self, name: str) -> None:
        with contextlib.suppress(BaseException):
            await self._qmp_cmd("closefd", {"fdname": name})

    # -- devices a clone gets after restore (and NICs that come later) ---------------
    async def hotplug_shared_fs(self, socket_path: Path, tag: str) -> str:
        port = self._claim_port("vfs")
        name = "vfs-sock"
        passed = False
        try:
            sock = await _connect_unix(socket_path)
            try:
                await self._getfd(sock.fileno(), name)
                passed = True
            finally:
                sock.close()
            await self._qmp_cmd("chardev-add", {"id": "vfs", "backend": {
                "type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": name}},
                    "server": False}}})
            passed = False  # the chardev took it
            await self._qmp_cmd("device_add", {
                "driver": "vhost-user-fs-pci", "id": "dev-vfs", "chardev": "vfs", "tag": tag,
                "queue-size": 1024, "bus": port})
        except BaseException:
            self._ports.pop("vfs", None)
            if passed:
                await self._closefd(name)
            raise
        return port

    async def hotplug_nic(self, nic_id: str, fds: list[int], mac: str) -> str:
        if self._qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        port = self._claim_port(nic_id)
        names = [f"{nic_id}-q{i}" for i in range(len(fds))]
        try:
            for fd, name in zip(fds, names, strict=True):
                await self._getfd(fd, name)
            await self._qmp_cmd("netdev_add", tap_netdev(nic_id, names))
            try:
                await self._qmp_cmd("device_add", nic_device(nic_id, mac, len(fds), port))
            except errors.PykataError:
                with contextlib.suppress(errors.PykataError):
                    await self._qmp_cmd("netdev_del", {"id": nic_id})
                raise
            self._plugged.append(PluggedDevice("nic", nic_id, bus=port, mac=mac,
                                               queues=len(fds)))
        except BaseException:
            self._ports.pop(nic_id, None)
            for name in names:
                await self._closefd(name)
            raise
        return port

    # -- templating -------------------------------------------------------------------
    async def _migrate_caps(self) -> None:
        await self._qmp_cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True}]})

    async def _await_migration(self, timeout: float, watch_exit: bool = False) -> None:
        """Until the MIGRATION event says completed (or failed). ``watch_exit``:
        QEMU exiting meanwhile (7.2 exits when an incoming stream is bad) ends
        the wait at once with its exit and the end of its log."""
        assert self._qmp is not None
        listener = _Listener(("MIGRATION",))
        exited: asyncio.Future[int] | None = (
            asyncio.ensure_future(self.wait()) if watch_exit else None)
        try:
            with self._qmp.listen(listener):
                status = str((await self._qmp_cmd("query-migrate")).get("status", ""))
                try:
                    async with asyncio.timeout(timeout):
                        while status not in ("completed", "failed", "cancelled"):
                            event = await self._next_event(listener, exited)
                            data = event["data"] if "data" in event else None
                            if isinstance(data, Mapping):
                                status = str(data.get("status", ""))
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"VM {self.spec.id}: migration not done within {timeout:g}s") from None
        finally:
            if exited is not None and not exited.done():
                exited.cancel()
                with contextlib.suppress(BaseException):
                    await exited
        if status != "completed":
            info = await self._qmp_cmd("query-migrate")
            raise errors.Internal(f"VM {self.spec.id}: migration {status}:"
                                  f" {info.get('error-desc', 'no detail')}")

    async def _next_event(self, listener: _Listener,
                          exited: asyncio.Future[int] | None) -> Any:
        """The listener's next event; with ``exited``, Unavailable (one line:
        QEMU's exit status and last log line) if QEMU exits first."""
        if exited is None:
            return await listener.get()
        got = asyncio.ensure_future(listener.get())
        try:
            racing: set[asyncio.Future[Any]] = {got, exited}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not got.done():
                got.cancel()
                with contextlib.suppress(BaseException):
                    await got
        if got.done() and not got.cancelled():
            return got.result()
        why = " ".join(tail(self.log_path, 1).split())
        raise errors.Unavailable(
            f"QEMU of VM {self.spec.id} exited (status {exited.result()}) during the"
            f" migration" + (f": {why[:300]}" if why else ""))

    async def _migrate_through(self, fd: int, cmd: str, name: str,
                               watch_exit: bool = False) -> None:
        """``cmd`` (migrate or migrate-incoming) to or from ``fd``: the seccomp
        filter forbids exec: URIs, and QEMU cannot open the root-only file."""
        try:
            await self._getfd(fd, name)
        finally:
            os.close(fd)
        try:
            await self._qmp_cmd(cmd, {"uri": f"fd:{name}"})
        except BaseException:
            await self._closefd(name)
            raise
        await self._await_migration(60.0, watch_exit)

    async def save(self, path: Path) -> None:
        if self.spec.memory_file is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no file-backed memory to save")
        await self._migrate_caps()
        await self._qmp_cmd("stop")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot create the VM state file {path}: {exc.strerror}") from exc
        await self._migrate_through(fd, "migrate", "migrate-out")

    async def restore(self, path: Path) -> None:
        if not self.spec.incoming:
            raise errors.FailedPrecondition(f"VM {self.spec.id} was not started to restore")
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot open the VM state file {path}: {exc.strerror}") from exc
        await self._load(fd)
        await self._qmp_cmd("cont")

    async def _load(self, fd: int, watch_exit: bool = False) -> None:
        """migrate-incoming from ``fd`` (closed here); the VM stays paused."""
        try:
            await self._migrate_caps()
        except BaseException:
            os.close(fd)
            raise
        await self._migrate_through(fd, "migrate-incoming", "migrate-in", watch_exit)

    # -- checkpoint (runtime/checkpoint.py) ---------------------------------------------
    def saveable(self) -> str:
        spec = self.spec
        if spec.shared_fs_socket is not None or "vfs" in self._ports:
            return ("its VM has a virtio-fs device (QEMU 7.2 cannot save vhost-user-fs);"
                    " use shared_fs = \"none\" with guest-pulled images")
        if spec.memory_file is None:
            return ("its VM's RAM is not in a file: set [runtime] checkpointable = true"
                    " before the pod starts (a VM from the VM cache has none unless it is"
                    " a template clone)")
        if spec.agent_channel != "serial":
            return ("its VM reaches the agent over vsock (a CID is per VM): use"
                    " agent_channel = \"serial\"")
        if self._shared_dimms:
            return ("its VM has hot-plugged shared memory (its content would not be saved;"
                    " [runtime] checkpointable pods get private memory)")
        if self._fdsets:
            return "its VM has hot-plugged block devices (not carried by a checkpoint yet)"
        if self._qmp is None:
            return "its VM is not running"
        return ""

    async def save_to(self, fd: int) -> None:
        why = self.saveable()
        if why:
            raise errors.FailedPrecondition(f"cannot save VM {self.spec.id}: {why}")
        mine = os.dup(fd)
        try:
            await self._migrate_caps()
            await self._qmp_cmd("stop")
        except BaseException:
            os.close(mine)
            raise
        try:
            await self._migrate_through(mine, "migrate", "migrate-out", watch_exit=True)
        except (errors.Unavailable, errors.Internal) as exc:
            raise _one_line(exc) from exc

    async def load(self, fd: int) -> None:
        if not self.spec.incoming:
            raise errors.FailedPrecondition(f"VM {self.spec.id} was not started to restore")
        try:
            await self._load(os.dup(fd), watch_exit=True)
        except (errors.Unavailable, errors.Internal) as exc:
            raise _one_line(exc) from exc

    async def checkpoint_info(self) -> dict[str, Any]:
        version = await self._qmp_cmd("query-version")
        machine = await self._qmp_cmd("qom-get", {"path": "/machine", "property": "type"})
        pci = await self._qmp_cmd("query-pci")
        cpus = await self._qmp_cmd("query-hotpluggable-cpus")
        devices = [
            {"bus": d.get("bus"), "slot": d.get("slot"), "function": d.get("function"),
             "id": d.get("qdev_id", ""), "vendor": d.get("id", {}).get("vendor"),
             "device": d.get("id", {}).get("device")}
            for bus in _pci_buses(pci) for d in bus.get("devices", [])]
        q = version.get("qemu", {}) if isinstance(version, Mapping) else {}
        return {
            "qemu": f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}",
            "package": str(version.get("package", "")).strip(),
            "machine": str(machine),
            "pci": devices,
            "vcpus": sum(1 for c in cpus if "qom-path" in c),
            "dimms": self._dimms,
            "ports": dict(self._ports),
            "plugged": [d.to_json() for d in self._plugged],
        }


def _one_line(exc: errors.Unavailable | errors.Internal) -> errors.PykataError:
    """``exc`` with its message on one line (QEMU's log tail may span several)."""
    text = " ".join(str(exc).split())
    if text == str(exc) or type(exc) not in (errors.Unavailable, errors.Internal):
        return exc
    return type(exc)(text)


def _pci_buses(pci: Any) -> list[dict[str, Any]]:
    """Every PCI bus of a query-pci answer, bridges' secondary buses included."""
    out: list[dict[str, Any]] = []
    todo = list(pci) if isinstance(pci, list) else []
    while todo:
        bus = todo.pop(0)
        if not isinstance(bus, Mapping):
            continue
        out.append(dict(bus))
        for d in bus.get("devices", []) or []:
            bridge = d.get("pci_bridge") if isinstance(d, Mapping) else None
            if isinstance(bridge, Mapping) and isinstance(bridge.get("bus"), Mapping):
                sub = dict(bridge["bus"])
                sub.setdefault("devices", bridge.get("devices", []))
                todo.append(sub)
    return out


def _open_asset(what: str, path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.NotFound(f"cannot open the {what} {path}: {exc.strerror}") from exc


async def _connect_unix(path: Path) -> socket.socket:
    """A unix stream socket connected (by us, root) to ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        with addressable(path) as where:
            await asyncio.get_running_loop().sock_connect(sock, where)
    except OSError as exc:
        sock.close()
        raise errors.Unavailable(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    sock.setblocking(True)
    return sock

