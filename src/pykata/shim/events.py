"""Publish task events to containerd: Events/Forward over ttRPC to $TTRPC_ADDRESS.

Events go out in the order they were published, from one queue. A failed send
is retried on a new connection, backing off up to MAX_DELAY: containerd may be
restarting (its address is the same when it comes back), so an event waits
for it up to OUTAGE_GRACE seconds counted from the first failure of the
outage. An event still not delivered then is dropped with an error log, and
while the outage lasts the later ones get one attempt each (nothing piles up
behind a containerd that is gone for good). With no TTRPC_ADDRESS the events
are only logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from pykata import errors
from pykata.protos import containerd_eventsvc_pb2 as evsvc
from pykata.ttrpc import Client

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
OUTAGE_GRACE = 60.0  # seconds events wait for containerd to come back
FIRST_DELAY = 0.05  # seconds before the first retry; doubled up to MAX_DELAY
MAX_DELAY = 2.0
CALL_TIMEOUT = 5.0


def pack_any(msg: Message) -> any_pb2.Any:
    """containerd's typeurl for protobuf messages is the bare full name."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._outage_since: float | None = None  # loop time of the first failed send
        self.dropped = 0  # events given up on

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def publish(self, topic: str, event: Message) -> None:
        log.debug("event %s: %s", topic, str(event).replace("\n", " "))
        self._queue.put_nowait((topic, event))

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            topic, event = item
            ts = timestamp_pb2.Timestamp()
            ts.GetCurrentTime()
            req = evsvc.ForwardRequest(envelope=evsvc.Envelope(
                timestamp=ts, namespace=self.namespace, topic=topic, event=pack_any(event)))
            await self._send(topic, req)

    async def _send(self, topic: str, req: evsvc.ForwardRequest) -> None:
        if not self.address:
            log.info("event %s (no TTRPC_ADDRESS, not forwarded)", topic)
            return
        delay = FIRST_DELAY
        while True:
            try:
                await self._forward(req)
            except errors.PykataError as exc:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                now = asyncio.get_running_loop().time()
                if self._outage_since is None:
                    self._outage_since = now
                    log.warning("cannot forward event %s to containerd (%s): retrying for"
                                " up to %gs", topic, exc, OUTAGE_GRACE)
                if now - self._outage_since >= OUTAGE_GRACE:
                    self.dropped += 1
                    log.error("dropping event %s: containerd unreachable for %.0fs: %s",
                              topic, now - self._outage_since, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            if self._outage_since is not None:
                log.info("containerd reachable again: event %s forwarded", topic)
                self._outage_since = None
            return

    async def _forward(self, req: evsvc.ForwardRequest) -> None:
        from google.protobuf import empty_pb2

        if self._client is None or self._client.closed:
            if self._client is not None:
                await self._client.close()
            self._client = await Client.connect_unix(self.address)
        await self._client.call(EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                                timeout=CALL_TIMEOUT)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)
        if self._client is not None:
            await self._client.close()
