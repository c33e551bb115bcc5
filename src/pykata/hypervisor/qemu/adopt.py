"""QEMU VMs handed from one process to another (see ``hypervisor/handoff.py``).

:class:`ExportableQemu` (the cache server's VMs) is an ordinary
:class:`QemuHypervisor` that keeps a second copy of the host ends it would
otherwise give to asyncio (QMP, the agent's socketpair), so that once the VM
is booted it can export copies of everything the host holds: QMP, the agent
channel, the read ends of QEMU's console and output pipes, its uid lease (the
``flock`` belongs to the open file, so the receiver's copy keeps the lease),
and a pidfd. After ``release()`` it holds nothing of the VM; the QEMU process
stays its child (the asyncio process object is kept until QEMU exits, so it
is reaped and never killed by the object's finaliser).

:class:`AdoptedQemu` (a sandbox's shim) runs the received VM: QMP over the
received socket without a new greeting (the session is already negotiated),
the agent channel over the received socketpair end, the console and output
drained into the sandbox's own capped logs, the process watched and signalled
through its pidfd (it is not the shim's child). Hot-plug, pause, stop work as
for any QEMU VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.hypervisor.base import VMSpec
from pykata.hypervisor.channels import SerialChannel, VsockChannel
from pykata.hypervisor.handoff import ExportableVM, Handoff
from pykata.hypervisor.qemu.cmdline import QemuFds, QemuOptions
from pykata.hypervisor.qemu.driver import (
    _QMP,
    QMP_CONNECT_TIMEOUT,
    Credentials,
    QemuHypervisor,
    _Fds,
)
from pykata.hypervisor.qemu.uids import UidLease
from pykata.utils.aio import readable
from pykata.utils.logfile import CappedLog, drain
from pykata.utils.process import ProcRef
from pykata.wire import PORTFWD_VSOCK_PORT, VSOCK_PORT

log = logging.getLogger(__name__)

# QEMU processes handed away by this process: kept (and reaped) until they exit.
_HANDED: set[asyncio.Task[int]] = set()


def _reap_later(proc: asyncio.subprocess.Process) -> None:
    task = asyncio.ensure_future(proc.wait())
    _HANDED.add(task)
    task.add_done_callback(_HANDED.discard)


def handed_count() -> int:
    """QEMU processes given away that still run (and are still our children)."""
    return len(_HANDED)


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class ExportableQemu(QemuHypervisor, ExportableVM):
    """A QEMU VM that can be handed to another process once it runs."""

    def __init__(self, spec: VMSpec, binary: str, options: QemuOptions) -> None:
        super().__init__(spec, binary, options)
        self._keep: dict[str, int] = {}  # our second copy of the QMP and agent ends

    def _close_keep(self) -> None:
        keep, self._keep = self._keep, {}
        _close(*keep.values())

    async def _open_resources(self, fds: _Fds) -> tuple[QemuFds, socket.socket, int,
                                                       socket.socket | None]:
        res = await super()._open_resources(fds)
        _, qmp, _, agent = res
        self._close_keep()
        self._keep["qmp"] = os.dup(qmp.fileno())
        if agent is not None:
            self._keep["agent"] = os.dup(agent.fileno())
        if self._portfwd_sock is not None:  # the port-forward channel's host end
            self._keep["portfwd"] = os.dup(self._portfwd_sock.fileno())
        return res

    async def start(self) -> None:
        try:
            await super().start()
        except BaseException:
            self._close_keep()
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        try:
            await super().stop(timeout)
        finally:
            self._close_keep()

    async def export(self) -> Handoff:
        proc = self._proc
        if proc is None or proc.returncode is not None or "qmp" not in self._keep:
            raise errors.FailedPrecondition(f"VM {self.spec.id} is not running")
        ref = ProcRef.of(proc.pid)
        if ref is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has exited")
        out_r, console_r = self.log_fds
        h = Handoff(info={})
        try:
            h.fds["pidfd"] = os.pidfd_open(proc.pid)
            h.fds["qmp"] = os.dup(self._keep["qmp"])
            if "agent" in self._keep:
                h.fds["agent"] = os.dup(self._keep["agent"])
            if "portfwd" in self._keep:
                h.fds["portfwd"] = os.dup(self._keep["portfwd"])
            h.fds["console"] = os.dup(console_r)
            h.fds["output"] = os.dup(out_r)
            if self._lease is not None and self._lease.held:
                dir_fd, fd = self._lease.fds()
                h.fds["lease_dir"] = os.dup(dir_fd)
                h.fds["lease"] = os.dup(fd)
        except OSError as exc:
            h.close()
            raise errors.Internal(f"cannot export VM {self.spec.id}: {exc}") from exc
        cred = self.credentials
        h.info = {
            "pid": proc.pid, "start_time": ref.start_time, "binary": self.binary,
            "argv": list(self.argv), "accel": self.options.accel,
            "user": cred.user if cred else "", "uid": cred.uid if cred else 0,
            "gid": cred.gid if cred else 0, "groups": list(cred.groups) if cred else [],
            "leased": bool(cred and cred.leased), "channel": self.spec.agent_channel,
            "vsock_cid": self.spec.vsock_cid, "vcpus": self._vcpus,
            "memory_mib": self.spec.memory_mib,
            "memory_file": str(self.spec.memory_file) if self.spec.memory_file else None,
        }
        return h

    async def release(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _reap_later(proc)
        drains, self._drains = self._drains, []
        for t in drains:
            t.cancel()
        await asyncio.gather(*drains, return_exceptions=True)  # they close their fds
        self.log_fds = (-1, -1)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()  # closes our fd; nothing is sent
            self._qmp = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._close_keep()
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.drop()  # the receiver holds it now
        self._prepared = False
        log.info("VM %s handed over (pid %s)", self.spec.id, proc.pid if proc else "?")


def _str(info: dict[str, Any], key: str) -> str:
    v = info.get(key, "")
    if not isinstance(v, str):
        raise errors.InvalidArgument(f"VM handoff: {key} is not a string")
    return v


def _int(info: dict[str, Any], key: str) -> int:
    v = info.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise errors.InvalidArgument(f"VM handoff: {key} is not a non-negative integer")
    return v


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to (from /proc/self/fdinfo), -1 if gone or not one."""
    try:
        text = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
    except OSError:
        return -1
    for line in text.splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return -1


