"""Spans as JSON lines appended to a file (``[runtime] tracing_file``), one object a
line, for a host without a collector:

    {"trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>"|"",
     "name": "container.create", "service": "pykata-shim", "kind": "INTERNAL",
     "start_unix_nano": ..., "end_unix_nano": ..., "status": "UNSET"|"OK"|"ERROR",
     "error": "", "attributes": {...}}

The file is opened for each batch without following a symbolic link, created
0600, appended to (several shims share it: each batch is one write), and never
grown past ``max_bytes``: a batch that would is dropped.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace.status import StatusCode

MAX_FILE_BYTES = 64 << 20


def _value(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Sequence):
        return [_value(v) for v in value]
    return str(value)


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as the JSON object of a line."""
    context = span.context
    parent = span.parent
    return {
        "trace_id": f"{context.trace_id:032x}" if context is not None else "",
        "span_id": f"{context.span_id:016x}" if context is not None else "",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else "",
        "name": span.name,
        "service": str(span.resource.attributes.get("service.name", "")),
        "kind": span.kind.name,
        "start_unix_nano": span.start_time or 0,
        "end_unix_nano": span.end_time or 0,
        "status": span.status.status_code.name,
        "error": (span.status.description or "")
        if span.status.status_code is StatusCode.ERROR else "",
        "attributes": {k: _value(v) for k, v in (span.attributes or {}).items()},
    }


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Append ``spans``; raises OSError with the reason when it cannot."""
        data = "".join(json.dumps(span_record(s), separators=(",", ":")) + "\n"
                       for s in spans).encode()
        if not data:
            return SpanExportResult.SUCCESS
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(f"{self.path} is not a regular file")
                if st.st_size + len(data) > self.max_bytes:
                    raise OSError(f"{self.path} is full ({self.max_bytes} bytes at most)")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
