"""Publish task events to containerd: Events/Forward over ttRPC to $TTRPC_ADDRESS.

Events go out in the order they were published, from one queue; a failed send
is retried (5 times, backing off) before it is dropped with an error log. With
no TTRPC_ADDRESS the events are only logged.
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
MAX_RETRIES = 5


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
        from google.protobuf import empty_pb2

        delay = 0.05
        for attempt in range(MAX_RETRIES + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect_unix(self.address)
                await self._client.call(EVENTS_SERVICE, "Forward", req, empty_pb2.Empty,
                                        timeout=5.0)
                return
            except errors.PykataError as exc:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                if attempt == MAX_RETRIES:
                    log.error("dropping event %s after %d attempts: %s", topic, attempt + 1, exc)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by ``timeout``), then stop."""
        if self._task is None:
            return
        self._queue.put_nowait(None)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)
        if self._client is not None:
            await self._client.close()
