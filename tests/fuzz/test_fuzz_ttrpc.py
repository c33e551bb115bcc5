"""Fuzzing the ttRPC layer: the frame decoder, the server and the client over
a real socket pair with a peer that sends anything, and the guest's early
Health/Check responder's own request parser.

Properties: the decoder yields frames or ends with IncompleteReadError (EOF)
or ResourceExhausted (an absurd length), never buffering more than MAX_DATA;
the server answers every request frame exactly once with a well-formed
response whose error (if any) is one bounded line, and survives any byte
stream; the client's calls end with a result or a PykataError, as a model of
what the peer sent predicts, never hang, and never raise anything else.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import tracemalloc
from dataclasses import dataclass

import pytest
from google.protobuf import message as pb_message
from hypothesis import given
from hypothesis import strategies as st

from pykata import errors, wire
from pykata.guest import channel
from pykata.protos import agent_pb2 as pb
from pykata.protos import ttrpc_pb2
from pykata.ttrpc import Client, Server, frames, mux
from pykata.ttrpc.status import to_error
from tests.fuzz import support

HEALTH = wire.HEALTH_SERVICE
HEADER = struct.Struct(">IIBB")


class Health:
    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        if req.service == "boom":
            raise RuntimeError("handler bug\nsecond line")
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def Version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        if req.service == "slow":
            await asyncio.sleep(0.01)
        return pb.VersionCheckResponse(agent_version=req.service)


# -- strategies -------------------------------------------------------------------------

stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)
frame_types = st.sampled_from([frames.TYPE_REQUEST] * 4 + [frames.TYPE_RESPONSE,
                                                           frames.TYPE_DATA, 0, 255])
flags = st.sampled_from([0, 1, 2, 4, 255])
metadata = st.lists(st.builds(ttrpc_pb2.KeyValue, key=support.texts, value=support.texts),
                    max_size=3)
requests = st.builds(
    ttrpc_pb2.Request,
    service=st.sampled_from([HEALTH, "", "no.Such", HEALTH + "\n"]) | support.texts,
    method=st.sampled_from(["Check", "Version", "Nope", "Check\nX", ""]) | support.texts,
    payload=st.sampled_from([b"", pb.CheckRequest(service="boom").SerializeToString(),
                             pb.CheckRequest(service="slow").SerializeToString(),
                             pb.CheckRequest(service="x" * 1000).SerializeToString(),
                             b"\xff\xff\xff", b"\x0a\x05ab"]) | st.binary(max_size=40),
    timeout_nano=st.sampled_from([0, 0, 0, 1, -1, 10**9, 2**63 - 1, -(2**63)]),
    metadata=metadata,
)
request_bytes = requests.map(lambda r: r.SerializeToString()) | st.binary(max_size=64)


@dataclass(frozen=True)
class RawFrame:
    stream_id: int
    type: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        return HEADER.pack(len(self.data), self.stream_id, self.type, self.flags) + self.data


raw_frames = st.builds(RawFrame, stream_ids, frame_types, flags, request_bytes)
# What ends the stream: nothing, a truncated frame, junk, or a header announcing
# more than MAX_DISCARD (the peer is cut off).
tails = st.sampled_from([b"", HEADER.pack(100, 1, 1, 0) + b"\0" * 10, b"\x00\x00",
                         HEADER.pack(frames.MAX_DISCARD + 1, 1, 1, 0),
                         HEADER.pack(2**32 - 1, 3, 2, 0)]) | st.binary(max_size=12)


# -- the decoder ------------------------------------------------------------------------

@given(st.lists(raw_frames, max_size=8), tails, st.integers(1, 64))
def test_decoder_reads_what_was_framed_and_ends_cleanly(fs: list[RawFrame], tail: bytes,
                                                        chunk: int) -> None:
    stream = b"".join(f.encode() for f in fs) + tail

    async def go() -> None:
        reader = asyncio.StreamReader()
        for i in range(0, len(stream), chunk):
            reader.feed_data(stream[i:i + chunk])
        reader.feed_eof()
        got: list[frames.Frame] = []
        while True:
            try:
                got.append(await frames.read_frame(reader))
            except asyncio.IncompleteReadError:
                break
            except errors.ResourceExhausted as exc:
                support.assert_one_line(str(exc))
                length = HEADER.unpack(tail[:10])[0]
                assert length > frames.MAX_DISCARD
                break
        assert [(g.stream_id, g.type, g.flags, g.data) for g in got[:len(fs)]] == [
            (f.stream_id, f.type, f.flags, f.data) for f in fs]
        for g in got:
            assert len(g.data) <= frames.MAX_DATA and not g.oversize

    support.run(go)


@pytest.mark.parametrize(("length", "stream_id"), [(frames.MAX_DATA + 1, 1),
                                                  (frames.MAX_DATA + 65537, 2**32 - 1),
                                                  (frames.MAX_DISCARD, 4)])
def test_decoder_skips_oversize_frames_without_buffering_them(length: int, stream_id: int
                                                              ) -> None:
    """Up to MAX_DISCARD bytes are read and dropped in chunks: the peak of memory
    allocated while reading is a small fraction of the frame."""
    block = b"\xab" * 65536

    async def go() -> None:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=b)
        _, peer = await asyncio.open_unix_connection(sock=a)

        async def send() -> None:
            peer.write(HEADER.pack(length, stream_id, frames.TYPE_REQUEST, 0))
            left = length
            while left:
                n = min(left, len(block))
                peer.write(block if n == len(block) else block[:n])
                await peer.drain()
                left -= n
            peer.write(frames.encode(stream_id, frames.TYPE_REQUEST, b"next"))
            await peer.drain()

        sender = asyncio.ensure_future(send())
        tracemalloc.start()
        try:
            first = await support.hang_guard(frames.read_frame(reader))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        second = await support.hang_guard(frames.read_frame(reader))
        await sender
        assert first.oversize == length and first.data == b""
        assert second.data == b"next"
        assert peak < frames.MAX_DATA // 4, f"peak {peak} bytes while skipping {length}"
        peer.close()
        writer.close()

    support.run(go)


# -- the server -------------------------------------------------------------------------

@pytest.mark.parametrize("length", [frames.MAX_DATA + 1, frames.MAX_DISCARD])
def test_server_answers_an_oversize_request_without_buffering_it(length: int) -> None:
    """RESOURCE_EXHAUSTED for the oversize call, the next call answered, and the peak
    of memory allocated meanwhile a small fraction of the frame."""
    block = b"\0" * 65536

    async def go() -> None:
        server = Server()
        server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_unix_connection(sock=a)
        serving = asyncio.ensure_future(server.serve_stream(sr, sw))
        r, w = await asyncio.open_unix_connection(sock=b)
        ok = ttrpc_pb2.Request(service=HEALTH, method="Check").SerializeToString()
        tracemalloc.start()
        try:
            w.write(HEADER.pack(length, 1, frames.TYPE_REQUEST, 0))
            for left in range(length, 0, -len(block)):
                w.write(block if left >= len(block) else block[:left])
                await w.drain()
            w.write(frames.encode(3, frames.TYPE_REQUEST, ok))
            got = {}
            for _ in range(2):
                f = await support.hang_guard(frames.read_frame(r))
                got[f.stream_id] = ttrpc_pb2.Response.FromString(f.data).status.code
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got == {1: 8, 3: 0}  # RESOURCE_EXHAUSTED, then OK
        assert peak < frames.MAX_DATA // 4, f"peak {peak} bytes for a {length}-byte frame"
        w.close()
        await support.hang_guard(serving)

    support.run(go)


@given(st.lists(raw_frames, min_size=1, max_size=10), tails)
def test_server_answers_every_request_frame_once(fs: list[RawFrame], tail: bytes) -> None:
    # Requests that start a handler, ignored frames, then how the stream ends. A
    # header announcing more than MAX_DISCARD ends the connection: the calls still
    # running then are cancelled, unanswered.
    expected = [f.stream_id for f in fs if f.type == frames.TYPE_REQUEST]
    cut_off = len(tail) >= 10 and HEADER.unpack(tail[:10])[0] > frames.MAX_DISCARD

    async def go() -> None:
        server = Server()
        server.register_service(pb.DESCRIPTOR.services_by_name["Health"], Health())
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_unix_connection(sock=a)
        serving = asyncio.ensure_future(server.serve_stream(sr, sw))
        r, w = await asyncio.open_unix_connection(sock=b, limit=frames.MAX_DATA * 2)
        w.write(b"".join(f.encode() for f in fs) + tail)
        await w.drain()
        answered: list[int] = []
        while len(answered) < len(expected):
            try:
                f = await support.hang_guard(frames.read_frame(r))
            except asyncio.IncompleteReadError:
                assert cut_off, "the server closed a connection it had no reason to close"
                break
            assert f.type == frames.TYPE_RESPONSE and f.flags == 0
            resp = ttrpc_pb2.Response.FromString(f.data)
            answered.append(f.stream_id)
            if resp.status.code:
                support.assert_one_line(resp.status.message)
                assert len(resp.status.message) <= 1024, resp.status.message[:200]
                assert isinstance(to_error(resp.status), errors.PykataError)
        left = list(expected)
        for sid in answered:
            left.remove(sid)  # each request answered at most once
        assert cut_off or not left
        w.close()
        await support.hang_guard(serving)  # ends by itself when the peer goes
        assert serving.exception() is None

    support.run(go)


# -- the client -------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """One frame the peer sends back: to the n-th call (or a stream nobody
    asked), of some type, holding a response or junk."""

    call: int  # index of the call; -1: an id that was never used
    type: int
    data: bytes


responses = st.builds(
    ttrpc_pb2.Response,
    status=st.builds(ttrpc_pb2.Status, code=st.sampled_from([0, 0, 1, 2, 3, 5, 8, 13, 14, 99,
                                                             -1]),
                     message=support.texts),
    payload=st.sampled_from([pb.HealthCheckResponse(status=1).SerializeToString(), b"",
                             b"\xff\xff"]) | st.binary(max_size=16),
).map(lambda r: r.SerializeToString())
answers = st.builds(Answer, st.integers(-1, 3),
                    st.sampled_from([frames.TYPE_RESPONSE] * 4 + [frames.TYPE_REQUEST,
                                                                  frames.TYPE_DATA, 7]),
                    responses | st.binary(max_size=24))


def _expect(calls: int, ids: list[int], script: list[Answer], cut: bool) -> list[object]:
    """What each call must end with, from what the peer sent: a HealthCheckResponse
    status, or the error class."""
    out: list[object] = [None] * calls
    for a in script:
        if a.type != frames.TYPE_RESPONSE or a.call < 0 or a.call >= calls:
            continue
        if out[a.call] is not None:
            continue  # answered already: dropped
        try:
            resp = ttrpc_pb2.Response.FromString(a.data)
        except pb_message.DecodeError:
            out[a.call] = errors.Internal
            continue
        if resp.status.code != 0:
            out[a.call] = type(to_error(resp.status))
            continue
        try:
            out[a.call] = pb.HealthCheckResponse.FromString(resp.payload).status
        except pb_message.DecodeError:
            out[a.call] = errors.Internal
    del cut  # however the stream ends, the calls not answered find it closed
    return [errors.Unavailable if o is None else o for o in out]


@given(st.integers(1, 4), st.lists(answers, max_size=10), tails)
def test_client_calls_end_as_the_peer_answered(calls: int, script: list[Answer],
                                               tail: bytes) -> None:
    async def go() -> None:
        a, b = socket.socketpair()
        r, w = await asyncio.open_unix_connection(sock=b, limit=frames.MAX_DATA * 2)
        client = Client(r, w)
        pr, pw = await asyncio.open_unix_connection(sock=a, limit=frames.MAX_DATA * 2)
        tasks = [asyncio.ensure_future(client.call(HEALTH, "Check", pb.CheckRequest(),
                                                   pb.HealthCheckResponse))
                 for _ in range(calls)]
        ids = []
        for _ in range(calls):
            f = await support.hang_guard(frames.read_frame(pr))
            assert f.type == frames.TYPE_REQUEST and f.stream_id % 2 == 1
            ids.append(f.stream_id)
        ids.sort()
        for ans in script:
            sid = ids[ans.call] if 0 <= ans.call < calls else max(ids) + 2
            pw.write(HEADER.pack(len(ans.data), sid, ans.type, 0) + ans.data)
        pw.write(tail)
        await pw.drain()
        pw.close()
        done = await support.hang_guard(asyncio.gather(*tasks, return_exceptions=True))
        want = _expect(calls, ids, script, bool(tail))
        # A tail that stops the reader early (an absurd length) changes nothing before it.
        for got, exp in zip(done, want, strict=True):
            if isinstance(exp, int):
                assert isinstance(got, pb.HealthCheckResponse) and got.status == exp, got
            else:
                assert isinstance(got, errors.PykataError), repr(got)
                assert type(got) is exp, (got, exp)
        assert client.closed
        await client.close()

    support.run(go)


# -- the early Health/Check responder (guest, before the agent's imports) --------------

@given(requests.map(lambda r: r.SerializeToString()) | st.binary(max_size=80))
def test_early_request_parser_agrees_with_protobuf(data: bytes) -> None:
    """channel.request_method parses a Request without protobuf: it fails only with
    ValueError, and where protobuf reads the message it reads the same service and
    method. (It may accept what protobuf refuses, such as field number 0 or a
    metadata entry that is not UTF-8: it looks at fields 1 and 2 only, and a
    Check answered early is harmless.)"""
    try:
        service, method = channel.request_method(data)
    except ValueError:
        return
    try:
        req = ttrpc_pb2.Request.FromString(data)
    except pb_message.DecodeError:
        return
    assert (service, method) == (req.service, req.method)


@given(st.lists(raw_frames, max_size=4), st.binary(max_size=20))
def test_early_check_reply_consumes_only_whole_check_frames(fs: list[RawFrame],
                                                            junk: bytes) -> None:
    buffer = b"".join(f.encode() for f in fs) + junk
    with support.cpu_limit():
        reply = channel.check_reply(buffer)
    if reply is None:
        return
    out, used = reply
    assert 0 < used <= len(buffer)
    length, stream, type_, _ = HEADER.unpack(buffer[:10])
    assert used == 10 + length and type_ == frames.TYPE_REQUEST and stream % 2 == 1
    req = ttrpc_pb2.Request.FromString(buffer[10:used])
    assert (req.service, req.method) == (HEALTH, "Check")
    head = HEADER.unpack(out[:10])
    assert head[1] == stream and head[2] == frames.TYPE_RESPONSE
    assert ttrpc_pb2.Response.FromString(out[10:]).status.code == 0


# -- the port-forward multiplexer (its frames come from the guest) --------------------

MuxFrame = tuple[int, int, bytes]  # kind, connection id, payload

mux_payloads = st.sampled_from([
    b"", b"\x00", b"\x01", b"\x06", mux.OPEN_BODY.pack(80, 4), mux.OPEN_BODY.pack(0, 4),
    mux.OPEN_BODY.pack(81, 6), mux.OPEN_BODY.pack(83, 0), mux.OPEN_BODY.pack(82, 9),
    mux.WINDOW_BODY.pack(1), mux.WINDOW_BODY.pack(0), mux.WINDOW_BODY.pack(2**32 - 1),
    mux.WINDOW_BODY.pack(mux.WINDOW), b"d" * 1000, b"d" * mux.MAX_PAYLOAD]) | st.binary(
    max_size=16)
mux_frames = st.tuples(st.sampled_from([*(int(k) for k in mux.Kind), 0, 7, 255]),
                       st.sampled_from([0, 1, 2, 3, 2**32 - 1]), mux_payloads)
mux_tails = st.sampled_from([b"", mux.HEADER.pack(3, 1, mux.MAX_PAYLOAD + 1),
                             mux.HEADER.pack(3, 1, 100) + b"x", b"\x03\x00"])


class CheckedMux(mux.Mux):
    """The mux, checking after each frame from the peer that no connection holds
    more than its window (what bounds the memory a peer can make it use)."""

    def _dispatch(self, kind: mux.Kind, cid: int, payload: bytes) -> None:
        super()._dispatch(kind, cid, payload)
        for conn in self.conns.values():
            assert 0 <= conn.held <= self.window, (conn.id, conn.held)
            assert conn.credit <= self.window, (conn.id, conn.credit)
        assert len(self.conns) <= self.max_conns


@given(st.lists(mux_frames, max_size=14), mux_tails, st.booleans())
def test_mux_survives_any_peer(fs: list[MuxFrame], tail: bytes, opener: bool) -> None:
    """Any frames from the peer: the channel ends cleanly when the peer goes (or on a
    frame it cannot parse), every connection is reset, nothing it sent back is
    malformed, and no connection ever holds more than its window."""

    async def go() -> None:
        a, b = socket.socketpair()
        mr, mw = await asyncio.open_unix_connection(sock=a)
        pr, pw = await asyncio.open_unix_connection(sock=b)
        locals_: list[asyncio.StreamWriter] = []

        async def connector(port: int, family: int) -> mux.Streams:
            if port == 80:
                raise ConnectionRefusedError(111, "refused")
            if port == 81:
                raise TimeoutError
            x, y = socket.socketpair()
            y.close() if port == 83 else None
            r, w = await asyncio.open_unix_connection(sock=x)
            locals_.append(w)
            return r, w

        m = CheckedMux(mr, mw, connector=None if opener else connector, max_conns=2,
                       open_timeout=5.0)
        running = asyncio.ensure_future(m.run())
        forwards = []
        if opener:  # the host side: connections it opened, the peer answering anything
            for _ in range(2):
                x, y = socket.socketpair()
                cr, cw = await asyncio.open_unix_connection(sock=x)
                locals_.append(cw)
                forwards.append(asyncio.ensure_future(m.forward(8080, 4, cr, cw)))
                y.close()
        for kind, cid, payload in fs:
            pw.write(mux.HEADER.pack(kind, cid, len(payload)) + payload)
        pw.write(tail)
        await pw.drain()
        pw.write_eof()
        sent = b""
        try:
            while chunk := await support.hang_guard(pr.read(65536)):
                sent += chunk
        except ConnectionResetError:
            pass  # the mux closed the channel with bytes of ours still unread
        await support.hang_guard(running)
        assert running.exception() is None and m.closed and not m.conns
        for f in forwards:  # each ends: opened and reset, or refused
            res = await support.hang_guard(asyncio.gather(f, return_exceptions=True))
            assert res[0] is None or isinstance(res[0], mux.OpenFailed), res
        pos = 0
        while pos < len(sent):  # what the mux wrote: whole, well-formed frames
            kind, cid, length = mux.HEADER.unpack(sent[pos:pos + mux.HEADER.size])
            assert kind in {int(k) for k in mux.Kind} and cid != 0
            assert length <= mux.MAX_PAYLOAD
            pos += mux.HEADER.size + length
        assert pos == len(sent)
        for w in locals_:
            w.close()
        pw.close()

    support.run(go)
