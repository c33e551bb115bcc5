"""pykata-monitor against fake shims: unix sockets in a temporary state
directory that answer GET /metrics the way a shim does, or badly (hanging,
refusing, malformed, oversized, hostile)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from pykata.monitor import main as monitor_main
from pykata.monitor import sandboxes
from pykata.monitor.cri import CriLookup
from pykata.monitor.scrape import (
    MAX_LABEL_VALUE,
    PodLabels,
    ScrapeError,
    fetch,
    parse,
    relabel,
    render,
)
from pykata.monitor.server import Monitor
from pykata.utils.unixsock import addressable

NS = "k8s.io"
SHIM_TEXT = """\
# HELP pykata_shim_sandbox_info The sandbox this shim runs and its pod
# TYPE pykata_shim_sandbox_info gauge
pykata_shim_sandbox_info{sandbox_id="%(id)s",namespace="k8s.io",pod_name="%(pod)s",\
pod_namespace="default",pod_uid="uid-%(pod)s"} 1
# HELP pykata_guest_meminfo Guest /proc/meminfo, bytes
# TYPE pykata_guest_meminfo gauge
pykata_guest_meminfo{item="MemTotal"} 5.36870912e+08
pykata_guest_meminfo{item="MemFree"} 4.0e+08
# HELP pykata_hypervisor_rss_bytes Resident memory of a process of the VM, bytes
# TYPE pykata_hypervisor_rss_bytes gauge
pykata_hypervisor_rss_bytes{process="qemu"} 2.5e+08
# HELP pykata_agent_rpc_errors_total Agent RPCs that failed
# TYPE pykata_agent_rpc_errors_total counter
pykata_agent_rpc_errors_total{method="ExecProcess"} 2
# HELP pykata_agent_rpc_duration_seconds Agent RPC latency, seconds
# TYPE pykata_agent_rpc_duration_seconds histogram
pykata_agent_rpc_duration_seconds_bucket{method="CreateContainer",le="0.1"} 1
pykata_agent_rpc_duration_seconds_bucket{method="CreateContainer",le="+Inf"} 2
pykata_agent_rpc_duration_seconds_count{method="CreateContainer"} 2
pykata_agent_rpc_duration_seconds_sum{method="CreateContainer"} 0.7
"""

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def http(body: bytes, status: str = "200 OK", ctype: str = "text/plain; version=0.0.4",
         chunked: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nConnection: close\r\n"
    if chunked:
        parts = [body[i:i + 100] for i in range(0, len(body), 100)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + payload
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def answering(response: bytes) -> Handler:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(response)
        await w.drain()
        w.close()
    return handle


async def hanging(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    await asyncio.sleep(3600)


class Node:
    """A state directory with fake sandboxes; servers closed at the end."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.servers: list[asyncio.Server] = []

    def sandbox(self, sid: str, ns: str = NS) -> Path:
        d = self.state / "sbs" / ns / sid
        d.mkdir(parents=True, mode=0o700)
        (d / "state.json").write_text(json.dumps({"id": sid, "state": "running"}))
        return d

    async def shim(self, sid: str, handler: Handler, ns: str = NS) -> Path:
        d = self.sandbox(sid, ns)
        with addressable(d / sandboxes.METRICS_SOCKET) as addr:
            self.servers.append(await asyncio.start_unix_server(handler, path=addr))
        return d

    async def good(self, sid: str, pod: str, ns: str = NS, **kw: bool) -> Path:
        text = SHIM_TEXT % {"id": sid, "pod": pod}
        return await self.shim(sid, answering(http(text.encode(), **kw)), ns)

    def refusing(self, sid: str) -> Path:
        d = self.sandbox(sid)
        with addressable(d / sandboxes.METRICS_SOCKET) as addr:
            s = socket.socket(socket.AF_UNIX)
            s.bind(addr)  # bound, never listening: connect is refused
            s.close()
        return d

    async def close(self) -> None:
        for s in self.servers:
            s.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        await n.close()


def families(text: bytes) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        assert fam.name not in out, f"family {fam.name} exposed twice"
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def series(fams: dict[str, list[tuple[str, dict[str, str], float]]], name: str,
           **want: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for fam in fams.values() for n, labels, v in fam
            if n == name and all(labels.get(k) == x for k, x in want.items())]


# -- scraping ---------------------------------------------------------------------------


