"""The guest agent run on the host (development mode) with the host's crun.

The agent is started as a subprocess on a unix socket with private state and
cgroup directories and driven through the ttRPC client, as the shim would.
Every call has a timeout; the module checks at the end that no container,
crun state or bundle is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pykata import errors
from pykata.protos import agent_pb2 as pb
from pykata.testing import busybox_rootfs, default_spec
from pykata.ttrpc import Client

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/crun"), reason="needs crun"),
]

AGENT = "pykata.agent.v1.AgentService"
HEALTH = "pykata.agent.v1.Health"
CACHE = Path("/var/tmp/pykata-test")
UNIFIED = Path("/sys/fs/cgroup/unified")
T = 15.0  # seconds, per call


def _fix_hybrid_cgroups() -> None:
    """crun refuses hybrid cgroups while hugetlb sits on v2 (see ENVIRONMENT.md)."""
    hugetlb = Path("/sys/fs/cgroup/hugetlb")
    if not UNIFIED.is_dir() or os.path.ismount(hugetlb):
        return
    if "hugetlb" not in Path("/proc/cgroups").read_text():
        return
    hugetlb.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(hugetlb)],
                   check=False)


def _cgroup_root() -> Path:
    return UNIFIED if UNIFIED.is_dir() else Path("/sys/fs/cgroup")


class AgentProc:
    def __init__(self, tmp: Path, extra: list[str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.tmp = tmp
        self.sock = tmp / "agent.sock"
        self.state = tmp / "state"
        self.crun_root = self.state / "crun"
        self.cgroup_parent = f"pykata-test-{uuid.uuid4().hex[:6]}"
        self.log = tmp / "agent.log"
        argv = [*(prefix or []), sys.executable, "-m", "pykata.guest.agent",
                "--listen", f"unix:{self.sock}", "--state-dir", str(self.state),
                "--cgroup-parent", self.cgroup_parent, "--cgroup-root", str(_cgroup_root()),
                "--log-level", "debug", *(extra or [])]
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{self.log.read_text()}")
            time.sleep(0.02)

    def crun_list(self) -> list[str]:
        out = subprocess.run(["crun", "--root", str(self.crun_root), "list", "-q"],
                             capture_output=True, text=True, check=False).stdout
        return out.split()

    def bundles(self) -> list[str]:
        d = self.state / "containers"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            d = hierarchy / self.cgroup_parent
            with contextlib.suppress(OSError):
                for child in d.iterdir():
                    if child.is_dir():
                        child.rmdir()
                d.rmdir()
        return self.proc.returncode


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return busybox_rootfs(CACHE / "busybox-rootfs")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[AgentProc]:
    _fix_hybrid_cgroups()
    failed_before = request.session.testsfailed
    a = AgentProc(tmp_path_factory.mktemp("agent"))
    try:
        yield a
        left_crun, left_bundles = a.crun_list(), a.bundles()
    finally:
        rc = a.stop()
        if request.session.testsfailed > failed_before:
            print("\n---- agent log ----\n" + a.log.read_text(errors="replace")[-8000:])
    assert rc == 0, "agent did not exit cleanly on SIGTERM"
    assert not left_crun, f"crun containers left behind: {left_crun}"
    assert not left_bundles, f"bundles left behind: {left_bundles}"


class Agent:
    """Typed calls with a timeout each."""

    def __init__(self, conn: Client) -> None:
        self.conn = conn

    async def call(self, method: str, req: Any, resp: Any, timeout: float = T,
                   service: str = AGENT) -> Any:
        return await self.conn.call(service, method, req, resp, timeout=timeout)

    async def create(self, cid: str, spec: dict[str, Any], **kw: Any) -> None:
        await self.call("CreateContainer", pb.CreateContainerRequest(
            container_id=cid, oci_spec_json=json.dumps(spec).encode(), **kw), pb.Empty)

    async def start(self, cid: str) -> int:
        return int((await self.call("StartContainer", pb.StartContainerRequest(
            container_id=cid), pb.ProcessResponse)).pid)

    async def run(self, cid: str, spec: dict[str, Any]) -> int:
        await self.create(cid, spec)
        return await self.start(cid)

    async def exec(self, cid: str, eid: str, process: dict[str, Any]) -> int:
        return int((await self.call("ExecProcess", pb.ExecProcessRequest(
            container_id=cid, exec_id=eid, process_json=json.dumps(process).encode()),
            pb.ProcessResponse)).pid)

    async def wait(self, cid: str, eid: str = "", timeout: float = T) -> pb.WaitProcessResponse:
        return await self.call("WaitProcess", pb.WaitProcessRequest(
            container_id=cid, exec_id=eid), pb.WaitProcessResponse, timeout=timeout)

    async def signal(self, cid: str, sig: int, eid: str = "", all: bool = False) -> None:
        await self.call("SignalProcess", pb.SignalProcessRequest(
            container_id=cid, exec_id=eid, signal=sig, all=all), pb.Empty)

    async def read(self, cid: str, eid: str = "", stderr: bool = False,
                   size: int = 0, timeout: float = T) -> bytes:
        method = "ReadStderr" if stderr else "ReadStdout"
        resp = await self.call(method, pb.ReadStreamRequest(
            container_id=cid, exec_id=eid, len=size), pb.ReadStreamResponse, timeout=timeout)
        return bytes(resp.data)

    async def read_all(self, cid: str, eid: str = "", stderr: bool = False) -> bytes:
        chunks = []
        deadline = time.monotonic() + T
        while True:
            data = await self.read(cid, eid, stderr, timeout=max(0.1, deadline - time.monotonic()))
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    async def write(self, cid: str, data: bytes, eid: str = "") -> int:
        return int((await self.call("WriteStdin", pb.WriteStreamRequest(
            container_id=cid, exec_id=eid, data=data), pb.WriteStreamResponse)).len)

    async def close_stdin(self, cid: str, eid: str = "") -> None:
        await self.call("CloseStdin", pb.CloseStdinRequest(container_id=cid, exec_id=eid),
                        pb.Empty)

    async def remove(self, cid: str, timeout_s: int = 10) -> None:
        await self.call("RemoveContainer", pb.RemoveContainerRequest(
            container_id=cid, timeout_seconds=timeout_s), pb.Empty, timeout=timeout_s + 10)


@pytest_asyncio.fixture
async def client(agent: AgentProc) -> AsyncIterator[Agent]:
    conn = await Client.connect_unix(agent.sock)
    try:
        yield Agent(conn)
    finally:
        await conn.close()


@pytest.fixture
def cid(agent: AgentProc) -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def spec_for(rootfs: Path, args: list[str], **kw: Any) -> dict[str, Any]:
    spec = default_spec(args, **kw)
    spec["root"] = {"path": str(rootfs), "readonly": True}
    return spec


def proc_for(args: list[str], terminal: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = default_spec(args, terminal=terminal)["process"]
    return p


# -- tests ------------------------------------------------------------------------------


async def test_health_and_version(client: Agent) -> None:
    resp = await client.call("Check", pb.CheckRequest(), pb.HealthCheckResponse,
                             service=HEALTH)
    assert resp.status == pb.HealthCheckResponse.SERVING
    ver = await client.call("Version", pb.CheckRequest(), pb.VersionCheckResponse,
                            service=HEALTH)
    from pykata import __version__

    assert ver.agent_version == __version__


async def test_output_stderr_and_exit_code(client: Agent, rootfs: Path, cid: str,
                                           agent: AgentProc) -> None:
    spec = spec_for(rootfs, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    pid = await client.run(cid, spec)
    assert pid > 0
    assert await client.read_all(cid) == b"out\n"
    assert await client.read_all(cid, stderr=True) == b"err\n"
    st = await client.wait(cid)
    assert st.status == 7
    assert abs(st.exited_at_unix_nano / 1e9 - time.time()) < 60
    assert not st.oom_killed
    # Waiting again answers at once.
    assert (await client.wait(cid, timeout=2)).status == 7
    await client.remove(cid)
    assert cid not in agent.crun_list()
    assert cid not in agent.bundles()


async def test_hostname_from_spec(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["hostname"], hostname="pod-abc"))
    assert await client.read_all(cid) == b"pod-abc\n"
    assert (await client.wait(cid)).status == 0
    await client.remove(cid)


async def test_exec_in_running_container(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    pid = await client.exec(cid, "e1", proc_for(["sh", "-c", "echo hi; exit 3"]))
    assert pid > 0
    assert await client.read_all(cid, "e1") == b"hi\n"
    assert (await client.wait(cid, "e1")).status == 3
    # The init is still running.
    procs = await client.call("ListProcesses", pb.ListProcessesRequest(container_id=cid),
                              pb.ListProcessesResponse)
    assert any(p.command == "sleep" and p.exec_id == "" for p in procs.processes)
    with pytest.raises(errors.AlreadyExists):
        await client.exec(cid, "e1", proc_for(["true"]))
    with pytest.raises(errors.NotFound):
        await client.wait(cid, "nope")
    await client.remove(cid)


async def test_exec_exit_right_away(client: Agent, rootfs: Path, cid: str) -> None:
    """A process that is gone before its pid file is read still reports its status."""
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    for i in range(5):
        await client.exec(cid, f"q{i}", proc_for(["sh", "-c", f"exit {i + 40}"]))
    for i in range(5):
        assert (await client.wait(cid, f"q{i}")).status == i + 40
    await client.remove(cid)


async def test_stdin_cat_and_close(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["cat"]))
    assert await client.write(cid, b"hello\n") == 6
    assert await client.read(cid) == b"hello\n"
    big = b"x" * 300_000 + b"\n"
    writer = asyncio.ensure_future(client.write(cid, big))
    got = b""
    while len(got) < len(big):
        got += await client.read(cid, size=65536)
    assert await writer == len(big)
    assert got == big
    await client.close_stdin(cid)
    assert await client.read(cid) == b""
    assert (await client.wait(cid)).status == 0
    await client.remove(cid)


async def test_exec_stdin(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    await client.exec(cid, "cat", proc_for(["sh", "-c", "cat; echo done"]))
    await client.write(cid, b"abc", "cat")
    await client.close_stdin(cid, "cat")
    assert await client.read_all(cid, "cat") == b"abcdone\n"
    assert (await client.wait(cid, "cat")).status == 0
    await client.remove(cid)


async def test_no_lost_tail(client: Agent, rootfs: Path, cid: str) -> None:
    script = "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done; echo end >&2"
    await client.run(cid, spec_for(rootfs, ["sh", "-c", script]))
    st = asyncio.ensure_future(client.wait(cid, timeout=60))
    out = await client.read_all(cid)
    lines = out.decode().splitlines()
    assert len(lines) == 20000
    assert lines[-1] == "line19999"
    assert (await st).status == 0
    assert await client.read_all(cid, stderr=True) == b"end\n"
    await client.remove(cid)


async def test_tty_process(client: Agent, rootfs: Path, cid: str) -> None:
    spec = spec_for(rootfs, ["sh", "-c", "sleep 0.5; stty size; tty; echo ttyout"],
                    terminal=True)
    await client.run(cid, spec)
    await client.call("TtyWinResize", pb.TtyWinResizeRequest(
        container_id=cid, row=40, column=100), pb.Empty)
    assert await client.read(cid, stderr=True, timeout=2) == b""
    out = await client.read_all(cid)
    assert b"40 100" in out
    assert b"/dev/pts/" in out
    assert b"ttyout" in out
    assert (await client.wait(cid)).status == 0
    await client.remove(cid)


async def test_tty_exec(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    await client.exec(cid, "t", proc_for(["sh", "-c", "read x; echo got-$x; exit 5"],
                                         terminal=True))
    await client.write(cid, b"yes\r", "t")
    out = await client.read_all(cid, "t")
    assert b"got-yes" in out
    assert (await client.wait(cid, "t")).status == 5
    await client.remove(cid)


async def test_signal_exec_sigterm(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    await client.exec(cid, "s", proc_for(["sleep", "30"]))
    waits = [asyncio.ensure_future(client.wait(cid, "s")) for _ in range(3)]
    await asyncio.sleep(0.1)
    await client.signal(cid, signal.SIGTERM, "s")
    results = await asyncio.gather(*waits)
    assert [r.status for r in results] == [143, 143, 143]
    with pytest.raises(errors.NotFound, match="already finished"):
        await client.signal(cid, signal.SIGTERM, "s")
    await client.remove(cid)


async def test_signal_init_and_all(client: Agent, rootfs: Path, cid: str) -> None:
    # A shell as pid 1 of its namespace only dies of signals it handles, or SIGKILL.
    await client.run(cid, spec_for(rootfs, ["sh", "-c", "trap 'exit 143' TERM; sleep 30 & wait"]))
    await asyncio.sleep(0.2)
    await client.signal(cid, signal.SIGTERM, all=True)
    assert (await client.wait(cid)).status == 143
    with pytest.raises(errors.NotFound):
        await client.signal(cid, signal.SIGKILL)
    await client.remove(cid)

    cid2 = cid + "k"
    await client.run(cid2, spec_for(rootfs, ["sleep", "30"]))
    await client.signal(cid2, signal.SIGKILL)
    assert (await client.wait(cid2)).status == 137
    await client.remove(cid2)


async def test_states(client: Agent, rootfs: Path, cid: str) -> None:
    await client.create(cid, spec_for(rootfs, ["sleep", "30"]))
    with pytest.raises(errors.FailedPrecondition, match="created"):
        await client.exec(cid, "e", proc_for(["true"]))
    with pytest.raises(errors.FailedPrecondition, match="created"):
        await client.call("PauseContainer", pb.PauseContainerRequest(container_id=cid),
                          pb.Empty)
    with pytest.raises(errors.AlreadyExists):
        await client.create(cid, spec_for(rootfs, ["true"]))
    await client.start(cid)
    with pytest.raises(errors.FailedPrecondition, match="running"):
        await client.start(cid)
    await client.call("PauseContainer", pb.PauseContainerRequest(container_id=cid), pb.Empty)
    with pytest.raises(errors.FailedPrecondition, match="paused"):
        await client.exec(cid, "e", proc_for(["true"]))
    await client.call("ResumeContainer", pb.ResumeContainerRequest(container_id=cid), pb.Empty)
    await client.exec(cid, "e", proc_for(["true"]))
    assert (await client.wait(cid, "e")).status == 0
    # Removing a running container kills it.
    await client.remove(cid)
    with pytest.raises(errors.NotFound):
        await client.wait(cid)


async def test_remove_created_container(client: Agent, rootfs: Path, cid: str,
                                        agent: AgentProc) -> None:
    await client.create(cid, spec_for(rootfs, ["sleep", "30"]))
    waiter = asyncio.ensure_future(client.wait(cid))
    await client.remove(cid)
    assert (await waiter).status == 137
    assert cid not in agent.crun_list()
    assert cid not in agent.bundles()


async def test_unknown_container(client: Agent) -> None:
    for coro in (client.start("nope"), client.wait("nope"), client.remove("nope"),
                 client.signal("nope", 9), client.read("nope"),
                 client.exec("nope", "e", proc_for(["true"]))):
        with pytest.raises(errors.NotFound, match="container nope not found"):
            await coro


async def test_invalid_specs_leave_nothing(client: Agent, rootfs: Path, cid: str,
                                           agent: AgentProc) -> None:
    spec = spec_for(rootfs, ["true"])
    spec["process"]["args"] = []
    with pytest.raises(errors.InvalidArgument, match="process.args"):
        await client.create(cid, spec)
    spec = spec_for(rootfs, ["true"])
    spec["root"]["path"] = "/nonexistent/rootfs"
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        await client.create(cid, spec)
    with pytest.raises(errors.InvalidArgument, match="not JSON"):
        await client.call("CreateContainer", pb.CreateContainerRequest(
            container_id=cid, oci_spec_json=b"{nope"), pb.Empty)
    with pytest.raises(errors.InvalidArgument, match="invalid container id"):
        await client.create("../evil", spec_for(rootfs, ["true"]))
    # crun itself refuses: a missing executable, one clear line.
    with pytest.raises(errors.InvalidArgument) as info:
        await client.create(cid, spec_for(rootfs, ["/no/such/binary"]))
    assert "\n" not in str(info.value)
    assert "/no/such/binary" in str(info.value)
    assert cid not in agent.crun_list()
    assert cid not in agent.bundles()
    # The id is free again.
    await client.run(cid, spec_for(rootfs, ["true"]))
    assert (await client.wait(cid)).status == 0
    await client.remove(cid)


async def test_failing_exec_and_tty_create(client: Agent, rootfs: Path, cid: str,
                                           agent: AgentProc) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    for terminal in (False, True):
        with pytest.raises(errors.InvalidArgument, match="/no/such/exe"):
            await client.exec(cid, "bad", proc_for(["/no/such/exe"], terminal=terminal))
    # The exec id is free again.
    await client.exec(cid, "bad", proc_for(["true"]))
    assert (await client.wait(cid, "bad")).status == 0
    await client.remove(cid)
    with pytest.raises(errors.InvalidArgument, match="/no/such/exe"):
        await client.create(cid, spec_for(rootfs, ["/no/such/exe"], terminal=True))
    assert cid not in agent.crun_list()
    assert cid not in agent.bundles()


async def test_exec_dies_with_init(client: Agent, rootfs: Path, cid: str) -> None:
    """The container's init exiting kills the rest of its pid namespace."""
    await client.run(cid, spec_for(rootfs, ["sh", "-c", "read x; exit 0"]))
    await client.exec(cid, "long", proc_for(["sleep", "30"]))
    await client.close_stdin(cid)
    assert (await client.wait(cid)).status == 0
    assert (await client.wait(cid, "long")).status == 137
    await client.remove(cid)


