"""The shim's Checkpoint (containerd's CheckpointTask) over the fakes, with the
real runtime.checkpoint: a pod whose VM cannot be saved is refused before
anything changes; a checkpoint quiesces the agent, saves and runs the pod
again; the waits the quiesce ended are made again, never reported as exits;
a failure leaves the pod running and the directory as it was."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from pykata import config, errors, wire
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt
from pykata.runtime import checkpoint
from pykata.shim.service import TaskService, checkpoint_exit
from pykata.testing import default_spec
from pykata.testing.fakes import FakeAgent, FakePublisher, FakeSandbox, FakeSandboxFactory

RUNC_OPTS = "type.googleapis.com/containerd.runc.v1.CheckpointOptions"


class Shim:
    def __init__(self, tmp_path: Path, sandbox_id: str = "c1") -> None:
        self.tmp = tmp_path
        self.pub = FakePublisher()
        self.factory = FakeSandboxFactory(tmp_path / "state")
        self.svc = TaskService(sandbox_id, "default", config.Config(), self.pub,
                               asyncio.Event(), make_sandbox=self.factory)

    @property
    def agent(self) -> FakeAgent:
        return self.factory.agent

    @property
    def sandbox(self) -> FakeSandbox:
        return self.factory.made[-1]

    async def run(self, cid: str = "c1", **spec: object) -> None:
        b = self.tmp / f"bundle-{cid}"
        (b / "rootfs").mkdir(parents=True, exist_ok=True)
        (b / "config.json").write_text(json.dumps({**default_spec(["sh"]), **spec}))
        await self.svc.Create(pb.CreateTaskRequest(id=cid, bundle=str(b)))
        await self.svc.Start(pb.StartRequest(id=cid))

    def saveable(self) -> Path:
        """Give the pod's fake VM what a checkpointable VM has: RAM in a file
        (sparse: 8 KiB of data in 64 MiB)."""
        mem = self.tmp / "vm.mem"
        with open(mem, "wb") as f:
            f.truncate(64 << 20)
            f.seek(1 << 20)
            f.write(b"\x5a" * 8192)
        spec = self.sandbox.fake_vm.spec
        spec.memory_file = mem
        spec.shared_fs_socket = None  # shared_fs = "none"
        return mem

    def dest(self) -> Path:
        d = self.tmp / "ckpt"
        d.mkdir(exist_ok=True)
        return d

    async def checkpoint(self, cid: str = "c1", exit_after: bool | None = None,
                         path: Path | None = None) -> None:
        opts = any_pb2.Any()
        if exit_after is not None:
            opts = any_pb2.Any(type_url=RUNC_OPTS, value=runcopts.CheckpointOptions(
                exit=exit_after, file_locks=True).SerializeToString())
        await self.svc.Checkpoint(pb.CheckpointTaskRequest(
            id=cid, path=str(path or self.dest()), options=opts))


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_virtio_fs_pod_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    assert shim.sandbox.fake_vm.spec.shared_fs_socket is not None  # the default: virtio-fs
    with pytest.raises(errors.FailedPrecondition) as refused:
        await shim.checkpoint()
    msg = str(refused.value)
    assert "\n" not in msg
    assert msg.startswith("cannot checkpoint sandbox c1: its VM has a virtio-fs device")
    assert 'shared_fs = "none"' in msg
    # Refused before anything changed: no quiesce, the VM never stopped, nothing written.
    assert shim.agent.called("prepare_checkpoint") == []
    assert not any(name in ("save_to", "pause") for name, _ in shim.sandbox.fake_vm.calls)
    assert os.listdir(shim.dest()) == []
    assert shim.sandbox.resumed.is_set()
    assert (await shim.svc.State(pb.StateRequest(id="c1"))).status == tt.RUNNING
    assert "/tasks/exit" not in shim.pub.topics


async def test_a_pod_with_ram_not_in_a_file_is_refused(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    shim.sandbox.fake_vm.spec.shared_fs_socket = None
    with pytest.raises(errors.FailedPrecondition, match="RAM is not in a file"):
        await shim.checkpoint()
    assert shim.agent.called("prepare_checkpoint") == []


async def test_only_the_pods_sandbox_container_is_checkpointed(tmp_path: Path) -> None:
    shim = Shim(tmp_path, sandbox_id="pod")
    await shim.run("pod")
    await shim.run("app", annotations={"io.kubernetes.cri.container-type": "container",
                                       "io.kubernetes.cri.sandbox-id": "pod"})
    shim.saveable()
    with pytest.raises(errors.FailedPrecondition,
                       match="checkpoint the pod's sandbox container .pod.; pykata"
                             " checkpoints whole pods"):
        await shim.checkpoint("app")
    with pytest.raises(errors.NotFound):
        await shim.checkpoint("nope")


def test_runc_options_decode_to_exit() -> None:
    assert checkpoint_exit(any_pb2.Any()) is False
    for want in (True, False):
        opts = any_pb2.Any(type_url=RUNC_OPTS, value=runcopts.CheckpointOptions(
            exit=want, open_tcp=True, file_locks=True).SerializeToString())
        assert checkpoint_exit(opts) is want
    with pytest.raises(errors.InvalidArgument, match="image_path is not supported"):
        checkpoint_exit(any_pb2.Any(type_url=RUNC_OPTS, value=runcopts.CheckpointOptions(
            image_path="/x").SerializeToString()))
    with pytest.raises(errors.InvalidArgument, match="not understood"):
        checkpoint_exit(any_pb2.Any(type_url="type.googleapis.com/x.Other", value=b""))
    with pytest.raises(errors.InvalidArgument, match="undecodable"):
        checkpoint_exit(any_pb2.Any(type_url=RUNC_OPTS, value=b"\xff\xff"))


async def test_checkpoint_leaves_the_pod_running_and_waits_are_made_again(
        tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    shim.saveable()
    proc = shim.sandbox.container("c1").init
    await settle()
    assert len(shim.agent.called("wait_process")) == 1  # the process watch, pending
    reading = asyncio.ensure_future(proc.read_stdout())
    await settle()

    await shim.checkpoint()

    dest = shim.dest()
    assert sorted(os.listdir(dest)) == sorted(checkpoint.FILES)
    m = checkpoint.read_manifest(dest)
    assert [c.id for c in m.containers] == ["c1"] and m.containers[0].state == "running"
    assert m.memory.data_bytes == 8192 and m.extra["sandbox_id"] == "c1"
    calls = [name for name, _ in shim.agent.calls]
    assert calls.index("prepare_checkpoint") < calls.index("finish_checkpoint")
    (time_ns, seed_len), = shim.agent.called("finish_checkpoint")
    assert time_ns > 0 and seed_len == 64
    vm_calls = [name for name, _ in shim.sandbox.fake_vm.calls]
    assert vm_calls.index("save_to") < vm_calls.index("resume")
    assert not shim.sandbox.fake_vm.paused and shim.sandbox.resumed.is_set()

    # The pending wait was ended by the quiesce and made again: no exit.
    await settle()
    assert len(shim.agent.called("wait_process")) == 2
    assert "/tasks/exit" not in shim.pub.topics
    assert (await shim.svc.State(pb.StateRequest(id="c1"))).status == tt.RUNNING
    # The pending read goes on too: output written after the checkpoint arrives.
    assert not reading.done()
    shim.agent.output("c1", "", b"after\n")
    assert await asyncio.wait_for(reading, 5) == b"after\n"
    # And the real exit is reported once, with its own status.
    shim.agent.exit("c1", code=7)
    wait = await asyncio.wait_for(shim.svc.Wait(pb.WaitRequest(id="c1")), 5)
    assert wait.exit_status == 7
    assert shim.pub.topics.count("/tasks/exit") == 1


async def test_a_wait_ended_while_quiesced_holds_until_unquiesced(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    sb = shim.sandbox
    await settle()
    await sb.quiesce()
    await settle()
    assert not sb.resumed.is_set()
    shim.agent.exit("c1", code=3)  # exits while the pod is quiesced
    await settle()
    assert "/tasks/exit" not in shim.pub.topics  # nobody asks the agent now
    await sb.unquiesce()
    wait = await asyncio.wait_for(shim.svc.Wait(pb.WaitRequest(id="c1")), 5)
    assert wait.exit_status == 3
    assert shim.pub.topics.count("/tasks/exit") == 1


async def test_a_failed_save_runs_the_pod_again_and_leaves_the_directory_empty(
        tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    shim.saveable()
    vm = shim.sandbox.fake_vm
    vm.failures["save_to"] = [errors.Internal("migration failed: boom")]
    (shim.dest() / "keep").write_text("not ours")
    with pytest.raises(errors.Internal) as failed:
        await shim.checkpoint()
    assert str(failed.value) == "cannot checkpoint sandbox c1: migration failed: boom"
    assert os.listdir(shim.dest()) == ["keep"]
    assert shim.agent.called("finish_checkpoint") and not shim.agent.quiesced
    assert shim.sandbox.resumed.is_set() and not vm.paused
    await settle()
    assert "/tasks/exit" not in shim.pub.topics
    assert (await shim.svc.State(pb.StateRequest(id="c1"))).status == tt.RUNNING
    # It can be checkpointed again once the cause is gone.
    (shim.dest() / "keep").unlink()
    await shim.checkpoint()
    assert sorted(os.listdir(shim.dest())) == sorted(checkpoint.FILES)


async def test_a_directory_that_is_not_there_is_refused(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    shim.saveable()
    with pytest.raises(errors.InvalidArgument, match="is not a directory"):
        await shim.checkpoint(path=tmp_path / "missing")
    assert shim.agent.called("prepare_checkpoint") == []


async def test_checkpoint_with_exit_stops_the_pod_with_137(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    shim.saveable()
    await shim.checkpoint(exit_after=True)
    assert sorted(os.listdir(shim.dest())) == sorted(checkpoint.FILES)
    assert shim.agent.called("finish_checkpoint") == []  # never runs again
    assert not shim.sandbox.fake_vm.running
    wait = await asyncio.wait_for(shim.svc.Wait(pb.WaitRequest(id="c1")), 5)
    assert wait.exit_status == 137
    exit_ev = shim.pub.last("/tasks/exit")
    assert isinstance(exit_ev, ev.TaskExit) and exit_ev.exit_status == 137
    # containerd deletes the task as after any exit; the pod's state goes with it.
    await shim.svc.Delete(pb.DeleteRequest(id="c1"))
    assert shim.svc.sandbox is None and not shim.sandbox.dir.exists()


async def checkpointed(tmp_path: Path) -> tuple[Path, bytes]:
    """A checkpoint of pod c1 taken with exit (as pykata-runtime asks), its
    task deleted: the directory, and the RAM file's content."""
    shim = Shim(tmp_path / "before")
    await shim.run()
    mem = shim.saveable()
    ram = mem.read_bytes()
    dest = tmp_path / "ctrd-checkpoint123"
    dest.mkdir()
    await shim.checkpoint(exit_after=True, path=dest)
    await shim.svc.Delete(pb.DeleteRequest(id="c1"))
    return dest, ram


