"""Guest side of hot-plugged disks: finding them by serial, ejecting them, and
giving the container the guest's major/minor (fake sysfs, no VM)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from pykata import errors
from pykata.guest import disks


def fake_disk(sysfs: Path, name: str, serial: str, dev: str, pci: str = "0000:01:00.0",
              slot: str = "0") -> None:
    pcidev = sysfs / "devices/pci0000:00/0000:00:03.0" / pci / "virtio2"
    pcidev.mkdir(parents=True)
    block = sysfs / "block" / name
    block.mkdir(parents=True)
    (block / "serial").write_text(serial + "\n")
    (block / "dev").write_text(dev + "\n")
    (block / "device").symlink_to(pcidev)
    s = sysfs / "bus/pci/slots" / slot
    s.mkdir(parents=True)
    (s / "address").write_text(pci.rsplit(".", 1)[0] + "\n")
    (s / "power").write_text("1\n")


def test_find_disk_by_serial(tmp_path: Path) -> None:
    fake_disk(tmp_path, "vda", "pkblk0", "254:0")
    fake_disk(tmp_path, "vdb", "pkblk1", "254:16", pci="0000:02:00.0", slot="0-2")
    d = disks.find_disk("pkblk1", str(tmp_path))
    assert d == disks.Disk("pkblk1", "vdb", 254, 16, "0000:02:00.0")
    assert d.path == "/dev/vdb"
    assert disks.find_disk("pkblk9", str(tmp_path)) is None
    assert disks.find_disk("", str(tmp_path)) is None
    assert disks.find_disk("pkblk0", str(tmp_path / "nosysfs")) is None


def test_eject_powers_off_the_disks_slot(tmp_path: Path) -> None:
    fake_disk(tmp_path, "vda", "pkblk0", "254:0")
    fake_disk(tmp_path, "vdb", "pkblk1", "254:16", pci="0000:02:00.0", slot="0-2")
    d = disks.find_disk("pkblk1", str(tmp_path))
    assert d is not None and disks.eject(d, str(tmp_path)) is True
    assert (tmp_path / "bus/pci/slots/0-2/power").read_text() == "0"
    assert (tmp_path / "bus/pci/slots/0/power").read_text() == "1\n"
    assert disks.eject(disks.Disk("x", "vdz", 254, 32, ""), str(tmp_path)) is False


def test_wait_disk_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match=r"disk pkblk4 did not appear.*within 0.2s"):
        asyncio.run(disks.wait_disk("pkblk4", timeout=0.2, sysfs=str(tmp_path),
                                      dev=str(tmp_path)))


def test_wait_disk_needs_the_device_node(tmp_path: Path) -> None:
    # The disk is in sysfs but /dev has no block node for it (yet): keep waiting.
    fake_disk(tmp_path, "vda", "pkblk0", "254:0")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/vda").write_text("")
    with pytest.raises(errors.NotFound, match="waiting for its device node"):
        asyncio.run(disks.wait_disk("pkblk0", timeout=0.2, sysfs=str(tmp_path),
                                      dev=str(tmp_path / "dev")))


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a block device needs root")
def test_wait_disk_finds_a_late_disk(tmp_path: Path) -> None:
    async def main() -> disks.Disk:
        async def plug() -> None:
            await asyncio.sleep(0.1)
            fake_disk(tmp_path, "vda", "pkblk0", "254:0")
            os.mknod(tmp_path / "dev/vda", 0o600 | 0o060000, os.makedev(254, 0))

        (tmp_path / "dev").mkdir()
        task = asyncio.ensure_future(plug())
        d = await disks.wait_disk("pkblk0", timeout=10, sysfs=str(tmp_path),
                                    dev=str(tmp_path / "dev"))
        await task
        return d

    assert asyncio.run(main()).name == "vda"


def spec_with_device() -> dict[str, Any]:
    return {"linux": {
        "devices": [{"path": "/dev/mydisk", "type": "b", "major": 7, "minor": 3},
                    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
        "resources": {"devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "b", "major": 7, "minor": 3, "access": "rw"},
            {"allow": True, "type": "c", "major": 7, "minor": 3, "access": "rw"},
            {"allow": True, "type": "b", "major": 7, "minor": 4, "access": "rw"},
        ]}}}


def test_use_guest_device_rewrites_entry_and_cgroup_rules() -> None:
    spec = spec_with_device()
    disks.use_guest_device(spec, "/dev/mydisk", 254, 16)
    assert spec["linux"]["devices"][0] == {"path": "/dev/mydisk", "type": "b", "major": 254,
                                           "minor": 16}
    rules = spec["linux"]["resources"]["devices"]
    assert rules[1] == {"allow": True, "type": "b", "major": 254, "minor": 16, "access": "rw"}
    assert rules[2]["major"] == 7  # a char device with the same numbers is another device
    assert rules[3]["minor"] == 4
    assert rules[0] == {"allow": False, "access": "rwm"}


def test_use_guest_device_needs_the_entry() -> None:
    with pytest.raises(errors.InvalidArgument, match="/dev/other is not in the spec"):
        disks.use_guest_device(spec_with_device(), "/dev/other", 254, 0)


def test_last_user_ejects(tmp_path: Path) -> None:
    fake_disk(tmp_path, "vda", "pkblk0", "254:0")
    reg = disks.Disks(str(tmp_path))
    d = disks.find_disk("pkblk0", str(tmp_path))
    assert d is not None
    reg.use(d, "c1")
    reg.use(d, "c2")
    power = tmp_path / "bus/pci/slots/0/power"
    asyncio.run(reg.release("pkblk0", "c1"))
    assert power.read_text() == "1\n" and reg.users("pkblk0") == {"c2"}
    asyncio.run(reg.release("pkblk0", "c2"))
    assert power.read_text() == "0" and reg.users("pkblk0") == set()
    asyncio.run(reg.release("pkblk0", "c2"))  # twice: nothing happens
