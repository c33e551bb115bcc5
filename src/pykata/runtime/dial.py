"""Reaching the agent of a booting VM: one "dial + check" for sandboxes and
the template build."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pykata import errors
from pykata.agent import AgentClient
from pykata.hypervisor.base import Hypervisor
from pykata.runtime.types import SandboxAgent
from pykata.ttrpc import Client
from pykata.utils.process import tail

# (VM, seconds to wait for it, default timeout of later calls) -> the agent
Connector = Callable[[Hypervisor, float, float], Awaitable[SandboxAgent]]


async def dial_agent(vm: Hypervisor, timeout: float, call_timeout: float = 60.0) -> AgentClient:
    """Connect to the agent of the booting ``vm`` and have it answer a Check:
    VMLaunchError if the VM exits first, Unavailable if the agent stays silent."""
    dial = asyncio.ensure_future(vm.agent_channel().connect(timeout))
    died = asyncio.ensure_future(vm.wait())
    try:
        done, _ = await asyncio.wait({dial, died}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        died.cancel()
    if dial not in done:
        dial.cancel()
        raise errors.VMLaunchError(f"VM of {vm.spec.id} exited while booting",
                                   exit_code=died.result(),
                                   console_tail=tail(vm.spec.console_log))
    reader, writer = dial.result()
    agent = AgentClient(Client(reader, writer), default_timeout=call_timeout)
    try:
        await agent.check(timeout=timeout)
    except errors.PykataError as exc:
        await agent.close()
        raise errors.Unavailable(
            f"agent in {vm.spec.id} did not answer: {exc}; console: "
            f"{tail(vm.spec.console_log, 3) or 'empty'}") from exc
    return agent
