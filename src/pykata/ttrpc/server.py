"""ttRPC server over asyncio streams: many concurrent unary calls per connection."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from pykata import errors
from pykata.protos import ttrpc_pb2
from pykata.ttrpc import frames
from pykata.ttrpc.status import to_status

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[pb_message.Message]]

# Around each handled call (e.g. the guest agent's span recorder): given the
# service, the method, the decoded request and its metadata, a context manager
# the handler runs in (it sees the handler's exception), or None for nothing.
CallHook = Callable[[str, str, pb_message.Message, Mapping[str, list[str]]],
                    AbstractContextManager[Any] | None]

# Requests of one connection handled at once; at the cap the server stops
# reading that connection (the peer's writes then block: backpressure). Generous
# because calls long-poll (containerd's Wait per process; the shim's ReadStdout,
# ReadStderr and WaitProcess per process toward the agent): a cap they could fill
# would stop the server reading the very call that ends them.
MAX_IN_FLIGHT = 1024

# Metadata of the call being handled (key -> list of values).
call_metadata: contextvars.ContextVar[Mapping[str, list[str]] | None] = contextvars.ContextVar(
    "call_metadata", default=None
)


# A name the peer sent, in an error line: as it is when short and printable, else
# repr-quoted (no line breaks or control characters) and cut.
PEER_TEXT_MAX = 128


def peer_text(text: str, limit: int = PEER_TEXT_MAX) -> str:
    if len(text) <= limit and text.isprintable():
        return text
    quoted = repr(text[:limit])
    return quoted + f"...(+{len(text) - limit} characters)" if len(text) > limit else quoted


class _Method:
    __slots__ = ("handler", "request_type")

    def __init__(self, request_type: type[pb_message.Message], handler: Handler) -> None:
        self.request_type = request_type
        self.handler = handler


class Server:
    """Dispatches ttRPC requests to registered async handlers.

    Handlers take the decoded request message and return the response message.
    Raising a :class:`pykata.errors.PykataError` returns its status code; any
    other exception returns UNKNOWN with its text (and is logged).
    """

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise errors.InvalidArgument("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._methods: dict[tuple[str, str], _Method] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._closing = False
        self.call_hook: CallHook | None = None

    def register(
        self, service: str, method: str, request_type: type[pb_message.Message], handler: Handler
    ) -> None:
        self._methods[(service, method)] = _Method(request_type, handler)

    def register_service(self, descriptor: ServiceDescriptor, impl: object) -> None:
        """Register every RPC of ``descriptor`` that ``impl`` has a coroutine method for."""
        for m in descriptor.methods:
            handler = getattr(impl, m.name, None)
            if handler is None:
                continue
            request_type = message_factory.GetMessageClass(m.input_type)
            self.register(descriptor.full_name, m.name, request_type, handler)

    async def serve_unix(self, path: str | os.PathLike[str]) -> asyncio.Server:
        srv = await asyncio.start_unix_server(self._on_connection, path=os.fspath(path))
        self._servers.append(srv)
        return srv

    async def serve_socket(self, sock: Any) -> asyncio.Server:
        """Serve on an already listening socket (e.g. AF_VSOCK, or one passed by a parent)."""
        srv = await asyncio.start_server(self._on_connection, sock=sock)
        self._servers.append(srv)
        return srv

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self.serve_stream(reader, writer)
        except asyncio.CancelledError:
            # close() ends connections by cancelling them. asyncio's stream
            # protocol asks this task for its exception when it is done, which
            # raises (and prints) for a cancelled task: end normally instead.
            if not self._closing:
                raise
        finally:
            self._connections.discard(task)

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection until the peer closes it or it breaks."""
        conn = _Connection(self, reader, writer)
        await conn.run()

    async def close(self) -> None:
        self._closing = True
        for srv in self._servers:
            srv.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for srv in self._servers:
            try:
                await srv.wait_closed()
            except Exception:
                pass
        self._servers.clear()