async def restoring_shim(tmp_path: Path, running: str = "c1") -> Shim:
    """A new shim whose (fake) guest runs ``running``, as the restored VM's would."""
    shim = Shim(tmp_path / "after")
    shim.svc._restore_sandbox = shim.factory.restore
    await shim.agent.create_container(running, {"process": {"args": ["sh"]}})
    await shim.agent.start_container(running)
    shim.agent.calls.clear()
    return shim


def bundle(tmp_path: Path, cid: str = "c1") -> Path:
    b = tmp_path / f"bundle-restore-{cid}"
    (b / "rootfs").mkdir(parents=True, exist_ok=True)
    (b / "config.json").write_text(json.dumps(default_spec(["sh"])))
    return b


async def test_create_from_a_checkpoint_restores_the_vm_and_start_runs_it(
        tmp_path: Path) -> None:
    dest, ram = await checkpointed(tmp_path)
    shim = await restoring_shim(tmp_path)
    await shim.svc.Create(pb.CreateTaskRequest(id="c1", bundle=str(bundle(tmp_path)),
                                               checkpoint=str(dest)))
    sb = shim.sandbox
    assert shim.factory.called("restore")[0][0] == "c1"
    assert shim.factory.called("create") == []  # no boot
    vm = sb.fake_vm
    assert [n for n, _ in vm.calls] == ["start", "load"] and vm.paused
    assert vm.loaded == vm.vmstate and vm.spec.incoming
    # The RAM is the sandbox's own file now (holes kept); containerd's copy went.
    assert vm.spec.memory_file is not None and vm.spec.memory_file.read_bytes() == ram
    assert not (dest / checkpoint.MEMORY).exists()
    # Created for containerd; nothing asked of the agent while the VM is paused.
    assert (await shim.svc.State(pb.StateRequest(id="c1"))).status == tt.CREATED
    assert shim.agent.calls == []
    assert shim.pub.topics == ["/tasks/create"]

    await shim.svc.Start(pb.StartRequest(id="c1"))
    assert not vm.paused
    names = [n for n, _ in shim.agent.calls]
    assert names[:2] == ["check", "finish_checkpoint"]
    (time_ns, seed_len), = shim.agent.called("finish_checkpoint")
    assert time_ns > 0 and seed_len == 64
    assert shim.agent.called("start_container") == []  # it runs already
    assert (await shim.svc.State(pb.StateRequest(id="c1"))).status == tt.RUNNING
    await settle()
    assert shim.agent.called("wait_process") == [("c1", "")]
    shim.agent.exit("c1", code=4)
    wait = await asyncio.wait_for(shim.svc.Wait(pb.WaitRequest(id="c1")), 5)
    assert wait.exit_status == 4
    assert shim.pub.topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    await shim.svc.Delete(pb.DeleteRequest(id="c1"))
    assert not sb.dir.exists() and not vm.spec.memory_file.exists()


