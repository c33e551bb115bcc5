"""OOM events: increases of a container's ``memory.events`` oom_kill count."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from pykata.guest import cgroups
from pykata.guest.container import Container

log = logging.getLogger(__name__)


class OomWatcher:
    """Turns increases of a container's ``memory.events`` oom_kill into events.

    Exits of a container's init report at once (:meth:`check` from the exit
    callback); other kills are found by polling while someone waits in
    GetOOMEvent. Events wait in a queue until asked for.
    """

    POLL_SECONDS = 1.0

    def __init__(self, containers: Mapping[str, Container]) -> None:
        self._containers = containers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._waiters = 0

    def check(self, c: Container) -> None:
        count = cgroups.oom_kill_count(c.cgroup)
        if count > c.oom_seen:
            c.oom_seen = count
            log.info("container %s: OOM kill (count %d)", c.id, count)
            self._queue.put_nowait(c.id)

    async def next(self) -> str:
        """The id of the next container with an OOM kill (waits until there is one)."""
        self._waiters += 1
        try:
            while True:
                try:
                    return self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
                for c in list(self._containers.values()):
                    self.check(c)
                try:
                    async with asyncio.timeout(self.POLL_SECONDS):
                        return await self._queue.get()
                except TimeoutError:
                    continue
        finally:
            self._waiters -= 1
