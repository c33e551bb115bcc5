"""Issue 12, shim side: what the guest (or a local user) sends cannot break or
mislead the shim. Fakes stand in for the VM; see also tests/unit/test_ttrpc.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2

from pykata import config, errors
from pykata.agent import AgentClient
from pykata.agent.convert import GUEST_TEXT_MAX, guest_text
from pykata.protos import agent_pb2 as apb
from pykata.protos import containerd_shim_pb2 as pb
from pykata.shim import convert
from pykata.shim import service as svc
from pykata.testing.fakes import FakeAgent, FakePublisher, FakeSandboxFactory
from pykata.ttrpc import Client, Server
from pykata.ttrpc import status as ttrpc_status

# -- 1. exit status as uint32 -----------------------------------------------------------


def _bundle_dir(tmp_path: Path) -> Path:
    import json

    from pykata.testing import default_spec

    b = tmp_path / "task"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(default_spec(["sh"])))
    return b


async def _running(tmp_path: Path) -> tuple[svc.TaskService, FakePublisher, FakeAgent]:
    pub = FakePublisher()
    make = FakeSandboxFactory(tmp_path / "state")
    service = svc.TaskService("c1", "default", config.Config(), pub, asyncio.Event(),
                              make_sandbox=make)
    await service.Create(pb.CreateTaskRequest(id="c1", bundle=str(_bundle_dir(tmp_path))))
    await service.Start(pb.StartRequest(id="c1"))
    return service, pub, make.agent


@pytest.mark.parametrize("code, wire", [(-1, 0xFFFFFFFF), (-9, 0xFFFFFFF7),
                                        (-(2**31), 2**31), (137, 137), (0, 0)])
async def test_guest_exit_status_reaches_containerd_as_uint32(tmp_path: Path, code: int,
                                                              wire: int) -> None:
    service, pub, agent = await _running(tmp_path)
    agent.exit("c1", code=code)
    wait = await asyncio.wait_for(service.Wait(pb.WaitRequest(id="c1")), 5)
    exit_ev = pub.last("/tasks/exit")
    assert exit_ev.exit_status == wire  # type: ignore[attr-defined]
    state = await service.State(pb.StateRequest(id="c1"))
    deleted = await service.Delete(pb.DeleteRequest(id="c1"))
    assert wait.exit_status == state.exit_status == deleted.exit_status == wire
    assert pub.last("/tasks/delete").exit_status == wire  # type: ignore[attr-defined]
    for m in (wait, state, deleted):
        m.SerializeToString()


async def test_exec_exit_status_and_absurd_exit_time(tmp_path: Path) -> None:
    import json

    service, pub, agent = await _running(tmp_path)
    await service.Exec(pb.ExecProcessRequest(id="c1", exec_id="e1", spec=any_pb2.Any(
        value=json.dumps({"args": ["true"]}).encode())))
    await service.Start(pb.StartRequest(id="c1", exec_id="e1"))
    before = time.time_ns()
    agent.exit("c1", "e1", -1, exited_at_ns=-(2**63))
    await asyncio.wait_for(service.Wait(pb.WaitRequest(id="c1", exec_id="e1")), 5)
    exit_ev = pub.last("/tasks/exit")
    assert exit_ev.exit_status == 0xFFFFFFFF  # type: ignore[attr-defined]
    # A guest clock in the year 1677 (or 2262) is replaced by the host's.
    assert exit_ev.exited_at.ToNanoseconds() >= before  # type: ignore[attr-defined]
    resp = await service.Delete(pb.DeleteRequest(id="c1", exec_id="e1"))
    assert resp.exit_status == 0xFFFFFFFF and resp.exited_at.ToNanoseconds() >= before
    await service.close()


def test_exit_code_mask() -> None:
    assert convert.exit_code(-1) == 0xFFFFFFFF
    assert convert.exit_code(128 + 9) == 137
    assert convert.exit_code(2**32 + 5) == 5


# -- 7. guest error text ----------------------------------------------------------------


def test_guest_text_escapes_controls_and_truncates() -> None:
    assert guest_text("plain text: ok") == "plain text: ok"
    forged = "boom\ntime=x level=error msg=\x1b[31mforged\u202e\x00"
    out = guest_text(forged)
    assert out.isprintable() and "\n" not in out and "\x1b" not in out
    assert "\\n" in out and "\\x1b" in out and "\\u202e" in out
    big = guest_text("x" * (1 << 20))
    assert len(big) < GUEST_TEXT_MAX + 40 and big.endswith(f"({1 << 20} chars)")
    worst = guest_text("\x1b" * (1 << 20))  # escaping must not lift the bound
    assert len(worst) < GUEST_TEXT_MAX + 40 and worst.isprintable()


class HostileAgent:
    """An agent whose every answer is an attack on the host's logs."""

    message = "\x1b[2J\nlevel=error msg=\"host compromised\"\n" + "A" * (1 << 20)

    async def Check(self, req: apb.CheckRequest) -> apb.HealthCheckResponse:
        raise errors.NotFound(self.message)

    async def Version(self, req: apb.CheckRequest) -> apb.VersionCheckResponse:
        return apb.VersionCheckResponse(agent_version="1.0\n\x1b[31mfake" + "v" * 5000)