async def test_a_checkpoint_from_another_guest_image_is_refused_and_nothing_is_left(
        tmp_path: Path) -> None:
    dest, _ = await checkpointed(tmp_path)
    doc = json.loads((dest / checkpoint.MANIFEST).read_text())
    doc["guest_image"]["digest"] = "9adf748aa75a1311"
    (dest / checkpoint.MANIFEST).write_text(json.dumps(doc))
    shim = await restoring_shim(tmp_path)
    with pytest.raises(errors.FailedPrecondition) as refused:
        await shim.svc.Create(pb.CreateTaskRequest(id="c1", bundle=str(bundle(tmp_path)),
                                                   checkpoint=str(dest)))
    msg = str(refused.value)
    assert "\n" not in msg and "guest_image.digest" in msg and "9adf748aa75a1311" in msg
    assert shim.svc.sandbox is None and shim.pub.topics == []
    state = tmp_path / "after" / "state"
    assert not state.exists() or not any(p.is_file() for p in state.rglob("*"))


async def test_a_truncated_vmstate_is_refused(tmp_path: Path) -> None:
    dest, _ = await checkpointed(tmp_path)
    with open(dest / checkpoint.VMSTATE, "r+b") as f:
        f.truncate(3)
    shim = await restoring_shim(tmp_path)
    with pytest.raises(errors.FailedPrecondition, match="truncated or damaged"):
        await shim.svc.Create(pb.CreateTaskRequest(id="c1", bundle=str(bundle(tmp_path)),
                                                   checkpoint=str(dest)))
    assert shim.svc.sandbox is None