async def test_sandbox_pid_namespace(client: Agent, rootfs: Path, cid: str) -> None:
    first, second = cid + "a", cid + "b"
    await client.create(first, spec_for(rootfs, ["sleep", "30"]), sandbox_pidns=True)
    await client.start(first)
    await client.create(second, spec_for(rootfs, ["cat", "/proc/1/comm"]), sandbox_pidns=True)
    await client.start(second)
    assert await client.read_all(second) == b"sleep\n"
    assert (await client.wait(second)).status == 0
    await client.remove(second)
    await client.remove(first)


async def test_many_containers_at_once(client: Agent, rootfs: Path, cid: str) -> None:
    async def one(i: int) -> None:
        c = f"{cid}-{i}"
        await client.run(c, spec_for(rootfs, ["sh", "-c", f"echo {i}; exit {i}"]))
        assert await client.read_all(c) == f"{i}\n".encode()
        assert (await client.wait(c)).status == i
        await client.remove(c)

    await asyncio.gather(*(one(i) for i in range(8)))


async def test_stats_and_update(client: Agent, rootfs: Path, cid: str) -> None:
    await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    stats = await client.call("StatsContainer", pb.StatsContainerRequest(container_id=cid),
                              pb.StatsContainerResponse)
    assert stats.cgroup_stats.memory_stats.usage.limit > 0
    await client.call("UpdateContainer", pb.UpdateContainerRequest(
        container_id=cid, resources_json=json.dumps({"pids": {"limit": 100}}).encode()),
        pb.Empty)
    with pytest.raises(errors.InvalidArgument):
        await client.call("UpdateContainer", pb.UpdateContainerRequest(
            container_id=cid, resources_json=b"[]"), pb.Empty)
    await client.remove(cid)


