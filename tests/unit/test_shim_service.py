"""The shim's Task service (containerd.task.v2.Task) driven through
pykata.testing.fakes: request sequences as containerd sends them, wrong-state
calls, rollback of a failed Create, and the order of events and replies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from pykata import config, errors
from pykata.protos import cgroups_v2_metrics_pb2 as m2
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt
from pykata.protos import runtimeoptions_pb2 as rtopts
from pykata.runtime.types import ContainerStats, State
from pykata.shim import rootfs
from pykata.shim.service import TaskService
from pykata.testing import default_spec
from pykata.testing.fakes import FakeAgent, FakePublisher, FakeSandbox, FakeSandboxFactory

VM_PID = 4242  # FakeHypervisor's: every pid containerd sees is the VM's
CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod"}


class Shim:
    """A TaskService with its fakes, and request helpers."""

    def __init__(self, tmp_path: Path, sandbox_id: str = "c1") -> None:
        self.tmp = tmp_path
        self.pub = FakePublisher()
        self.factory = FakeSandboxFactory(tmp_path / "state")
        self.shutdown = asyncio.Event()
        self.svc = TaskService(sandbox_id, "k8s.io", config.Config(), self.pub,
                               self.shutdown, make_sandbox=self.factory)

    @property
    def agent(self) -> FakeAgent:
        return self.factory.agent

    @property
    def sandbox(self) -> FakeSandbox:
        return self.factory.made[-1]

    def bundle(self, cid: str, args: list[str] | None = None, **spec: Any) -> Path:
        b = self.tmp / f"bundle-{cid}"
        (b / "rootfs").mkdir(parents=True, exist_ok=True)
        (b / "config.json").write_text(json.dumps({**default_spec(args or ["sh"]), **spec}))
        return b

    async def create(self, cid: str = "c1", **kw: Any) -> pb.CreateTaskResponse:
        spec = kw.pop("spec", {})
        return await self.svc.Create(pb.CreateTaskRequest(
            id=cid, bundle=str(self.bundle(cid, **spec)), **kw))

    async def start(self, cid: str = "c1", exec_id: str = "") -> pb.StartResponse:
        return await self.svc.Start(pb.StartRequest(id=cid, exec_id=exec_id))

    async def exec(self, cid: str, exec_id: str, args: list[str] | None = None,
                   **kw: Any) -> None:
        spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                           value=json.dumps({"args": args or ["true"], "cwd": "/"}).encode())
        await self.svc.Exec(pb.ExecProcessRequest(id=cid, exec_id=exec_id, spec=spec, **kw))

    async def state(self, cid: str = "c1", exec_id: str = "") -> pb.StateResponse:
        return await self.svc.State(pb.StateRequest(id=cid, exec_id=exec_id))

    async def wait(self, cid: str = "c1", exec_id: str = "") -> pb.WaitResponse:
        return await asyncio.wait_for(self.svc.Wait(pb.WaitRequest(id=cid, exec_id=exec_id)), 5)

    async def kill(self, cid: str = "c1", sig: int = signal.SIGTERM, exec_id: str = "",
                   all: bool = False) -> None:
        await self.svc.Kill(pb.KillRequest(id=cid, exec_id=exec_id, signal=sig, all=all))

    async def delete(self, cid: str = "c1", exec_id: str = "") -> pb.DeleteResponse:
        return await self.svc.Delete(pb.DeleteRequest(id=cid, exec_id=exec_id))


@pytest.fixture
def shim(tmp_path: Path) -> Shim:
    return Shim(tmp_path)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- sequences --------------------------------------------------------------------------


async def test_create_start_exit_wait_delete(shim: Shim) -> None:
    assert (await shim.create(spec={"hostname": "web"})).pid == VM_PID
    # The first Create boots the pod's sandbox, in containerd's namespace.
    assert shim.factory.called("create") == [
        ("c1", {"hostname": "web", "netns": "", "namespace": "k8s.io"})]
    assert (await shim.state()).status == tt.CREATED
    assert (await shim.start()).pid == VM_PID
    st = await shim.state()
    assert (st.status, st.pid, st.bundle) == (tt.RUNNING, VM_PID, str(shim.bundle("c1")))

    shim.agent.exit("c1", code=3)
    wait = await shim.wait()
    assert wait.exit_status == 3 and wait.exited_at.ToNanoseconds() > 0
    st = await shim.state()
    assert (st.status, st.exit_status) == (tt.STOPPED, 3)

    deleted = await shim.delete()
    assert (deleted.exit_status, deleted.exited_at) == (3, wait.exited_at)
    assert shim.pub.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    exit_ev = shim.pub.last("/tasks/exit")
    assert isinstance(exit_ev, ev.TaskExit)
    assert (exit_ev.container_id, exit_ev.id, exit_ev.pid, exit_ev.exit_status) == (
        "c1", "c1", VM_PID, 3)
    delete_ev = shim.pub.last("/tasks/delete")
    assert isinstance(delete_ev, ev.TaskDelete) and delete_ev.exit_status == 3
    # The last container took the VM with it; Shutdown may end the shim.
    assert shim.svc.sandbox is None and shim.sandbox.state is State.STOPPED
    assert not shim.sandbox.fake_vm.running
    with pytest.raises(errors.NotFound, match="task c1 not found"):
        await shim.state()
    await shim.svc.Shutdown(pb.ShutdownRequest(id="c1"))
    assert shim.shutdown.is_set()


async def test_exec_added_started_exited_deleted(shim: Shim) -> None:
    await shim.create()
    await shim.start()
    await shim.exec("c1", "e1", ["sh", "-c", "exit 5"], terminal=True, stdout="")
    st = await shim.state(exec_id="e1")
    assert (st.status, st.exec_id, st.terminal) == (tt.CREATED, "e1", True)
    assert shim.agent.called("exec_process") == []
    assert (await shim.start(exec_id="e1")).pid == VM_PID
    assert (await shim.state(exec_id="e1")).status == tt.RUNNING
    assert shim.agent.process("c1", "e1").spec["terminal"] is True

    shim.agent.exit("c1", "e1", 5)
    assert (await shim.wait(exec_id="e1")).exit_status == 5
    assert (await shim.state()).status == tt.RUNNING  # the init runs on
    assert (await shim.delete(exec_id="e1")).exit_status == 5
    with pytest.raises(errors.NotFound, match="exec e1"):
        await shim.state(exec_id="e1")
    assert shim.pub.topics == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                               "/tasks/exec-started", "/tasks/exit"]
    exit_ev = shim.pub.last("/tasks/exit")
    assert isinstance(exit_ev, ev.TaskExit)
    assert (exit_ev.container_id, exit_ev.id, exit_ev.exit_status) == ("c1", "e1", 5)


async def test_kill_then_delete_and_killing_the_dead(shim: Shim) -> None:
    await shim.create()
    await shim.start()
    await shim.kill(sig=signal.SIGTERM)
    assert (await shim.wait()).exit_status == 128 + signal.SIGTERM
    await shim.kill(sig=signal.SIGKILL)  # like runc: no error
    await shim.kill(sig=signal.SIGTERM, all=True)
    with pytest.raises(errors.NotFound, match="already exited"):
        await shim.kill(sig=signal.SIGTERM)
    await shim.delete()


async def test_kill_of_a_created_task_ends_it_without_a_start(shim: Shim) -> None:
    await shim.create()
    await shim.kill(sig=signal.SIGKILL)
    assert (await shim.wait()).exit_status == 137
    assert (await shim.state()).status == tt.STOPPED
    assert shim.agent.called("remove_container") == [("c1",)]
    assert shim.agent.called("signal_process") == []
    await shim.delete()
    assert shim.pub.topics == ["/tasks/create", "/tasks/exit", "/tasks/delete"]


async def test_pod_vm_lives_until_its_sandbox_container_is_deleted(tmp_path: Path) -> None:
    shim = Shim(tmp_path, sandbox_id="pod")
    await shim.create("pod")
    await shim.start("pod")
    await shim.create("app", spec={"annotations": CRI})
    await shim.start("app")
    assert len(shim.factory.made) == 1  # the second container joined the pod's VM
    shim.agent.exit("app", code=0)
    await shim.wait("app")
    await shim.delete("app")
    assert shim.svc.sandbox is shim.sandbox and shim.sandbox.fake_vm.running
    await shim.svc.Shutdown(pb.ShutdownRequest(id="pod"))
    assert not shim.shutdown.is_set()  # a task is left
    # The sandbox container goes, and the VM with it (and whatever is left in it).
    await shim.create("late", spec={"annotations": CRI})
    await shim.kill("pod", signal.SIGKILL)
    await shim.wait("pod")
    await shim.delete("pod")
    assert shim.svc.sandbox is None and not shim.sandbox.fake_vm.running
    assert shim.sandbox.containers == {}
    with pytest.raises(errors.NotFound):
        await shim.state("late")


async def test_pause_resume_pids_stats_update_resize_closeio(shim: Shim) -> None:
    await shim.create()
    await shim.start()
    await shim.svc.Pause(pb.PauseRequest(id="c1"))
    assert (await shim.state()).status == tt.PAUSED
    await shim.svc.Resume(pb.ResumeRequest(id="c1"))
    assert shim.pub.topics[-2:] == ["/tasks/paused", "/tasks/resumed"]

    await shim.exec("c1", "e1")
    await shim.start(exec_id="e1")
    pids = await shim.svc.Pids(pb.PidsRequest(id="c1"))
    by_pid = {p.pid: p for p in pids.processes}
    init_pid = shim.agent.process("c1").pid
    assert not by_pid[init_pid].HasField("info")
    details = runcopts.ProcessDetails.FromString(
        by_pid[shim.agent.process("c1", "e1").pid].info.value)
    assert details.exec_id == "e1"

    shim.agent.stats_result = ContainerStats(pids_current=3)
    stats = await shim.svc.Stats(pb.StatsRequest(id="c1"))
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    assert m2.Metrics.FromString(stats.stats.value).pids.current == 3

    res = {"memory": {"limit": 64 << 20}}
    await shim.svc.Update(pb.UpdateTaskRequest(id="c1", resources=any_pb2.Any(
        value=json.dumps(res).encode())))
    assert shim.agent.resources["c1"] == [res]

    await shim.svc.ResizePty(pb.ResizePtyRequest(id="c1", exec_id="e1", width=80, height=24))
    assert shim.agent.process("c1", "e1").tty == (24, 80)
    await shim.svc.CloseIO(pb.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    assert shim.agent.process("c1", "e1").stdin_closed


# -- wrong states -------------------------------------------------------------------------


async def test_wrong_state_calls_are_clear_errors(shim: Shim) -> None:
    with pytest.raises(errors.NotFound, match="task c1 not found"):
        await shim.start()
    await shim.create()
    with pytest.raises(errors.AlreadyExists, match="task c1 already exists"):
        await shim.create()
    with pytest.raises(errors.FailedPrecondition, match="cannot exec in container c1: it is"
                       " created"):
        await shim.exec("c1", "e1")
    with pytest.raises(errors.FailedPrecondition, match="pause"):
        await shim.svc.Pause(pb.PauseRequest(id="c1"))
    await shim.start()
    with pytest.raises(errors.FailedPrecondition, match="cannot start container c1: it is"
                       " running"):
        await shim.start()
    with pytest.raises(errors.FailedPrecondition, match="cannot delete container c1: it is"
                       " running"):
        await shim.delete()
    assert (await shim.state()).status == tt.RUNNING  # refused: nothing undone
    assert shim.svc.sandbox is not None and shim.sandbox.fake_vm.running

    await shim.exec("c1", "e1")
    with pytest.raises(errors.AlreadyExists, match="exec e1 already exists"):
        await shim.exec("c1", "e1")
    with pytest.raises(errors.FailedPrecondition, match="was not started"):
        await shim.kill(exec_id="e1")
    with pytest.raises(errors.FailedPrecondition, match="not started"):
        await shim.svc.ResizePty(pb.ResizePtyRequest(id="c1", exec_id="e1", width=1, height=1))
    await shim.start(exec_id="e1")
    with pytest.raises(errors.FailedPrecondition, match="exec e1 .* it is running"):
        await shim.start(exec_id="e1")
    with pytest.raises(errors.FailedPrecondition, match="still running"):
        await shim.delete(exec_id="e1")
    with pytest.raises(errors.NotFound, match="exec nope"):
        await shim.wait(exec_id="nope")

    with pytest.raises(errors.InvalidArgument, match="exec spec is not valid JSON"):
        await shim.svc.Exec(pb.ExecProcessRequest(id="c1", exec_id="e2",
                                                  spec=any_pb2.Any(value=b"{nope")))
    with pytest.raises(errors.InvalidArgument, match="process.args"):
        await shim.svc.Exec(pb.ExecProcessRequest(id="c1", exec_id="e2",
                                                  spec=any_pb2.Any(value=b"{}")))
    with pytest.raises(errors.InvalidArgument, match="resources are not valid JSON"):
        await shim.svc.Update(pb.UpdateTaskRequest(id="c1",
                                                   resources=any_pb2.Any(value=b"[")))
    with pytest.raises(errors.FailedPrecondition, match="virtio-fs"):  # test_shim_checkpoint
        await shim.svc.Checkpoint(pb.CheckpointTaskRequest(id="c1"))
    assert "/tasks/exec-added" in shim.pub.topics
    assert shim.pub.topics.count("/tasks/exec-added") == 1  # refused Execs announce nothing
    await shim.svc.close()
    assert shim.sandbox.state is State.STOPPED


# -- rollback -----------------------------------------------------------------------------


class Mounts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mounted: list[Path] = []
        self.unmounted: list[Path] = []
        monkeypatch.setattr(rootfs, "mount_rootfs", self.mount)
        monkeypatch.setattr(rootfs, "unmount_rootfs", self.unmount)

    def mount(self, bundle: Path, items: list[rootfs.Mount]) -> bool:
        self.mounted.append(bundle)
        return bool(items)

    def unmount(self, bundle: Path) -> None:
        self.unmounted.append(bundle)


def snapshot() -> list[Any]:
    req = pb.CreateTaskRequest()
    m = req.rootfs.add()
    m.type, m.source = "overlay", "overlay"
    m.options.append("lowerdir=/l")
    return [m]


async def test_failed_create_in_the_guest_leaves_nothing(shim: Shim,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = Mounts(monkeypatch)
    shim.agent.fail("create_container", errors.Internal("guest said no"))
    with pytest.raises(errors.Internal, match="guest said no"):
        await shim.create(rootfs=snapshot())
    b = shim.bundle("c1")
    assert mounts.mounted == [b] and mounts.unmounted == [b]
    # The VM booted for this container alone is stopped again.
    assert shim.svc.sandbox is None and shim.sandbox.state is State.STOPPED
    assert shim.sandbox.tree.shared == {}
    assert shim.pub.events == []
    # containerd may try again: a new sandbox.
    await shim.create(rootfs=snapshot())
    assert len(shim.factory.made) == 2 and shim.svc.sandbox is shim.factory.made[1]
    # The rootfs this shim mounted is unmounted at delete.
    await shim.delete()
    assert mounts.unmounted == [b, b]


async def test_failed_boot_unmounts_the_rootfs(shim: Shim,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = Mounts(monkeypatch)
    shim.factory.fail("create", errors.VMLaunchError("qemu died", argv=["qemu"]))
    with pytest.raises(errors.VMLaunchError):
        await shim.create(rootfs=snapshot())
    assert mounts.unmounted == [shim.bundle("c1")]
    assert shim.svc.sandbox is None and shim.pub.events == []


async def test_impossible_limits_are_refused_before_a_vm_boots(
        shim: Shim, monkeypatch: pytest.MonkeyPatch) -> None:
    mounts = Mounts(monkeypatch)
    shim.svc.config.vm.default_maxmemory = 4096
    spec = {"linux": {"resources": {"memory": {"limit": 8192 << 20}}}}
    with pytest.raises(errors.InvalidArgument,
                       match="memory limit of 8192 MiB is impossible: .* at most 4096 MiB"):
        await shim.create(rootfs=snapshot(), spec=spec)
    assert shim.factory.made == []  # no VM was asked for
    assert mounts.unmounted == [shim.bundle("c1")]
    assert shim.svc.sandbox is None and shim.pub.events == []


async def test_failed_second_container_keeps_the_pod(tmp_path: Path) -> None:
    shim = Shim(tmp_path, sandbox_id="pod")
    await shim.create("pod")
    shim.agent.fail("create_container", errors.InvalidArgument("bad spec"))
    with pytest.raises(errors.InvalidArgument):
        await shim.create("app", spec={"annotations": CRI})
    assert shim.svc.sandbox is shim.sandbox and shim.sandbox.fake_vm.running
    assert list(shim.sandbox.containers) == ["pod"]


async def test_runtime_options_choose_the_configuration(shim: Shim) -> None:
    opts = rtopts.Options(config_body=b"[runtime]\nenable_debug = true\n")
    await shim.create(options=any_pb2.Any(type_url="runtimeoptions.v1.Options",
                                          value=opts.SerializeToString()))
    assert shim.svc.config.runtime.enable_debug
    assert shim.sandbox.config is shim.svc.config


# -- ordering -----------------------------------------------------------------------------


async def test_exit_is_published_before_wait_returns(shim: Shim) -> None:
    await shim.create()
    await shim.start()
    seen: list[list[str]] = []

    async def waiter() -> None:
        await shim.wait()
        seen.append(list(shim.pub.topics))

    w = asyncio.ensure_future(waiter())
    await settle()
    assert not w.done()
    shim.agent.exit("c1", code=0)
    await asyncio.wait_for(w, 5)
    assert seen == [["/tasks/create", "/tasks/start", "/tasks/exit"]]


async def test_oom_is_published_just_before_the_exit(shim: Shim) -> None:
    await shim.create()
    await shim.start()
    shim.agent.exit("c1", code=137, oom_killed=True)
    await shim.wait()
    assert shim.pub.topics[-2:] == ["/tasks/oom", "/tasks/exit"]
    oom = shim.pub.last("/tasks/oom")
    assert isinstance(oom, ev.TaskOOM) and oom.container_id == "c1"


async def test_output_reaches_the_fifo_before_the_exit(shim: Shim, tmp_path: Path) -> None:
    out = tmp_path / "stdout"
    os.mkfifo(out)
    reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await shim.create(stdout=str(out))
        assert (await shim.state()).stdout == str(out)
        await shim.start()
        shim.agent.output("c1", "", b"hello ")
        shim.agent.output("c1", "", b"world\n")
        shim.agent.exit("c1", code=0)
        await shim.wait()
        assert os.read(reader, 4096) == b"hello world\n"
    finally:
        await shim.svc.close()
        os.close(reader)
