"""The pod network inside the VM: the interfaces and routes the agent sets up,
and a watch on the pod's network namespace that hot-plugs interfaces added
later (a second network), driven by rtnetlink events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from pykata import errors
from pykata.hypervisor.base import Hypervisor
from pykata.resources import network
from pykata.runtime import sizing
from pykata.runtime.types import SandboxAgent

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.2  # after an event, let CNI finish: link, address, routes


async def configure_guest(agent: SandboxAgent, net: network.PodNetwork,
                          endpoints: list[network.Endpoint] | None = None) -> None:
    """Name, address and bring up ``endpoints`` (default: all) in the guest, with
    the routes through them."""
    eps = net.endpoints if endpoints is None else endpoints
    for ep in eps:
        await agent.update_interface(ep.name, ep.mac, ep.mtu, ep.addresses)
    names = {ep.name for ep in eps}
    routes = [(r.dest, r.gateway, r.device, r.family) for r in net.routes
              if endpoints is None or r.device in names]
    if routes:
        await agent.update_routes(routes)


class NetworkWatch:
    """Connects interfaces that appear in the pod's namespace to the VM."""

    def __init__(self, name: str, net: network.PodNetwork, vm: Hypervisor,
                 agent: SandboxAgent, lock: asyncio.Lock) -> None:
        self.name = name
        self.net = net
        self.vm = vm
        self.agent = agent
        self.lock = lock  # the sandbox's resize lock: one hotplug at a time
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.to_thread(network.event_socket, self.net.netns)
        except errors.PykataError as exc:
            log.warning("sandbox %s: not watching %s: %s", self.name, self.net.netns, exc)
            return
        changed = asyncio.Event()

        def readable() -> None:
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
            changed.set()

        loop.add_reader(sock.fileno(), readable)
        try:
            while True:
                await changed.wait()
                await asyncio.sleep(SETTLE_SECONDS)
                changed.clear()
                try:
                    await self.plug_new()
                except (errors.PykataError, OSError) as exc:
                    log.error("sandbox %s: cannot connect a new interface: %s", self.name, exc)
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    async def plug_new(self) -> None:
        """Attach and hot-plug every interface not yet connected."""
        async with self.lock:
            first = len(self.net.endpoints)
            new = await asyncio.to_thread(network.attach_new, self.net,
                                          sizing.nic_queues(self.vm.spec))
            for i, ep in enumerate(new, start=first):
                try:
                    await self.vm.hotplug_nic(f"net{i}", ep.fds, ep.mac)
                finally:
                    for fd in ep.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    ep.fds = []
                log.info("sandbox %s: interface %s (%s) hot-plugged", self.name, ep.name, ep.mac)
            if new:
                await configure_guest(self.agent, self.net, new)
