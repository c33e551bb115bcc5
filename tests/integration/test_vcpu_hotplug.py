"""vCPU hotplug with a small TCG translation cache (docs/memory.md): QEMU 7.2's
multi-threaded TCG aborts (tcg/region.c assertion) when a new vCPU thread finds
no free cache region, which a small tb-size makes likely (4 of 5 hot-plugs at
8 MiB in the measurement). The driver runs such VMs single-threaded; this test
fills an 8 MiB cache with guest work and hot-plugs three vCPUs, one at a time."""

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


async def run(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str,
              cpus: int = 0) -> str:
    cid = f"c-{uuid.uuid4().hex[:6]}"
    spec = default_spec(["sh", "-c", script])
    if cpus:
        spec["linux"]["resources"] = {"cpu": {"quota": cpus * 100000, "period": 100000}}
    c = await sb.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    await c.start()
    out = await read_all(c.init.read_stdout, 120)
    status = await asyncio.wait_for(c.wait(), 120)
    await c.delete()
    assert status.code == 0, out
    return out.decode()


async def test_hotplug_into_a_full_small_cache_does_not_abort(
        pykata_config: config.Config, rootfs: Path, tmp_path: Path) -> None:
    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.tb_size = 8
    cfg.qemu.default_maxvcpus = 4
    sb = await Sandbox.create(f"hp-{uuid.uuid4().hex[:6]}", cfg)
    try:
        assert sb.vm is not None
        assert "tcg,tb-size=8,thread=single" in sb.vm.argv
        work = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; nproc"
        assert (await run(sb, tmp_path, rootfs, work)).strip() == "1"
        for want in (2, 3, 4):
            # A container asking for `want` CPUs makes the runtime hot-plug them.
            # The guest brings a hot-plugged vCPU online on its own time (bounded).
            wait = (f"n=0; while [ $(grep -c ^processor /proc/cpuinfo) -lt {want} ]"
                    f" && [ $n -lt 60 ]; do n=$((n+1)); sleep 0.5; done")
            got = await run(sb, tmp_path, rootfs,
                            f"{work}; {wait}; grep -c ^processor /proc/cpuinfo", cpus=want - 1)
            assert sb.vm.pid is not None, "QEMU died during the hotplug"
            assert got.split()[-1] == str(want), got
        assert sb.vcpus == 4
    finally:
        await sb.stop()
    assert leftovers(cfg.runtime.state_dir, sb.id) == []
