"""Issue 18 tracing, end to end: `ctr run --rm` of busybox through a private
containerd whose pykata shims have ``[runtime] enable_tracing`` on, exporting
both to a JSON-lines file and to an OTLP/HTTP receiver on 127.0.0.1 run by the
test. One trace must hold the shim's lifecycle spans and the agent's spans
(recorded in the guest, taken back over the agent channel), each agent span a
child of the shim span that made the call."""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from pykata import config
from pykata.testing.containerd import RUNTIME_TYPE
from pykata.testing.images import BUSYBOX_REF
from tests.integration.conftest import _with_rootfs_mode
from tests.integration.soak_support import CtrEnv, ctr_env

SHIM_SPANS = {"sandbox.create", "vm.boot", "agent.dial", "guest.create_sandbox",
              "container.create", "container.start", "sandbox.stop"}
AGENT_SPANS = {"agent.CreateSandbox", "agent.CreateContainer", "agent.StartContainer"}


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP traces receiver (protobuf bodies) on loopback."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        with self.server.lock:
            self.server.requests.append(req)
            self.server.paths.append(self.path)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    srv = Receiver()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _enable_tracing(env: CtrEnv, endpoint: str, file: Path) -> None:
    """The shims of ``env`` (each reads PYKATA_CONFIG when it starts) trace."""
    cfg = _with_rootfs_mode(config.load())
    cfg.runtime.state_dir = str(env.state)
    cfg.runtime.enable_tracing = True
    cfg.runtime.tracing_endpoint = endpoint
    cfg.runtime.tracing_file = str(file)
    (env.ctd.base / "pykata.toml").write_text(config.to_toml(cfg))


def _check_one_trace(spans: list[dict[str, Any]], cid: str) -> None:
    """``spans`` (trace_id, span_id, parent_span_id, name, service) hold one trace
    of sandbox ``cid`` with the shim's and the agent's spans, linked."""
    ours = [s for s in spans if s["attributes"].get("pykata.sandbox") == cid]
    traces = {s["trace_id"] for s in ours}
    assert len(traces) == 1, f"sandbox {cid} spans in {len(traces)} traces"
    (trace_id,) = traces
    trace = [s for s in spans if s["trace_id"] == trace_id]
    shim = {s["span_id"]: s for s in trace if s["service"] == "pykata-shim"}
    agent = [s for s in trace if s["service"] == "pykata-agent"]
    names = {s["name"] for s in shim.values()}
    assert SHIM_SPANS <= names, f"shim spans: {sorted(names)}"
    assert AGENT_SPANS <= {s["name"] for s in agent}, f"agent spans: {agent}"
    roots = [s for s in shim.values() if not s["parent_span_id"]]
    assert [r["name"] for r in roots] == ["sandbox.create"]
    for s in agent:
        assert s["parent_span_id"] in shim, f"agent span {s['name']} has no shim parent"
        assert s["start_unix_nano"] <= s["end_unix_nano"]
    parent_of = {s["name"]: shim[s["parent_span_id"]]["name"] for s in agent}
    assert parent_of["agent.CreateSandbox"] == "guest.create_sandbox"
    assert parent_of["agent.CreateContainer"] == "container.create"
    assert parent_of["agent.StartContainer"] == "container.start"
    by_name = {s["name"]: s for s in agent}
    assert by_name["agent.CreateContainer"]["attributes"]["container.id"] == cid
    # The guest's clock is its own: the shim places the agent's spans in its time.
    for name in AGENT_SPANS:
        s = by_name[name]
        p = shim[s["parent_span_id"]]
        assert p["start_unix_nano"] <= s["start_unix_nano"] <= s["end_unix_nano"] \
            <= p["end_unix_nano"], f"{name} is not within {p['name']}"


def _otlp_spans(receiver: Receiver) -> list[dict[str, Any]]:
    """The receiver's spans in the JSON file's shape."""
    out = []
    with receiver.lock:
        requests = list(receiver.requests)
    for req in requests:
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes
                            if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                        "service": service, "start_unix_nano": s.start_time_unix_nano,
                        "end_unix_nano": s.end_time_unix_nano,
                        "attributes": {a.key: a.value.string_value for a in s.attributes},
                    })
    return out


def test_one_trace_covers_shim_and_agent_spans_of_a_ctr_run(
        tmp_path: Path, receiver: Receiver) -> None:
    trace_file = tmp_path / "spans.jsonl"
    with ctr_env("trace") as env:
        _enable_tracing(env, receiver.url, trace_file)
        cid = f"trace-{uuid.uuid4().hex[:8]}"
        env.scope.ids.add(cid)
        rc, out, err = env.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, BUSYBOX_REF, cid,
                               "echo", "traced")
        assert rc == 0, err
        assert out.strip() == "traced"
        # The shim exports what is still queued as it exits.
        linger = env.scope.wait_shims_gone([cid], 60)
        assert linger[cid] < 60, "the shim did not exit"
    lines = trace_file.read_text().splitlines()
    assert trace_file.stat().st_mode & 0o777 == 0o600
    _check_one_trace([json.loads(line) for line in lines], cid)
    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    _check_one_trace(_otlp_spans(receiver), cid)