async def test_guest_calls(client: Agent, tmp_path: Path) -> None:
    details = await client.call("GetGuestDetails", pb.GetGuestDetailsRequest(),
                                pb.GuestDetailsResponse)
    assert details.online_cpus >= 1
    assert details.mem_total_bytes > 0
    assert details.kernel_release == os.uname().release
    assert not details.agent_details.init_daemon
    metrics = (await client.call("GetMetrics", pb.GetMetricsRequest(), pb.Metrics)).metrics
    assert "pykata_agent_rss_bytes" in metrics
    assert 'pykata_guest_meminfo{item="MemTotal"}' in metrics
    online = await client.call("OnlineCPUMem", pb.OnlineCPUMemRequest(), pb.OnlineCPUMemResponse)
    assert online.online_cpus >= 1
    await client.call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=os.urandom(32)),
                      pb.Empty)
    with pytest.raises(errors.FailedPrecondition, match="not setting the clock"):
        await client.call("SetGuestDateTime", pb.SetGuestDateTimeRequest(sec=1), pb.Empty)
    target = tmp_path / "sub" / "file.txt"
    for off, chunk in ((0, b"hello "), (6, b"world")):
        await client.call("CopyFile", pb.CopyFileRequest(
            path=str(target), file_size=11, file_mode=0o640, dir_mode=0o755, offset=off,
            data=chunk), pb.Empty)
    assert target.read_bytes() == b"hello world"
    assert target.stat().st_mode & 0o777 == 0o640
    routes = await client.call("ListRoutes", pb.ListRoutesRequest(), pb.Routes)
    assert isinstance(list(routes.routes), list)
    with pytest.raises(errors.FailedPrecondition, match="network"):
        await client.call("UpdateRoutes", pb.UpdateRoutesRequest(), pb.Routes)


