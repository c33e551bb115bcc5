"""Faults seen from the host, over fakes (tests/integration/test_faults.py does
it for real): the VM or virtiofsd dying under a sandbox (runtime/watchdog.py),
the VMM's pid recorded before it answers, events waiting out a containerd
restart (shim/events.py), and output fifos whose reader goes and comes back
(shim/stdio.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from pykata import errors
from pykata.hypervisor.base import Hypervisor, VMSpec
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_eventsvc_pb2 as evsvc
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import watchdog
from pykata.runtime.container import LOST_STATUS
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.state import SandboxRecord
from pykata.runtime.types import State
from pykata.shim import events
from pykata.shim.service import TaskService
from pykata.shim.stdio import FifoOut
from pykata.testing.fakes import (
    FakeAgent,
    FakeDriver,
    FakeHypervisor,
    FakeSandbox,
    FakeSandboxFactory,
    fake_config,
    fake_parts,
)
from pykata.ttrpc import Server
from tests.unit.test_shim_service import Shim


class ClosingAgent(FakeAgent):
    """A fake agent whose close() is a real connection's end: every process still
    waited for fails with Unavailable, its output streams end."""

    async def close(self) -> None:
        await super().close()
        for p in self.procs.values():
            if p.started and not p.exit.done():
                p.stdout.put_nowait(b"")
                p.stderr.put_nowait(b"")
                p.exit.set_exception(errors.Unavailable("ttrpc client closed"))


async def until(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- the watchdog ------------------------------------------------------------------------


class FakeVirtiofsd:
    def __init__(self) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


def test_status_and_console_words() -> None:
    assert watchdog.status_text(0) == "status 0"
    assert watchdog.status_text(-9) == "killed by SIGKILL"
    assert watchdog.status_text(-200) == "killed by signal 200"
    console = ("[  1.0] booting\n[  9.1] sysrq: Trigger a crash\n"
               "[  9.1] Kernel panic - not syncing: sysrq triggered crash\x1b[0m\n"
               "[  9.2] ---[ end trace ]---\n")
    assert watchdog.guest_last_words(console) == \
        "Kernel panic - not syncing: sysrq triggered crash?[0m"
    assert watchdog.guest_last_words("a\nlast words\n\n") == "last words"
    assert watchdog.guest_last_words("") == ""
    long = watchdog.guest_last_words("x" * 1000)
    assert len(long) == watchdog.REASON_MAX + 3 and long.endswith("...")


async def watched(tmp_path: Path, fs: FakeVirtiofsd | None, console: str = ""
                  ) -> tuple[FakeHypervisor, watchdog.Watchdog, list[str]]:
    """A started fake VM (its console log holding ``console``), a started
    watchdog over it and ``fs``, and the list the watchdog's reasons go to."""
    vm = FakeHypervisor(VMSpec(id="p", run_dir=tmp_path, kernel=Path("/k")))
    await vm.start()
    if console:
        (tmp_path / "console.log").write_text(console)
    said: list[str] = []

    async def failed(reason: str) -> None:
        said.append(reason)

    dog = watchdog.Watchdog("p", vm, fs, failed)
    dog.start()
    return vm, dog, said


async def test_virtiofsd_death_stops_the_vm_and_says_why(tmp_path: Path) -> None:
    fs = FakeVirtiofsd()
    vm, dog, said = await watched(tmp_path, fs)
    await asyncio.sleep(0)
    assert not said and vm.running
    fs.exited.set_result(-9)
    await until(lambda: said)
    assert not vm.running and ("stop", (watchdog.STOP_TIMEOUT,)) in vm.calls
    assert said == ["virtiofsd exited (killed by SIGKILL): the guest lost its shared files,"
                    " so its VM was stopped"]
    assert dog.fired and dog.reason == said[0]


async def test_a_vm_death_names_the_guest_panic(tmp_path: Path) -> None:
    vm, _, said = await watched(tmp_path, None, "Kernel panic - not syncing: Attempted to"
                                " kill init! exitcode=0x0000000b\nRebooting in 0 seconds..\n")
    vm.die(0)
    await until(lambda: said)
    assert said == ["its VM exited unexpectedly (status 0); guest console: Kernel panic - not"
                    " syncing: Attempted to kill init! exitcode=0x0000000b"]


async def test_virtiofsd_ending_because_the_vm_died_names_the_vm(tmp_path: Path) -> None:
    """A guest panic ends QEMU, and virtiofsd with it (status 0, its peer gone);
    seen in either order, the reason is the VM's."""
    fs = FakeVirtiofsd()
    vm, _, said = await watched(tmp_path, fs,
                                "Kernel panic - not syncing: sysrq triggered crash\n")
    await asyncio.sleep(0)
    fs.exited.set_result(0)  # noticed first
    await asyncio.sleep(0.1)
    vm.die(0)
    await until(lambda: said)
    assert said == ["its VM exited unexpectedly (status 0); guest console: Kernel panic - not"
                    " syncing: sysrq triggered crash"]
    assert ("stop", (watchdog.STOP_TIMEOUT,)) not in vm.calls


