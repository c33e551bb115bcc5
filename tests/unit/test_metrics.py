"""The shim's per-sandbox metrics (pykata.metrics): /proc parsing, the guest's
text read as hostile input, the collector over fakes, the unix-socket server,
and the agent call timings."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import types
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pykata import errors
from pykata.agent import rpcstats
from pykata.agent.client import AgentClient
from pykata.metrics import guesttext, procstat
from pykata.metrics.collector import SandboxCollector, scrape
from pykata.metrics.companion import MetricsCompanion
from pykata.metrics.server import MAX_HEAD, MetricsServer, parse_head
from pykata.observe import Phases

# -- procstat ----------------------------------------------------------------------


def test_parse_stat_counts_fields_after_the_last_parenthesis() -> None:
    # A command name with spaces and ") (" in it must not shift the fields.
    fields = ["S"] + [str(i) for i in range(4, 53)]
    fields[11] = str(3 * procstat.CLK_TCK)  # utime
    fields[12] = str(procstat.CLK_TCK)  # stime
    fields[17] = "7"  # threads
    fields[19] = "123456"  # start time
    fields[21] = "10"  # rss pages
    text = "42 (qemu ) (evil x) " + " ".join(fields)
    assert procstat.parse_stat(text) == (3.0, 1.0, 7, 123456, 10 * procstat.PAGE_SIZE)
    assert procstat.parse_stat("42 (x) Z " + " ".join(fields[1:])) is None
    assert procstat.parse_stat("garbage") is None
    assert procstat.parse_stat("1 (x) S 1 2") is None


def test_parse_smaps_rollup_and_io() -> None:
    rollup = ("55d0-7ffc ---p 00000000 00:00 0  [rollup]\nRss:   2048 kB\nPss:  1024 kB\n"
              "Pss_Anon: 12 kB\n")
    assert procstat.parse_kb_fields(rollup, ("Rss", "Pss")) == {"Rss": 2 << 20, "Pss": 1 << 20}
    io = "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 8192\nbad line\nx: y\n"
    assert procstat.parse_io(io) == {"rchar": 10, "wchar": 20, "read_bytes": 4096,
                                     "write_bytes": 8192}


def test_read_own_process_and_a_reused_pid() -> None:
    me = procstat.read(os.getpid())
    assert me is not None
    assert me.rss_bytes > 0 and me.pss_bytes > 0 and me.threads >= 1 and me.fds >= 3
    assert me.user_seconds + me.system_seconds > 0
    # Same pid, another start time: not the process that was meant.
    assert procstat.read(os.getpid(), me.start_ticks + 1) is None
    assert procstat.read(2 ** 22 + 7) is None


def test_read_tree_sums_the_children() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child waits until the parent has looked
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        alone = procstat.read(os.getpid())
        tree = procstat.read_tree(os.getpid())
        assert pid in procstat.children(os.getpid())
        assert alone is not None and tree is not None
        assert tree.threads > alone.threads and tree.fds > alone.fds
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def test_parse_net_dev() -> None:
    text = ("Inter-|   Receive   |  Transmit\n face |bytes packets errs drop ...\n"
            "  eth0_pk: 100 2 3 4 0 0 0 0 500 6 7 8 0 0 0 0\n"
            "  lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n"
            "  short: 1 2\n  neg: -1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n")
    devs = procstat.parse_net_dev(text)
    assert set(devs) == {"eth0_pk", "lo"}
    d = devs["eth0_pk"]
    assert (d.rx_bytes, d.rx_packets, d.rx_errors, d.rx_dropped) == (100, 2, 3, 4)
    assert (d.tx_bytes, d.tx_packets, d.tx_errors, d.tx_dropped) == (500, 6, 7, 8)
    assert "lo" in procstat.thread_net_dev()


# -- the guest's text --------------------------------------------------------------

GOOD = """# HELP pykata_guest_meminfo Guest meminfo.
# TYPE pykata_guest_meminfo gauge
pykata_guest_meminfo{item="MemTotal"} 1048576
pykata_guest_meminfo{item="MemFree"} 524288
# TYPE pykata_guest_cpu_seconds_total counter
pykata_guest_cpu_seconds_total{cpu="0",mode="user"} 1.5
# TYPE pykata_guest_old counter
pykata_guest_old 3
pykata_agent_rss_bytes 2e7 1700000000000
"""


def test_guest_text_good() -> None:
    p = guesttext.parse(GOOD)
    assert p.dropped == 0
    assert p.families["pykata_guest_meminfo"].samples == [({"item": "MemTotal"}, 1048576.0),
                                                          ({"item": "MemFree"}, 524288.0)]
    assert p.families["pykata_guest_cpu_seconds"].kind == "counter"
    assert p.families["pykata_guest_old"].kind == "counter"
    assert p.families["pykata_agent_rss_bytes"].kind == "untyped"
    assert p.families["pykata_agent_rss_bytes"].samples == [({}, 2e7)]


@pytest.mark.parametrize("line", [
    'node_cpu_seconds_total 1',  # not a guest name
    'pykata_shim_rss_bytes 1',  # the host's
    'pykata_hypervisor_rss_bytes{process="qemu"} 1',
    'pykata_agent_rpc_duration_seconds_count{method="x"} 1',  # reserved: the host's
    'pykata_agent_scrape_errors_total 0',
    'pykata_guest_x{pod_name="other"} 1',  # an identity label
    'pykata_guest_x{sandbox_id="other"} 1',
    'pykata_guest_x{__name__="pykata_shim_x"} 1',
    'pykata_guest_x NaN',
    'pykata_guest_x +Inf',
    'pykata_guest_x -Inf',
    'pykata_guest_x nope',
    'pykata_guest_x',
    'pykata_guest_x 1 2 3',
    'pykata_guest_x{a="1"} 1\rpykata_shim_evil 1',  # \r is not a line end here
    'pykata_guest_x{a="1",a="2"} 1',
    'pykata_guest_x{a="unterminated} 1',
    'pykata_guest_x{a="x"}\n',
    'pykata_guest_x{a="bad\\q"} 1',
    'pykata_guest_x{a="nl\\n"} 1',  # a newline in a value
    'pykata_guest_x{a="\x1b[31m"} 1',
    'pykata_guest_x{1a="1"} 1',
    'pykata_guest_x{a="1"}} 1',
    'pykata_guest_x{a="1"} 1 notatime',
    '{__name__="pykata_guest_x"} 1',
    'pykata_guest_' + "x" * 200 + ' 1',
    'pykata_guest_x{a="' + "v" * 300 + '"} 1',
    'pykata_guest_x{' + ",".join(f'l{i}="v"' for i in range(9)) + '} 1',
])
def test_guest_text_refuses_a_bad_line(line: str) -> None:
    p = guesttext.parse(line + "\npykata_guest_ok 1\n")
    assert p.dropped >= 1, line
    names = set(p.families)
    assert names <= {"pykata_guest_ok", "pykata_guest_x"} and "pykata_guest_ok" in names
    for fam in p.families.values():
        for labels, value in fam.samples:
            assert value == 1.0 and len(labels) <= guesttext.MAX_LABELS
            assert not set(labels) & guesttext.RESERVED_LABELS


def test_guest_text_counter_rules() -> None:
    p = guesttext.parse("# TYPE pykata_guest_c counter\npykata_guest_c -1\n"
                        "pykata_guest_c_total 5\npykata_guest_c 6\n")
    # A negative counter is dropped; NAME and NAME_total are one sample.
    assert p.families["pykata_guest_c"].samples == [({}, 5.0)]
    assert p.dropped == 2
    # A gauge whose name is a counter's NAME_total would be written out twice.
    p = guesttext.parse("# TYPE pykata_guest_d counter\npykata_guest_d 1\n"
                        "# TYPE pykata_guest_d_total gauge\npykata_guest_d_total 2\n")
    assert list(p.families) == ["pykata_guest_d"] and p.dropped == 1
    # A second TYPE, an unknown type, a HELP of another name: ignored.
    p = guesttext.parse("# TYPE pykata_guest_e gauge\n# TYPE pykata_guest_e counter\n"
                        "# TYPE pykata_guest_f histogram\n# HELP node_x y\n"
                        "pykata_guest_e -2\npykata_guest_f 1\n")
    assert p.families["pykata_guest_e"].kind == "gauge"
    assert p.families["pykata_guest_f"].kind == "untyped"


def test_guest_text_bounds() -> None:
    with pytest.raises(guesttext.GuestTextError):
        guesttext.parse("pykata_guest_x 1\n" * (guesttext.MAX_TEXT // 10))
    with pytest.raises(guesttext.GuestTextError):
        guesttext.parse(b"\xff\xfe")
    many = "".join(f'pykata_guest_x{{i="{i}"}} 1\n' for i in range(guesttext.MAX_SAMPLES + 5))
    p = guesttext.parse(many)
    assert p.samples == guesttext.MAX_SAMPLES and p.dropped == 5
    fams = "".join(f"pykata_guest_f{i} 1\n" for i in range(guesttext.MAX_FAMILIES + 3))
    p = guesttext.parse(fams)
    assert len(p.families) == guesttext.MAX_FAMILIES and p.dropped == 3
    dup = guesttext.parse('pykata_guest_x{a="1"} 1\npykata_guest_x{a="1"} 2\n')
    assert dup.families["pykata_guest_x"].samples == [({"a": "1"}, 1.0)]


# -- the collector -----------------------------------------------------------------


class Agent:
    def __init__(self, text: str = GOOD, delay: float = 0.0, fail: bool = False) -> None:
        self.text, self.delay, self.fail = text, delay, fail

    async def metrics(self) -> str:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise errors.Unavailable("agent connection closed")
        return self.text


def sandbox(tmp_path: Path, agent: Agent, **kw: Any) -> Any:
    phases = Phases()
    phases.record("vm.boot", 1.25)
    base = dict(id="sb1", namespace="k8s.io", dir=tmp_path,
                vm=types.SimpleNamespace(pid=os.getpid()), virtiofsd=None, network=None,
                agent=agent, phases=phases)
    base.update(kw)
    return types.SimpleNamespace(**base)


def families(text: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(fams: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    for s in fams[name].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no {sample} {labels}")


CRI_SPEC = {"annotations": {
    "io.kubernetes.cri.sandbox-name": 'web"}\npykata_shim_evil 1\n',
    "io.kubernetes.cri.sandbox-namespace": "default",
    "io.kubernetes.cri.sandbox-uid": "u-1"}}


async def test_collector_host_guest_and_identity(tmp_path: Path) -> None:
    rpc = rpcstats.RpcStats()
    rpc.observe("Check", 0.002)
    rpc.observe("CreateContainer", 3.0, failed=True)
    c = SandboxCollector(sandbox(tmp_path, Agent()), CRI_SPEC, rpc=rpc)
    text = await scrape(c)
    assert not [ln for ln in text.splitlines() if ln.startswith(b"pykata_shim_evil")]
    fams = families(text)
    info = fams["pykata_shim_sandbox_info"].samples[0]
    assert info.labels == {"sandbox_id": "sb1", "namespace": "k8s.io",
                           "pod_name": 'web"}pykata_shim_evil 1',
                           "pod_namespace": "default", "pod_uid": "u-1"}
    # The "VM" is this process here.
    assert value(fams, "pykata_hypervisor_rss_bytes", "pykata_hypervisor_rss_bytes",
                 process="qemu") > 0
    assert value(fams, "pykata_shim_fds", "pykata_shim_fds", process="shim") >= 3
    assert value(fams, "pykata_hypervisor_cpu_seconds", "pykata_hypervisor_cpu_seconds_total",
                 process="qemu", mode="user") >= 0
    assert value(fams, "pykata_shim_startup_phase_seconds",
                 "pykata_shim_startup_phase_seconds", phase="vm.boot") == 1.25
    h = "pykata_agent_rpc_duration_seconds"
    assert value(fams, h, h + "_count", method="Check") == 1
    assert value(fams, h, h + "_bucket", method="Check", le="0.0025") == 1
    assert value(fams, h, h + "_bucket", method="CreateContainer", le="2.5") == 0
    assert value(fams, h, h + "_bucket", method="CreateContainer", le="+Inf") == 1
    assert value(fams, "pykata_agent_rpc_errors", "pykata_agent_rpc_errors_total",
                 method="CreateContainer") == 1
    assert value(fams, "pykata_guest_meminfo", "pykata_guest_meminfo",
                 item="MemTotal") == 1048576
    assert value(fams, "pykata_guest_cpu_seconds", "pykata_guest_cpu_seconds_total",
                 cpu="0", mode="user") == 1.5
    assert value(fams, "pykata_guest_old", "pykata_guest_old_total") == 3
    assert value(fams, "pykata_agent_scrape_errors", "pykata_agent_scrape_errors_total") == 0
    # Every name is written once (a duplicate would fail the whole scrape).
    heads = [ln.split()[2] for ln in text.decode().splitlines() if ln.startswith("# TYPE")]
    assert len(heads) == len(set(heads))


async def test_collector_guest_hostile_text_cannot_add_host_lines(tmp_path: Path) -> None:
    evil = ('pykata_guest_x{a="1"} 1\npykata_shim_sandbox_info{sandbox_id="other"} 1\n'
            'pykata_agent_rpc_errors_total{method="Check"} 99\n'
            '# TYPE pykata_guest_meminfo gauge\npykata_guest_meminfo{item="x\\"} 1\n')
    rpcstats.STATS.clear()  # the process's own agent calls (other tests made some)
    c = SandboxCollector(sandbox(tmp_path, Agent(evil)), {})
    fams = families(await scrape(c))
    assert [s.labels["sandbox_id"] for s in fams["pykata_shim_sandbox_info"].samples] == ["sb1"]
    assert fams["pykata_agent_rpc_errors"].samples == []
    assert value(fams, "pykata_agent_scrape_dropped_lines",
                 "pykata_agent_scrape_dropped_lines_total") == 3
    assert "pykata_guest_meminfo" not in fams


@pytest.mark.parametrize("agent", [Agent(delay=5.0), Agent(fail=True),
                                   Agent("pykata_guest_x 1\n" * 100000)])
async def test_collector_guest_failure_still_serves_the_host(tmp_path: Path,
                                                             agent: Agent) -> None:
    c = SandboxCollector(sandbox(tmp_path, agent), {}, guest_timeout=0.2)
    fams = families(await scrape(c))
    assert value(fams, "pykata_agent_scrape_errors", "pykata_agent_scrape_errors_total") == 1
    assert value(fams, "pykata_hypervisor_rss_bytes", "pykata_hypervisor_rss_bytes",
                 process="qemu") > 0
    assert not [n for n in fams if n.startswith("pykata_guest_")]
    fams = families(await scrape(c))
    assert value(fams, "pykata_agent_scrape_errors", "pykata_agent_scrape_errors_total") == 2


async def test_collector_without_vm_agent_or_phases(tmp_path: Path) -> None:
    sb = types.SimpleNamespace(id="sb2", namespace="default", vm=None)
    fams = families(await scrape(SandboxCollector(sb, {})))
    assert fams["pykata_hypervisor_rss_bytes"].samples == []
    assert fams["pykata_shim_startup_phase_seconds"].samples == []
    assert value(fams, "pykata_agent_scrape_errors", "pykata_agent_scrape_errors_total") == 1


async def test_collector_reads_tap_counters_in_the_pod_namespace(tmp_path: Path) -> None:
    # The namespace here is the test's own: its "lo" stands for a tap.
    net = types.SimpleNamespace(netns=f"/proc/{os.getpid()}/ns/net",
                                endpoints=[types.SimpleNamespace(name="eth0", tap="lo"),
                                           types.SimpleNamespace(name="eth1", tap="gone_pk")])
    c = SandboxCollector(sandbox(tmp_path, Agent(), network=net), {})
    fams = families(await scrape(c))
    got = {s.labels["interface"] for s in fams["pykata_hypervisor_netdev_rx_bytes"].samples}
    assert got == {"lo"}
    # A namespace that went: no counters, still an answer.
    net.netns = str(tmp_path / "no-such-netns")
    fams = families(await scrape(c))
    assert fams["pykata_hypervisor_netdev_rx_bytes"].samples == []


def test_rpcstats_buckets_and_bound() -> None:
    s = rpcstats.RpcStats()
    s.observe("A", 0.0005)  # on a bound: in that bucket
    s.observe("A", 1000.0)
    snap = s.snapshot()["A"]
    assert snap.buckets[0] == 1 and snap.buckets[-1] == 1 and snap.count == 2
    for i in range(rpcstats.MAX_METHODS + 5):
        s.observe(f"m{i}", 0.1)
    assert len(s.snapshot()) == rpcstats.MAX_METHODS


async def test_agent_client_times_calls_with_a_deadline() -> None:
    from pykata.protos import agent_pb2 as pb

    class Conn:
        def __init__(self) -> None:
            self.fail = False

        async def call(self, service: str, method: str, req: Any, resp_type: Any,
                       timeout: float | None = None) -> Any:
            if self.fail:
                raise errors.Unavailable("gone")
            return resp_type()

        async def close(self) -> None:
            pass

    rpcstats.STATS.clear()
    conn = Conn()
    client = AgentClient(conn)  # type: ignore[arg-type]
    await client.guest_details()
    await client.wait_process("c1")  # a long poll: not timed
    conn.fail = True
    with pytest.raises(errors.Unavailable):
        await client.metrics()
    snap = rpcstats.STATS.snapshot()
    assert set(snap) == {"GetGuestDetails", "GetMetrics"}
    assert snap["GetGuestDetails"].count == 1 and snap["GetGuestDetails"].errors == 0
    assert snap["GetMetrics"].errors == 1
    _ = pb


# -- the server --------------------------------------------------------------------


async def request(path: Path, data: bytes, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    if half_close:
        writer.write_eof()
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


def test_parse_head() -> None:
    assert parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n") == ("GET", "/metrics")
    for bad in (b"GET /metrics\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                b"G\xffT /metrics HTTP/1.1\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n",
                b"G-T /metrics HTTP/1.1\r\n\r\n"):
        assert parse_head(bad) is None


async def test_server_answers_and_refuses(tmp_path: Path) -> None:
    async def render() -> bytes:
        return b"pykata_x 1\n"

    path = tmp_path / "metrics.sock"
    srv = MetricsServer(path, render)
    await srv.start()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        ok = await request(path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4" in ok
        assert ok.endswith(b"\r\n\r\npykata_x 1\n")
        head = await request(path, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert (await request(path, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await request(path, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 405")
        assert (await request(path, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400")
        big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
        assert (await request(path, big)).startswith(b"HTTP/1.1 431")
        # A client that sends half a request and goes away: nothing answered, served on.
        assert await request(path, b"GET /met", half_close=True) == b""
        ok = await request(path, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
    finally:
        await srv.stop()
    assert not path.exists()


async def test_server_slow_client_times_out(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata.metrics import server as servermod

    async def render() -> bytes:
        return b""

    monkeypatch.setattr(servermod, "HEAD_TIMEOUT", 0.2)
    path = tmp_path / "m.sock"
    srv = MetricsServer(path, render)
    await srv.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # never ends its head
        out = await asyncio.wait_for(reader.read(), 10)
        assert out.startswith(b"HTTP/1.1 408")
        writer.close()
    finally:
        await srv.stop()


async def test_server_render_failure_is_a_500(tmp_path: Path) -> None:
    async def render() -> bytes:
        raise RuntimeError("boom")

    srv = MetricsServer(tmp_path / "m.sock", render)
    await srv.start()
    try:
        out = await request(tmp_path / "m.sock", b"GET /metrics HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500") and b"boom" not in out
    finally:
        await srv.stop()


async def test_server_socket_path_rules(tmp_path: Path) -> None:
    async def render() -> bytes:
        return b""

    # A stale socket of an earlier shim is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "m.sock"))
    stale.close()
    srv = MetricsServer(tmp_path / "m.sock", render)
    await srv.start()
    await srv.stop()
    # A symlink or a file in its place is left alone and refused.
    target = tmp_path / "elsewhere"
    (tmp_path / "link.sock").symlink_to(target)
    with pytest.raises(errors.Unavailable):
        await MetricsServer(tmp_path / "link.sock", render).start()
    assert not target.exists() and (tmp_path / "link.sock").is_symlink()
    # A path longer than sockaddr_un holds is bound through its directory.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    srv = MetricsServer(deep / "metrics.sock", render)
    await srv.start()
    try:
        out = await request(deep / "metrics.sock", b"GET /metrics HTTP/1.1\r\n\r\n") \
            if len(str(deep / "metrics.sock")) <= 107 else None
        assert stat.S_ISSOCK(os.lstat(deep / "metrics.sock").st_mode)
        _ = out
    finally:
        await srv.stop()
    assert not (deep / "metrics.sock").exists()


async def test_companion_serves_the_sandbox(tmp_path: Path) -> None:
    comp = MetricsCompanion()
    await comp.start(sandbox(tmp_path, Agent()), CRI_SPEC)
    try:
        out = await request(tmp_path / "metrics.sock", b"GET /metrics HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200")
        body = out.split(b"\r\n\r\n", 1)[1]
        fams = families(body)
        assert value(fams, "pykata_guest_meminfo", "pykata_guest_meminfo",
                     item="MemTotal") == 1048576
    finally:
        await comp.stop()
    assert not (tmp_path / "metrics.sock").exists()