async def test_every_sample_gets_its_sandbox_and_pod(node: Node) -> None:
    await node.good("sb-a", "web")
    await node.good("sb-b", "db", chunked=True)
    fams = families(await Monitor(node.state).exposition())
    for sid, pod in (("sb-a", "web"), ("sb-b", "db")):
        (mem,) = series(fams, "pykata_guest_meminfo", sandbox_id=sid, item="MemTotal")
        assert mem == ({"item": "MemTotal", "sandbox_id": sid, "namespace": NS,
                        "pod_name": pod, "pod_namespace": "default", "pod_uid": f"uid-{pod}"},
                       536870912.0)
        assert series(fams, "pykata_agent_rpc_duration_seconds_bucket", sandbox_id=sid,
                      pod_name=pod, le="+Inf")[0][1] == 2
        assert series(fams, "pykata_agent_rpc_errors_total", sandbox_id=sid)[0][1] == 2
        assert series(fams, "pykata_monitor_sandbox_up", sandbox_id=sid, pod_name=pod
                      )[0][1] == 1
    # every sample of a sandbox carries all five sandbox labels
    for fam in fams.values():
        for name, labels, _ in fam:
            if not name.startswith("pykata_monitor_") or name == "pykata_monitor_sandbox_up":
                assert {"sandbox_id", "namespace", "pod_name", "pod_namespace",
                        "pod_uid"} <= set(labels), (name, labels)
    assert series(fams, "pykata_monitor_sandboxes")[0][1] == 2
    assert series(fams, "pykata_monitor_up")[0][1] == 1
    assert series(fams, "pykata_monitor_scrape_duration_seconds_count")[0][1] == 1
    assert not series(fams, "pykata_monitor_scrape_errors_total")


async def test_dead_sandboxes_cost_only_their_own_samples(node: Node) -> None:
    await node.good("alive", "web")
    await node.shim("hung", hanging)
    node.refusing("refusing")
    node.sandbox("booting")  # no socket yet: down, not an error
    mon = Monitor(node.state, scrape_timeout=2, max_parallel=2)
    for _ in range(2):
        fams = families(await mon.exposition())
        assert series(fams, "pykata_guest_meminfo", sandbox_id="alive", item="MemTotal")
        up = {labels["sandbox_id"]: v for labels, v in series(fams, "pykata_monitor_sandbox_up")}
        assert up == {"alive": 1, "hung": 0, "refusing": 0, "booting": 0}
        assert not series(fams, "pykata_guest_meminfo", sandbox_id="hung")
    errors = {labels["sandbox_id"]: v
              for labels, v in series(fams, "pykata_monitor_scrape_errors_total")}
    assert errors == {"hung": 2, "refusing": 2}
    assert series(fams, "pykata_monitor_sandboxes")[0][1] == 4


async def test_the_whole_scrape_is_bounded(node: Node) -> None:
    """Sandboxes still queued when the scrape's budget runs out count as failed;
    the scrape returns."""
    for i in range(3):
        await node.shim(f"hung-{i}", hanging)
    mon = Monitor(node.state, scrape_timeout=5, max_parallel=1, budget=0.3)
    outcomes = await mon.scrape()
    assert [o.error for o in outcomes] == ["not scraped within 0.3 s"] * 3


async def test_errors_of_a_sandbox_that_went_are_forgotten(node: Node) -> None:
    d = node.refusing("gone-soon")
    mon = Monitor(node.state)
    fams = families(await mon.exposition())
    assert series(fams, "pykata_monitor_scrape_errors_total", sandbox_id="gone-soon")
    (d / sandboxes.METRICS_SOCKET).unlink()
    (d / "state.json").unlink()
    d.rmdir()
    fams = families(await mon.exposition())
    assert not series(fams, "pykata_monitor_scrape_errors_total")
    assert not series(fams, "pykata_monitor_sandbox_up")


HOSTILE = """\
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0"} 5
# TYPE pykata_monitor_up gauge
pykata_monitor_up 0
# TYPE pykata_monitor_sandboxes gauge
pykata_monitor_sandboxes 1000
# TYPE pykata_guest_meminfo gauge
pykata_guest_meminfo{item="MemTotal",sandbox_id="someone-else",pod_name="forged"} 1
pykata_guest_meminfo{item="MemTotal",sandbox_id="someone-else",pod_name="forged"} 2
"""