class _Connection:
    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.write_lock = asyncio.Lock()
        self.calls: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(server.max_in_flight)

    async def run(self) -> None:
        try:
            while True:
                # One slot per call, taken before the next frame is read: at the
                # cap, reading stops until a call finishes.
                await self.slots.acquire()
                try:
                    frame = await frames.read_frame(self.reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.slots.release()
                    return
                except errors.ResourceExhausted as exc:
                    self.slots.release()
                    log.warning("%s", exc)
                    return
                if not self._dispatch(frame):
                    self.slots.release()
        finally:
            for t in list(self.calls):
                t.cancel()
            if self.calls:
                await asyncio.gather(*self.calls, return_exceptions=True)
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:
                pass

    def _dispatch(self, frame: frames.Frame) -> bool:
        """Start handling ``frame``; False if it was ignored (no task holds its slot)."""
        if frame.type != frames.TYPE_REQUEST:
            log.debug("ignoring ttrpc frame of type %d on stream %d", frame.type, frame.stream_id)
            return False
        if frame.oversize:
            self._spawn(
                self._reply_error(
                    frame.stream_id,
                    errors.ResourceExhausted(
                        f"message length {frame.oversize} exceeds maximum message size of"
                        f" {frames.MAX_DATA}"
                    ),
                )
            )
            return True
        if frame.stream_id % 2 == 0:
            self._spawn(
                self._reply_error(
                    frame.stream_id,
                    errors.InvalidArgument("stream id must be odd for client-initiated streams"),
                )
            )
            return True
        self._spawn(self._handle(frame.stream_id, frame.data))
        return True

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.calls.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.calls.discard(task)
        self.slots.release()

    async def _handle(self, stream_id: int, data: bytes) -> None:
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(data)
        except pb_message.DecodeError as exc:
            await self._reply_error(stream_id, errors.InvalidArgument(f"bad request: {exc}"))
            return
        del data  # a long-polling call does not keep its raw frame (up to MAX_DATA)
        method = self.server._methods.get((req.service, req.method))
        if method is None:
            await self._reply_error(
                stream_id,
                errors.Unimplemented(
                    f"{peer_text(req.service)}/{peer_text(req.method)} is not implemented"),
            )
            return
        try:
            request = method.request_type()
            request.ParseFromString(req.payload)
        except pb_message.DecodeError as exc:
            await self._reply_error(
                stream_id, errors.InvalidArgument(f"bad {req.method} payload: {exc}")
            )
            return
        md: dict[str, list[str]] = {}
        for kv in req.metadata:
            md.setdefault(kv.key, []).append(kv.value)
        call_metadata.set(md)
        service, name, timeout_nano = req.service, req.method, req.timeout_nano
        del req  # nor its payload
        hook = self.server.call_hook
        around = None
        if hook is not None:
            try:
                around = hook(service, name, request, md)
            except Exception:  # an observer never fails the call it observes
                log.exception("ttrpc call hook failed for %s/%s", service, name)
        try:
            coro = method.handler(request)
            if around is None:
                response = await self._run(coro, timeout_nano)
            else:
                with around:
                    response = await self._run(coro, timeout_nano)
        except TimeoutError:
            await self._reply_error(
                stream_id, errors.DeadlineExceeded(f"{name}: deadline exceeded")
            )
            return
        except asyncio.CancelledError:
            raise
        except errors.PykataError as exc:
            log.debug("%s/%s failed: %s", service, name, exc)
            await self._reply_error(stream_id, exc)
            return
        except Exception as exc:
            log.exception("%s/%s raised", service, name)
            await self._reply_error(stream_id, exc)
            return
        payload = response.SerializeToString()
        resp = ttrpc_pb2.Response(payload=payload)
        await self._send(stream_id, resp)

    @staticmethod
    async def _run(coro: Awaitable[pb_message.Message], timeout_nano: int
                   ) -> pb_message.Message:
        if timeout_nano > 0:
            return await asyncio.wait_for(coro, timeout_nano / 1e9)
        return await coro

    async def _reply_error(self, stream_id: int, exc: BaseException) -> None:
        await self._send(stream_id, ttrpc_pb2.Response(status=to_status(exc)))

    async def _send(self, stream_id: int, resp: ttrpc_pb2.Response) -> None:
        data = resp.SerializeToString()
        if len(data) > frames.MAX_DATA:
            err = errors.ResourceExhausted(
                f"response of {len(data)} bytes exceeds maximum message size of {frames.MAX_DATA}"
            )
            data = ttrpc_pb2.Response(status=to_status(err)).SerializeToString()
        async with self.write_lock:
            try:
                self.writer.write(frames.encode(stream_id, frames.TYPE_RESPONSE, data))
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                log.debug("connection lost before the response to stream %d was sent", stream_id)
