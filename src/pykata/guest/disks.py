"""Hot-plugged disks in the guest: found by serial, given to containers, ejected.

The host hot-plugs a virtio-blk disk with a serial (its drive id) and names the
disk by that serial in a Storage (``driver="blk"``, ``source=<serial>``) or a
Device (``id=<serial>``). The agent waits (bounded) until a disk with that
serial shows up in ``/sys/block/*/serial`` and its node in ``/dev``, then
mounts it or gives it to the container with the guest's major/minor.

When the last container using a disk is removed, the agent ejects it: it powers
off the disk's PCIe slot (``/sys/bus/pci/slots/*/power``). QEMU then detaches
the device at once; an eject requested by the host (``device_del``) waits for
the guest's hotplug driver, which does not act on it under TCG.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata import errors

log = logging.getLogger(__name__)

DISK_WAIT_SECONDS = 20.0  # a hot-plugged disk under TCG shows up within a second or two
EJECT_SECONDS = 10.0


@dataclass(frozen=True)
class Disk:
    """A virtio-blk disk found in the guest."""

    serial: str
    name: str  # "vda"
    major: int
    minor: int
    pci: str  # "0000:01:00.0" ("" if not on PCI)

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def find_disk(serial: str, sysfs: str = "/sys") -> Disk | None:
    """The disk whose virtio serial is ``serial``, if the guest has it."""
    if not serial:
        return None
    block = Path(sysfs, "block")
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return None
    for name in names:
        if _read(block / name / "serial") != serial:
            continue
        major, _, minor = _read(block / name / "dev").partition(":")
        if not major.isdigit() or not minor.isdigit():
            continue
        pci = ""
        with contextlib.suppress(OSError):
            # .../0000:00:03.0/0000:01:00.0/virtio2: the PCI function holds virtioN.
            pci = Path(os.path.realpath(block / name / "device")).parent.name
        return Disk(serial, name, int(major), int(minor), pci if ":" in pci else "")
    return None


async def wait_disk(serial: str, timeout: float = DISK_WAIT_SECONDS, sysfs: str = "/sys",
                    dev: str = "/dev") -> Disk:
    """Poll (bounded) until the disk and its device node are there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    while True:
        disk = find_disk(serial, sysfs)
        if disk is not None:
            node = os.path.join(dev, disk.name)
            with contextlib.suppress(OSError):
                st = os.stat(node)
                if stat.S_ISBLK(st.st_mode):
                    return disk
        if loop.time() >= deadline:
            what = "its device node" if disk is not None else "it"
            raise errors.NotFound(
                f"hot-plugged disk {serial} did not appear in the guest within {timeout:g}s"
                f" (waiting for {what}); see the guest console for virtio-blk errors")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def slot_of(pci: str, sysfs: str = "/sys") -> Path | None:
    """The hotplug slot (``/sys/bus/pci/slots/<name>``) that holds PCI function ``pci``."""
    if not pci:
        return None
    address = pci.rsplit(".", 1)[0]  # domain:bus:device
    slots = Path(sysfs, "bus/pci/slots")
    try:
        names = sorted(os.listdir(slots))
    except OSError:
        return None
    for name in names:
        if _read(slots / name / "address") == address:
            return slots / name
    return None


def eject(disk: Disk, sysfs: str = "/sys") -> bool:
    """Power off the disk's slot (blocks until the guest has let go); False if the
    disk has no hotplug slot."""
    slot = slot_of(disk.pci, sysfs)
    if slot is None:
        return False
    (slot / "power").write_text("0")
    return True


def device_entry(spec: dict[str, Any], container_path: str) -> dict[str, Any]:
    """The spec's ``linux.devices`` entry for ``container_path``."""
    for d in (spec.get("linux") or {}).get("devices") or []:
        if isinstance(d, dict) and d.get("path") == container_path:
            return d
    raise errors.InvalidArgument(
        f"device {container_path} is not in the spec's linux.devices")


def use_guest_device(spec: dict[str, Any], container_path: str, major: int, minor: int) -> None:
    """Point the ``linux.devices`` entry at ``container_path`` to the guest's
    major/minor, and every device cgroup rule that named the host's numbers too.
    ``spec`` is changed in place."""
    entry = device_entry(spec, container_path)
    kind = entry.get("type", "b")
    host = (entry.get("major"), entry.get("minor"))
    entry["major"], entry["minor"] = major, minor
    resources = (spec.get("linux") or {}).get("resources") or {}
    for rule in resources.get("devices") or []:
        if not isinstance(rule, dict) or rule.get("type", "a") not in (kind, "a"):
            continue
        if (rule.get("major"), rule.get("minor")) == host and host != (None, None):
            rule["major"], rule["minor"] = major, minor


class Disks:
    """Which containers use which hot-plugged disk; the last one out ejects it."""

    def __init__(self, sysfs: str = "/sys") -> None:
        self.sysfs = sysfs
        self._users: dict[str, set[str]] = {}
        self._disks: dict[str, Disk] = {}

    def use(self, disk: Disk, container_id: str) -> None:
        self._disks[disk.serial] = disk
        self._users.setdefault(disk.serial, set()).add(container_id)

    def users(self, serial: str) -> set[str]:
        return set(self._users.get(serial, ()))

    async def release(self, serial: str, container_id: str) -> None:
        """Forget one user; eject the disk when it was the last (bounded, best effort)."""
        users = self._users.get(serial)
        if users is None:
            return
        users.discard(container_id)
        if users:
            return
        del self._users[serial]
        disk = self._disks.pop(serial)
        try:
            ejected = await asyncio.wait_for(asyncio.to_thread(eject, disk, self.sysfs),
                                             EJECT_SECONDS)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot eject disk %s (%s): %s", serial, disk.name, exc)
            return
        if ejected:
            log.info("disk %s (%s) ejected", serial, disk.name)
        else:
            log.info("disk %s (%s) has no hotplug slot; left to the host", serial, disk.name)