async def test_hostile_text_cannot_forge_or_leak(node: Node) -> None:
    await node.shim("evil", answering(http(HOSTILE.encode())))
    await node.good("good", "web")
    fams = families(await Monitor(node.state).exposition())
    assert "node_cpu_seconds" not in fams
    assert series(fams, "pykata_monitor_up")[0][1] == 1
    assert series(fams, "pykata_monitor_sandboxes")[0][1] == 2
    evil = series(fams, "pykata_guest_meminfo", sandbox_id="evil")
    # the sandbox's labels replace the forged ones; the duplicate series is kept once
    assert evil == [({"item": "MemTotal", "sandbox_id": "evil", "namespace": NS,
                      "pod_name": "", "pod_namespace": "", "pod_uid": ""}, 1.0)]
    assert not series(fams, "pykata_guest_meminfo", sandbox_id="someone-else")


async def test_a_family_keeps_the_type_it_was_first_given(node: Node) -> None:
    await node.shim("a-gauge", answering(http(b"# TYPE pykata_x gauge\npykata_x 1\n")))
    counter = b"# TYPE pykata_x_total counter\npykata_x_total 2\n"
    await node.shim("b-counter", answering(http(counter)))
    text = await Monitor(node.state).exposition()
    assert text.decode().count("# TYPE pykata_x ") == 1
    fams = families(text)
    assert [labels["sandbox_id"] for labels, _ in series(fams, "pykata_x")] == ["a-gauge"]
    assert not series(fams, "pykata_x_total")


