"""The shim's tracing, on OpenTelemetry's SDK: a TracerProvider whose batch span
processors feed an OTLP/HTTP exporter and/or a JSON-lines file; the span factory
of ``pykata.observe``; the ``traceparent`` every agent call in a span carries; and
the agent's spans (``TraceSpan``, untrusted guest bytes) turned into SDK spans
handed to the same processors. Imported only when tracing is on."""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from pykata import __version__, errors, observe
from pykata.protos import agent_pb2 as pb
from pykata.tracing.jsonfile import JsonLinesExporter
from pykata.ttrpc import client as ttrpc_client
from pykata.ttrpc import tracecontext
from pykata.wire import AGENT_SERVICE

log = logging.getLogger(__name__)

AGENT_SERVICE_NAME = "pykata-agent"
SCOPE = "pykata"
TAKE_TIMEOUT = 5.0  # seconds a TakeSpans may take
EXPORT_TIMEOUT = 3.0  # seconds an OTLP export may take, retries included
BATCH_DELAY = 0.5  # seconds a finished span may wait for its batch
MAX_QUEUE = 2048  # finished spans waiting for export, per exporter (more are dropped)
MAX_BATCH = 512
SHUTDOWN_WAIT = 1.0  # seconds shutdown waits for the last export, after the flush
STOP_PHASE = "sandbox.stop"  # after it, a sandbox's trace is closed

# Bounds on what the guest hands over (it is untrusted).
MAX_NAME = 128
MAX_ATTRIBUTES = 32
MAX_KEY = 64
MAX_VALUE = 256
MAX_ERROR = 256
MAX_TRACES = 256  # trace ids the shim sent lately: the agent's spans must be in one
MAX_ROOTS = 256  # sandboxes whose first span is remembered (a shim has one or a few)

# The OTLP exporter logs every failed export; Guarded says it once instead.
_NOISY = ("opentelemetry.exporter.otlp.proto.http",
          "opentelemetry.exporter.otlp.proto.http.trace_exporter")


def _text(value: str, limit: int) -> str:
    """Guest text for a span: printable as it is, else repr-quoted; cut to ``limit``."""
    if not value.isprintable():
        value = repr(value)[1:-1]
    return value[:limit]


def to_readable(span: pb.TraceSpan, resource: Resource, shift: int = 0
                ) -> ReadableSpan | None:
    """The SDK span of one of the agent's spans (None if its ids are malformed):
    same trace, span and parent ids, times (plus ``shift`` ns: the guest's clock
    to the host's), attributes (bounded) and error."""
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return None
    if len(span.span_id) != 8 or not any(span.span_id):
        return None
    if span.parent_span_id and (len(span.parent_span_id) != 8 or not any(span.parent_span_id)):
        return None
    trace_id = int.from_bytes(span.trace_id, "big")
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(trace_id, int.from_bytes(span.span_id, "big"), is_remote=False,
                          trace_flags=flags)
    parent = (SpanContext(trace_id, int.from_bytes(span.parent_span_id, "big"),
                          is_remote=True, trace_flags=flags)
              if span.parent_span_id else None)
    attributes: dict[str, str] = {}
    for key in sorted(span.attributes)[:MAX_ATTRIBUTES]:
        attributes[_text(key, MAX_KEY)] = _text(span.attributes[key], MAX_VALUE)
    if shift:
        attributes["pykata.guest_clock_shift_ns"] = str(shift)
    start = max(0, span.start_unix_nano + shift)
    end = max(start, span.end_unix_nano + shift)
    status = (Status(StatusCode.ERROR, _text(span.error, MAX_ERROR)) if span.error
              else Status(StatusCode.UNSET))
    return ReadableSpan(
        name=_text(span.name, MAX_NAME) or "agent", context=context, parent=parent,
        resource=resource, attributes=attributes, kind=SpanKind.SERVER, status=status,
        start_time=start, end_time=end,
        instrumentation_scope=InstrumentationScope(f"{SCOPE}.agent", __version__))


class Guarded(SpanExporter):
    """An exporter that never raises and says once that it cannot export."""

    def __init__(self, inner: SpanExporter, where: str) -> None:
        self.inner = inner
        self.where = where
        self.warned = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        why = ""
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            result, why = SpanExportResult.FAILURE, f": {exc}"
        if result is not SpanExportResult.SUCCESS and not self.warned:
            self.warned = True
            log.warning("tracing: cannot export spans to %s%s (said once; spans that cannot"
                        " be exported are dropped)", self.where, why or ": export failed")
        return result

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception:
            return False


class _Provider(TracerProvider):
    """The SDK's provider, minus its fork handler: the shim forks only to exec
    (subprocess with a preexec_fn, which runs the at-fork handlers), and a child
    between fork and exec must not start threads or detect resources."""

    def _handle_fork(self) -> None:
        pass


