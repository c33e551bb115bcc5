"""The checkpoint VM layer on a real QEMU (issue 20, docs/checkpoint-design.md):
a shared_fs = "none" sandbox booted with ``[runtime] checkpointable`` has its
RAM in a file; ``runtime.checkpoint.save`` writes its state and packed RAM to
a directory; ``Sandbox.restore`` starts a new QEMU from it (incoming, the
hot-plugged vCPU on its command line with the same id) and the guest goes on:
the agent answers, a file in a guest tmpfs written before is there, a process
counting in guest memory continues its count, the hot-plugged vCPU is online.
Nothing is left (QEMU, state directory, RAM files) once both are stopped.

The guest is reached through the debug console (DebugExec: a process in the
guest outside any container), so no container rootfs (which needs virtio-fs
or a guest pull) is needed."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from pathlib import Path

import pytest

from pykata import config, errors
from pykata.protos import agent_pb2 as pb
from pykata.runtime import checkpoint
from pykata.runtime.sandbox import Sandbox
from pykata.testing import leftovers

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def guest_start(sb: Sandbox, script: str) -> str:
    """Start ``sh -c script`` in the guest (debug console); its exec id."""
    exec_id = f"d{uuid.uuid4().hex[:6]}"
    process = {"args": ["sh", "-c", script], "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"],
               "terminal": False}
    await sb.agent._call("DebugExec", pb.ExecProcessRequest(  # type: ignore[attr-defined]
        exec_id=exec_id, process_json=json.dumps(process).encode()), pb.ProcessResponse)
    return exec_id


async def guest_sh(sb: Sandbox, script: str) -> str:
    """Run ``sh -c script`` in the guest to its end: its stdout (exit 0 asserted)."""
    exec_id = await guest_start(sb, script)
    out = b""
    async with asyncio.timeout(120):
        while chunk := await sb.agent.read_stdout("", exec_id):
            out += chunk
        status = await sb.agent.wait_process("", exec_id)
    assert status.code == 0, (script, out)
    return out.decode(errors="replace")


async def test_checkpoint_and_restore_into_a_new_qemu(pykata_config: config.Config,
                                                      state_dir: Path, tmp_path: Path) -> None:
    cfg = copy.deepcopy(pykata_config)
    cfg.vm.shared_fs = "none"
    cfg.vm.default_maxvcpus = 2
    cfg.runtime.checkpointable = True
    cfg.agent.debug_console = True
    cfg.factory.enable_template = False
    cfg.factory.vm_cache_number = 0
    sid = f"ck-{uuid.uuid4().hex[:6]}"
    ckpt = tmp_path / "ck"
    token = uuid.uuid4().hex
    sb = await Sandbox.create(sid, cfg)
    restored: Sandbox | None = None
    try:
        assert sb.vm is not None and sb.vm.spec.memory_file is not None
        mem = sb.vm.spec.memory_file
        assert mem.is_file() and sb.record.extra.get("memory_file") == str(mem)
        assert checkpoint.eligible(sb) == ""
        # A vCPU hot-plugged: the restore's command line must repeat it.
        assert await sb.vm.hotplug_vcpus(2) == 2
        await sb.agent.online_cpu_mem(2, cpu_only=True)
        await guest_sh(sb, "n=0; while ! grep -q 1 /sys/devices/system/cpu/online"
                           " && [ $n -lt 60 ]; do n=$((n+1)); sleep 0.5; done")
        await guest_sh(sb, f"mkdir -p /mnt/ckt && mount -t tmpfs ckt /mnt/ckt"
                           f" && echo {token} > /mnt/ckt/token")
        await guest_start(sb, "i=0; while :; do i=$((i+1)); echo $i > /mnt/ckt/n;"
                              " sleep 0.2; done")
        await guest_sh(sb, "n=0; while [ ! -s /mnt/ckt/n ] || [ $(cat /mnt/ckt/n) -lt 5 ]"
                           " && [ $n -lt 100 ]; do n=$((n+1)); sleep 0.2; done")

        n_before = int((await guest_sh(sb, "cat /mnt/ckt/n")).strip())
        await sb.quiesce()
        t0 = time.monotonic()
        m = await checkpoint.save(sb, ckpt, next_stream_id=1)
        took = time.monotonic() - t0
        # The VM is stopped: the count in its RAM is what the checkpoint holds.
        sizes = {p.name: p.stat().st_size for p in ckpt.iterdir()}
        print(f"checkpoint in {took:.2f}s: {sizes}, RAM {m.memory.data_bytes >> 20} MiB"
              f" of {m.memory.size >> 20} MiB in {m.memory.extents} extents")
        assert sorted(sizes) == sorted(checkpoint.FILES)
        assert [d.id for d in m.plugged] == ["cpu-1"]
        assert m.memory.data_bytes < m.memory.size  # holes were not packed
        assert m.vmm_info["machine"].startswith("pc-q35")
        await sb.end_checkpointed()
        await sb.stop()
        assert leftovers(state_dir, sid) == []
        assert not mem.exists()

        restored = await Sandbox.restore(sid, cfg, ckpt)
        assert restored.vm is not None
        assert any("id=cpu-1" in a for a in restored.vm.argv)  # type: ignore[attr-defined]
        assert restored.vm.spec.memory_file is not None
        assert restored.vm.spec.memory_file.is_file()
        await restored.resume_restored()
        details = await restored.agent.guest_details()
        assert details is not None
        out = await guest_sh(restored, "cat /mnt/ckt/token; cat /mnt/ckt/n; sleep 1;"
                                       " cat /mnt/ckt/n; cat /sys/devices/system/cpu/online")
        lines = out.split()
        assert lines[0] == token, out
        n_after, n_later = int(lines[1]), int(lines[2])
        assert n_after >= n_before >= 5, out  # it went on from its count, not from 0
        assert n_later > n_after, out  # and it still counts
        assert lines[3] == "0-1", out
        # The restored VM can be checkpointed again (its plugged vCPU carried on).
        assert checkpoint.eligible(restored) == ""
    finally:
        await sb.stop()
        if restored is not None:
            await restored.stop()
    assert leftovers(state_dir, sid) == []  # QEMU, state directory, RAM files


async def test_restore_into_the_same_netns_keeps_both_nics(pykata_config: config.Config,
                                                          state_dir: Path,
                                                          tmp_path: Path) -> None:
    """A pod with a NIC on the VM's command line (eth0, there at boot) and one
    hot-plugged later (eth1, on a root port): restored into the same network
    namespace, the guest has both addresses and reaches both peers (traffic
    only to namespaces this test made)."""
    from tests.integration.test_network import link_namespaces, netns_pair, sh

    cfg = copy.deepcopy(pykata_config)
    cfg.vm.shared_fs = "none"
    cfg.runtime.checkpointable = True
    cfg.agent.debug_console = True
    cfg.factory.enable_template = False
    cfg.factory.vm_cache_number = 0
    tag = uuid.uuid4().hex[:6]
    sid = f"cn-{tag}"
    ckpt = tmp_path / "ck"
    ping = "ping -c 1 -W 5 10.231.91.1 >/dev/null && ping -c 1 -W 5 10.231.92.1 >/dev/null"
    with netns_pair(tag) as (pod_ns, peer_ns):
        link_namespaces(pod_ns, peer_ns, "eth0", "10.231.91")
        netns = f"/run/netns/{pod_ns}"
        sb = await Sandbox.create(sid, cfg, netns=netns)
        restored: Sandbox | None = None
        try:
            link_namespaces(pod_ns, peer_ns, "eth1", "10.231.92")
            await sb.sync_network()
            assert sb.network is not None and len(sb.network.endpoints) == 2
            await guest_sh(sb, "n=0; until ip -4 -o addr show | grep -q 10.231.92.2"
                               " && [ $n -lt 60 ]; do n=$((n+1)); sleep 0.5; done; " + ping)
            await sb.quiesce()
            m = await checkpoint.save(sb, ckpt)
            assert len(m.cold_nics) == 1 and [d.kind for d in m.plugged] == ["nic"]
            assert {i.name for i in m.network.interfaces} == {"eth0", "eth1"}
            await sb.end_checkpointed()
            await sb.stop()
            assert "_pk" not in sh("ip", "-n", pod_ns, "-o", "link")

            restored = await Sandbox.restore(sid, cfg, ckpt, netns=netns)
            assert restored.vm is not None
            assert any("bus=rp0" in a for a in restored.vm.argv)  # type: ignore[attr-defined]
            await restored.resume_restored()
            out = await guest_sh(restored, "ip -4 -o addr show; " + ping)
            assert "10.231.91.2/24" in out and "10.231.92.2/24" in out, out
        finally:
            await sb.stop()
            if restored is not None:
                await restored.stop()
        assert "_pk" not in sh("ip", "-n", pod_ns, "-o", "link")
    assert leftovers(state_dir, sid) == []


async def test_private_memory_is_restored_and_a_damaged_state_refused(
        pykata_config: config.Config, state_dir: Path, tmp_path: Path) -> None:
    """Memory hot-plugged into a checkpointable VM is private: the state
    carries it and the restore's command line repeats the DIMM, so the guest
    has the same memory and can use it all. Then the same checkpoint with its
    state damaged (same size): QEMU refuses the stream and exits; the restore
    says so in one line, at once, and leaves nothing."""
    cfg = copy.deepcopy(pykata_config)
    cfg.vm.shared_fs = "none"
    cfg.vm.default_maxmemory = 2048
    cfg.runtime.checkpointable = True
    cfg.agent.debug_console = True
    cfg.factory.enable_template = False
    cfg.factory.vm_cache_number = 0
    sid = f"cm-{uuid.uuid4().hex[:6]}"
    ckpt = tmp_path / "ck"
    sb = await Sandbox.create(sid, cfg)
    restored: Sandbox | None = None
    try:
        assert sb.vm is not None
        assert await sb.vm.hotplug_memory(256) == 256
        await guest_sh(sb, "n=0; until [ $(grep MemTotal /proc/meminfo | tr -dc 0-9) -gt"
                           " 600000 ] || [ $n -ge 60 ]; do n=$((n+1)); sleep 0.5; done")
        mem_total = (await guest_sh(sb, "grep MemTotal /proc/meminfo")).split()[1]
        assert int(mem_total) > 600000, mem_total
        # Fill memory so pages of the DIMM hold data, keep a token in a tmpfs.
        await guest_sh(sb, "mkdir -p /mnt/ckm && mount -t tmpfs -o size=400m ckm /mnt/ckm"
                           " && dd if=/dev/urandom of=/mnt/ckm/fill bs=1M count=300"
                           " 2>/dev/null && md5sum /mnt/ckm/fill > /mnt/ckm/sum")
        want = (await guest_sh(sb, "cat /mnt/ckm/sum")).split()[0]
        assert checkpoint.eligible(sb) == ""
        await sb.quiesce()
        m = await checkpoint.save(sb, ckpt)
        assert [(d.kind, d.props) for d in m.plugged] == [("dimm", {"size-mib": 256})]
        print(f"state {m.vmstate_bytes >> 20} MiB (the DIMM), RAM file"
              f" {m.memory.data_bytes >> 20} MiB")
        await sb.end_checkpointed()
        await sb.stop()

        restored = await Sandbox.restore(sid, cfg, ckpt)
        assert restored.vm is not None
        assert "pc-dimm,id=dimm0,memdev=mem-dimm0" in restored.vm.argv  # type: ignore[attr-defined]
        await restored.resume_restored()
        out = (await guest_sh(restored, "grep MemTotal /proc/meminfo; md5sum /mnt/ckm/fill"))
        assert out.split()[1] == mem_total and out.split()[3] == want, out
        await restored.stop()
        assert leftovers(state_dir, sid) == []

        state = ckpt / checkpoint.VMSTATE
        size = state.stat().st_size
        with open(state, "r+b") as f:
            f.seek(size // 2)
            f.write(bytes(size - size // 2))
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable) as exc:
            await Sandbox.restore(sid, cfg, ckpt)
        print(f"damaged state refused in {time.monotonic() - t0:.1f}s: {exc.value}")
        assert "exited (status 1) during" in str(exc.value)
        assert "\n" not in str(exc.value)
    finally:
        await sb.stop()
        if restored is not None:
            await restored.stop()
    assert leftovers(state_dir, sid) == []