async def test_the_panic_line_is_found_above_a_long_trace(tmp_path: Path) -> None:
    trace = "".join(f"[    6.3] R{i:02}: ffffffff{i:08x} frame\n" for i in range(100))
    vm, _, said = await watched(
        tmp_path, None, "[    6.2] Kernel panic - not syncing: sysrq triggered crash\n"
        + trace + "[    6.34] Kernel Offset: disabled\n")
    vm.die(0)
    await until(lambda: said)
    assert said[0].endswith("guest console: Kernel panic - not syncing: sysrq triggered crash")


async def test_a_stopped_watchdog_says_nothing(tmp_path: Path) -> None:
    vm, dog, said = await watched(tmp_path, FakeVirtiofsd())
    await dog.stop()
    await vm.stop()
    await asyncio.sleep(0.05)
    assert not said and not dog.fired


# -- a sandbox whose VM dies -----------------------------------------------------------


def bundle(tmp_path: Path, name: str) -> Path:
    import json

    from pykata.testing import default_spec

    b = tmp_path / name
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(default_spec(["sh"])))
    return b


async def test_vm_death_ends_every_process_with_255_and_refuses_containers(
        tmp_path: Path) -> None:
    agent = ClosingAgent()
    driver = FakeDriver()
    sb = await Sandbox.create("pod", fake_config(tmp_path / "state"),
                              parts=fake_parts(agent, driver))
    c = await sb.create_container("c1", bundle(tmp_path, "b1"))
    await c.start()
    e = await c.exec("e1", {"args": ["sleep", "1"]})
    unstarted = await sb.create_container("c0", bundle(tmp_path, "b0"))
    before = time.time_ns()
    driver.made[0].die(-9)
    init_exit = await asyncio.wait_for(c.wait(), 5)
    exec_exit = await asyncio.wait_for(e.wait(), 5)
    never_ran = await asyncio.wait_for(unstarted.wait(), 5)
    assert init_exit.code == exec_exit.code == never_ran.code == LOST_STATUS == 255
    assert min(init_exit.exited_at_ns, exec_exit.exited_at_ns, never_ran.exited_at_ns) >= before
    assert c.state is unstarted.state is State.STOPPED and agent.closed
    assert sb.failure == "its VM exited unexpectedly (killed by SIGKILL)"
    with pytest.raises(errors.Unavailable, match="cannot create container c2: sandbox pod"
                       " failed: its VM exited unexpectedly"):
        await sb.create_container("c2", bundle(tmp_path, "b2"))
    assert sorted(sb.containers) == ["c0", "c1"]
    await sb.stop()
    assert not sb.dir.exists()


async def test_a_vm_dying_during_create_is_the_error(tmp_path: Path) -> None:
    driver = FakeDriver()

    class DyingBoot(ClosingAgent):
        async def create_sandbox(self, *args: object, **kw: object) -> None:
            driver.made[0].die(-9)
            raise errors.Unavailable("ttrpc connection closed by peer")

    cfg = fake_config(tmp_path / "state")
    with pytest.raises(errors.Unavailable) as ei:
        await Sandbox.create("pod", cfg, parts=fake_parts(DyingBoot(), driver))
    assert str(ei.value) == ("sandbox pod failed while starting: its VM exited unexpectedly"
                             " (killed by SIGKILL)")
    assert not (tmp_path / "state" / "sbs" / "default" / "pod").exists()


async def test_a_healthy_sandbox_keeps_its_own_errors(tmp_path: Path) -> None:
    agent = FakeAgent()
    agent.fail("create_sandbox", errors.InvalidArgument("guest said no"))
    with pytest.raises(errors.InvalidArgument, match="^guest said no$"):
        await Sandbox.create("pod", fake_config(tmp_path / "state"), parts=fake_parts(agent))


async def test_the_vmm_pid_is_recorded_as_soon_as_it_is_spawned(tmp_path: Path) -> None:
    """A shim killed while its VM boots leaves the VMM's pid in state.json."""
    seen: list[object] = []

    class SlowVM(FakeHypervisor):
        async def start(self) -> None:
            await super().start()
            assert self.on_spawn is not None
            self.on_spawn(os.getpid())  # a live pid: ProcRef.of records it
            seen.append(SandboxRecord.load(self.spec.run_dir).vmm)

    class SlowDriver(FakeDriver):
        def vm(self, spec: VMSpec) -> Hypervisor:
            vm = SlowVM(spec, pid=4242)
            self.made.append(vm)
            return vm

    sb = await Sandbox.create("pod", fake_config(tmp_path / "state"),
                              parts=fake_parts(FakeAgent(), SlowDriver()))
    assert seen and isinstance(seen[0], dict) and seen[0]["pid"] == os.getpid()
    await sb.stop()


# -- through the shim ------------------------------------------------------------------


