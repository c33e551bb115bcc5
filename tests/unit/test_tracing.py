"""Tracing (issue 18): the W3C traceparent in ttRPC metadata, the guest's span
recorder, the agent's spans turned into SDK spans of the shim's trace, the
JSON-lines file, and the whole path over a real ttRPC connection in process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import StatusCode

from pykata import errors, observe, tracing
from pykata.config import RuntimeConfig
from pykata.guest import tracing as guest_tracing
from pykata.protos import agent_pb2 as pb
from pykata.tracing import host
from pykata.tracing.jsonfile import JsonLinesExporter
from pykata.ttrpc import Client, Server, frames, tracecontext
from pykata.ttrpc import client as ttrpc_client
from pykata.wire import AGENT_SERVICE

TRACE = bytes(range(1, 17))
SPAN = bytes(range(17, 25))
GOOD = f"00-{TRACE.hex()}-{SPAN.hex()}-01"


# -- traceparent ---------------------------------------------------------------------

def test_traceparent_round_trip() -> None:
    parsed = tracecontext.parse(GOOD)
    assert parsed == tracecontext.TraceParent(TRACE, SPAN, 1)
    assert parsed.sampled and parsed.format() == GOOD
    assert not tracecontext.TraceParent(TRACE, SPAN, 0).sampled


@pytest.mark.parametrize("value", [
    "",
    "00",
    GOOD.upper(),  # hex is lower case
    GOOD + "-",  # version 00 has exactly four fields
    GOOD + "x",
    GOOD[:-1],
    f"ff-{TRACE.hex()}-{SPAN.hex()}-01",  # version ff is invalid
    f"0g-{TRACE.hex()}-{SPAN.hex()}-01",
    f"00-{'0' * 32}-{SPAN.hex()}-01",  # all-zero trace id
    f"00-{TRACE.hex()}-{'0' * 16}-01",  # all-zero parent id
    f"00_{TRACE.hex()}-{SPAN.hex()}-01",
    f"00-{TRACE.hex()}_{SPAN.hex()}-01",
    f"00-{TRACE.hex()}-{SPAN.hex()}_01",
    f"00-{TRACE.hex()}-{SPAN.hex()}-zz",
    f"00-{TRACE.hex()[:-1]}\u0661-{SPAN.hex()}-01",  # a non-ASCII digit
    f"00-{TRACE.hex()}-{SPAN.hex()[:-1]} -01",
    f"01-{TRACE.hex()}-{SPAN.hex()}-01x",  # a later version: a '-' must follow
    f"01-{TRACE.hex()}-{SPAN.hex()}-01-" + "a" * 300,  # too long to look at
    "\0" * 55,
])
def test_traceparent_hostile_values_are_no_trace_context(value: str) -> None:
    assert tracecontext.parse(value) is None


def test_traceparent_later_version_reads_its_first_fields() -> None:
    parsed = tracecontext.parse(f"cc-{TRACE.hex()}-{SPAN.hex()}-01-whatever")
    assert parsed is not None and parsed.trace_id == TRACE and parsed.span_id == SPAN


def test_traceparent_from_metadata() -> None:
    assert tracecontext.from_metadata(None) is None
    assert tracecontext.from_metadata({}) is None
    assert tracecontext.from_metadata({"traceparent": []}) is None
    assert tracecontext.from_metadata({"traceparent": [GOOD, GOOD]}) is None  # ambiguous
    assert tracecontext.from_metadata({"traceparent": [GOOD]}) == tracecontext.parse(GOOD)


# -- the guest's recorder ------------------------------------------------------------

def _record(rec: guest_tracing.Recorder, method: str = "CreateContainer",
            md: dict[str, list[str]] | None = None, request: object = None) -> None:
    around = rec.hook(AGENT_SERVICE, method, request or pb.CreateContainerRequest(
        container_id="c1"), {"traceparent": [GOOD]} if md is None else md)
    assert around is not None
    with around:
        pass


def test_recorder_records_a_child_of_the_callers_span() -> None:
    rec = guest_tracing.Recorder()
    _record(rec)
    taken = rec.take()
    assert taken.dropped == 0 and len(taken.spans) == 1
    span = taken.spans[0]
    assert span.trace_id == TRACE and span.parent_span_id == SPAN
    assert len(span.span_id) == 8 and any(span.span_id) and span.span_id != SPAN
    assert span.name == "agent.CreateContainer" and span.error == ""
    assert span.attributes["container.id"] == "c1"
    assert span.attributes["rpc.method"] == "CreateContainer"
    assert 0 < span.start_unix_nano <= span.end_unix_nano
    assert rec.take().spans == []  # handed over and forgotten


def test_recorder_ignores_untraced_unsampled_and_unrecorded_calls() -> None:
    rec = guest_tracing.Recorder()
    req = pb.CreateContainerRequest()
    assert rec.hook(AGENT_SERVICE, "CreateContainer", req, {}) is None
    assert rec.hook(AGENT_SERVICE, "CreateContainer", req, {"traceparent": ["junk"]}) is None
    unsampled = {"traceparent": [GOOD[:-2] + "00"]}
    assert rec.hook(AGENT_SERVICE, "CreateContainer", req, unsampled) is None
    for method in ("TakeSpans", "ReadStdout", "WriteStdin", "Check"):
        assert rec.hook(AGENT_SERVICE, method, req, {"traceparent": [GOOD]}) is None
    assert rec.take().spans == []


def test_recorder_keeps_the_error() -> None:
    rec = guest_tracing.Recorder()
    around = rec.hook(AGENT_SERVICE, "StartContainer", pb.StartContainerRequest(),
                      {"traceparent": [GOOD]})
    assert around is not None
    with pytest.raises(errors.NotFound), around:
        raise errors.NotFound("x" * 1000)
    span = rec.take().spans[0]
    assert span.error.startswith("NotFound: x") and len(span.error) == guest_tracing.MAX_ERROR


def test_recorder_is_capped_and_counts_what_it_dropped() -> None:
    rec = guest_tracing.Recorder(cap=3)
    for i in range(5):
        _record(rec, request=pb.CreateContainerRequest(container_id=f"c{i}"))
    taken = rec.take()
    assert taken.dropped == 2
    assert [s.attributes["container.id"] for s in taken.spans] == ["c2", "c3", "c4"]
    _record(rec)
    again = rec.take()
    assert again.dropped == 0 and len(again.spans) == 1


# -- agent spans into SDK spans ------------------------------------------------------

RESOURCE = Resource({"service.name": "pykata-agent"})


def _agent_span(**kw: object) -> pb.TraceSpan:
    fields: dict[str, object] = dict(
        trace_id=TRACE, span_id=b"\x01" * 8, parent_span_id=SPAN, name="agent.StartContainer",
        start_unix_nano=1_000, end_unix_nano=2_000, attributes={"container.id": "c1"})
    fields.update(kw)
    return pb.TraceSpan(**fields)  # type: ignore[arg-type]


def test_agent_span_becomes_an_sdk_span_of_the_same_trace() -> None:
    span = host.to_readable(_agent_span(), RESOURCE)
    assert span is not None and span.context is not None and span.parent is not None
    assert span.context.trace_id == int.from_bytes(TRACE, "big")
    assert span.context.span_id == int.from_bytes(b"\x01" * 8, "big")
    assert span.parent.span_id == int.from_bytes(SPAN, "big") and span.parent.is_remote
    assert span.parent.trace_id == span.context.trace_id
    assert (span.start_time, span.end_time) == (1_000, 2_000)
    assert dict(span.attributes or {}) == {"container.id": "c1"}
    assert span.name == "agent.StartContainer" and span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "pykata-agent"


def test_agent_span_error_ends_and_bounds() -> None:
    span = host.to_readable(_agent_span(error="boom", end_unix_nano=500,
                                        name="bad\nname" + "n" * 500,
                                        attributes={f"k{i:03}": "v" * 1000 for i in range(99)}),
                            RESOURCE)
    assert span is not None
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "boom"
    assert span.end_time == span.start_time == 1_000  # an end before the start is clamped
    assert "\n" not in span.name and len(span.name) == host.MAX_NAME
    attrs = dict(span.attributes or {})
    assert len(attrs) == host.MAX_ATTRIBUTES
    assert all(len(str(v)) == host.MAX_VALUE for v in attrs.values())
    root = host.to_readable(_agent_span(parent_span_id=b""), RESOURCE)
    assert root is not None and root.parent is None


@pytest.mark.parametrize("bad", [
    {"trace_id": b""}, {"trace_id": b"\0" * 16}, {"trace_id": TRACE + b"x"},
    {"span_id": b"\0" * 8}, {"span_id": b"1234567"}, {"parent_span_id": b"\0" * 8},
    {"parent_span_id": b"123"},
])
def test_agent_span_with_malformed_ids_is_dropped(bad: dict[str, bytes]) -> None:
    assert host.to_readable(_agent_span(**bad), RESOURCE) is None


# -- the shim's spans ----------------------------------------------------------------

@pytest.fixture
def traced() -> Iterator[tuple[host.Tracing, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    t = host.Tracing("pykata-shim", exporters=[memory])
    t.install()
    try:
        yield t, memory
    finally:
        t.close()
    assert ttrpc_client._metadata_hook is None and observe._span_factory is None


def _finished(t: host.Tracing, memory: InMemorySpanExporter) -> list[ReadableSpan]:
    t.provider.force_flush()
    return list(memory.get_finished_spans())


def test_phases_of_one_sandbox_share_its_trace(
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    t, memory = traced
    phases = observe.Phases()
    with observe.phase("sandbox.create", phases, sandbox="sb"):
        with observe.phase("vm.boot", phases, sandbox="sb"):
            pass
    with observe.phase("container.start", sandbox="sb", container="c"):
        pass
    with observe.phase("sandbox.stop", phases, sandbox="sb"):
        pass
    with observe.phase("sandbox.create", phases, sandbox="sb"):  # the id again: a new trace
        pass
    spans = {(s.name, i): s for i, s in enumerate(_finished(t, memory))}
    by_name = [s for (_, _), s in sorted(spans.items(), key=lambda kv: kv[0][1])]
    boot, create, start, stop, again = by_name
    assert (boot.name, create.name, start.name, stop.name) == (
        "vm.boot", "sandbox.create", "container.start", "sandbox.stop")
    assert create.context is not None and create.parent is None
    tid = create.context.trace_id
    for child in (boot, start, stop):
        assert child.context is not None and child.parent is not None
        assert child.context.trace_id == tid and child.parent.span_id == create.context.span_id
    assert dict(start.attributes or {}) == {"pykata.sandbox": "sb", "pykata.container": "c"}
    assert again.context is not None and again.context.trace_id != tid
    assert [n for n, _ in phases.items()] == ["vm.boot", "sandbox.create", "sandbox.stop"]


def test_failed_phase_is_an_error_span(
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    t, memory = traced
    with pytest.raises(errors.Unavailable), observe.phase("container.create", sandbox="s"):
        raise errors.Unavailable("gone")
    (span,) = _finished(t, memory)
    assert span.status.status_code is StatusCode.ERROR


def test_metadata_hook_carries_the_current_span(
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    t, memory = traced
    assert t.metadata() is None  # no span, no trace context
    with observe.phase("container.create", sandbox="s"):
        md = t.metadata()
    assert md is not None
    parent = tracecontext.parse(md["traceparent"])
    (span,) = _finished(t, memory)
    assert span.context is not None and parent is not None and parent.sampled
    assert int.from_bytes(parent.trace_id, "big") == span.context.trace_id
    assert int.from_bytes(parent.span_id, "big") == span.context.span_id


def test_agent_spans_only_of_traces_the_shim_sent(
        traced: tuple[host.Tracing, InMemorySpanExporter],
        caplog: pytest.LogCaptureFixture) -> None:
    t, memory = traced
    with observe.phase("container.create", sandbox="s"):
        md = t.metadata()
    assert md is not None
    parent = tracecontext.parse(md["traceparent"])
    assert parent is not None
    ours = _agent_span(trace_id=parent.trace_id, parent_span_id=parent.span_id)
    foreign = _agent_span()  # a trace this shim never sent
    malformed = _agent_span(span_id=b"")
    with caplog.at_level(logging.WARNING):
        exported = t.export_agent_spans(pb.TraceSpans(spans=[ours, foreign, malformed],
                                                      dropped=4))
    assert exported == 1 and t.agent_dropped == 6
    assert sum("spans were lost" in r.message for r in caplog.records) == 1
    names = [s.name for s in _finished(t, memory)]
    assert sorted(names) == ["agent.StartContainer", "container.create"]


def test_setup_off_and_without_destination(caplog: pytest.LogCaptureFixture) -> None:
    assert not tracing.setup(RuntimeConfig())
    assert not tracing.enabled() and observe._span_factory is None
    with caplog.at_level(logging.WARNING):
        assert not tracing.setup(RuntimeConfig(enable_tracing=True))
    assert "neither tracing_endpoint nor tracing_file" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert not tracing.setup(RuntimeConfig(enable_tracing=True,
                                               tracing_endpoint="ftp://x"))
    assert "not an http(s) URL" in caplog.text and not tracing.enabled()


async def test_collect_is_nothing_when_off_or_for_a_fake_agent() -> None:
    await tracing.collect(object())  # off: returns at once
    t = host.Tracing("s", exporters=[])
    await t.collect(object())  # no ttRPC connection: nothing


# -- the JSON-lines file -------------------------------------------------------------

def test_setup_with_a_file_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    assert tracing.setup(RuntimeConfig(enable_tracing=True, tracing_file=str(path)))
    try:
        assert tracing.enabled()
        with observe.phase("sandbox.create", sandbox="sb"):
            pass
    finally:
        tracing.shutdown()
    assert not tracing.enabled() and observe._span_factory is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["name"] == "sandbox.create" and record["service"] == "pykata-shim"
    assert len(record["trace_id"]) == 32 and len(record["span_id"]) == 16
    assert record["parent_span_id"] == "" and record["status"] == "UNSET"
    assert record["attributes"] == {"pykata.sandbox": "sb"}
    assert 0 < record["start_unix_nano"] <= record["end_unix_nano"]


def _spans(n: int) -> list[ReadableSpan]:
    out = []
    for i in range(n):
        span = host.to_readable(_agent_span(span_id=bytes([i + 1]) * 8), RESOURCE)
        assert span is not None
        out.append(span)
    return out


def test_file_is_appended_and_capped(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = JsonLinesExporter(str(path))
    assert exporter.export(_spans(2)) is SpanExportResult.SUCCESS
    assert exporter.export(_spans(1)) is SpanExportResult.SUCCESS
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    small = JsonLinesExporter(str(path), max_bytes=len(path.read_bytes()) + 10)
    with pytest.raises(OSError, match="full"):
        small.export(_spans(1))
    assert len(path.read_text().splitlines()) == 3  # nothing of the refused batch


def test_file_never_follows_a_link_nor_opens_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError):
        JsonLinesExporter(str(link)).export(_spans(1))
    assert target.read_text() == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # no reader: ENXIO, not a blocked exporter thread
        JsonLinesExporter(str(fifo)).export(_spans(1))


def test_guarded_exporter_says_it_once(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "x")
    guarded = host.Guarded(JsonLinesExporter(str(link)), str(link))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert guarded.export(_spans(1)) is SpanExportResult.FAILURE
    assert sum("cannot export spans" in r.message for r in caplog.records) == 1


# -- the whole path over a real ttRPC connection -------------------------------------

class Agent:
    """The agent side: the guest's recorder as the server's call hook."""

    def __init__(self) -> None:
        self.recorder = guest_tracing.Recorder()
        self.server: Server | None = None

    async def CreateContainer(self, req: pb.CreateContainerRequest) -> pb.Empty:
        return pb.Empty()

    async def StartContainer(self, req: pb.StartContainerRequest) -> pb.ProcessResponse:
        raise errors.NotFound(f"container {req.container_id} not found")

    async def TakeSpans(self, req: pb.TakeSpansRequest) -> pb.TraceSpans:
        return self.recorder.take()


class Conn:
    def __init__(self, conn: Client) -> None:
        self.conn = conn


@pytest.fixture
async def agent() -> AsyncIterator[tuple[Client, Agent]]:
    server = Server()
    impl = Agent()
    server.call_hook = impl.recorder.hook
    impl.server = server
    for method, req in (("CreateContainer", pb.CreateContainerRequest),
                        ("StartContainer", pb.StartContainerRequest),
                        ("TakeSpans", pb.TakeSpansRequest)):
        server.register(AGENT_SERVICE, method, req, getattr(impl, method))
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    task = asyncio.ensure_future(server.serve_stream(sr, sw))
    cr, cw = await asyncio.open_unix_connection(sock=b, limit=frames.MAX_DATA + 64)
    client = Client(cr, cw)
    yield client, impl
    await client.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_agent_spans_join_the_shims_trace_over_ttrpc(
        agent: tuple[Client, Agent],
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    client, impl = agent
    t, memory = traced
    await client.call(AGENT_SERVICE, "CreateContainer", pb.CreateContainerRequest(
        container_id="untraced"), pb.Empty)  # outside any span: not recorded
    with observe.phase("container.create", sandbox="sb", container="c1"):
        await client.call(AGENT_SERVICE, "CreateContainer",
                          pb.CreateContainerRequest(container_id="c1"), pb.Empty)
    with pytest.raises(errors.NotFound), observe.phase("container.start", sandbox="sb"):
        await client.call(AGENT_SERVICE, "StartContainer",
                          pb.StartContainerRequest(container_id="c1"), pb.ProcessResponse)
    await t.collect(Conn(client))
    spans = {s.name: s for s in _finished(t, memory)}
    assert set(spans) == {"container.create", "container.start", "agent.CreateContainer",
                          "agent.StartContainer"}
    create, start = spans["container.create"], spans["container.start"]
    assert create.context is not None and start.context is not None
    for shim, agent_span in ((create, spans["agent.CreateContainer"]),
                             (start, spans["agent.StartContainer"])):
        assert agent_span.context is not None and agent_span.parent is not None
        assert agent_span.context.trace_id == create.context.trace_id
        assert agent_span.parent.span_id == shim.context.span_id
        assert agent_span.resource.attributes["service.name"] == "pykata-agent"
    assert spans["agent.StartContainer"].status.status_code is StatusCode.ERROR
    assert spans["agent.CreateContainer"].attributes == {
        "rpc.system": "ttrpc", "rpc.service": AGENT_SERVICE,
        "rpc.method": "CreateContainer", "container.id": "c1"}
    assert impl.recorder.take().spans == []  # TakeSpans itself is not recorded


async def test_metadata_hook_does_not_override_the_callers_metadata(
        agent: tuple[Client, Agent]) -> None:
    client, impl = agent
    ttrpc_client.set_metadata_hook(lambda: {"traceparent": GOOD})
    try:
        await client.call(AGENT_SERVICE, "CreateContainer", pb.CreateContainerRequest(),
                          pb.Empty)
        await client.call(AGENT_SERVICE, "CreateContainer", pb.CreateContainerRequest(),
                          pb.Empty, metadata={"traceparent": "junk"})
    finally:
        ttrpc_client.set_metadata_hook(None)
    spans = impl.recorder.take().spans
    assert len(spans) == 1 and spans[0].parent_span_id == SPAN


# -- the batcher ---------------------------------------------------------------------

def test_a_child_between_fork_and_exec_starts_no_thread(
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    """The shim starts virtiofsd with a preexec_fn: the at-fork handlers run in the
    child. The SDK's batch processor started its worker thread there, and the
    child hung before exec (a shim stuck in Create); ours starts none."""
    t, _ = traced
    with observe.phase("sandbox.create", sandbox="s"):
        pass
    t.provider.force_flush()
    r, w = os.pipe()
    try:
        def child() -> None:
            os.write(w, str(threading.active_count()).encode())

        subprocess.run(["true"], preexec_fn=child, timeout=60, check=True, pass_fds=(w,))
        assert os.read(r, 16) == b"1"
    finally:
        os.close(r)
        os.close(w)


class _Slow(InMemorySpanExporter):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def export(self, spans: object) -> SpanExportResult:
        self.release.wait(30)
        return super().export(spans)  # type: ignore[arg-type]


def test_batcher_is_bounded_flushes_and_drains_on_shutdown() -> None:
    slow = _Slow()
    batcher = host.Batcher(slow, delay=30, max_queue=3, max_batch=2)
    spans = _spans(7)
    for s in spans[:2]:  # a full batch: taken by the thread, which blocks in export
        batcher.on_end(s)
    for _ in range(100):
        if not batcher._queue:
            break
        time.sleep(0.05)
    assert not batcher._queue
    for s in spans[2:]:
        batcher.on_end(s)  # 3 queued, 2 dropped
    assert batcher.dropped == 2
    assert not batcher.force_flush(50)  # the exporter is stuck: not flushed in time
    slow.release.set()
    assert batcher.force_flush(30000)
    assert len(slow.get_finished_spans()) == 5
    batcher.on_end(spans[0])
    batcher.shutdown()  # what is queued goes out first
    assert len(slow.get_finished_spans()) == 6
    batcher.on_end(spans[1])  # after shutdown: ignored
    assert len(slow.get_finished_spans()) == 6


# -- the guest's clock ---------------------------------------------------------------

S = 1_000_000_000  # ns


def test_clock_shift_places_agent_spans_inside_their_parents() -> None:
    assert host.clock_shift([]) == 0 and host.clock_shift([], 7) == 7
    inside = ((10 * S, 11 * S), (9 * S, 12 * S))
    assert host.clock_shift([inside]) == 0  # already inside: left alone
    behind = [((t - 12 * S + 1, t - 12 * S + 2), (t, t + 3)) for t in (100 * S, 200 * S)]
    shift = host.clock_shift(behind)
    for (start, end), (p_start, p_end) in behind:
        assert p_start <= start + shift and end + shift <= p_end
    assert host.clock_shift(behind, default=12 * S) == 12 * S  # still allowed: kept
    # A long poll outliving its parent allows no shift; a call made after its span
    # ended allows a wrong one: the others outvote it.
    long_poll = ((0, 50 * S), (0, 3))
    late = ((500 * S, 500 * S + 1), (100 * S, 100 * S + 3))
    assert host.clock_shift([long_poll, late, *behind]) == shift


def test_agent_spans_of_a_lagging_guest_clock_are_moved_into_their_parents(
        traced: tuple[host.Tracing, InMemorySpanExporter]) -> None:
    t, memory = traced
    with observe.phase("container.create", sandbox="s"):
        md = t.metadata()
    assert md is not None
    parent = tracecontext.parse(md["traceparent"])
    assert parent is not None
    (shim,) = _finished(t, memory)
    assert shim.start_time is not None and shim.end_time is not None
    lag = 12 * S
    span = _agent_span(trace_id=parent.trace_id, parent_span_id=parent.span_id,
                       start_unix_nano=shim.start_time - lag + 1,
                       end_unix_nano=shim.end_time - lag - 1)
    assert t.export_agent_spans(pb.TraceSpans(spans=[span])) == 1
    agent = next(s for s in _finished(t, memory) if s.name == "agent.StartContainer")
    assert agent.start_time is not None and agent.end_time is not None
    assert shim.start_time <= agent.start_time <= agent.end_time <= shim.end_time
    assert agent.end_time - agent.start_time == span.end_unix_nano - span.start_unix_nano
    assert (agent.attributes or {})["pykata.guest_clock_shift_ns"] == str(t.shift)
    assert t.shift > 0


def test_unreachable_collector_and_unwritable_file_are_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the collector's loopback port; the file is a directory.
    The phases still run, and each destination is one warning, however many
    exports fail."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # a free port, closed again: refused
    port = listener.getsockname()[1]
    listener.close()
    (tmp_path / "dir").mkdir()
    with caplog.at_level(logging.WARNING):
        assert tracing.setup(RuntimeConfig(
            enable_tracing=True, tracing_endpoint=f"http://127.0.0.1:{port}/v1/traces",
            tracing_file=str(tmp_path / "dir")))
        try:
            for i in range(2):
                with observe.phase(f"p{i}", sandbox="s"):
                    pass
                assert tracing._active is not None
                tracing._active.provider.force_flush(10000)
        finally:
            tracing.shutdown()
    warned = [r.getMessage() for r in caplog.records if "cannot export spans" in r.message]
    assert len(warned) == 2, warned
    assert any(f"127.0.0.1:{port}" in w for w in warned)
    assert any(str(tmp_path / "dir") in w for w in warned)


async def test_a_failing_call_hook_never_fails_the_call(
        agent: tuple[Client, Agent], caplog: pytest.LogCaptureFixture) -> None:
    client, impl = agent

    def broken(*args: object) -> None:
        raise RuntimeError("observer bug")

    assert impl.server is not None
    impl.server.call_hook = broken
    with caplog.at_level(logging.ERROR):
        await client.call(AGENT_SERVICE, "CreateContainer", pb.CreateContainerRequest(),
                          pb.Empty, metadata={"traceparent": GOOD})
    assert "call hook failed" in caplog.text
