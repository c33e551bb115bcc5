"""Issue 5 (block part, driver level): a host loop device hot-plugged into a
running VM as virtio-blk appears in the guest; when the sandbox stops, the loop
device is no longer held. (Unplug from a running guest is not reliable yet:
the guest does not acknowledge the eject under TCG; see the issue note.)"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "pkdisk", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert str(img) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                          text=True).stdout


async def run_in(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str) -> str:
    cid = f"b{uuid.uuid4().hex[:6]}"
    spec: dict[str, Any] = default_spec(["sh", "-c", script])
    c = await sb.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    await c.start()
    out = b""
    async with asyncio.timeout(60):
        while chunk := await c.init.read_stdout():
            out += chunk
    await c.wait()
    await c.delete()
    return out.decode()


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
    fuser = await asyncio.to_thread(subprocess.run, ["fuser", "-s", loop_device], check=False)
    held = fuser.returncode == 0
    assert not held, f"{loop_device} is still held after the sandbox stopped"