@pytest.mark.parametrize(("response", "why"), [
    (http(b"pykata_guest_meminfo{item=\"MemTotal\" 1\n"), "malformed metrics text"),
    (http(b"x" * 64, status="500 Internal Server Error"), "HTTP status 500"),
    (http(b"{}", ctype="application/json"), "unexpected content type"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n", "response over"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "connection closed mid-response"),
    (http(b"pykata_a 1\n\xff\xfe"), "not UTF-8"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", "headers too long"),
], ids=["syntax", "status", "ctype", "oversized", "not-http", "short", "utf8", "chunk",
        "headers"])
async def test_bad_responses_fail_that_sandbox(node: Node, response: bytes, why: str) -> None:
    d = await node.shim("bad", answering(response))
    with pytest.raises(ScrapeError, match=why):
        text = await fetch(d / sandboxes.METRICS_SOCKET)
        parse(text)


WEIRD = r"""# HELP pykata_guest_x a \\ help\nline
# TYPE pykata_guest_x gauge
pykata_guest_x{a="multi\nline",b="q\"uote",c="back\\slash"} NaN
pykata_guest_x{a="b"} +Inf
# TYPE pykata_guest_y untyped
pykata_guest_y -Inf
pykata_guest_y{z="1"} 1e+21
"""


class Families:
    def __init__(self, fams: list[Metric]) -> None:
        self.fams = fams

    def collect(self) -> list[Metric]:
        return self.fams


def test_render_writes_what_generate_latest_would() -> None:
    fams = parse(SHIM_TEXT % {"id": "sb", "pod": "web"} + WEIRD)
    relabel(fams, {"sandbox_id": "sb", "pod_name": 'we"ird\\name\n'})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(fams))
    ours, theirs = render(fams).decode(), generate_latest(registry).decode()
    # the same lines but for how a number is spelt (5.36870912e+08 or 536870912.0)
    assert [ln.rpartition(" ")[0] for ln in ours.splitlines()] == \
        [ln.rpartition(" ")[0] for ln in theirs.splitlines()]

    def read(text: str) -> list[tuple[str, str, str, list[Any]]]:
        return [(f.name, f.type, f.documentation,  # NaN is not equal to itself: as text
                 [(s.name, s.labels, repr(float(s.value))) for s in f.samples])
                for f in parse(text)]

    assert read(ours) == read(theirs) == read(render(parse(ours)).decode())
    assert str(read(ours)).count("'nan'") == 1


def test_names_the_classic_format_cannot_carry_are_dropped() -> None:
    fams = parse('{"pykata_guest_\u00e9t\u00e9"} 1\npykata_guest_ok 1\n')
    assert [s.name for f in fams for s in f.samples] == ["pykata_guest_ok"]


async def test_too_many_samples_fail_the_sandbox() -> None:
    text = "".join(f'pykata_x{{i="{i}"}} 1\n' for i in range(11))
    assert sum(len(f.samples) for f in parse(text, max_samples=11)) == 11
    with pytest.raises(ScrapeError, match="more than 10 samples"):
        parse(text, max_samples=10)


async def test_socket_must_be_a_socket_of_ours(node: Node, tmp_path: Path) -> None:
    d = node.sandbox("linked")
    real = tmp_path / "elsewhere.sock"
    with addressable(real) as addr:
        server = await asyncio.start_unix_server(answering(http(b"pykata_a 1\n")), path=addr)
    try:
        os.symlink(real, d / sandboxes.METRICS_SOCKET)
        with pytest.raises(ScrapeError, match="not a socket"):
            await fetch(d / sandboxes.METRICS_SOCKET)
    finally:
        server.close()
    f = node.sandbox("file") / sandboxes.METRICS_SOCKET
    f.write_text("")
    with pytest.raises(ScrapeError, match="not a socket"):
        await fetch(f)


async def test_long_state_dir_paths_are_reached(tmp_path: Path) -> None:
    node = Node(tmp_path / ("x" * 60))
    try:
        await node.good("a" * 64, "web")
        fams = families(await Monitor(node.state).exposition())
        assert series(fams, "pykata_guest_meminfo", sandbox_id="a" * 64, item="MemTotal")
    finally:
        await node.close()


# -- CRI ----------------------------------------------------------------------------------


class FakeCri(CriLookup):
    def __init__(self, pods: dict[str, PodLabels] | None) -> None:
        super().__init__("", 1.0)
        self._pods = pods

    async def pods(self) -> dict[str, PodLabels] | None:
        return self._pods


async def test_cri_names_the_pod_when_it_can(node: Node) -> None:
    await node.good("sb-a", "from-annotations")
    await node.good("sb-b", "only-annotations")
    await node.good("sb-a", "other-namespace", ns="default")
    cri = FakeCri({"sb-a": PodLabels("from-cri", "prod", "u-1")})
    fams = families(await Monitor(node.state, cri=cri).exposition())
    assert series(fams, "pykata_guest_meminfo", sandbox_id="sb-a", namespace=NS,
                  item="MemTotal", pod_name="from-cri", pod_namespace="prod", pod_uid="u-1")
    assert series(fams, "pykata_guest_meminfo", sandbox_id="sb-b", item="MemTotal",
                  pod_name="only-annotations")
    # CRI's pods are in containerd's k8s.io namespace only
    assert series(fams, "pykata_guest_meminfo", sandbox_id="sb-a", namespace="default",
                  item="MemTotal", pod_name="other-namespace")
    # without CRI the shim's annotations stand
    fams = families(await Monitor(node.state, cri=FakeCri(None)).exposition())
    assert series(fams, "pykata_guest_meminfo", sandbox_id="sb-a", namespace=NS,
                  item="MemTotal", pod_name="from-annotations")


async def test_cri_endpoint_absent_or_not_cri_degrades(tmp_path: Path) -> None:
    assert await CriLookup(str(tmp_path / "none.sock"), 0.5).pods() is None
    path = tmp_path / "notcri.sock"

    async def slam(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    server = await asyncio.start_unix_server(slam, path=str(path))
    lookup = CriLookup(str(path), 0.5)
    try:
        assert lookup.enabled  # grpcio is installed for the tests
        assert await lookup.pods() is None
        assert "CRI ListPodSandbox failed" in lookup.last_error
    finally:
        lookup.close()
        server.close()
    assert not CriLookup("", 1.0).enabled


async def test_long_pod_labels_are_cut(node: Node) -> None:
    await node.good("sb", "p" * 400)
    fams = families(await Monitor(node.state).exposition())
    ((labels, _),) = series(fams, "pykata_guest_meminfo", sandbox_id="sb", item="MemTotal")
    assert labels["pod_name"] == "p" * MAX_LABEL_VALUE


# -- HTTP endpoints ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(mon: Monitor) -> AsyncIterator[TestClient[object, object]]:
    c: TestClient[object, object] = TestClient(TestServer(mon.app()))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def test_http_metrics_and_sandboxes(node: Node) -> None:
    await node.good("sb-a", "web")
    node.refusing("sb-dead")
    async with client(Monitor(node.state)) as c:
        r = await c.get("/metrics")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert series(families(await r.read()), "pykata_guest_meminfo", pod_name="web")
        r = await c.get("/sandboxes")
        assert r.status == 200
        items = sorted(await r.json(), key=lambda i: i["id"])
        assert items == [
            {"id": "sb-a", "namespace": NS, "state": "running", "metrics_socket": True,
             "pod_name": "web", "pod_namespace": "default", "pod_uid": "uid-web"},
            {"id": "sb-dead", "namespace": NS, "state": "running", "metrics_socket": True,
             "pod_name": "", "pod_namespace": "", "pod_uid": ""},
        ]


async def test_http_logs(node: Node) -> None:
    d = node.sandbox("sb-a")
    (d / "console.log.1").write_bytes(b"[    0.1] older line\n")
    (d / "console.log").write_bytes(b"[    1.0] pykata-agent INFO ready\n\x1b[31mred\x07\n")
    node.sandbox("twice", "ns1")
    node.sandbox("twice", "ns2")
    e = node.sandbox("linked")
    os.symlink(d / "console.log", e / "console.log")
    async with client(Monitor(node.state)) as c:
        r = await c.get("/sandboxes/sb-a/logs")
        assert r.status == 200
        assert await r.text() == ("==> console.log <==\n[    0.1] older line\n"
                                  "[    1.0] pykata-agent INFO ready\n?[31mred?\n")
        r = await c.get("/sandboxes/sb-a/logs?lines=1")
        assert await r.text() == "==> console.log <==\n?[31mred?\n"
        assert (await c.get("/sandboxes/nope/logs")).status == 404
        assert (await c.get("/sandboxes/..%2F..%2Fetc/logs")).status in (400, 404)
        assert (await c.get("/sandboxes/.hidden/logs")).status == 400
        assert (await c.get("/sandboxes/sb-a/logs?lines=many")).status == 400
        assert (await c.get("/sandboxes/twice/logs")).status == 409
        assert (await c.get("/sandboxes/twice/logs?namespace=ns2")).status == 200
        # a symlinked log is not followed: its header, no content
        r = await c.get("/sandboxes/linked/logs")
        assert await r.text() == "==> console.log <==\n"
    async with client(Monitor(node.state, serve_logs=False)) as c:
        assert (await c.get("/sandboxes/sb-a/logs")).status == 403


def test_logs_are_capped(tmp_path: Path) -> None:
    d = tmp_path / "sbs" / NS / "big"
    d.mkdir(parents=True)
    (d / "console.log").write_bytes(b"".join(b"line %d\n" % i for i in range(100000)))
    ref = sandboxes.find(tmp_path, "big")
    text = sandboxes.logs(ref, lines=10**9, max_bytes=10**9)
    assert len(text.encode()) <= sandboxes.LOG_MAX_BYTES + 64
    assert text.endswith("line 99999\n")


def test_discovery_skips_what_is_not_a_sandbox(tmp_path: Path) -> None:
    for name in ("ok", ".tmp", "a b"):
        (tmp_path / "sbs" / NS / name).mkdir(parents=True)
    (tmp_path / "sbs" / "bad ns" / "x").mkdir(parents=True)
    assert [(r.namespace, r.id) for r in sandboxes.discover(tmp_path)] == [(NS, "ok")]
    assert sandboxes.discover(tmp_path / "missing") == []


# -- command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "want"), [
    ("127.0.0.1:8090", ("127.0.0.1", 8090)),
    ("[::1]:9", ("::1", 9)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_parses(value: str, want: tuple[str, int]) -> None:
    assert monitor_main.parse_listen(value) == want


@pytest.mark.parametrize("value", ["8090", "host:80", "127.0.0.1:99999", "127.0.0.1:x"])
def test_listen_refuses(value: str) -> None:
    with pytest.raises(Exception, match="--listen"):
        monitor_main.parse_listen(value)


def test_defaults_are_loopback_and_containerd() -> None:
    args = monitor_main.build_parser().parse_args([])
    assert args.listen == ("127.0.0.1", 8090)
    assert args.cri_endpoint == "/run/containerd/containerd.sock"


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert monitor_main.main(["--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = monitor_main.main(["--state-dir", str(tmp_path), "--cri-endpoint", "",
                                "--listen", f"127.0.0.1:{port}"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pykata-monitor: cannot serve on 127.0.0.1:{port}")
