"""QEMU driver: launch, QMP (through qemu.qmp), stop, pause/resume, hotplug."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from pykata import errors
from pykata.hypervisor.base import AgentChannel, Hypervisor, VMSpec
from pykata.hypervisor.channels import SerialChannel, VsockChannel
from pykata.hypervisor.qemu.cmdline import (
    VSOCK_PORT,
    QemuOptions,
    build_argv,
    nic_device,
    tap_netdev,
)
from pykata.utils.process import stop_child, tail

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 15.0


class QemuHypervisor(Hypervisor):
    name = "qemu"

    def __init__(self, spec: VMSpec, binary: str, options: QemuOptions) -> None:
        super().__init__(spec)
        self.binary = binary
        self.options = options
        self.argv: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._serial: SerialChannel | None = None
        self._channel: AgentChannel | None = None
        self._vcpus = spec.vcpus
        self._dimms = 0
        self._ports: dict[str, str] = {}  # hot-plugged device id -> PCIe root port
        self.log_path = spec.run_dir / "qemu.log"

    # -- lifecycle -----------------------------------------------------------------
    async def prepare(self) -> None:
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
        if len(str(self.spec.run_dir / "agent.sock")) > 100:
            raise errors.InvalidArgument(f"VM run directory path is too long: {self.spec.run_dir}")
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        opts = self.options
        self.options = QemuOptions(
            **{**opts.__dict__, "qmp_socket": self.spec.run_dir / "qmp.sock",
               "agent_socket": self.spec.run_dir / "agent.sock"}
        )
        self.argv = build_argv(self.binary, self.spec, self.options)

    async def start(self) -> None:
        if not self.argv:
            await self.prepare()
        qmp = QMPClient(f"pykata-{self.spec.id}")
        qmp_path = str(self.options.qmp_socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        await qmp.start_server(qmp_path)
        self._qmp = qmp
        if self.spec.agent_channel == "vsock":
            self._channel = VsockChannel(self.spec.vsock_cid, VSOCK_PORT)
        else:
            self._serial = SerialChannel(self.options.agent_socket)
            await self._serial.listen()
            self._channel = self._serial
        log.debug("starting VM %s: %s", self.spec.id, " ".join(self.argv))
        with open(self.log_path, "ab") as logf:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=tuple(fd for nic in self.spec.nics for fd in nic.fds),
                )
            except OSError as exc:
                await self._release()
                raise errors.VMLaunchError(
                    f"cannot start {self.binary}: {exc.strerror}", self.argv
                ) from exc
        accept = asyncio.ensure_future(qmp.accept())
        died = asyncio.ensure_future(self._proc.wait())
        done, _ = await asyncio.wait(
            {accept, died}, timeout=QMP_CONNECT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if accept in done and accept.exception() is None:
            died.cancel()
            log.info("VM %s started (pid %d)", self.spec.id, self._proc.pid)
            return
        accept.cancel()
        with contextlib.suppress(BaseException):
            await accept
        code: int | None = None
        if died in done:
            code = died.result()
            msg = f"QEMU exited while starting VM {self.spec.id}"
        else:
            died.cancel()
            msg = f"QEMU did not come up for VM {self.spec.id}"
        qemu_err = tail(self.log_path, 5)
        await self.stop(timeout=1.0)
        raise errors.VMLaunchError(
            msg, self.argv, code, qemu_err or tail(self.spec.console_log)
        )

    async def _qmp_cmd(self, cmd: str, args: dict[str, Any] | None = None,
                       timeout: float = 10.0) -> Any:
        if self._qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout)
        except QMPError as exc:
            raise errors.Internal(f"QMP {cmd} failed: {exc}") from exc
        except TimeoutError:
            raise errors.DeadlineExceeded(f"QMP {cmd} got no answer in {timeout:g}s") from None

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

    async def _release(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
            self._qmp = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        for sock in (self.options.qmp_socket,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)

    async def wait(self) -> int:
        if self._proc is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} was not started")
        return await self._proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

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
            present += 1
        self._vcpus = present
        return present

    async def hotplug_memory(self, size_mib: int) -> int:
        if not self.spec.memory_slots or self._dimms >= self.spec.memory_slots:
            raise errors.ResourceExhausted(f"VM {self.spec.id} has no free memory slot")
        n = self._dimms
        await self._qmp_cmd("object-add", {
            "qom-type": "memory-backend-memfd", "id": f"mem-dimm{n}",
            "size": size_mib << 20, "share": True,
        })
        try:
            await self._qmp_cmd("device_add", {
                "driver": "pc-dimm", "id": f"dimm{n}", "memdev": f"mem-dimm{n}",
            })
        except errors.PykataError:
            with contextlib.suppress(errors.PykataError):
                await self._qmp_cmd("object-del", {"id": f"mem-dimm{n}"})
            raise
        self._dimms += 1
        return size_mib

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

    async def hotplug_block(self, drive_id: str, path: Path, readonly: bool = False,
                            serial: str = "") -> str:
        """Attach ``path`` as a virtio-blk disk on a free root port; the port's name.
        ``serial`` (at most 20 characters) lets the guest find the disk in
        /sys/block/*/serial."""
        if len(serial) > 20:
            raise errors.InvalidArgument(f"virtio-blk serial {serial!r} is longer than 20")
        port = self._claim_port(drive_id)
        try:
            await self._qmp_cmd("blockdev-add", {
                "node-name": drive_id, "driver": "raw", "read-only": readonly,
                "file": {"driver": "host_device" if path.is_block_device() else "file",
                         "filename": str(path), "read-only": readonly},
            })
        except errors.PykataError:
            self._ports.pop(drive_id, None)
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
            raise
        return port

    async def unplug_block(self, drive_id: str, timeout: float = 20.0) -> None:
        """Ask the guest to release the disk, wait (at most ``timeout``) until it has
        (DEVICE_DELETED), then drop the backend. A disk the guest ejected itself
        (the agent powers its slot off) is already gone: only the backend is dropped.
        On timeout the disk and its port stay taken until the VM stops."""
        from collections.abc import Mapping

        qmp = self._qmp
        if qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        dev = f"dev-{drive_id}"
        listener = EventListener(("DEVICE_DELETED",))
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
                return
            except ExecuteError as exc:
                if "in use" not in str(exc) or loop.time() > deadline:
                    raise errors.Internal(f"QMP blockdev-del {drive_id} failed: {exc}") from exc
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"QMP blockdev-del {drive_id} got no answer in 10s") from None
            await asyncio.sleep(0.05)

    # -- devices a clone gets after restore (and NICs that come later) ---------------
    async def hotplug_shared_fs(self, socket_path: Path, tag: str) -> str:
        port = self._claim_port("vfs")
        try:
            await self._qmp_cmd("chardev-add", {"id": "vfs", "backend": {
                "type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": str(socket_path)}},
                    "server": False}}})
            await self._qmp_cmd("device_add", {
                "driver": "vhost-user-fs-pci", "id": "dev-vfs", "chardev": "vfs", "tag": tag,
                "queue-size": 1024, "bus": port})
        except errors.PykataError:
            self._ports.pop("vfs", None)
            raise
        return port

    async def hotplug_nic(self, nic_id: str, fds: list[int], mac: str) -> str:
        if self._qmp is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no QMP connection")
        port = self._claim_port(nic_id)
        names = [f"{nic_id}-q{i}" for i in range(len(fds))]
        try:
            for fd, name in zip(fds, names, strict=True):
                self._qmp.send_fd_scm(fd)
                await self._qmp_cmd("getfd", {"fdname": name})
            await self._qmp_cmd("netdev_add", tap_netdev(nic_id, names))
            try:
                await self._qmp_cmd("device_add", nic_device(nic_id, mac, len(fds), port))
            except errors.PykataError:
                with contextlib.suppress(errors.PykataError):
                    await self._qmp_cmd("netdev_del", {"id": nic_id})
                raise
        except BaseException:
            self._ports.pop(nic_id, None)
            for name in names:
                with contextlib.suppress(BaseException):
                    await self._qmp_cmd("closefd", {"fdname": name})
            raise
        return port

    # -- templating -------------------------------------------------------------------
    async def _migrate_caps(self) -> None:
        await self._qmp_cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True}]})

    async def _await_migration(self, timeout: float) -> None:
        """Until the MIGRATION event says completed (or failed)."""
        assert self._qmp is not None
        listener = EventListener(("MIGRATION",))
        with self._qmp.listen(listener):
            status = str((await self._qmp_cmd("query-migrate")).get("status", ""))
            try:
                async with asyncio.timeout(timeout):
                    while status not in ("completed", "failed", "cancelled"):
                        event = await listener.get()
                        data = event["data"] if "data" in event else None
                        if isinstance(data, dict):
                            status = str(data.get("status", ""))
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"VM {self.spec.id}: migration not done within {timeout:g}s") from None
        if status != "completed":
            info = await self._qmp_cmd("query-migrate")
            raise errors.Internal(f"VM {self.spec.id}: migration {status}:"
                                  f" {info.get('error-desc', 'no detail')}")

    async def save(self, path: Path) -> None:
        if self.spec.memory_file is None:
            raise errors.FailedPrecondition(f"VM {self.spec.id} has no file-backed memory to save")
        await self._migrate_caps()
        await self._qmp_cmd("stop")
        await self._qmp_cmd("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
        await self._await_migration(60.0)

    async def restore(self, path: Path) -> None:
        if not self.spec.incoming:
            raise errors.FailedPrecondition(f"VM {self.spec.id} was not started to restore")
        await self._migrate_caps()
        await self._qmp_cmd("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
        await self._await_migration(60.0)
        await self._qmp_cmd("cont")