async def test_sandbox_storages(client: Agent, rootfs: Path, tmp_path: Path, cid: str) -> None:
    local = tmp_path / "local-vol"
    mnt = tmp_path / "tmpfs-vol"
    await client.call("CreateSandbox", pb.CreateSandboxRequest(
        sandbox_id="sb1", hostname="ignored-in-dev-mode", storages=[
            pb.Storage(driver="local", mount_point=str(local)),
            pb.Storage(driver="tmpfs", source="tmpfs", mount_point=str(mnt),
                       options=["size=1m"]),
        ]), pb.Empty)
    try:
        assert local.is_dir()
        assert os.path.ismount(mnt)
        with pytest.raises(errors.AlreadyExists):
            await client.call("CreateSandbox", pb.CreateSandboxRequest(sandbox_id="sb2"),
                              pb.Empty)
        await client.run(cid, spec_for(rootfs, ["sleep", "30"]))
    finally:
        await client.call("DestroySandbox", pb.DestroySandboxRequest(), pb.Empty, timeout=30)
    assert not os.path.ismount(mnt)
    with pytest.raises(errors.NotFound):
        await client.wait(cid)


async def test_oom_killed(client: Agent, rootfs: Path, cid: str) -> None:
    if not (_cgroup_root() / "cgroup.subtree_control").exists() or \
            "memory" not in (_cgroup_root() / "cgroup.controllers").read_text():
        pytest.skip("the memory controller is not on cgroup v2 here (hybrid host)")
    spec = spec_for(rootfs, ["sh", "-c", "x=a; while true; do x=$x$x; done"],
                    memory_limit=32 * 1024 * 1024)
    await client.run(cid, spec)
    st = await client.wait(cid, timeout=60)
    assert st.oom_killed
    oom = await client.call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent, timeout=10)
    assert oom.container_id == cid
    await client.remove(cid)


