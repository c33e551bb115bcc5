"""ttRPC framing and semantics against our own server and client, plus raw
frames written by hand from the documented wire format."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from pykata import errors
from pykata.protos import agent_pb2 as pb
from pykata.protos import ttrpc_pb2
from pykata.ttrpc import Client, Server, call_metadata, frames

SVC = "pykata.agent.v1.Health"


class Health:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        if req.service == "slow":
            await self.release.wait()
        elif req.service == "sleep":
            await asyncio.sleep(10)
        elif req.service == "notfound":
            raise errors.NotFound("no such thing")
        elif req.service == "boom":
            raise RuntimeError("kaput")
        elif req.service == "metadata":
            md = call_metadata.get() or {}
            return pb.HealthCheckResponse(status=len(md.get("k", [])))
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def Version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(agent_version=req.service)


async def _pair(server: Server) -> tuple[Client, asyncio.Task[None]]:
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    task = asyncio.ensure_future(server.serve_stream(sr, sw))
    cr, cw = await asyncio.open_unix_connection(sock=b, limit=frames.MAX_DATA + 64)
    return Client(cr, cw), task


@pytest.fixture
async def env() -> AsyncIterator[tuple[Client, Health, Server]]:
    server = Server()
    impl = Health()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], impl)
    client, task = await _pair(server)
    yield client, impl, server
    await client.close()
    task.cancel()


def test_header_layout() -> None:
    raw = frames.encode(0x01020304, frames.TYPE_REQUEST, b"xyz", flags=0x2)
    assert raw[:10] == bytes([0, 0, 0, 3, 1, 2, 3, 4, 1, 2])
    assert raw[10:] == b"xyz"
    assert frames.HEADER_SIZE == 10 and frames.MAX_DATA == 4 * 1024 * 1024


async def test_unary_call(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    resp = await client.call(SVC, "Version", pb.CheckRequest(service="v1"),
                             pb.VersionCheckResponse)
    assert resp.agent_version == "v1"


async def test_interleaved_concurrent_calls(env: tuple[Client, Health, Server]) -> None:
    client, impl, _ = env
    slow = asyncio.ensure_future(
        client.call(SVC, "Check", pb.CheckRequest(service="slow"), pb.HealthCheckResponse))
    # Many fast calls complete while the slow one is still pending on the same connection.
    fast = await asyncio.gather(*[
        client.call(SVC, "Version", pb.CheckRequest(service=str(i)), pb.VersionCheckResponse)
        for i in range(50)
    ])
    assert [r.agent_version for r in fast] == [str(i) for i in range(50)]
    assert not slow.done()
    impl.release.set()
    assert (await slow).status == pb.HealthCheckResponse.SERVING


async def test_stream_ids_are_odd_and_increasing() -> None:
    a, b = socket.socketpair()
    r, w = await asyncio.open_unix_connection(sock=b)
    client = Client(r, w)
    loop = asyncio.get_running_loop()
    calls = [asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(),
                                               pb.HealthCheckResponse)) for _ in range(3)]
    a.setblocking(False)
    ids = []
    for _ in range(3):
        hdr = await loop.sock_recv(a, 10)
        while len(hdr) < 10:
            hdr += await loop.sock_recv(a, 10 - len(hdr))
        length, sid, typ, flags = struct.unpack(">IIBB", hdr)
        body = b""
        while len(body) < length:
            body += await loop.sock_recv(a, length - len(body))
        req = ttrpc_pb2.Request.FromString(body)
        assert (typ, flags, req.service, req.method) == (1, 0, SVC, "Check")
        ids.append(sid)
        resp = ttrpc_pb2.Response(payload=pb.HealthCheckResponse(status=1).SerializeToString())
        data = resp.SerializeToString()
        await loop.sock_sendall(a, struct.pack(">IIBB", len(data), sid, 2, 0) + data)
    assert ids == [1, 3, 5]
    assert [r.status for r in await asyncio.gather(*calls)] == [1, 1, 1]
    await client.close()
    a.close()


async def test_unknown_method_and_service(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    with pytest.raises(errors.Unimplemented, match="Nope"):
        await client.call(SVC, "Nope", pb.CheckRequest(), pb.HealthCheckResponse)
    with pytest.raises(errors.Unimplemented):
        await client.call("no.Such", "Check", pb.CheckRequest(), pb.HealthCheckResponse)


async def test_errors_map_to_status(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    with pytest.raises(errors.NotFound, match="no such thing"):
        await client.call(SVC, "Check", pb.CheckRequest(service="notfound"),
                          pb.HealthCheckResponse)
    with pytest.raises(errors.PykataError, match="kaput") as ei:
        await client.call(SVC, "Check", pb.CheckRequest(service="boom"), pb.HealthCheckResponse)
    assert ei.value.code == 2  # UNKNOWN
    # The connection survives handler errors.
    ok = await client.call(SVC, "Check", pb.CheckRequest(), pb.HealthCheckResponse)
    assert ok.status == 1


async def test_timeout_is_sent_and_enforced(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    with pytest.raises(errors.DeadlineExceeded):
        await client.call(SVC, "Check", pb.CheckRequest(service="sleep"),
                          pb.HealthCheckResponse, timeout=0.1)


async def test_server_enforces_timeout_nano() -> None:
    server = Server()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    task = asyncio.ensure_future(server.serve_stream(sr, sw))
    r, w = await asyncio.open_unix_connection(sock=b)
    req = ttrpc_pb2.Request(service=SVC, method="Check", timeout_nano=50_000_000,
                            payload=pb.CheckRequest(service="sleep").SerializeToString())
    w.write(frames.encode(1, frames.TYPE_REQUEST, req.SerializeToString()))
    frame = await asyncio.wait_for(frames.read_frame(r), 5)
    resp = ttrpc_pb2.Response.FromString(frame.data)
    assert resp.status.code == 4  # DEADLINE_EXCEEDED
    w.close()
    task.cancel()


async def test_metadata(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    resp = await client.call(SVC, "Check", pb.CheckRequest(service="metadata"),
                             pb.HealthCheckResponse, metadata={"k": ["a", "b"]})
    assert resp.status == 2


async def test_oversize_request_refused_by_client(env: tuple[Client, Health, Server]) -> None:
    client, _, _ = env
    big = pb.CheckRequest(service="x" * (frames.MAX_DATA + 1))
    with pytest.raises(errors.ResourceExhausted):
        await client.call(SVC, "Check", big, pb.HealthCheckResponse)
    ok = await client.call(SVC, "Check", pb.CheckRequest(), pb.HealthCheckResponse)
    assert ok.status == 1


async def _raw_server() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    server = Server()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a, limit=frames.MAX_DATA * 2)
    task = asyncio.ensure_future(server.serve_stream(sr, sw))
    r, w = await asyncio.open_unix_connection(sock=b)
    return r, w, task


async def test_oversize_frame_gets_resource_exhausted_and_connection_survives() -> None:
    r, w, task = await _raw_server()
    w.write(struct.pack(">IIBB", frames.MAX_DATA + 10, 1, 1, 0) + b"\0" * (frames.MAX_DATA + 10))
    req = ttrpc_pb2.Request(service=SVC, method="Check",
                            payload=pb.CheckRequest().SerializeToString())
    w.write(frames.encode(3, frames.TYPE_REQUEST, req.SerializeToString()))
    got = {}
    for _ in range(2):
        f = await asyncio.wait_for(frames.read_frame(r), 10)
        got[f.stream_id] = ttrpc_pb2.Response.FromString(f.data)
    assert got[1].status.code == 8  # RESOURCE_EXHAUSTED
    assert got[3].status.code == 0
    w.close()
    task.cancel()


async def test_malformed_and_even_stream() -> None:
    r, w, task = await _raw_server()
    w.write(frames.encode(1, frames.TYPE_REQUEST, b"\xff\xff\xff"))  # not protobuf
    req = ttrpc_pb2.Request(service=SVC, method="Check")
    w.write(frames.encode(2, frames.TYPE_REQUEST, req.SerializeToString()))
    codes = {}
    for _ in range(2):
        f = await asyncio.wait_for(frames.read_frame(r), 5)
        codes[f.stream_id] = ttrpc_pb2.Response.FromString(f.data).status.code
    assert codes == {1: 3, 2: 3}  # INVALID_ARGUMENT
    w.close()
    task.cancel()


async def test_truncated_frame_fails_pending_calls() -> None:
    a, b = socket.socketpair()
    r, w = await asyncio.open_unix_connection(sock=b)
    client = Client(r, w)
    call = asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(),
                                             pb.HealthCheckResponse))
    await asyncio.sleep(0.05)
    a.recv(65536)  # the request (read, so closing does not reset the connection)
    a.sendall(struct.pack(">IIBB", 100, 1, 2, 0) + b"\0" * 10)  # promises 100, sends 10
    a.close()
    with pytest.raises(errors.Unavailable, match="middle of a frame"):
        await asyncio.wait_for(call, 5)
    with pytest.raises(errors.Unavailable):
        await client.call(SVC, "Check", pb.CheckRequest(), pb.HealthCheckResponse)
    await client.close()


async def test_connection_loss_fails_pending_and_server_cancels() -> None:
    server = Server()
    impl = Health()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], impl)
    client, task = await _pair(server)
    call = asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(service="slow"),
                                             pb.HealthCheckResponse))
    await asyncio.sleep(0.05)
    task.cancel()  # the server side goes away
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(call, 5)
    await client.close()


async def test_unix_server_many_connections(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "t.sock"
    server = Server()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
    await server.serve_unix(path)
    clients = [await Client.connect_unix(path) for _ in range(5)]
    res = await asyncio.gather(*[
        c.call(SVC, "Version", pb.CheckRequest(service=str(i)), pb.VersionCheckResponse)
        for i, c in enumerate(clients)])
    assert [x.agent_version for x in res] == ["0", "1", "2", "3", "4"]
    for c in clients:
        await c.close()
    await server.close()
    with pytest.raises(errors.Unavailable):
        await Client.connect_unix(path.parent / "missing.sock")


async def test_server_close_with_open_connections_is_quiet(tmp_path: object) -> None:
    """close() ends connections still open (a call in flight included) without
    asyncio reporting an unhandled exception from them."""
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "q.sock"
    server = Server()
    impl = Health()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], impl)
    await server.serve_unix(path)
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        clients = [await Client.connect_unix(path) for _ in range(3)]
        pending = asyncio.ensure_future(clients[0].call(
            SVC, "Check", pb.CheckRequest(service="slow"), pb.HealthCheckResponse))
        await clients[1].call(SVC, "Version", pb.CheckRequest(service="x"),
                              pb.VersionCheckResponse)
        await asyncio.wait_for(server.close(), 5)
        with pytest.raises(errors.PykataError):
            await asyncio.wait_for(pending, 5)
        for c in clients:
            await c.close()
        await asyncio.sleep(0.05)  # let done-callbacks run
    finally:
        loop.set_exception_handler(None)
    assert reported == []


# -- limits (issue 12: the peer may be hostile) ---------------------------------------
class Counting(Health):
    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.peak = 0

    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await super().Check(req)
        finally:
            self.active -= 1


async def test_in_flight_calls_per_connection_are_capped() -> None:
    """At the cap the server stops reading: a call sent later waits (backpressure)
    until one in flight finishes, and never more than the cap run at once."""
    server = Server(max_in_flight=3)
    impl = Counting()
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], impl)
    client, task = await _pair(server)
    slow = [asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(service="slow"),
                                              pb.HealthCheckResponse)) for _ in range(5)]
    fast = asyncio.ensure_future(client.call(SVC, "Version", pb.CheckRequest(service="f"),
                                             pb.VersionCheckResponse))
    await asyncio.sleep(0.2)
    assert impl.active == 3 and impl.peak == 3
    assert not fast.done()  # not even read: all three slots are busy
    impl.release.set()
    assert (await asyncio.wait_for(fast, 5)).agent_version == "f"
    assert [r.status for r in await asyncio.wait_for(asyncio.gather(*slow), 5)] == [1] * 5
    assert impl.peak == 3
    await client.close()
    task.cancel()


async def test_ignored_frames_do_not_leak_slots() -> None:
    server = Server(max_in_flight=1)
    server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    task = asyncio.ensure_future(server.serve_stream(sr, sw))
    r, w = await asyncio.open_unix_connection(sock=b)
    for i in range(5):  # data and response frames are ignored; each gives its slot back
        w.write(frames.encode(2 * i + 1, frames.TYPE_DATA, b"x"))
        w.write(frames.encode(2 * i + 1, frames.TYPE_RESPONSE, b"y"))
    req = ttrpc_pb2.Request(service=SVC, method="Check")
    w.write(frames.encode(99, frames.TYPE_REQUEST, req.SerializeToString()))
    f = await asyncio.wait_for(frames.read_frame(r), 5)
    assert f.stream_id == 99 and ttrpc_pb2.Response.FromString(f.data).status.code == 0
    w.close()
    task.cancel()


async def test_absurd_length_header_closes_the_connection() -> None:
    """A 4 GiB length is neither allocated nor read through: the connection ends."""
    r, w, task = await _raw_server()
    w.write(struct.pack(">IIBB", 0xFFFFFFFF, 1, 1, 0) + b"\0" * 1000)
    assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing answered
    await asyncio.wait_for(task, 5)
    w.close()


async def test_client_drops_what_it_did_not_ask_for(caplog: pytest.LogCaptureFixture) -> None:
    """Responses for streams never requested, other frame types and garbage from
    the peer are dropped and logged quoted and truncated; calls keep working."""
    a, b = socket.socketpair()
    r, w = await asyncio.open_unix_connection(sock=b)
    client = Client(r, w)
    loop = asyncio.get_running_loop()
    a.setblocking(False)
    evil = b"\x1b[2J\nlevel=error msg=forged" + b"A" * 5000
    await loop.sock_sendall(a, frames.encode(7, frames.TYPE_RESPONSE, evil))
    await loop.sock_sendall(a, frames.encode(8, frames.TYPE_DATA, b"\n" * 10))
    await loop.sock_sendall(a, frames.encode(9, frames.TYPE_RESPONSE, b"\xff\xff"))
    call = asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(),
                                             pb.HealthCheckResponse))
    hdr = b""
    while len(hdr) < 10:
        hdr += await loop.sock_recv(a, 10 - len(hdr))
    length, sid, _, _ = struct.unpack(">IIBB", hdr)
    body = b""
    while len(body) < length:
        body += await loop.sock_recv(a, length - len(body))
    ok = pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)
    data = ttrpc_pb2.Response(payload=ok.SerializeToString()).SerializeToString()
    await loop.sock_sendall(a, frames.encode(sid, frames.TYPE_RESPONSE, data))
    assert (await asyncio.wait_for(call, 5)).status == 1
    assert client.dropped == 3 and not client._pending
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "forged" in text and "\x1b" not in text
    assert all("\n" not in rec.getMessage() and len(rec.getMessage()) < 300
               for rec in caplog.records)
    await client.close()
    a.close()


async def test_client_gives_up_on_an_absurd_frame() -> None:
    a, b = socket.socketpair()
    r, w = await asyncio.open_unix_connection(sock=b)
    client = Client(r, w)
    call = asyncio.ensure_future(client.call(SVC, "Check", pb.CheckRequest(),
                                             pb.HealthCheckResponse))
    await asyncio.sleep(0.05)
    a.sendall(struct.pack(">IIBB", frames.MAX_DISCARD + 1, 1, 2, 0))
    with pytest.raises(errors.Unavailable, match="given up"):
        await asyncio.wait_for(call, 5)
    assert client.closed
    await client.close()
    a.close()