async def test_restore_under_another_id_is_refused(tmp_path: Path) -> None:
    dest, _ = await checkpointed(tmp_path)
    shim = Shim(tmp_path / "other", sandbox_id="c2")
    shim.svc._restore_sandbox = shim.factory.restore
    with pytest.raises(errors.FailedPrecondition, match="under the same id"):
        await shim.svc.Create(pb.CreateTaskRequest(id="c2", bundle=str(bundle(tmp_path, "c2")),
                                                   checkpoint=str(dest)))
    assert shim.svc.sandbox is None and shim.factory.made == []


async def test_create_from_a_checkpoint_into_a_running_pod_is_refused(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    await shim.run()
    with pytest.raises(errors.FailedPrecondition, match="into a running pod"):
        await shim.svc.Create(pb.CreateTaskRequest(id="c9", bundle=str(bundle(tmp_path, "c9")),
                                                   checkpoint="/tmp/ctrd-checkpoint1"))
    with pytest.raises(errors.Unimplemented, match="pre-dump"):
        await shim.svc.Create(pb.CreateTaskRequest(id="c9", bundle=str(bundle(tmp_path, "c9")),
                                                   parent_checkpoint="/x"))
    assert shim.pub.topics == ["/tasks/create", "/tasks/start"]


def test_the_marker_is_one_plain_line() -> None:
    assert wire.QUIESCED.isprintable() and len(wire.QUIESCED) < 100