async def _agent(tmp_path: Path, impl: object, service: str) -> tuple[AgentClient, Server]:
    server = Server()
    server.register_service(apb.DESCRIPTOR.services_by_name[service], impl)
    await server.serve_unix(tmp_path / "a.sock")
    return AgentClient(await Client.connect_unix(tmp_path / "a.sock")), server


async def test_agent_error_text_is_bounded_and_quoted(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A hostile agent does not flatten its status messages as pykata's server does:
    # the raw bytes reach the host, whose client must bound and quote them.
    monkeypatch.setattr(ttrpc_status, "one_line", lambda text, limit=0: text)
    agent, server = await _agent(tmp_path, HostileAgent(), "Health")
    try:
        with pytest.raises(errors.NotFound) as ei:  # the kind survives
            await agent.check()
        msg = str(ei.value)
        assert msg == ei.value.message == ei.value.args[0]
        assert len(msg) < GUEST_TEXT_MAX + 40
        assert msg.isprintable() and "\n" not in msg and "\x1b" not in msg
        assert msg.startswith("\\x1b[2J\\nlevel=error")
        version = await agent.version()
        assert version.isprintable() and len(version) < GUEST_TEXT_MAX + 40
    finally:
        await agent.close()
        await server.close()


def test_guest_strings_in_converted_replies_are_sanitized() -> None:
    from pykata.agent import convert

    procs = convert.processes(apb.ListProcessesResponse(processes=[
        apb.ProcessInfo(pid=1, exec_id="e\n1", command="sh\x1b]0;x\x07" + "y" * 9999)]))
    assert procs[0].exec_id == "e\\n1"
    assert procs[0].command.isprintable() and len(procs[0].command) < GUEST_TEXT_MAX + 40
    details = convert.guest_details(apb.GuestDetailsResponse(kernel_release="6.1\r\nX"))
    assert details.kernel_release == "6.1\\r\\nX"


# -- 5. the shim's log fifo never blocks the event loop ------------------------------------


def test_log_fifo_nobody_reads_does_not_block_logging(tmp_path: Path) -> None:
    """containerd stops reading the `log` fifo: logging calls still return at once
    (records beyond the queue are dropped and counted); once the fifo is read
    again the writer says how many were lost."""
    import logging
    import os

    from pykata.shim import main as shim_main

    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        pump = shim_main._setup_logging(False, "sb1", str(fifo))
        line = "x" * 1000
        worst = 0.0
        t0 = time.monotonic()
        for i in range(5000):  # ~5 MB: far more than a pipe (64 KiB) plus the queue holds
            t = time.monotonic()
            logging.getLogger("pykata.test").info("%d %s", i, line)
            worst = max(worst, time.monotonic() - t)
        assert time.monotonic() - t0 < 5 and worst < 0.5
        assert pump.handler.dropped > 0
        assert pump.queue.qsize() <= shim_main.LOG_QUEUE_MAX
        # The reader comes back: the writer drains, and reports the loss.
        got = b""
        deadline = time.monotonic() + 10
        while b"records dropped" not in got and time.monotonic() < deadline:
            try:
                got += os.read(rfd, 1 << 16)
            except BlockingIOError:
                time.sleep(0.01)
            got = got[-(1 << 20):]
        assert b"log records dropped (log fifo not read)" in got
        assert b"sandbox=sb1" in got
    finally:
        root.handlers[:], lvl = saved
        root.setLevel(lvl)
        if shim_main._pump is not None:
            shim_main._pump.stop(0.2)
            shim_main._pump = None
        os.close(rfd)  # the writer thread's next write fails, quietly


# -- 2. shim sockets: root only, never a path someone else prepared -----------------------


def test_socket_dir_and_socket_are_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    from pykata.shim.main import bind_private, private_dir

    old = os.umask(0)
    try:
        d = tmp_path / "a" / "s"
        private_dir(d)
        sock = bind_private(d / "x.sock")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        st = os.lstat(d / "x.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        sock.close()
    # A stale socket of ours is replaced.
    bind_private(d / "x.sock").close()


def test_socket_path_prepared_by_someone_else_is_refused(tmp_path: Path) -> None:
    import os
    import socket as so

    from pykata.shim.main import bind_private, private_dir

    d = tmp_path / "s"
    private_dir(d)
    (d / "file").write_text("")
    os.symlink("/etc/passwd", d / "link")
    for name in ("file", "link"):
        with pytest.raises(errors.FailedPrecondition, match="not a socket of ours"):
            bind_private(d / name)
    assert os.path.islink(d / "link") and (d / "file").exists()  # untouched
    theirs = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    theirs.bind(str(d / "theirs.sock"))
    os.chown(d / "theirs.sock", 65534, 65534)
    with pytest.raises(errors.FailedPrecondition, match="not a socket of ours"):
        bind_private(d / "theirs.sock")
    theirs.close()


def test_socket_dir_that_others_could_change_is_refused(tmp_path: Path) -> None:
    import os
    import stat

    from pykata.shim.main import private_dir

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(errors.FailedPrecondition, match="writable by other users"):
        private_dir(open_dir)
    private_dir(open_dir, tighten=True)  # ours: shim start takes the access away
    assert stat.S_IMODE(os.stat(open_dir).st_mode) == 0o700
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(errors.FailedPrecondition, match="owned by uid 65534"):
        private_dir(foreign, tighten=True)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "swapped")
    with pytest.raises(errors.FailedPrecondition, match="not a directory"):
        private_dir(tmp_path / "swapped")


# -- 3. `shim delete` trusts no id; 4. state keyed by containerd namespace ----------------


def _bundle(tmp_path: Path, sandbox_id: str) -> Path:
    import json

    b = tmp_path / "bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": sandbox_id}}))
    return b


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def mounts(self, *a: Any) -> list[str]:
        self.calls.append(("cleanup_container_mounts", a))
        return []

    async def cleanup(self, *a: Any, **kw: Any) -> bool:
        self.calls.append(("cleanup", a))
        return True


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    from pykata.runtime import cleanup as sandbox

    r = Recorder()
    monkeypatch.setattr(sandbox, "cleanup_container_mounts", r.mounts)
    monkeypatch.setattr(sandbox, "cleanup", r.cleanup)
    return r