def test_network_in_netns(tmp_path: Path) -> None:
    """UpdateInterface/UpdateRoutes/AddARPNeighbors/List* in a private netns."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare and ip")
    # A private network namespace, and a sysfs that shows it.
    a = AgentProc(tmp_path, extra=["--manage-network"],
                  prefix=["unshare", "--net", "--mount", "sh", "-c",
                          'mount -t sysfs sysfs /sys && exec "$@"', "sh"])
    try:
        ns = ["nsenter", "-t", str(a.proc.pid), "-n"]
        subprocess.run([*ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                       check=True)
        link = subprocess.run([*ns, "ip", "-o", "link", "show", "v0"], capture_output=True,
                              text=True, check=True).stdout.split()
        mac = link[link.index("link/ether") + 1]
        subprocess.run([*ns, "ip", "link", "set", "v1", "up"], check=True)

        async def go() -> None:
            conn = await Client.connect_unix(a.sock)
            c = Agent(conn)
            try:
                iface = await c.call("UpdateInterface", pb.UpdateInterfaceRequest(
                    interface=pb.Interface(device="eth0", hw_addr=mac, mtu=1400,
                                           ip_addresses=[pb.IPAddress(
                                               family=4, address="10.9.0.2", mask="24")])),
                    pb.Interface)
                assert iface.name == "eth0"
                assert iface.mtu == 1400
                assert [(x.address, x.mask) for x in iface.ip_addresses
                        if x.family == 4] == [("10.9.0.2", "24")]
                routes = await c.call("UpdateRoutes", pb.UpdateRoutesRequest(routes=[
                    pb.Route(dest="", gateway="10.9.0.1", device="eth0", family=4),
                    pb.Route(dest="10.9.0.0/24", device="eth0", scope=253, family=4),
                ]), pb.Routes)
                assert any(r.dest == "" and r.gateway == "10.9.0.1" for r in routes.routes)
                await c.call("AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=[
                    pb.ARPNeighbor(to_ip_address=pb.IPAddress(family=4, address="10.9.0.1"),
                                   device="eth0", ll_addr="02:00:00:00:00:01")]), pb.Empty)
                listed = await c.call("ListInterfaces", pb.ListInterfacesRequest(),
                                      pb.Interfaces)
                assert "eth0" in [i.name for i in listed.interfaces]
                with pytest.raises(errors.NotFound):
                    await c.call("UpdateInterface", pb.UpdateInterfaceRequest(
                        interface=pb.Interface(device="x", hw_addr="02:99:99:99:99:99")),
                        pb.Interface)
            finally:
                await conn.close()

        asyncio.run(go())
        neigh = subprocess.run([*ns, "ip", "neigh", "show", "dev", "eth0"], capture_output=True,
                               text=True, check=True).stdout
        assert "10.9.0.1" in neigh and "02:00:00:00:00:01" in neigh
    finally:
        assert a.stop() == 0
