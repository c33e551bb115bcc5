"""The real Sandbox over the shipped fakes (pykata.testing.fakes): lifecycle,
rollback of a failed create, wrong-state calls, resource fitting, and the one
"dial + check" of a booting VM."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pykata import errors
from pykata.config import HypervisorConfig, VMConfig
from pykata.hypervisor.base import AgentChannel, VMSpec
from pykata.runtime import boot
from pykata.runtime.dial import dial_agent
from pykata.runtime.netwatch import NetworkWatch
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.state import SandboxRecord
from pykata.runtime.types import State
from pykata.testing import default_spec
from pykata.testing.fakes import (
    FakeAgent,
    FakeDriver,
    FakeHypervisor,
    FakeSandbox,
    fake_config,
    fake_parts,
)


def bundle(tmp_path: Path, name: str = "b", **resources: object) -> Path:
    b = tmp_path / name
    (b / "rootfs").mkdir(parents=True)
    spec = default_spec(["sh"])
    if resources:
        spec["linux"] = {"resources": resources}
    (b / "config.json").write_text(json.dumps(spec))
    return b


async def test_create_runs_and_stop_removes_everything(tmp_path: Path) -> None:
    agent = FakeAgent()
    driver = FakeDriver()
    cfg = fake_config(tmp_path / "state")
    sb = await Sandbox.create("pod", cfg, hostname="web", parts=fake_parts(agent, driver))
    assert sb.state is State.RUNNING
    vm = driver.made[0]
    assert vm.running and vm.spec.id == "pod" and vm.spec.vcpus == cfg.vm.default_vcpus
    assert [c[0] for c in agent.calls] == ["check", "create_sandbox"]
    assert agent.sandbox is not None and agent.sandbox["hostname"] == "web"
    assert [s.driver for s in agent.sandbox["storages"]] == ["virtiofs"]
    rec = SandboxRecord.load(sb.dir)
    assert rec.state == "running" and rec.owner is not None
    assert rec.vmm is None  # the fake VM's pid 4242 is no process of ours

    await sb.stop()
    assert sb.state is State.STOPPED and not vm.running and not sb.dir.exists()
    assert [c[0] for c in agent.calls][-2:] == ["destroy_sandbox", "close"]
    await sb.stop()  # idempotent
    assert [c[0] for c in vm.calls].count("stop") >= 1


async def test_a_failed_create_leaves_nothing_behind(tmp_path: Path) -> None:
    agent = FakeAgent()
    agent.fail("create_sandbox", errors.Unavailable("guest said no"))
    driver = FakeDriver()
    cfg = fake_config(tmp_path / "state")
    with pytest.raises(errors.Unavailable, match="guest said no"):
        await Sandbox.create("pod", cfg, parts=fake_parts(agent, driver))
    assert not driver.made[0].running
    assert not (tmp_path / "state" / "sbs" / "default").exists()
    assert agent.closed


async def test_an_existing_sandbox_is_left_alone(tmp_path: Path) -> None:
    first = await FakeSandbox.running("pod", state_dir=tmp_path / "state")
    cfg = fake_config(tmp_path / "state")
    driver = FakeDriver()
    with pytest.raises(errors.AlreadyExists, match="sandbox pod already exists"):
        await Sandbox.create("pod", cfg, parts=fake_parts(FakeAgent(), driver))
    assert driver.made == []  # refused before any VM
    assert first.dir.is_dir() and first.fake_vm.running
    c = await first.create_container("c1", bundle(tmp_path))
    assert c.id in first.containers
    await first.stop()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-x", "x" * 129])
async def test_bad_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid sandbox id"):
        await FakeSandbox.running(bad, state_dir=tmp_path / "state")
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.json"))


async def test_wrong_state_calls(tmp_path: Path) -> None:
    sb = await FakeSandbox.running("pod", state_dir=tmp_path / "state")
    b = bundle(tmp_path)
    await sb.create_container("c1", b)
    with pytest.raises(errors.AlreadyExists):
        await sb.create_container("c1", b)
    with pytest.raises(errors.NotFound):
        sb.container("nope")
    await sb.pause()
    assert sb.state is State.PAUSED and sb.fake_vm.paused
    with pytest.raises(errors.FailedPrecondition, match="sandbox pod is paused"):
        await sb.create_container("c2", bundle(tmp_path, "b2"))
    await sb.resume()
    assert sb.state is State.RUNNING
    await sb.stop()
    with pytest.raises(errors.FailedPrecondition, match="sandbox pod is stopped"):
        await sb.create_container("c3", bundle(tmp_path, "b3"))
    assert sb.containers == {}


async def test_containers_grow_the_vm_and_impossible_limits_are_refused(
        tmp_path: Path) -> None:
    cfg = fake_config(tmp_path / "state")
    cfg.vm.default_maxvcpus = 8
    sb = await FakeSandbox.running("pod", state_dir=tmp_path / "state", config=cfg)
    vm = sb.fake_vm
    base_cpus, base_mem = vm.spec.vcpus, vm.spec.memory_mib
    await sb.create_container("c1", bundle(tmp_path, cpu={"quota": 150000, "period": 100000},
                                            memory={"limit": 300 << 20}))
    assert ("hotplug_vcpus", (base_cpus + 2,)) in vm.calls
    assert ("hotplug_memory", (256,)) in vm.calls  # whole 128 MiB blocks below 300
    assert sb.vcpus == base_cpus + 2 and sb.memory_mib == base_mem + 256
    assert sb.wanted_resources() == (base_cpus + 2, base_mem + 300)
    too_big = {"limit": (vm.spec.max_memory_mib + 1) << 20}
    with pytest.raises(errors.InvalidArgument, match="memory limit of .* is impossible"):
        await sb.create_container("c2", bundle(tmp_path, "b2", memory=too_big))
    assert "c2" not in sb.containers and "c2" not in sb.fake_agent.containers
    await sb.stop()


class _Silent(AgentChannel):
    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await asyncio.sleep(timeout)
        raise errors.DeadlineExceeded("no agent")


class _DyingVM(FakeHypervisor):
    def agent_channel(self) -> AgentChannel:
        return _Silent()


async def test_dial_reports_a_vm_that_exits_while_booting(tmp_path: Path) -> None:
    spec = VMSpec(id="pod", run_dir=tmp_path, kernel=tmp_path / "k")
    (tmp_path / "console.log").write_text("Kernel panic - not syncing: VFS\n")
    vm = _DyingVM(spec)
    vm.exit_code = 1
    await vm.start()
    asyncio.get_running_loop().call_later(0.05, vm._exited.set)
    with pytest.raises(errors.VMLaunchError, match="exited while booting") as info:
        await dial_agent(vm, timeout=5.0)
    assert "Kernel panic" in str(info.value.console_tail)


async def test_dial_reports_a_channel_that_fails(tmp_path: Path) -> None:
    vm = FakeHypervisor(VMSpec(id="pod", run_dir=tmp_path, kernel=tmp_path / "k"))
    await vm.start()
    with pytest.raises(errors.Unavailable, match="no agent channel"):
        await dial_agent(vm, timeout=1.0)


def test_the_engine_choice_reaches_the_guest_kernel_command_line(tmp_path: Path) -> None:
    from pykata.runtime import sizing
    from pykata.wire import AGENT_ENGINE_PARAM

    cfg = fake_config(tmp_path)
    spec = sizing.vm_spec(cfg, "pod", "default", tmp_path, channel="serial")
    assert AGENT_ENGINE_PARAM not in spec.kernel_params  # native: the guest's default
    cfg.agent.container_engine = "crun"
    spec = sizing.vm_spec(cfg, "pod", "default", tmp_path, channel="serial")
    assert f"{AGENT_ENGINE_PARAM}=crun" in spec.kernel_params.split()


@dataclass
class _OtherVMM(VMConfig):
    """A second driver's section: the common keys only."""

    path: str = "/usr/bin/other-vmm"