@pytest.mark.parametrize("sandbox_id", ["../../..", "a/../../etc", "x\n", "-x",
                                        "s" * 129, "..", "\x1b[2J" * 1000])
def test_shim_delete_refuses_a_bad_sandbox_id_from_annotations(
        tmp_path: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str],
        sandbox_id: str) -> None:
    from pykata.shim.main import cmd_delete, parse_args

    args = parse_args(["-namespace", "k8s.io", "-id", "c1", "-bundle",
                       str(_bundle(tmp_path, sandbox_id)), "delete"])
    assert cmd_delete(args, config.Config()) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no DeleteResponse
    assert err.count("\n") == 1 and "invalid sandbox id" in err and len(err) < 200
    assert "\x1b" not in err
    assert recorder.calls == []  # nothing touched


@pytest.mark.parametrize("flags, kind", [(["-namespace", "../k8s.io", "-id", "c1"], "namespace"),
                                         (["-namespace", "k8s.io", "-id", "../c1"], "container"),
                                         (["-namespace", "k8s.io", "-id", "c1/x"], "container")])
def test_shim_delete_refuses_a_bad_namespace_or_container_id(
        tmp_path: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str],
        flags: list[str], kind: str) -> None:
    from pykata.shim.main import cmd_delete, parse_args

    args = parse_args([*flags, "-bundle", str(_bundle(tmp_path, "pod1")), "delete"])
    assert cmd_delete(args, config.Config()) == 1
    assert f"invalid {kind} id" in capsys.readouterr().err
    assert recorder.calls == []


def test_shim_delete_cleans_only_recorded_mounts_in_its_namespace(
        tmp_path: Path, recorder: Recorder, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    from pykata.shim.main import cmd_delete, parse_args

    cfg = config.Config()
    args = parse_args(["-namespace", "k8s.io", "-id", "c1", "-bundle",
                       str(_bundle(tmp_path, "pod1")), "delete"])
    assert cmd_delete(args, cfg) == 0
    assert recorder.calls == [("cleanup_container_mounts",
                               (cfg.runtime.state_dir, "pod1", "c1", "k8s.io"))]
    resp = pb.DeleteResponse.FromString(capsysbinary.readouterr().out)
    assert resp.exit_status == 137


def test_shim_delete_of_a_sandbox_cleans_it_in_its_namespace(
        tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from pykata.shim import main as shim_main

    monkeypatch.setattr(shim_main, "SOCKET_DIR", tmp_path / "s")
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "from-env")
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox"}}))
    cfg = config.Config()
    # No -namespace flag: the environment's namespace.
    args = shim_main.parse_args(["-id", "pod1", "-bundle", str(b), "delete"])
    assert shim_main.cmd_delete(args, cfg) == 0
    assert recorder.calls == [("cleanup", (cfg.runtime.state_dir, "pod1", "from-env"))]


async def test_sandbox_is_created_in_containerds_namespace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from pykata.testing import default_spec

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    async def create(sandbox_id: str, cfg: config.Config, **kw: Any) -> None:
        seen.update(kw, id=sandbox_id)
        raise Stop

    monkeypatch.setattr(svc.Sandbox, "create", create)
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(default_spec(["sh"])))
    service = svc.TaskService("pod1", "k8s.io", config.Config(),
                              FakePublisher(), asyncio.Event())
    with pytest.raises(Stop):
        await service.Create(pb.CreateTaskRequest(id="pod1", bundle=str(b)))
    assert seen["id"] == "pod1" and seen["namespace"] == "k8s.io"
