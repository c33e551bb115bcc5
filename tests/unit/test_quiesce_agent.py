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
