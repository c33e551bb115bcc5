"""Port forwarding: the mux (pykata.ttrpc.mux) end to end over a socketpair
with real loopback TCP on both ends, its bounds, and a hostile guest writing
raw frames at the host; the nftables batch encoding (resources/portforward)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from pykata.resources import portforward as pf
from pykata.ttrpc import mux
from pykata.ttrpc.mux import HEADER, Kind, Reason

pytestmark = pytest.mark.timeout(60)


async def _pair() -> tuple[mux.Streams, mux.Streams]:
    a, b = socket.socketpair()
    return (await asyncio.open_connection(sock=a, limit=1 << 20),
            await asyncio.open_connection(sock=b, limit=1 << 20))


@dataclass
class Rig:
    host: mux.Mux
    guest: mux.Mux
    port: int  # the host-side listener: connecting to it is "containerd's dial"
    servers: list[asyncio.base_events.Server]
    tasks: list[asyncio.Task[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then a line with the sha256 of what came, then close."""
    h = hashlib.sha256()
    while data := await reader.read(65536):
        h.update(data)
        writer.write(data)
        await writer.drain()
    writer.write(b"sha " + h.hexdigest().encode() + b"\n")
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def rig(guest_port: int, *, max_conns: int = mux.MAX_CONNS,
              window: int = mux.WINDOW) -> AsyncIterator[Rig]:
    (hr, hw), (gr, gw) = await _pair()
    host = mux.Mux(hr, hw, name="host", max_conns=max_conns, window=window)

    async def connector(port: int, family: int) -> mux.Streams:
        assert family == mux.FAMILY_V4
        return await asyncio.open_connection("127.0.0.1", port)

    guest = mux.Mux(gr, gw, connector=connector, name="guest", window=window)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await host.forward(guest_port, mux.FAMILY_V4, reader, writer)
        except mux.OpenFailed:
            mux.abort(writer)

    front = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    tasks = [asyncio.ensure_future(host.run()), asyncio.ensure_future(guest.run())]
    r = Rig(host, guest, port, [front], tasks)
    try:
        yield r
    finally:
        host.close()
        guest.close()
        for s in r.servers:
            s.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i:i + 100_000])
            await writer.drain()
        writer.write_eof()  # half-close: the server answers after it

    sender = asyncio.ensure_future(send())
    got = await reader.read()
    await sender
    writer.close()
    return got


async def test_echo_large_both_ways_and_half_close() -> None:
    payload = os.urandom(3 << 20)
    async with echo_server() as eport, rig(eport) as r:
        got = await _roundtrip(r.port, payload)
        assert got[:len(payload)] == payload
        assert got[len(payload):] == b"sha " + hashlib.sha256(payload).hexdigest().encode() + b"\n"
        await asyncio.sleep(0.05)
        assert r.host.conns == {} and r.guest.conns == {}
        assert r.host.stats["violations"] == r.guest.stats["violations"] == 0


async def test_many_concurrent_connections() -> None:
    async with echo_server() as eport, rig(eport) as r:
        payloads = [os.urandom(50_000 + i * 997) for i in range(40)]
        results = await asyncio.gather(*(_roundtrip(r.port, p) for p in payloads))
        for p, got in zip(payloads, results, strict=True):
            assert got.startswith(p) and got.endswith(
                hashlib.sha256(p).hexdigest().encode() + b"\n")
        assert r.host.stats["opened"] == 40


async def test_refused_port_is_a_reset() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed_port = s.getsockname()[1]
    s.close()
    async with rig(closed_port) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert r.host.stats["failed"] == 1 and r.host.conns == {}


async def test_reset_carried_both_ways() -> None:
    resets: list[str] = []
    accepted = asyncio.Event()
    holder: list[asyncio.StreamWriter] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder.append(writer)
        accepted.set()
        try:
            await reader.read()
        except ConnectionResetError:
            resets.append("server saw reset")

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    async with rig(srv.sockets[0].getsockname()[1]) as r:
        # guest side resets -> the client sees a reset
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        await asyncio.wait_for(accepted.wait(), 5)
        mux.abort(holder[0])
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # client resets -> the server sees a reset
        accepted.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        await asyncio.wait_for(accepted.wait(), 5)
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)
        mux.abort(writer)
        for _ in range(100):
            if resets:
                break
            await asyncio.sleep(0.02)
        assert resets == ["server saw reset"]
    srv.close()


