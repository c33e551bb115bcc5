"""Taking a sandbox down, the reverse of its start: the network watch, the
containers and the guest's sandbox, what was shared with the guest, the agent
connection, the VM, virtiofsd, the pod network's taps, a clone's copy of the
template RAM, and last the state directory. Every step runs whatever became of
the ones before (a create that failed half-way is taken down the same way), so
nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pykata.resources import network
from pykata.runtime.cleanup import remove_memory_file, remove_sandbox_dir
from pykata.runtime.types import SandboxAgent, State

if TYPE_CHECKING:
    from pykata.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)


async def teardown(sb: Sandbox, agent: SandboxAgent | None) -> None:
    """Take down all ``sb`` started; ``agent`` (its connection, if any) is closed.
    Its directory goes only if ``sb`` made it (``owns_dir``). Idempotent."""
    if sb.netwatch is not None:
        await sb.netwatch.stop()
        sb.netwatch = None
    if agent is not None and sb.state is State.RUNNING:
        for c in list(sb.containers.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.delete(force=True), 15)
        with contextlib.suppress(Exception):
            await agent.destroy_sandbox(timeout=5.0)
    for c in list(sb.containers.values()):
        c.unmount_shared()
    sb.containers.clear()
    if sb.owns_dir:
        left = sb.tree.teardown()
        if left:
            log.error("sandbox %s: cannot unmount %s", sb.id, ", ".join(left))
    if agent is not None:
        with contextlib.suppress(Exception):
            await agent.close()
    if sb.vm is not None:
        await sb.vm.stop()
    if sb.virtiofsd is not None:
        await sb.virtiofsd.stop()
    if sb.network is not None:
        await asyncio.to_thread(network.detach, sb.network)
        sb.network = None
    remove_memory_file(sb.record.extra.get("memory_file"))
    sb.state = State.STOPPED
    if not sb.owns_dir:
        return  # e.g. AlreadyExists: that directory belongs to the sandbox there
    remove_sandbox_dir(sb.dir)
    sb.owns_dir = False
    log.info("sandbox %s stopped and removed", sb.id)
