"""Host block devices hot-plugged into a sandbox's VM as virtio-blk disks.

One registry per sandbox counts the containers using each host device: the
first use hot-plugs it (drive id = virtio serial = ``pkblk<n>``, which the agent
looks for in /sys/block/*/serial), the last release unplugs it.

Unplug: the agent ejects a disk when the last container using it is removed
(it powers off the disk's PCIe slot; QEMU detaches the device at once), so the
host's ``device_del`` normally finds the device gone and only the backend is
dropped. Should the guest not have ejected it, ``device_del`` waits for the
guest, which under TCG never answers: the wait is bounded, the disk stays
attached and its root port taken until the VM stops, and QEMU's exit releases
the host device for sure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pykata import errors
from pykata.hypervisor.base import Hypervisor

log = logging.getLogger(__name__)

UNPLUG_TIMEOUT = 5.0  # seconds a container delete waits for a disk the guest kept


@dataclass
class _Attached:
    serial: str
    host_path: Path
    readonly: bool
    port: str
    users: int = 1
    stuck: bool = False  # the guest did not let go; attached until the VM stops


class BlockDevices:
    """The host block devices attached to one VM, counted by use."""

    def __init__(self, sandbox_id: str, vm: Hypervisor) -> None:
        self.sandbox_id = sandbox_id
        self.vm = vm
        self._by_path: dict[str, _Attached] = {}
        self._seq = itertools.count()
        self._lock = asyncio.Lock()

    def attached(self) -> dict[str, str]:
        """serial -> host device of every attached disk."""
        return {a.serial: str(a.host_path) for a in self._by_path.values()}

    async def attach(self, host_path: Path, readonly: bool) -> str:
        """Hot-plug ``host_path`` (or count one more user of it); its serial."""
        key = os.path.realpath(host_path)
        async with self._lock:
            a = self._by_path.get(key)
            if a is not None:
                if a.stuck:
                    raise errors.FailedPrecondition(
                        f"block device {host_path} is still attached to sandbox"
                        f" {self.sandbox_id}: the guest did not release it; it is freed"
                        " when the sandbox stops")
                if a.readonly and not readonly:
                    raise errors.FailedPrecondition(
                        f"block device {host_path} is attached read-only to sandbox"
                        f" {self.sandbox_id}: another container cannot use it read-write")
                a.users += 1
                return a.serial
            if not Path(key).is_block_device():
                raise errors.InvalidArgument(f"{host_path} is not a block device")
            serial = f"pkblk{next(self._seq)}"
            started = time.monotonic()
            try:
                port = await self.vm.hotplug_block(serial, Path(key), readonly, serial=serial)
            except errors.ResourceExhausted as exc:
                raise errors.ResourceExhausted(
                    f"cannot attach block device {host_path}: {exc}; detach a block volume"
                    " (delete its container) or give the pod fewer block devices") from None
            except errors.PykataError as exc:
                raise type(exc)(f"cannot attach block device {host_path}: {exc}") from None
            took = time.monotonic() - started
            self._by_path[key] = _Attached(serial, Path(key), readonly, port)
            log.info("sandbox %s: %s attached as virtio-blk %s on %s%s in %.3fs",
                     self.sandbox_id, host_path, serial, port, " (read-only)" if readonly
                     else "", took)
            return serial

    async def detach(self, serial: str, timeout: float = UNPLUG_TIMEOUT) -> None:
        """One user less; the last one unplugs the disk (bounded). Never raises:
        a disk that cannot be unplugged stays attached until the VM stops."""
        async with self._lock:
            key, a = next(((k, v) for k, v in self._by_path.items() if v.serial == serial),
                          ("", None))
            if a is None or a.stuck:
                return
            a.users -= 1
            if a.users > 0:
                return
            started = time.monotonic()
            try:
                await self.vm.unplug_block(serial, timeout=timeout)
            except errors.PykataError as exc:
                a.stuck = True
                log.warning("sandbox %s: %s (%s) stays attached until the sandbox stops: %s",
                            self.sandbox_id, a.host_path, serial, exc)
                return
            del self._by_path[key]
            log.info("sandbox %s: %s (%s) detached in %.3fs", self.sandbox_id, a.host_path,
                     serial, time.monotonic() - started)


async def detach_all(reg: BlockDevices, serials: list[str]) -> None:
    """Release ``serials`` for one container, each bounded; never raises."""
    for serial in serials:
        with contextlib.suppress(Exception):
            await reg.detach(serial)
