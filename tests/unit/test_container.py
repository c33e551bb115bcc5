"""Container and Process state machines, driven through pykata.testing.fakes (no
VM): lifecycle, wrong-state calls, rollback of a failed create, exit ordering."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from pykata import errors
from pykata.runtime.container import Container, PodSettings, Process
from pykata.runtime.types import ExitStatus, State, Stdio
from pykata.testing import default_spec
from pykata.testing.fakes import FakeAgent, FakeIO, FakeSandbox


def make_bundle(tmp_path: Path, args: list[str] | None = None, name: str = "b",
                **spec_kw: Any) -> Path:
    b = tmp_path / name
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(default_spec(args or ["sh"], **spec_kw)))
    return b


@pytest.fixture
async def sandbox(tmp_path: Path) -> FakeSandbox:
    return await FakeSandbox.running("pod", state_dir=tmp_path / "state")


@pytest.fixture
def agent(sandbox: FakeSandbox) -> FakeAgent:
    return sandbox.fake_agent


async def created(sandbox: FakeSandbox, tmp_path: Path, cid: str = "c1") -> Container:
    return await sandbox.create_container(cid, make_bundle(tmp_path, name=f"b-{cid}"))


async def running(sandbox: FakeSandbox, tmp_path: Path, cid: str = "c1") -> Container:
    c = await created(sandbox, tmp_path, cid)
    await c.start()
    return c


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- lifecycle ------------------------------------------------------------------------


async def test_create_start_exit_delete(sandbox: FakeSandbox, agent: FakeAgent,
                                        tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    assert c.state is State.CREATED and c.init.state is State.CREATED
    assert agent.called("create_container") == [("c1",)]
    rootfs = str(sandbox.tree.mounts / "c1/rootfs")
    assert rootfs in sandbox.tree.shared
    # The guest sees the shared copy, not the host path.
    assert agent.containers["c1"]["root"]["path"].endswith("/c1/rootfs")

    pid = await c.start()
    assert pid and c.init.pid == pid
    assert c.state is State.RUNNING and c.init.state is State.RUNNING
    agent.exit("c1", code=7)
    status = await asyncio.wait_for(c.wait(), 5)
    assert status.code == 7
    assert c.state is State.STOPPED and c.init.state is State.STOPPED

    assert await c.delete() == status
    assert "c1" not in sandbox.containers
    assert sandbox.tree.shared == {}
    assert "c1" not in agent.containers


async def test_pause_resume_update_stats_pids(sandbox: FakeSandbox, agent: FakeAgent,
                                              tmp_path: Path) -> None:
    c = await running(sandbox, tmp_path)
    await c.pause()
    assert c.state is State.PAUSED and "c1" in agent.paused
    await c.resume()
    assert c.state is State.RUNNING and "c1" not in agent.paused
    await c.update({"memory": {"limit": 64 << 20}})
    assert c.resources()["memory"]["limit"] == 64 << 20
    assert agent.resources["c1"] == [{"memory": {"limit": 64 << 20}}]
    assert sandbox.fitted >= 2  # at create and at update
    assert await c.stats() is agent.stats_result
    assert [p.pid for p in await c.pids()] == [c.init.pid]


def test_pod_settings_from_the_spec() -> None:
    spec = default_spec(["sh"], hostname="web")
    spec["linux"]["namespaces"] = [{"type": "network", "path": "/var/run/netns/cni-1"}]
    assert PodSettings.of(spec) == PodSettings("web", "/var/run/netns/cni-1")
    assert PodSettings.of({}) == PodSettings("", "")


# -- wrong states ---------------------------------------------------------------------


async def test_wrong_state_calls_are_clear_errors(sandbox: FakeSandbox, agent: FakeAgent,
                                                  tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    with pytest.raises(errors.FailedPrecondition, match="cannot pause container c1: it is"
                       " created"):
        await c.pause()
    with pytest.raises(errors.FailedPrecondition, match="cannot exec in container c1"):
        c.add_exec("e1", {"args": ["true"]})
    with pytest.raises(errors.FailedPrecondition, match="resume"):
        await c.resume()
    await c.start()
    with pytest.raises(errors.FailedPrecondition, match="cannot start container c1: it is"
                       " running"):
        await c.start()
    with pytest.raises(errors.FailedPrecondition, match="cannot delete container c1: it is"
                       " running"):
        await c.delete()
    # Refused: nothing was undone.
    assert "c1" in sandbox.containers and sandbox.tree.shared and "c1" in agent.containers
    with pytest.raises(errors.FailedPrecondition, match="starts with its container"):
        await c.init.start()
    agent.exit("c1", code=0)
    await c.wait()
    for call in (c.pause(), c.update({})):
        with pytest.raises(errors.FailedPrecondition, match="stopped"):
            await call
    with pytest.raises(errors.FailedPrecondition, match="stopped"):
        c.add_exec("e1", {"args": ["true"]})


async def test_kill_of_the_dead(sandbox: FakeSandbox, agent: FakeAgent,
                                tmp_path: Path) -> None:
    c = await running(sandbox, tmp_path)
    await c.kill(signal.SIGTERM)
    assert (await asyncio.wait_for(c.wait(), 5)).code == 128 + signal.SIGTERM
    sent = len(agent.called("signal_process"))
    await c.kill(signal.SIGKILL)  # like runc: no error
    await c.kill(signal.SIGTERM, all_processes=True)
    with pytest.raises(errors.NotFound, match="already exited"):
        await c.kill(signal.SIGTERM)
    assert len(agent.called("signal_process")) == sent  # nothing reached the guest


async def test_kill_of_a_never_started_container_ends_it(sandbox: FakeSandbox,
                                                         agent: FakeAgent,
                                                         tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    seen: list[ExitStatus | None] = []
    c.init.on_exit(lambda p: seen.append(p.exit))
    await c.kill(signal.SIGTERM)
    assert c.state is State.STOPPED
    status = await asyncio.wait_for(c.wait(), 1)
    assert status.code == 128 + signal.SIGTERM and status.exited_at_ns > 0
    assert seen == [status]
    assert agent.called("remove_container") == [("c1",)]
    assert agent.called("signal_process") == []
    await c.delete()  # the guest has forgotten it already: still fine
    assert "c1" not in sandbox.containers


# -- execs ----------------------------------------------------------------------------


async def test_exec_announced_started_exited_removed(sandbox: FakeSandbox, agent: FakeAgent,
                                                     tmp_path: Path) -> None:
    c = await running(sandbox, tmp_path)
    p = c.add_exec("e1", {"args": ["sh", "-c", "exit 3"]})
    assert p.state is State.CREATED and c.process("e1") is p
    assert agent.called("exec_process") == []
    with pytest.raises(errors.FailedPrecondition, match="was not started"):
        await c.kill(signal.SIGTERM, exec_id="e1")
    with pytest.raises(errors.FailedPrecondition, match="not started"):
        await p.resize(24, 80)
    await p.start()
    assert p.state is State.RUNNING and p.pid
    with pytest.raises(errors.FailedPrecondition, match="cannot start exec e1 of container"
                       " c1: it is running"):
        await p.start()
    with pytest.raises(errors.FailedPrecondition, match="still running"):
        await c.remove_exec("e1")
    await p.resize(24, 80)
    assert agent.process("c1", "e1").tty == (24, 80)
    agent.exit("c1", "e1", 3)
    assert (await asyncio.wait_for(p.wait(), 5)).code == 3
    assert c.state is State.RUNNING  # an exec's exit does not stop the container
    assert (await c.remove_exec("e1")) == p.exit
    with pytest.raises(errors.NotFound, match="exec e1 not found in container c1"):
        c.process("e1")


async def test_exec_checks(sandbox: FakeSandbox, agent: FakeAgent, tmp_path: Path) -> None:
    c = await running(sandbox, tmp_path)
    c.add_exec("e1", {"args": ["true"]})
    with pytest.raises(errors.AlreadyExists):
        c.add_exec("e1", {"args": ["true"]})
    with pytest.raises(errors.InvalidArgument, match="exec id"):
        c.add_exec("", {"args": ["true"]})
    with pytest.raises(errors.InvalidArgument, match="process.args"):
        c.add_exec("e2", {"args": []})
    # An exec never started can be removed; it has no exit status.
    assert await c.remove_exec("e1") is None
    # exec() = add + start; a failed start forgets it.
    agent.fail("exec_process", errors.NotFound("/no/such/binary"))
    with pytest.raises(errors.NotFound, match="/no/such/binary"):
        await c.exec("e3", {"args": ["/no/such/binary"]})
    assert "e3" not in c.execs
    p = await c.exec("e3", {"args": ["true"]})
    assert p.state is State.RUNNING


# -- rollback ---------------------------------------------------------------------------


async def test_failed_create_leaves_nothing(sandbox: FakeSandbox, agent: FakeAgent,
                                            tmp_path: Path) -> None:
    agent.fail("create_container", errors.Internal("guest said no"))
    with pytest.raises(errors.Internal, match="guest said no"):
        await created(sandbox, tmp_path)
    assert sandbox.containers == {}
    assert sandbox.tree.shared == {}
    assert sandbox.tree.called("clear") == [("c1",)]
    # The id is free again.
    c = await created(sandbox, tmp_path, "c1x")
    assert c.state is State.CREATED


async def test_invalid_spec_is_refused_before_anything_is_shared(
        sandbox: FakeSandbox, agent: FakeAgent, tmp_path: Path) -> None:
    b = make_bundle(tmp_path)
    with pytest.raises(errors.InvalidArgument, match="process.args"):
        await sandbox.create_container("c1", b, {**default_spec([]), "process": {"args": []}})
    assert sandbox.tree.calls == [] and agent.calls == [] and sandbox.containers == {}


async def test_delete_forgets_the_container_even_if_the_agent_fails(
        sandbox: FakeSandbox, agent: FakeAgent, tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    agent.fail("remove_container", errors.DeadlineExceeded("agent too slow"))
    with pytest.raises(errors.DeadlineExceeded):
        await c.delete()
    assert "c1" not in sandbox.containers and sandbox.tree.shared == {}
    assert c.state is State.STOPPED


async def test_force_delete_of_a_running_container(sandbox: FakeSandbox, agent: FakeAgent,
                                                   tmp_path: Path) -> None:
    c = await running(sandbox, tmp_path)
    io = FakeIO()
    c.init.attach_io(io)
    p = await c.exec("e1", {"args": ["sleep", "9"]})
    await c.delete(force=True)
    assert "c1" not in sandbox.containers and sandbox.tree.shared == {}
    assert io.events == ["start", "stop"]
    await settle()
    assert p._waiter is not None and p._waiter.done()  # the agent wait is cancelled


# -- stdio and exit ordering -------------------------------------------------------------


async def test_init_io_starts_at_attach_exec_io_at_start(sandbox: FakeSandbox,
                                                         tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    init_io = FakeIO(Stdio("/in", "/out", "/err", False))
    c.init.attach_io(init_io)
    assert init_io.events == ["start"]  # the init exists in the guest once created
    assert c.init.stdio == Stdio("/in", "/out", "/err", False)
    with pytest.raises(errors.AlreadyExists):
        c.init.attach_io(FakeIO())
    await c.start()
    assert init_io.events == ["start"]  # not twice
    p = c.add_exec("e1", {"args": ["true"], "terminal": True})
    assert p.stdio == Stdio(terminal=True)  # nothing attached yet
    exec_io = FakeIO()
    p.attach_io(exec_io)
    assert exec_io.events == []  # the guest does not know the exec yet
    await p.start()
    assert exec_io.events == ["start"]
    await p.end_input()
    assert exec_io.events == ["start", "close_stdin"]


async def test_exit_is_final_after_output_drained_and_callbacks_before_wait(
        sandbox: FakeSandbox, agent: FakeAgent, tmp_path: Path) -> None:
    c = await created(sandbox, tmp_path)
    io = FakeIO(hold_drain=True)
    c.init.attach_io(io)
    order: list[str] = []

    def first(p: Process) -> None:
        order.append(f"callback {p.state.value} {c.state.value}")

    def broken(p: Process) -> None:
        raise RuntimeError("a callback that fails does not stop the others")

    c.init.on_exit(first)
    c.init.on_exit(broken)
    c.init.on_exit(lambda p: order.append("second"))
    await c.start()

    async def waiter() -> None:
        await c.wait()
        order.append("wait returned")

    w = asyncio.ensure_future(waiter())
    agent.exit("c1", code=1)
    await settle()
    # The guest reported the exit, the output is not delivered: not final yet.
    assert c.init.state is State.RUNNING and c.state is State.RUNNING and c.init.exit is None
    assert order == []
    io.release()
    await asyncio.wait_for(w, 5)
    assert io.events == ["start", "drain"]
    assert order == ["callback stopped stopped", "second", "wait returned"]
    with pytest.raises(errors.FailedPrecondition, match="already exited"):
        c.init.on_exit(first)


async def test_lost_agent_wait_is_an_exit_of_255(sandbox: FakeSandbox, agent: FakeAgent,
                                                 tmp_path: Path) -> None:
    agent.fail("wait_process", errors.Unavailable("agent connection closed"))
    c = await running(sandbox, tmp_path)
    assert (await asyncio.wait_for(c.wait(), 5)).code == 255
    assert c.state is State.STOPPED