class Batcher(SpanProcessor):
    """Finished spans to one exporter in batches, from a daemon thread: a bounded
    queue (a span past ``max_queue`` is dropped and counted), exported every
    ``delay`` seconds or when a batch is full. Unlike the SDK's batch processor it
    registers no at-fork handler (see _Provider), and it never keeps the process
    from exiting."""

    def __init__(self, exporter: SpanExporter, delay: float = BATCH_DELAY,
                 max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH) -> None:
        self.exporter = exporter
        self.delay = delay
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.dropped = 0
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._cond = threading.Condition()
        self._busy = 0  # spans taken from the queue, not yet exported
        self._stopping = False
        self._flushing = 0  # force_flush calls waiting: export without waiting
        self._thread: threading.Thread | None = None

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        with self._cond:
            if self._stopping:
                return
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            self._queue.append(span)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pykata-spans",
                                                daemon=True)
                self._thread.start()
            if len(self._queue) >= self.max_batch:
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and (not self._queue or (
                        not self._flushing and len(self._queue) < self.max_batch)):
                    self._cond.wait(self.delay)
                if not self._queue:
                    if self._stopping:
                        return
                    continue
                batch = [self._queue.popleft()
                         for _ in range(min(self.max_batch, len(self._queue)))]
                self._busy = len(batch)
            try:
                self.exporter.export(batch)
            except Exception:  # an exporter that raises loses its batch, not the thread
                pass
            with self._cond:
                self._busy = 0
                self._cond.notify_all()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Wait (at most ``timeout_millis``) until everything queued was exported."""
        with self._cond:
            if self._thread is None:
                return True
            self._flushing += 1
            try:
                self._cond.notify_all()
                return self._cond.wait_for(lambda: not self._queue and not self._busy,
                                           timeout_millis / 1000)
            finally:
                self._flushing -= 1

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(SHUTDOWN_WAIT)  # then abandoned: a daemon thread
        self.exporter.shutdown()


class _Times(SpanProcessor):
    """When the shim's recent spans started and ended (span id -> ns), bounded:
    the parents the agent's spans are placed against (see clock_shift)."""

    def __init__(self, cap: int = 4096) -> None:
        self.cap = cap
        self.times: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or span.start_time is None or span.end_time is None:
            return
        with self._lock:
            self.times[span.context.span_id] = (span.start_time, span.end_time)
            while len(self.times) > self.cap:
                self.times.popitem(last=False)

    def get(self, span_id: int) -> tuple[int, int] | None:
        with self._lock:
            return self.times.get(span_id)


def clock_shift(pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]],
                default: int = 0) -> int:
    """How far (ns) to move the guest's span times so that the agent's spans lie
    within the shim spans that made the calls: ``pairs`` of ((start, end) of an
    agent span, (start, end) of its parent). Each pair allows the shifts in
    [parent start - start, parent end - end]; the answer is the shift nearest to
    ``default`` that the most pairs allow (a call made after its span ended, from
    a task the span started, allows a wrong range: it is outvoted). The guest's
    clock is its own (under TCG it drifts by seconds); without this, the agent's
    spans would start before the host asked for them."""
    ranges = [(p_start - start, p_end - end) for (start, end), (p_start, p_end) in pairs
              if p_start - start <= p_end - end]
    if not ranges:
        return default
    lows = sorted(a for a, _ in ranges)
    highs = sorted(b for _, b in ranges)
    best = (-1, 0, default)  # (pairs allowing it, -distance to default, shift)
    for x in {default, *lows, *highs}:
        allowed = bisect.bisect_right(lows, x) - bisect.bisect_left(highs, x)
        best = max(best, (allowed, -abs(x - default), x))
    return best[2] if best[0] > 0 else default


def _exporters(endpoint: str, file: str) -> list[SpanExporter]:
    out: list[SpanExporter] = []
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise errors.InvalidArgument(
                f"[runtime] tracing_endpoint = {endpoint!r} is not an http(s) URL")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        out.append(Guarded(OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT),
                           endpoint))
    if file:
        out.append(Guarded(JsonLinesExporter(file), file))
    return out


