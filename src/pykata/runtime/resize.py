"""Growing a running VM to what its containers ask for: hot-plug vCPUs and
memory, then have the agent bring them online. It never shrinks (the limits
inside the guest do that)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pykata.hypervisor.base import Hypervisor
from pykata.runtime import sizing
from pykata.runtime.types import SandboxAgent

log = logging.getLogger(__name__)


class Resizer:
    """The present size of one VM and the lock every change to it takes."""

    def __init__(self, name: str, vcpus: int, memory_mib: int) -> None:
        self.name = name
        self.vcpus = vcpus  # present vCPUs
        self.memory_mib = memory_mib  # boot memory + hot-plugged
        self.lock = asyncio.Lock()  # also held while NICs are hot-plugged

    async def fit(self, vm: Hypervisor, agent: SandboxAgent, cpus: int, mem: int) -> None:
        """Grow towards (``cpus``, ``mem`` MiB), capped at the VM's maxima."""
        async with self.lock:
            cpus = min(cpus, vm.spec.max_vcpus)
            mem = min(mem, vm.spec.max_memory_mib)
            if cpus > self.vcpus:
                self.vcpus = await vm.hotplug_vcpus(cpus)
                want = self.vcpus
                online, _ = await settle(agent, lambda o, _t: o >= want, cpu_only=True,
                                         name=self.name)
                log.info("sandbox %s: %d vCPUs present, %d online", self.name, self.vcpus,
                         online)
            add = sizing.memory_to_add(self.memory_mib, mem)
            if add:
                _, before = await agent.online_cpu_mem()
                self.memory_mib += await vm.hotplug_memory(add)
                target = before + (add << 20) * 9 // 10
                _, total = await settle(agent, lambda _o, t: t >= target, name=self.name)
                log.info("sandbox %s: memory %d MiB (guest sees %d MiB)", self.name,
                         self.memory_mib, total >> 20)


async def settle(agent: SandboxAgent, done: Callable[[int, int], bool], *,
                 cpu_only: bool = False, timeout: float = 10.0,
                 name: str = "") -> tuple[int, int]:
    """Have the agent online what was hot-plugged until ``done(cpus, mem bytes)``
    (the guest adds hot-plugged CPUs and memory blocks asynchronously), at most
    ``timeout`` seconds; the last (online CPUs, memory bytes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        online, total = await agent.online_cpu_mem(cpu_only=cpu_only)
        if done(online, total):
            return online, total
        if loop.time() > deadline:
            log.warning("sandbox %s: hot-plugged resources not all online after %gs"
                        " (cpus %d, memory %d MiB)", name, timeout, online, total >> 20)
            return online, total
        await asyncio.sleep(0.1)
