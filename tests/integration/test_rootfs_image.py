"""The guest root as a read-only image (rootfs = "image"): booted from the
early initrd on each device, the root mounted read-only (with DAX on pmem),
containers and exec working, nothing left behind; and through containerd."""

from __future__ import annotations

import asyncio
import copy
import uuid
from pathlib import Path

import pytest

from pykata import config
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, leftovers, make_bundle, read_all

pytestmark = pytest.mark.asyncio(loop_scope="module")

MOUNTED = {
    "nvdimm": "pykata-early: root /dev/pmem0 (erofs, ro,dax) mounted",
    "virtio-pmem": "pykata-early: root /dev/pmem0 (erofs, ro,dax) mounted",
    "virtio-blk": "pykata-early: root /dev/vda (erofs, ro) mounted",
}


@pytest.mark.parametrize("device", list(MOUNTED))
async def test_each_root_device_boots_and_runs_containers(
        pykata_config: config.Config, rootfs: Path, tmp_path: Path, device: str) -> None:
    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.rootfs, cfg.qemu.rootfs_device = "image", device
    image = cfg.root_image_path()
    assert image is not None and image.exists(), f"{image} missing: run 'make setup'"
    sb = await Sandbox.create(f"img-{uuid.uuid4().hex[:6]}", cfg)
    try:
        assert sb.vm is not None and sb.vm.spec.image == image
        console = (sb.dir / "console.log").read_text(errors="replace")
        assert MOUNTED[device] in console, console[-3000:]
        assert "mounting it without" not in console  # DAX was not refused
        b = make_bundle(tmp_path / "b", rootfs, default_spec(
            ["sh", "-c", "cat /proc/version; echo written > /tmp/x && cat /tmp/x; exit 3"]))
        c = await sb.create_container("c1", b)
        await c.start()
        out = await read_all(c.init.read_stdout)
        status = await asyncio.wait_for(c.wait(), 60)
        assert status.code == 3 and out.decode().splitlines()[1:] == ["written"], out
        assert out.startswith(b"Linux version ")
        await c.delete()
    finally:
        await sb.stop()
    assert leftovers(cfg.runtime.state_dir, sb.id) == []


async def test_template_clones_share_the_root_image(
        pykata_config: config.Config, rootfs: Path, tmp_path: Path) -> None:
    """A template of an image-root guest: the root image is a shared, read-only
    mapping QEMU does not migrate; each clone maps the same file again."""
    from pykata.runtime import factory

    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.rootfs, cfg.qemu.rootfs_device = "image", "nvdimm"
    cfg.factory.enable_template = True
    cfg.factory.template_path = str(tmp_path / "tpl" / "template")
    try:
        for i in range(2):
            sb = await Sandbox.create(f"imgtpl-{uuid.uuid4().hex[:6]}", cfg)
            try:
                assert "memory_file" in sb.record.extra, "not started from the template"
                assert sb.vm is not None and sb.vm.spec.image == cfg.root_image_path()
                b = make_bundle(tmp_path / f"b{i}", rootfs, default_spec(["sh", "-c", "echo ok"]))
                c = await sb.create_container("c1", b)
                await c.start()
                out = await read_all(c.init.read_stdout)
                assert (await asyncio.wait_for(c.wait(), 60)).code == 0 and out == b"ok\n"
                await c.delete()
            finally:
                await sb.stop()
            assert leftovers(cfg.runtime.state_dir, sb.id) == []
        t = factory.Factory(cfg).current()
        assert t is not None and t.memory_bytes > 0
    finally:
        factory.Factory(cfg).destroy()