class Tracing:
    def __init__(self, service: str, *, endpoint: str = "", file: str = "",
                 exporters: list[SpanExporter] | None = None) -> None:
        self.resource = Resource({"service.name": service, "service.version": __version__})
        self.agent_resource = Resource({"service.name": AGENT_SERVICE_NAME,
                                        "service.version": __version__})
        self.processors = [
            Batcher(e) for e in (_exporters(endpoint, file) if exporters is None else exporters)]
        self.provider = _Provider(resource=self.resource)
        self._times = _Times()
        self.provider.add_span_processor(self._times)
        self.shift = 0  # the last guest clock shift, ns
        for p in self.processors:
            self.provider.add_span_processor(p)
        self.tracer = self.provider.get_tracer(SCOPE, __version__)
        self._lock = threading.Lock()
        self._roots: collections.OrderedDict[str, SpanContext] = collections.OrderedDict()
        self._traces: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._said: set[str] = set()
        self.agent_spans = 0  # agent spans exported
        self.agent_dropped = 0  # agent spans lost: its buffer was full, or malformed

    def install(self) -> None:
        observe.set_span_factory(self.span)
        ttrpc_client.set_metadata_hook(self.metadata)

    def close(self, timeout: float = 5.0) -> None:
        observe.set_span_factory(None)
        ttrpc_client.set_metadata_hook(None)
        with contextlib.suppress(Exception):
            self.provider.force_flush(int(timeout * 1000))
        with contextlib.suppress(Exception):
            self.provider.shutdown()

    def _once(self, key: str, message: str, *args: object) -> None:
        if key in self._said:
            log.debug(message, *args)
        else:
            self._said.add(key)
            log.warning(message, *args)

    # -- the shim's spans ------------------------------------------------------------
    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, str]) -> Iterator[Any]:
        """A span around one phase (``pykata.observe``'s span factory). Inside
        another span, its child; else a child of its sandbox's first span (which a
        phase of a sandbox not seen yet becomes)."""
        sandbox = attributes.get("sandbox", "")
        outer = trace.get_current_span().get_span_context().is_valid
        root = None
        context = None
        if not outer and sandbox:
            with self._lock:
                root = self._roots.get(sandbox)
            if root is not None:
                context = trace.set_span_in_context(NonRecordingSpan(root))
        attrs = {f"pykata.{k}": str(v) for k, v in attributes.items()}
        try:
            with self.tracer.start_as_current_span(name, context=context,
                                                   attributes=attrs) as span:
                if sandbox and not outer and root is None:
                    self._remember_root(sandbox, span.get_span_context())
                yield span
        finally:
            if name == STOP_PHASE and sandbox:
                with self._lock:
                    self._roots.pop(sandbox, None)

    def _remember_root(self, sandbox: str, context: SpanContext) -> None:
        with self._lock:
            self._roots[sandbox] = context
            while len(self._roots) > MAX_ROOTS:
                self._roots.popitem(last=False)

    def metadata(self) -> Mapping[str, str] | None:
        """The ttRPC client's metadata hook: the current span's ``traceparent``."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        with self._lock:
            self._traces[context.trace_id] = None
            self._traces.move_to_end(context.trace_id)
            while len(self._traces) > MAX_TRACES:
                self._traces.popitem(last=False)
        parent = tracecontext.TraceParent(context.trace_id.to_bytes(16, "big"),
                                          context.span_id.to_bytes(8, "big"),
                                          tracecontext.SAMPLED)
        return {tracecontext.KEY: parent.format()}

    # -- the agent's spans -----------------------------------------------------------
    async def collect(self, agent: object) -> None:
        conn = getattr(agent, "conn", None)
        if not isinstance(conn, ttrpc_client.Client) or conn.closed:
            return
        try:
            taken = await conn.call(AGENT_SERVICE, "TakeSpans", pb.TakeSpansRequest(),
                                    pb.TraceSpans, timeout=TAKE_TIMEOUT)
        except errors.PykataError as exc:
            self._once("take", "tracing: cannot take the agent's spans: %s",
                       ttrpc_client.quote(str(exc).encode(), MAX_ERROR))
            return
        self.export_agent_spans(taken)

    def export_agent_spans(self, taken: pb.TraceSpans) -> int:
        """Hand the agent's spans of traces this shim sent to the processors; how
        many. A span of any other trace, or malformed, is dropped (and counted)."""
        with self._lock:
            known = set(self._traces)
        exported = 0
        dropped = taken.dropped
        pairs = []
        for span in taken.spans:
            parent = (self._times.get(int.from_bytes(span.parent_span_id, "big"))
                      if len(span.parent_span_id) == 8 else None)
            if parent is not None:
                pairs.append(((span.start_unix_nano, span.end_unix_nano), parent))
        self.shift = clock_shift(pairs, self.shift)
        for span in taken.spans:
            readable = to_readable(span, self.agent_resource, self.shift)
            if readable is None or readable.context is None or (
                    readable.context.trace_id not in known):
                dropped += 1
                continue
            for p in self.processors:
                p.on_end(readable)
            exported += 1
        self.agent_spans += exported
        if dropped:
            self.agent_dropped += dropped
            self._once("dropped", "tracing: %d of the agent's spans were lost (its buffer"
                       " was full, or they were malformed or of an unknown trace)", dropped)
        return exported
