"""ttRPC client over asyncio streams: concurrent unary calls on one connection."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from google.protobuf import message as pb_message

from pykata import errors
from pykata.protos import ttrpc_pb2
from pykata.ttrpc import frames
from pykata.ttrpc.status import to_error

log = logging.getLogger(__name__)

M = TypeVar("M", bound=pb_message.Message)

# The peer (the guest agent) is untrusted: frames nobody asked for are dropped;
# the first few of a connection are logged (quoted, truncated), then every 1000th.
LOG_DROPPED_FIRST = 10
LOG_DROPPED_EVERY = 1000
QUOTE_BYTES = 64

# Metadata every call adds to its own (e.g. the trace context of the calling task,
# see pykata.tracing): None, the default, costs one global lookup per call.
MetadataHook = Callable[[], Mapping[str, str] | None]
_metadata_hook: MetadataHook | None = None


def set_metadata_hook(hook: MetadataHook | None) -> None:
    """Install (None: remove) what adds metadata to every call of every client."""
    global _metadata_hook
    _metadata_hook = hook


class Client:
    """One ttRPC connection. ``call`` may be awaited from many tasks at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._write_lock = asyncio.Lock()
        self._closed: errors.PykataError | None = None
        self.dropped = 0  # frames received that answered no pending call
        self._recv_task = asyncio.ensure_future(self._receive())

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str]) -> Client:
        try:
            reader, writer = await asyncio.open_unix_connection(
                os.fspath(path), limit=frames.MAX_DATA + frames.HEADER_SIZE
            )
        except OSError as exc:
            raise errors.Unavailable(f"cannot connect to ttrpc socket {path}: {exc}") from exc
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self,
        service: str,
        method: str,
        request: pb_message.Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> M:
        """Send one request and wait for its response.

        Raises the PykataError matching the returned status, DeadlineExceeded on
        ``timeout`` (which is also sent to the server as ``timeout_nano``), and
        Unavailable when the connection is or becomes closed.
        """
        if self._closed is not None:
            raise errors.Unavailable(f"ttrpc connection closed: {self._closed}")
        req = ttrpc_pb2.Request(
            service=service, method=method, payload=request.SerializeToString()
        )
        if timeout is not None:
            req.timeout_nano = max(1, int(timeout * 1e9))
        for key, value in (metadata or {}).items():
            values = [value] if isinstance(value, str) else list(value)
            for v in values:
                req.metadata.add(key=key, value=v)
        hook = _metadata_hook
        if hook is not None:
            for key, v in (hook() or {}).items():
                if metadata is None or key not in metadata:
                    req.metadata.add(key=key, value=v)
        data = req.SerializeToString()
        if len(data) > frames.MAX_DATA:
            raise errors.ResourceExhausted(
                f"{method}: request of {len(data)} bytes exceeds maximum message size of"
                f" {frames.MAX_DATA}"
            )
        stream_id = self._next_id
        self._next_id += 2
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            async with self._write_lock:
                try:
                    self._writer.write(frames.encode(stream_id, frames.TYPE_REQUEST, data))
                    await self._writer.drain()
                except (ConnectionError, RuntimeError) as exc:
                    self._fail_all(errors.Unavailable(f"ttrpc connection lost: {exc}"))
            try:
                resp = await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"{service}/{method}: no answer within {timeout:g}s"
                ) from None
        finally:
            self._pending.pop(stream_id, None)
        if resp.status.code != 0:
            raise to_error(resp.status)
        out = response_type()
        try:
            out.ParseFromString(resp.payload)
        except pb_message.DecodeError as exc:
            raise errors.Internal(f"{method}: undecodable response: {exc}") from exc
        return out

    async def _receive(self) -> None:
        reason: errors.PykataError = errors.Unavailable("ttrpc connection closed by peer")
        try:
            while True:
                frame = await frames.read_frame(self._reader)
                if frame.type != frames.TYPE_RESPONSE:
                    self._drop(frame, f"frame of type {frame.type}")
                    continue
                fut = self._pending.get(frame.stream_id)
                if fut is None or fut.done():
                    self._drop(frame, "response for no pending call")
                    continue
                if frame.oversize:
                    fut.set_exception(
                        errors.ResourceExhausted(
                            f"response of {frame.oversize} bytes exceeds maximum message size"
                            f" of {frames.MAX_DATA}"
                        )
                    )
                    continue
                resp = ttrpc_pb2.Response()
                try:
                    resp.ParseFromString(frame.data)
                except pb_message.DecodeError as exc:
                    fut.set_exception(errors.Internal(f"undecodable ttrpc response: {exc}"))
                    continue
                fut.set_result(resp)
        except asyncio.IncompleteReadError as exc:
            if exc.partial or exc.expected != frames.HEADER_SIZE:
                reason = errors.Unavailable("ttrpc connection closed in the middle of a frame")
        except (ConnectionError, OSError) as exc:
            reason = errors.Unavailable(f"ttrpc connection lost: {exc}")
        except errors.ResourceExhausted as exc:  # a frame too large even to skip
            log.warning("%s", exc)
            reason = errors.Unavailable(f"ttrpc connection given up: {exc}")
        except asyncio.CancelledError:
            reason = errors.Unavailable("ttrpc client closed")
            raise
        finally:
            self._fail_all(reason)

    def _drop(self, frame: frames.Frame, what: str) -> None:
        self.dropped += 1
        if self.dropped <= LOG_DROPPED_FIRST or self.dropped % LOG_DROPPED_EVERY == 0:
            size = frame.oversize or len(frame.data)
            log.warning("ttrpc: dropped %s on stream %d (%d bytes: %s; %d dropped so far)",
                        what, frame.stream_id, size, quote(frame.data), self.dropped)

    def _fail_all(self, reason: errors.PykataError) -> None:
        if self._closed is None:
            self._closed = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(type(reason)(reason.message))
        self._pending.clear()

    async def close(self) -> None:
        self._recv_task.cancel()
        try:
            await self._recv_task
        except (asyncio.CancelledError, Exception):
            pass
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except Exception:
            pass

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def quote(data: bytes, limit: int = QUOTE_BYTES) -> str:
    """Peer bytes for a log line: repr-quoted (no control characters), truncated."""
    text = repr(data[:limit])
    return text + f"...(+{len(data) - limit} bytes)" if len(data) > limit else text