@dataclass
class _TwoDrivers(HypervisorConfig):
    other: _OtherVMM = field(default_factory=_OtherVMM)


async def test_the_sandbox_reads_the_selected_drivers_section(tmp_path: Path) -> None:
    """Another driver's section drives the sandbox as [hypervisor.qemu] does:
    nothing in the runtime knows which driver it is."""
    cfg = fake_config(tmp_path / "state")
    cfg.hypervisor = _TwoDrivers(driver="other",
                                 other=_OtherVMM(default_vcpus=2, default_memory=256,
                                                 shared_fs="none", kernel_params="quiet"))
    cfg.qemu.default_vcpus = 3
    agent, driver = FakeAgent(), FakeDriver()
    sb = await Sandbox.create("pod", cfg, parts=fake_parts(agent, driver))
    spec = driver.made[0].spec
    assert (spec.vcpus, spec.memory_mib) == (2, 256)
    assert spec.kernel_params.startswith("quiet ") and spec.shared_fs_socket is None
    assert agent.sandbox is not None and agent.sandbox["storages"] == []
    await sb.stop()
    assert not sb.dir.exists()


def test_the_shared_fs_daemon_follows_the_configuration(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path / "state")
    cfg.vm.virtio_fs_cache, cfg.vm.virtio_fs_daemon = "never", "/opt/virtiofsd"
    sb = Sandbox("pod", cfg)
    sock = boot.shared_fs(sb)
    assert sock == sb.dir / "vfs.sock" and sb.virtiofsd is not None
    assert (sb.virtiofsd.binary, sb.virtiofsd.cache) == ("/opt/virtiofsd", "never")
    assert sb.virtiofsd.source == sb.shared_dir
    sb.virtiofsd = None
    assert boot.shared_fs(sb, make_daemon=False) == sock and sb.virtiofsd is None
    cfg.vm.shared_fs = "none"
    assert boot.shared_fs(sb) is None and sb.virtiofsd is None


def test_a_record_written_before_the_vmm_field_loads(tmp_path: Path) -> None:
    """state.json of an older pykata ("qemu" for the VM's process) still loads,
    so its shim's ``delete`` and ``pykata cleanup`` find that process."""
    ref = {"pid": 1234, "start_time": 99}
    (tmp_path / "state.json").write_text(json.dumps({
        "id": "pod", "state": "running", "dir": str(tmp_path), "qemu": ref,
        "virtiofsd": None, "containers": {}, "namespace": "default", "owner": None,
        "extra": {}}))
    rec = SandboxRecord.load(tmp_path)
    assert rec.vmm == ref
    rec.save()
    again = json.loads((tmp_path / "state.json").read_text())
    assert again["vmm"] == ref and "qemu" not in again


class _Watch(NetworkWatch):
    def __init__(self) -> None:
        self.plugged = 0

    async def plug_new(self) -> None:
        self.plugged += 1


async def test_sync_network_connects_what_appeared(tmp_path: Path) -> None:
    sb = await FakeSandbox.running("pod", state_dir=tmp_path / "state")
    assert sb.netwatch is None  # no pod network
    await sb.sync_network()  # nothing to do, no error
    sb.netwatch = watch = _Watch()
    await sb.sync_network()
    assert watch.plugged == 1
    sb.netwatch = None
    await sb.stop()
