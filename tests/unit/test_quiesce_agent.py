"""The agent's checkpoint quiesce (PrepareCheckpoint / FinishCheckpoint), driven
in development mode: blocking calls end with UNAVAILABLE wire.QUIESCED and are
refused until FinishCheckpoint, and what they waited for is not lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pykata import errors, wire
from pykata.guest import service
from pykata.guest.reaper import Reaper
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb


def make(tmp_path: Path) -> service.AgentService:
    return service.AgentService(Settings(state_dir=tmp_path), Reaper())


def test_prepare_ends_a_pending_blocking_call_and_refuses_new_ones(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        waiting = asyncio.ensure_future(svc.GetOOMEvent(pb.GetOOMEventRequest()))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await svc.PrepareCheckpoint(pb.Empty())
        # Answered only once the pending call has ended.
        assert waiting.done()
        with pytest.raises(errors.Unavailable) as ended:
            waiting.result()
        assert ended.value.message == wire.QUIESCED
        with pytest.raises(errors.Unavailable) as refused:
            await svc.GetOOMEvent(pb.GetOOMEventRequest())
        assert refused.value.message == wire.QUIESCED
        # An event that comes while quiesced waits for the next call.
        svc.sandbox.oom._queue.put_nowait("c1")
        await svc.FinishCheckpoint(pb.FinishCheckpointRequest(seed=b""))
        assert not svc.quiesced
        got = await asyncio.wait_for(svc.GetOOMEvent(pb.GetOOMEventRequest()), 5)
        assert got.container_id == "c1"

    asyncio.run(go())


def test_a_call_that_finished_keeps_its_answer(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        ready = asyncio.Event()

        async def answer() -> str:
            await ready.wait()
            return "done"

        call = asyncio.ensure_future(svc._blocking_call(answer()))
        await asyncio.sleep(0)
        ready.set()  # the answer and the quiesce in the same loop turn
        await svc.PrepareCheckpoint(pb.Empty())
        assert await call == "done"
        await svc.FinishCheckpoint(pb.FinishCheckpointRequest())

    asyncio.run(go())


def test_blocking_calls_of_a_missing_process_are_still_not_found(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        with pytest.raises(errors.NotFound):
            await svc.WaitProcess(pb.WaitProcessRequest(container_id="c9"))
        with pytest.raises(errors.NotFound):
            await svc.ReadStderr(pb.ReadStreamRequest(container_id="c9"))
        await svc.PrepareCheckpoint(pb.Empty())
        assert not svc._blocking
        await svc.FinishCheckpoint(pb.FinishCheckpointRequest(time_ns=1))  # dev mode: no clock

    asyncio.run(go())


def test_the_real_client_and_agent_quiesce_together(tmp_path: Path) -> None:
    """AgentClient over ttRPC to the AgentService: prepare_checkpoint returns
    with nothing in flight, the pending blocking call answered QUIESCED (which
    runtime.types.quiesced recognises), calls made meanwhile held until
    finish_checkpoint, then answered."""
    from pykata.agent.client import AgentClient
    from pykata.runtime.types import quiesced
    from pykata.ttrpc import Client, Server

    async def go() -> None:
        svc = make(tmp_path)
        server = Server()
        server.register_service(service.AGENT_SERVICE, svc)
        server.register_service(service.HEALTH_SERVICE, service.HealthService())
        sock = tmp_path / "agent.sock"
        await server.serve_unix(sock)
        agent = AgentClient(await Client.connect_unix(sock))
        try:
            oom = asyncio.ensure_future(agent.oom_event())
            await asyncio.sleep(0.05)
            assert agent.in_flight == 1
            await agent.prepare_checkpoint()
            assert agent.in_flight == 0 and svc.quiesced
            with pytest.raises(errors.Unavailable) as ended:
                await oom
            assert quiesced(ended.value)
            assert not quiesced(errors.Unavailable("ttrpc connection closed by peer"))
            held = asyncio.ensure_future(agent.metrics())
            await asyncio.sleep(0.1)
            assert not held.done() and agent.in_flight == 0  # not even sent
            assert await agent.check()  # health goes through
            first = agent.next_stream_id
            await agent.finish_checkpoint(time_ns=0, seed=b"x" * 16)
            assert "pykata_agent_containers" in await asyncio.wait_for(held, 5)
            assert not svc.quiesced and agent.next_stream_id > first
            with pytest.raises(errors.InvalidArgument):
                agent.next_stream_id = 4
        finally:
            await agent.close()
            await server.close()

    asyncio.run(go())