async def test_connection_cap() -> None:
    async with echo_server() as eport, rig(eport, max_conns=2) as r:
        held = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(2)]
        for _, w in held:
            w.write(b"a")
        for rd, _ in held:
            assert await asyncio.wait_for(rd.readexactly(1), 5) == b"a"
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for _, w in held:
            w.close()


# -- a hostile guest ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def hostile(window: int = mux.WINDOW
                  ) -> AsyncIterator[tuple[mux.Mux, asyncio.StreamReader,
                                           asyncio.StreamWriter, asyncio.Task[None]]]:
    """A host mux whose peer is the test, writing raw frames."""
    (hr, hw), (gr, gw) = await _pair()
    host = mux.Mux(hr, hw, name="host", open_timeout=5, window=window)
    task = asyncio.ensure_future(host.run())
    try:
        yield host, gr, gw, task
    finally:
        host.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gw.close()


async def _frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    kind, cid, length = HEADER.unpack(await asyncio.wait_for(reader.readexactly(HEADER.size), 5))
    return kind, cid, await reader.readexactly(length)


async def _opened_conn(host: mux.Mux, gr: asyncio.StreamReader, gw: asyncio.StreamWriter
                       ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection the host forwards, OPENED by the fake guest."""
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await host.forward(80, mux.FAMILY_V4, reader, writer)
        except mux.OpenFailed:
            mux.abort(writer)

    front = await asyncio.start_server(accepted, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
    kind, cid, body = await _frame(gr)
    assert kind == Kind.OPEN and mux.OPEN_BODY.unpack(body) == (80, mux.FAMILY_V4)
    gw.write(mux.encode(Kind.OPENED, cid))
    return cid, reader, writer


async def test_hostile_oversized_frame_closes_the_channel() -> None:
    async with hostile() as (host, gr, gw, task):
        cid, reader, _writer = await _opened_conn(host, gr, gw)
        gw.write(HEADER.pack(Kind.DATA, cid, 1 << 30))
        await asyncio.wait_for(task, 5)
        assert host.closed and host.stats["violations"] == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)


async def test_hostile_unknown_kind_closes_the_channel() -> None:
    async with hostile() as (host, _gr, gw, task):
        gw.write(HEADER.pack(99, 1, 0))
        await asyncio.wait_for(task, 5)
        assert host.closed


async def test_hostile_data_beyond_window_resets_only_that_connection() -> None:
    async with hostile(window=4096) as (host, gr, gw, task):
        cid, _reader, writer = await _opened_conn(host, gr, gw)
        cid2, reader2, writer2 = await _opened_conn(host, gr, gw)
        # the whole window and one byte more, in one write (before any WINDOW)
        gw.write(mux.encode(Kind.DATA, cid, b"z" * 4096) + mux.encode(Kind.DATA, cid, b"!"))
        await gw.drain()
        seen: list[tuple[int, int, bytes]] = []
        while not any(k == Kind.RESET for k, _, _ in seen):
            seen.append(await _frame(gr))
        assert (Kind.RESET, cid, bytes([Reason.PROTOCOL])) in seen
        assert host.stats["violations"] == 1 and cid not in host.conns
        # the other connection still works
        gw.write(mux.encode(Kind.DATA, cid2, b"hello"))
        assert await asyncio.wait_for(reader2.readexactly(5), 5) == b"hello"
        assert not task.done()
        writer.close()
        writer2.close()


async def test_hostile_frames_for_unknown_ids_are_ignored() -> None:
    async with hostile() as (host, gr, gw, task):
        for kind in (Kind.DATA, Kind.WINDOW, Kind.EOF, Kind.RESET, Kind.OPENED):
            gw.write(mux.encode(kind, 12345, b"x"))
        cid, reader, writer = await _opened_conn(host, gr, gw)
        gw.write(mux.encode(Kind.DATA, cid, b"ok"))
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        assert host.stats["ignored"] == 5 and not task.done()
        writer.close()


@pytest.mark.parametrize("frame", [
    (Kind.WINDOW, struct.pack(">I", 1)),  # more credit than was ever used
    (Kind.WINDOW, b"\0\0"),  # malformed
    (Kind.OPENED, b""),  # twice
    (Kind.EOF, b"junk"),
    (Kind.DATA, b""),
])
async def test_hostile_bad_control_frames_reset_the_connection(frame: tuple[Kind, bytes]
                                                               ) -> None:
    async with hostile() as (host, gr, gw, task):
        cid, reader, writer = await _opened_conn(host, gr, gw)
        gw.write(mux.encode(frame[0], cid, frame[1]))
        kind, rcid, body = await _frame(gr)
        assert (kind, rcid, body) == (Kind.RESET, cid, bytes([Reason.PROTOCOL]))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        assert not task.done() and host.conns == {}
        writer.close()


async def test_hostile_open_towards_the_host_is_refused() -> None:
    async with hostile() as (host, gr, gw, _task):
        gw.write(mux.encode(Kind.OPEN, 7, mux.OPEN_BODY.pack(22, 4)))
        assert await _frame(gr) == (Kind.RESET, 7, bytes([Reason.PROTOCOL]))
        assert host.conns == {}


async def test_hostile_guest_never_answering_open_times_out() -> None:
    (hr, hw), (_gr, _gw) = await _pair()
    host = mux.Mux(hr, hw, open_timeout=0.2)
    task = asyncio.ensure_future(host.run())
    a, _b = await _pair()
    with pytest.raises(mux.OpenFailed) as info:
        await host.forward(80, mux.FAMILY_V4, *a)
    assert info.value.reason is Reason.TIMEOUT and host.conns == {}
    host.close()
    await asyncio.gather(task, return_exceptions=True)


async def test_guest_side_validates_open() -> None:
    (hr, hw), (gr, gw) = await _pair()

    async def connector(port: int, family: int) -> mux.Streams:
        raise ConnectionRefusedError(111, "refused")

    guest = mux.Mux(gr, gw, connector=connector)
    task = asyncio.ensure_future(guest.run())
    hw.write(mux.encode(Kind.OPEN, 1, mux.OPEN_BODY.pack(0, 4)))  # port 0
    hw.write(mux.encode(Kind.OPEN, 2, mux.OPEN_BODY.pack(80, 5)))  # family 5
    hw.write(mux.encode(Kind.OPEN, 3, b"\0"))  # short
    hw.write(mux.encode(Kind.OPEN, 4, mux.OPEN_BODY.pack(80, 4)))  # refused
    got = [await _frame(hr) for _ in range(4)]
    assert got == [(Kind.RESET, 1, bytes([Reason.PROTOCOL])),
                   (Kind.RESET, 2, bytes([Reason.PROTOCOL])),
                   (Kind.RESET, 3, bytes([Reason.PROTOCOL])),
                   (Kind.RESET, 4, bytes([Reason.REFUSED]))]
    guest.close()
    await asyncio.gather(task, return_exceptions=True)


# -- nftables encoding -----------------------------------------------------------------------

def test_table_batch_shape() -> None:
    batch, acks = pf.table_batch(4000, 6000, seq=10)
    msgs = pf._messages(batch)
    types = [t for t, _, _ in msgs]
    nft = pf.NFNL_SUBSYS_NFTABLES << 8
    assert types == [pf.NFNL_MSG_BATCH_BEGIN, nft | pf.NFT_MSG_NEWTABLE,
                     nft | pf.NFT_MSG_NEWCHAIN, nft | pf.NFT_MSG_NEWRULE,
                     nft | pf.NFT_MSG_NEWRULE, pf.NFNL_MSG_BATCH_END]
    assert acks == [11, 12, 13, 14]
    assert pf.TABLE.encode() in msgs[1][2]
    rule4, rule6 = msgs[3][2], msgs[4][2]
    assert struct.pack(">H", 4000) in rule4 and bytes([127, 0, 0, 1]) in rule4
    assert struct.pack(">H", 6000) in rule6 and bytes(15) + b"\x01" in rule6
    assert b"redir\0" in rule4 and b"redir\0" in rule6
    assert len(batch) % 4 == 0