async def test_the_shim_publishes_exit_255_and_refuses_a_new_container(
        tmp_path: Path) -> None:
    shim = Shim(tmp_path, "pod")
    shim.factory = FakeSandboxFactory(tmp_path / "state", agent=ClosingAgent())
    shim.svc = TaskService("pod", "k8s.io", shim.svc.config, shim.pub, shim.shutdown,
                           make_sandbox=shim.factory)
    await shim.create("pod")
    await shim.start("pod")
    sb: FakeSandbox = shim.sandbox
    vm = sb.fake_vm
    before = time.time_ns()
    vm.die(-9)
    w = await shim.wait("pod")
    assert w.exit_status == 255 and w.exited_at.ToNanoseconds() >= before
    exit_ev = shim.pub.last("/tasks/exit")
    assert isinstance(exit_ev, ev.TaskExit)
    assert exit_ev.exit_status == 255 and exit_ev.exited_at.ToNanoseconds() >= before
    with pytest.raises(errors.Unavailable, match="cannot create container c2: sandbox pod"
                       " failed: its VM exited unexpectedly"):
        await shim.svc.Create(pb.CreateTaskRequest(
            id="c2", bundle=str(shim.bundle("c2", annotations={
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "pod"}))))
    d = await shim.delete("pod")
    assert d.exit_status == 255
    assert shim.svc.sandbox is None and not sb.dir.exists()


async def test_a_vm_dying_while_create_hooks_run_fails_the_create(tmp_path: Path) -> None:
    shim = Shim(tmp_path, "pod")
    marker = tmp_path / "hook-ran"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"touch {marker}; sleep 0.3"]}
    create = asyncio.ensure_future(shim.create("pod", spec={"hooks": {"prestart": [hook]}}))
    await until(marker.exists)
    shim.sandbox.fake_vm.die(-9)
    with pytest.raises(errors.Unavailable, match="cannot create container pod: sandbox pod"
                       " failed: its VM exited unexpectedly"):
        await create
    assert shim.svc.sandbox is None and not shim.sandbox.dir.exists()


# -- events across a containerd restart -----------------------------------------------


class EventSink:
    def __init__(self) -> None:
        self.topics: list[str] = []

    async def Forward(self, req: evsvc.ForwardRequest) -> empty_pb2.Empty:
        self.topics.append(req.envelope.topic)
        return empty_pb2.Empty()


async def _containerd(path: Path, sink: EventSink) -> Server:
    server = Server()
    server.register_service(evsvc.DESCRIPTOR.services_by_name["Events"], sink)
    await server.serve_unix(path)
    return server


async def test_events_wait_for_containerd_to_come_back(tmp_path: Path) -> None:
    path = tmp_path / "containerd.sock.ttrpc"
    sink = EventSink()
    server = await _containerd(path, sink)
    pub = events.Publisher(f"unix://{path}", "ns")
    pub.start()
    pub.publish("/tasks/start", ev.TaskStart(container_id="a"))
    await until(lambda: sink.topics == ["/tasks/start"])
    await server.close()  # containerd goes away ...
    path.unlink()
    pub.publish("/tasks/exit", ev.TaskExit(container_id="a", exit_status=255))
    pub.publish("/tasks/delete", ev.TaskDelete(container_id="a"))
    await asyncio.sleep(0.5)
    server = await _containerd(path, sink)  # ... and comes back at the same address
    await until(lambda: len(sink.topics) == 3)
    assert sink.topics == ["/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert pub.dropped == 0
    await pub.close()
    await server.close()


async def test_events_are_dropped_after_the_grace_and_later_ones_do_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "OUTAGE_GRACE", 0.3)
    pub = events.Publisher(f"unix://{tmp_path / 'nobody'}", "ns")
    pub.start()
    pub.publish("/tasks/exit", ev.TaskExit(container_id="a"))
    await until(lambda: pub.dropped == 1)
    t0 = time.monotonic()
    pub.publish("/tasks/delete", ev.TaskDelete(container_id="a"))
    await until(lambda: pub.dropped == 2)
    assert time.monotonic() - t0 < 0.3  # one attempt: the outage is older than the grace
    sink = EventSink()
    server = await _containerd(tmp_path / "nobody", sink)
    pub.publish("/tasks/start", ev.TaskStart(container_id="b"))
    await until(lambda: sink.topics == ["/tasks/start"])
    await pub.close()
    await server.close()


# -- output fifos whose reader goes and comes back ----------------------------------------


async def test_output_resumes_when_the_fifo_has_a_reader_again(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    out = await FifoOut.open(str(fifo))
    try:
        await out.write(b"before ")
        assert os.read(reader, 100) == b"before "
        os.close(reader)  # containerd goes away
        await out.write(b"while away ")
        assert out.dropped == len(b"while away ")
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # and comes back
        await out.write(b"after")
        assert os.read(reader, 100) == b"after"
    finally:
        out.close()
        os.close(reader)


async def test_a_slow_reader_gets_everything(tmp_path: Path) -> None:
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    out = await FifoOut.open(str(fifo))
    data = os.urandom(1 << 20)  # more than the pipe holds: the writer waits
    got = bytearray()

    async def read() -> None:
        while len(got) < len(data):
            try:
                got.extend(os.read(reader, 65536))
            except BlockingIOError:
                await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(asyncio.gather(out.write(data), read()), 10)
        assert bytes(got) == data and out.dropped == 0
    finally:
        out.close()
        os.close(reader)
