"""Issue 5 (block part): host block devices reach the VM as hot-plugged virtio-blk
disks. Driver level: a loop device hot-plugged into a running VM appears in the
guest. From the spec: a loop device given as a file system mount is mounted by
the agent and used by the container; given in linux.devices (or as a bind of
the device) it is a device node with the guest's numbers. The disk is unplugged
when its container is deleted, and no loop device is held once the sandbox stops."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config, errors
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

LABEL = "pkdisk"


def _losetup_list() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert str(img) not in _losetup_list()


def cmd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def held(dev: str) -> bool:
    return subprocess.run(["fuser", "-s", dev], check=False).returncode == 0


async def run_spec(sb: Sandbox, tmp_path: Path, rootfs: Path,
                   spec: dict[str, Any]) -> tuple[str, str, int]:
    """Run a container to its end; (stdout, stderr, exit code). It is deleted."""
    cid = f"b{uuid.uuid4().hex[:6]}"
    c = await sb.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    try:
        await c.start()
        out, err = b"", b""
        async with asyncio.timeout(120):
            while chunk := await c.init.read_stdout():
                out += chunk
            while chunk := await c.init.read_stderr():
                err += chunk
        status = await asyncio.wait_for(c.wait(), 60)
    finally:
        await c.delete(force=True)
    return out.decode(), err.decode(), status.code


async def run_in(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str) -> str:
    return (await run_spec(sb, tmp_path, rootfs, default_spec(["sh", "-c", script])))[0]


def dev_numbers(dev: str) -> tuple[int, int]:
    rdev = os.stat(dev).st_rdev
    return os.major(rdev), os.minor(rdev)


async def test_loop_device_hotplug(pykata_config: config.Config, tmp_path: Path,
                                   rootfs: Path, loop_device: str) -> None:
    sb = await Sandbox.create(f"blk-{uuid.uuid4().hex[:6]}", pykata_config)
    try:
        assert sb.vm is not None
        before = await run_in(sb, tmp_path, rootfs, "cat /proc/partitions")
        port = await sb.vm.hotplug_block("disk0", Path(loop_device))
        assert port.startswith("rp")
        during = await run_in(sb, tmp_path, rootfs, "cat /proc/partitions")
        new = set(during.split()) - set(before.split())
        assert "vda" in new and "65536" in new, during
    finally:
        await sb.stop()
    assert not held(loop_device), f"{loop_device} is still held after the sandbox stopped"


async def test_block_mount_from_spec(pykata_config: config.Config, tmp_path: Path,
                                     rootfs: Path, loop_device: str) -> None:
    """A loop device with ext4 as a spec mount: mounted in the guest, a bind in the
    container, writes land on the device; unplugged on delete, plugged again for
    the next container; released when the sandbox stops."""
    sb = await Sandbox.create(f"blk-{uuid.uuid4().hex[:6]}", pykata_config)
    mount = {"destination": "/data", "type": "ext4", "source": loop_device,
             "options": ["rw", "noatime"]}
    try:
        spec = default_spec(["sh", "-c",
                             "grep ' /data ' /proc/mounts; echo hello-block > /data/hello;"
                             " sync; cat /data/hello; cat /data/lost+found/.. >/dev/null;"
                             " ls /data"])
        spec["mounts"].append(mount)
        out, err, code = await run_spec(sb, tmp_path, rootfs, spec)
        assert code == 0, err
        lines = out.splitlines()
        source, target, fstype, options = lines[0].split()[:4]
        assert (source, target, fstype) == ("/dev/vda", "/data", "ext4"), lines[0]
        assert options.startswith("rw")
        assert lines[1] == "hello-block"
        assert "lost+found" in lines[2:]
        # Deleted with its container: unplugged (the guest ejected it), port free.
        assert sb.block_devices().attached() == {}
        gone = await run_in(sb, tmp_path, rootfs, "ls /sys/block")
        assert "vd" not in gone, gone
        # Plugged again (same root port) for the next container; the data is there.
        ro = dict(mount, options=["ro"])
        spec = default_spec(["sh", "-c", "cat /data/hello; echo x > /data/new; echo rc=$?"])
        spec["mounts"].append(ro)
        out, err, code = await run_spec(sb, tmp_path, rootfs, spec)
        assert out.splitlines() == ["hello-block", "rc=1"], (out, err)
        assert "Read-only file system" in err
    finally:
        await sb.stop()
    assert not held(loop_device), f"{loop_device} is still held after the sandbox stopped"
    assert cmd("debugfs", "-R", "cat /hello", loop_device).stdout == "hello-block\n"


async def test_block_device_in_linux_devices(sandbox: Sandbox, tmp_path: Path, rootfs: Path,
                                             loop_device: str) -> None:
    """linux.devices (type b) with the host's numbers: a block device node at the
    requested path, with the guest's numbers, readable per the cgroup rule."""
    major, minor = dev_numbers(loop_device)
    spec = default_spec(["sh", "-c",
                         "stat -c '%F %t:%T' /dev/mydisk; cat /sys/block/vd*/dev;"
                         f" dd if=/dev/mydisk bs=1 skip=1144 count={len(LABEL)} 2>/dev/null;"
                         " echo"])
    spec["linux"]["devices"] = [{"path": "/dev/mydisk", "type": "b", "major": major,
                                 "minor": minor, "fileMode": 0o660, "uid": 0, "gid": 0}]
    spec["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "b", "major": major, "minor": minor, "access": "rw"})
    out, err, code = await run_spec(sandbox, tmp_path, rootfs, spec)
    assert code == 0, err
    kind, numbers = out.splitlines()[0].rsplit(" ", 1)
    assert kind == "block special file"
    guest = out.splitlines()[1]  # decimal major:minor of the guest's disk
    g_major, g_minor = (int(x) for x in guest.split(":"))
    assert numbers == f"{g_major:x}:{g_minor:x}"
    assert (g_major, g_minor) != (major, minor)
    assert out.splitlines()[2] == LABEL  # the ext4 volume label, read through the node
    assert sandbox.block_devices().attached() == {}


async def test_bind_of_block_device_read_only(sandbox: Sandbox, tmp_path: Path, rootfs: Path,
                                              loop_device: str) -> None:
    """A bind mount of a block device gives the device node; ro makes the disk
    read-only (writes fail in the guest)."""
    spec = default_spec(["sh", "-c",
                         f"dd if=/dev/xvdb bs=1 skip=1144 count={len(LABEL)} 2>/dev/null;"
                         " echo; cat /sys/block/vd*/ro;"
                         " dd if=/dev/zero of=/dev/xvdb bs=512 count=1 conv=fsync; echo rc=$?"])
    spec["mounts"].append({"destination": "/dev/xvdb", "type": "bind", "source": loop_device,
                           "options": ["bind", "ro"]})
    out, err, _ = await run_spec(sandbox, tmp_path, rootfs, spec)
    lines = out.splitlines()
    assert lines[0] == LABEL, (out, err)
    assert lines[1] == "1"  # the guest sees a read-only disk
    assert lines[2] != "rc=0", (out, err)
    assert f"Filesystem volume name:   {LABEL}" in cmd("dumpe2fs", "-h", loop_device).stdout


@pytest.mark.parametrize(("what", "message"), [
    ("missing", r"mount source /nonexistent/disk for /data does not exist"),
    ("regular", r"mount source .*/plain.img for /data is not a block device"),
])
async def test_block_volume_errors(sandbox: Sandbox, tmp_path: Path, rootfs: Path,
                                   what: str, message: str) -> None:
    spec = default_spec(["true"])
    if what == "missing":
        spec["mounts"].append({"destination": "/data", "type": "ext4",
                               "source": "/nonexistent/disk"})
    else:
        img = tmp_path / "plain.img"
        img.write_bytes(b"\0" * 4096)
        spec["mounts"].append({"destination": "/data", "type": "ext4", "source": str(img)})
    cid = f"bad-{what}"
    b = make_bundle(tmp_path / cid, rootfs, spec)
    with pytest.raises(errors.InvalidArgument, match=message) as ei:
        await sandbox.create_container(cid, b)
    assert "\n" not in str(ei.value)
    assert cid not in sandbox.containers
    assert not (sandbox.shared_dir / cid).exists()
    assert sandbox.block_devices().attached() == {}


async def test_device_entry_not_a_host_disk_is_made_as_given(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    """A ``linux.devices`` block entry the host has no disk for is not an error
    (runc makes the node as given): the container sees the node with its type,
    numbers, mode and owner, and nothing is hot-plugged."""
    # a loop minor no host has (CI machines may carry hundreds of loop devices)
    assert not Path("/sys/dev/block/7:1048000").exists()
    spec = default_spec(["sh", "-c", "stat -c '%F %t:%T %a %u:%g' /dev/gone"])
    spec["linux"]["devices"] = [{"path": "/dev/gone", "type": "b", "major": 7,
                                 "minor": 1048000, "fileMode": 0o640, "uid": 5, "gid": 6}]
    out, err, status = await run_spec(sandbox, tmp_path, rootfs, spec)
    # 1048000 = 0xffdc0: stat prints the numbers in hex
    assert (out.strip(), status) == ("block special file 7:ffdc0 640 5:6", 0), (out, err)
    assert sandbox.block_devices().attached() == {}


async def test_agent_failure_after_hotplug_leaves_nothing(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path, loop_device: str) -> None:
    """The disk is plugged, then the guest cannot mount it (wrong file system
    type): the create fails with the guest's reason and the disk is unplugged."""
    spec = default_spec(["true"])
    spec["mounts"].append({"destination": "/data", "type": "xfs", "source": loop_device})
    b = make_bundle(tmp_path / "badfs", rootfs, spec)
    with pytest.raises(errors.PykataError, match="cannot mount blk storage"):
        await sandbox.create_container("badfs", b)
    assert sandbox.block_devices().attached() == {}
    assert "vd" not in await run_in(sandbox, tmp_path, rootfs, "ls /sys/block")
    assert json.loads((b / "config.json").read_text())["mounts"][-1]["source"] == loop_device