class AdoptedQemu(QemuHypervisor):
    """A running QEMU VM another process booted and handed over (not our child)."""

    def __init__(self, spec: VMSpec, binary: str, options: QemuOptions,
                 handoff: Handoff) -> None:
        super().__init__(spec, binary, options)
        info = handoff.info
        self._pidfd = self._qmp_fd = -1
        self._log_in = (-1, -1)
        self._exited: asyncio.Future[None] | None = None
        taken: list[int] = []

        def take(name: str, required: bool = True) -> int:
            fd = handoff.take(name)
            if fd >= 0:
                taken.append(fd)
            elif required:
                raise errors.InvalidArgument(f"VM handoff without its {name} fd")
            return fd

        try:
            self._pid = _int(info, "pid")
            start = _int(info, "start_time")
            pidfd = take("pidfd")
            if pidfd_pid(pidfd) != self._pid:
                raise errors.InvalidArgument(
                    f"VM handoff: the pidfd is not process {self._pid}'s (or it is gone)")
            ref = ProcRef.of(self._pid)
            if ref is None or ref.start_time != start:
                raise errors.FailedPrecondition(f"the handed VM (pid {self._pid}) is gone")
            qmp = take("qmp")
            self._log_in = (take("output"), take("console"))
            agent = take("agent", required=False)
            portfwd = take("portfwd", required=False)
            channel = _str(info, "channel")
            if channel == "serial":
                if agent < 0:
                    raise errors.InvalidArgument("VM handoff: serial channel without its fd")
            elif channel == "vsock":
                cid = _int(info, "vsock_cid")
            else:
                raise errors.InvalidArgument(f"VM handoff: unknown channel {channel!r}")
            uid, gid = _int(info, "uid"), _int(info, "gid")
            lease_dir, lease = take("lease_dir", False), take("lease", False)
            if (lease_dir >= 0) != (lease >= 0):
                raise errors.InvalidArgument("VM handoff: half a uid lease")
            user = _str(info, "user")
            if user:
                groups = info.get("groups") or []
                if not isinstance(groups, list) or not all(
                        isinstance(g, int) for g in groups):
                    raise errors.InvalidArgument("VM handoff: groups is not a list of gids")
                self.credentials = Credentials(user, uid, gid, tuple(groups),
                                               bool(info.get("leased")))
            argv = info.get("argv") or []
            if isinstance(argv, list):
                self.argv = [str(a) for a in argv]
            vcpus = info.get("vcpus")
            if isinstance(vcpus, int) and 0 < vcpus <= spec.max_vcpus:
                self._vcpus = vcpus
        except BaseException:
            _close(*taken)
            handoff.close()
            raise
        handoff.close()  # anything else it carried is not ours to keep
        if channel == "serial":
            self._channel = SerialChannel(socket.socket(fileno=agent))
            if portfwd >= 0:
                self._portfwd = SerialChannel(socket.socket(fileno=portfwd))
        else:
            _close(agent, portfwd)
            self._channel = VsockChannel(cid, VSOCK_PORT)
            self._portfwd = VsockChannel(cid, PORTFWD_VSOCK_PORT)
        self._pidfd, self._qmp_fd = pidfd, qmp
        if lease >= 0:
            self._lease = UidLease(uid, gid, lease_dir, lease)
        self._prepared = True

    @property
    def pid(self) -> int | None:
        return self._pid

    async def prepare(self) -> None:
        """Nothing to prepare: the VM runs."""

    async def start(self) -> None:
        """Take the running VM over: drain its console and output into this
        sandbox's logs, reach QMP over the received socket (no new greeting)."""
        if self._qmp is not None:
            return
        fd, self._qmp_fd = self._qmp_fd, -1
        if fd < 0 or self._pidfd < 0:
            raise errors.FailedPrecondition(f"the adopted VM {self.spec.id} was stopped")
        out, con = self._log_in
        self._log_in = (-1, -1)
        try:
            self.spec.run_dir.mkdir(parents=True, exist_ok=True)
            logs = [CappedLog(self.log_path, self.options.log_max_bytes),
                    CappedLog(self.spec.console_log, self.options.log_max_bytes)]
        except BaseException:
            _close(fd, out, con)
            raise
        self._drains = [asyncio.ensure_future(drain(out, logs[0])),
                        asyncio.ensure_future(drain(con, logs[1]))]
        self.log_fds = (out, con)
        qmp = _QMP(f"pykata-{self.spec.id}")
        qmp.await_greeting = False
        qmp.negotiate = False  # the session was negotiated by the process that booted it
        sock = socket.socket(fileno=fd)
        try:
            await asyncio.wait_for(qmp.connect(sock), QMP_CONNECT_TIMEOUT)
        except BaseException as exc:
            sock.close()
            raise errors.VMLaunchError(
                f"cannot reach QMP of the handed VM {self.spec.id}: {exc}", self.argv) from exc
        # No command yet: until the sender has released the VM its own QMP
        # reader may still take what QEMU writes on this socket.
        self._qmp = qmp
        log.info("VM %s adopted (pid %d)", self.spec.id, self._pid)

    def _gone(self) -> bool:
        if self._pidfd < 0:
            return True
        r, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(r)

    def _exit_future(self) -> asyncio.Future[None]:
        """One watcher of the pidfd however many wait (the loop keeps one reader per fd)."""
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._watch())
        return self._exited

    async def _watch(self) -> None:
        while not self._gone():
            await readable(self._pidfd)

    async def _wait_gone(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit_future()), timeout)
        return self._gone()

    async def wait(self) -> int:
        if self._pidfd < 0:
            raise errors.FailedPrecondition(f"VM {self.spec.id} is not running")
        await asyncio.shield(self._exit_future())
        try:  # its status is only ours to read if we are its parent (we are not)
            res = os.waitid(os.P_PIDFD, self._pidfd,  # noqa: ASYNC222 (WNOHANG)
                            os.WEXITED | os.WNOHANG)
        except (ChildProcessError, OSError, AttributeError):
            return -1
        return res.si_status if res is not None else -1

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._pidfd, sig)

    async def stop(self, timeout: float = 5.0) -> None:
        if self._pidfd >= 0 and not self._gone():
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.execute("quit"), 1.0)
                await self._wait_gone(timeout)
            if not self._gone():
                self._signal(signal.SIGTERM)
                if not await self._wait_gone(2.0):
                    self._signal(signal.SIGKILL)
                    await self._wait_gone(10.0)
        await self._release()
        self._release_uid()
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()
        pidfd, self._pidfd = self._pidfd, -1
        qmp, self._qmp_fd = self._qmp_fd, -1
        out, con = self._log_in
        self._log_in = (-1, -1)
        _close(pidfd, qmp, out, con)
