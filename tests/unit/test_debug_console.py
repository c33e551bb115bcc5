"""The debug console (issue 18): the agent's DebugExec and its container_id ""
processes (pipes and a pty), refused unless the sandbox was created with
debug_console; the shim's relay refuses container ids; `pykata exec`/`logs`
argument errors. The agent runs here in development mode, its processes on
this host."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pykata import errors
from pykata.cli import admin
from pykata.guest import service
from pykata.guest.reaper import Reaper
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb
from pykata.shim.debug import DebugProxy


async def make(tmp_path: Path, debug_console: bool) -> service.AgentService:
    reaper = Reaper()
    reaper.install()
    svc = service.AgentService(Settings(state_dir=tmp_path), reaper)
    await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb",
                                                    debug_console=debug_console))
    return svc


@pytest_asyncio.fixture
async def agent(tmp_path: Path) -> AsyncIterator[service.AgentService]:
    svc = await make(tmp_path, True)
    try:
        yield svc
    finally:
        await svc.debug.kill_all()
        svc.reaper.uninstall()


def exec_req(exec_id: str, args: list[str], terminal: bool = False, **extra: Any
             ) -> pb.ExecProcessRequest:
    proc = {"args": args, "terminal": terminal, **extra}
    return pb.ExecProcessRequest(exec_id=exec_id, process_json=json.dumps(proc).encode())


async def read_all(svc: service.AgentService, exec_id: str, stderr: bool = False) -> bytes:
    out = b""
    for _ in range(1000):
        req = pb.ReadStreamRequest(exec_id=exec_id, len=4096)
        resp = await (svc.ReadStderr(req) if stderr else svc.ReadStdout(req))
        if not resp.data:
            return out
        out += resp.data
    raise AssertionError("output never ended")


async def test_refused_unless_the_sandbox_allows_it(tmp_path: Path) -> None:
    svc = await make(tmp_path, False)
    try:
        with pytest.raises(errors.FailedPrecondition, match=r"\[agent\] debug_console"):
            await svc.DebugExec(exec_req("d1", ["/bin/sh", "-c", "true"]))
        for call in (svc.ReadStdout(pb.ReadStreamRequest(exec_id="d1")),
                     svc.WaitProcess(pb.WaitProcessRequest(exec_id="d1")),
                     svc.SignalProcess(pb.SignalProcessRequest(exec_id="d1", signal=9))):
            with pytest.raises(errors.FailedPrecondition, match="debug_console"):
                await call
        assert not svc.debug.procs
    finally:
        svc.reaper.uninstall()


async def test_pipes_output_and_exit_code(agent: service.AgentService) -> None:
    resp = await agent.DebugExec(exec_req("d1", ["sh", "-c", "echo hi; echo err >&2; exit 3"]))
    assert resp.pid > 0
    out, err = await asyncio.gather(read_all(agent, "d1"), read_all(agent, "d1", stderr=True))
    status = await agent.WaitProcess(pb.WaitProcessRequest(exec_id="d1"))
    assert (out, err, status.status) == (b"hi\n", b"err\n", 3)


async def test_stdin_reaches_it(agent: service.AgentService) -> None:
    await agent.DebugExec(exec_req("d2", ["/bin/cat"]))
    await agent.WriteStdin(pb.WriteStreamRequest(exec_id="d2", data=b"abc\n"))
    await agent.CloseStdin(pb.CloseStdinRequest(exec_id="d2"))
    assert await read_all(agent, "d2") == b"abc\n"
    assert (await agent.WaitProcess(pb.WaitProcessRequest(exec_id="d2"))).status == 0


async def test_pty_is_its_terminal_and_follows_resize(agent: service.AgentService) -> None:
    await agent.DebugExec(exec_req("t1", ["/bin/sh"], terminal=True,
                                   consoleSize={"height": 30, "width": 90}))
    await agent.TtyWinResize(pb.TtyWinResizeRequest(exec_id="t1", row=41, column=123))
    await agent.WriteStdin(pb.WriteStreamRequest(
        exec_id="t1", data=b"stty size; tty; test -t 0 && echo TTY-OK; exit 7\n"))
    out = await read_all(agent, "t1")
    status = await agent.WaitProcess(pb.WaitProcessRequest(exec_id="t1"))
    assert status.status == 7
    assert b"41 123" in out and b"TTY-OK" in out and b"/dev/pts/" in out


async def test_signal_and_bad_requests(agent: service.AgentService) -> None:
    await agent.DebugExec(exec_req("s1", ["sleep", "60"]))
    with pytest.raises(errors.AlreadyExists):
        await agent.DebugExec(exec_req("s1", ["true"]))
    await agent.SignalProcess(pb.SignalProcessRequest(exec_id="s1", signal=15))
    assert (await agent.WaitProcess(pb.WaitProcessRequest(exec_id="s1"))).status == 128 + 15
    with pytest.raises(errors.NotFound):
        await agent.WaitProcess(pb.WaitProcessRequest(exec_id="nope"))
    with pytest.raises(errors.InvalidArgument):
        await agent.DebugExec(exec_req("s2", []))
    with pytest.raises(errors.InvalidArgument):
        await agent.DebugExec(exec_req("s3", ["no-such-command-here"]))
    bad = exec_req("s4", ["true"])
    bad.container_id = "c1"
    with pytest.raises(errors.InvalidArgument, match="container_id"):
        await agent.DebugExec(bad)


async def test_finished_processes_make_room(agent: service.AgentService) -> None:
    from pykata.guest import debugconsole

    for i in range(debugconsole.MAX_PROCESSES + 3):
        await agent.DebugExec(exec_req(f"r{i}", ["true"]))
        await agent.WaitProcess(pb.WaitProcessRequest(exec_id=f"r{i}"))
    assert len(agent.debug.procs) <= debugconsole.MAX_PROCESSES


async def test_shim_relay_serves_the_debug_console_only() -> None:
    class Sb:
        id = "sb"
        agent = object()

    proxy = DebugProxy(Sb())
    with pytest.raises(errors.InvalidArgument, match="debug console only"):
        await proxy.ReadStdout(pb.ReadStreamRequest(container_id="c1", exec_id="x"))
    with pytest.raises(errors.Unimplemented):  # not an agent connection
        await proxy.ReadStdout(pb.ReadStreamRequest(exec_id="x"))


# -- the CLI -----------------------------------------------------------------------------

def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "configuration.toml"
    cfg.write_text(f'[runtime]\nstate_dir = "{tmp_path / "state"}"\n')
    return cfg


@pytest.mark.parametrize("argv, message", [
    (["logs", "no-such-sandbox"], "no sandbox no-such-sandbox"),
    (["exec", "no-such-sandbox", "true"], "no sandbox no-such-sandbox"),
    (["logs", ".."], "invalid sandbox id"),
    (["logs", "../etc"], "invalid namespace id"),
    (["exec", "bad/ns/../x"], "invalid"),
    (["logs", "--tail", "-1", "sb"], "--tail must be 0 or more"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], message: str) -> None:
    cfg = write_config(tmp_path)
    assert admin.main(["--config", str(cfg), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_exec_refuses_a_symlinked_sandbox_and_tty_flags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    ns = tmp_path / "state" / "sbs" / "default"
    ns.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", ns / "sb")
    assert admin.main(["--config", str(cfg), "logs", "sb"]) == 1
    assert "not a sandbox directory" in capsys.readouterr().err
    (ns / "sb").unlink()
    (ns / "sb").mkdir(mode=0o700)
    assert admin.main(["--config", str(cfg), "exec", "-t", "-T", "sb"]) == 1
    assert "exclude each other" in capsys.readouterr().err
    assert admin.main(["--config", str(cfg), "exec", "-T", "sb", "true"]) == 1
    assert "has no debug socket" in capsys.readouterr().err
    import socket

    with socket.socket(socket.AF_UNIX) as stale:  # a shim killed: nobody listens
        stale.bind(str(ns / "sb" / "debug.sock"))
    assert admin.main(["--config", str(cfg), "exec", "-T", "sb", "true"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the shim of sandbox sb" in err and err.count("\n") == 1, err


def test_cli_logs_prints_both_files_in_order_and_sanitised(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    d = tmp_path / "state" / "sbs" / "default" / "sb"
    d.mkdir(parents=True, mode=0o700)
    (d / "console.log.1").write_bytes(b"one\ntwo\n")
    (d / "console.log").write_bytes(b"three \x1b[31mred\r\nfour")
    assert admin.main(["--config", str(cfg), "logs", "sb"]) == 0
    assert capsys.readouterr().out == "one\ntwo\nthree \\x1b[31mred\nfour\n"
    assert admin.main(["--config", str(cfg), "logs", "--tail", "2", "default/sb"]) == 0
    assert capsys.readouterr().out == "three \\x1b[31mred\nfour\n"


def test_cli_logs_follow_prints_new_lines_until_the_sandbox_goes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    import threading
    import time

    cfg = write_config(tmp_path)
    d = tmp_path / "state" / "sbs" / "default" / "sb"
    d.mkdir(parents=True, mode=0o700)
    (d / "console.log").write_bytes(b"before\n")
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(
        admin.main(["--config", str(cfg), "logs", "--follow", "sb"])))
    t.start()
    with (d / "console.log").open("ab") as w:
        w.write(b"after\n")
    for _ in range(200):  # until the follower has printed it (bounded)
        if "after" in capsys.readouterr().out:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the new line was not printed")
    shutil.rmtree(d)
    t.join(30)
    assert result == [0]


async def test_cli_through_the_shim_socket_to_an_agent(
        tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    """`pykata exec` -> debug.sock (the shim's DebugSocket) -> AgentClient ->
    the agent's ttRPC server (development mode, debug_console on): the exit code
    and output come back; the socket is 0600 and goes at stop."""
    import stat

    from pykata.agent.client import AgentClient
    from pykata.shim.debug import DebugSocket
    from pykata.ttrpc import Client, Server

    svc = await make(tmp_path, True)
    agent_server = Server()
    agent_server.register_service(service.AGENT_SERVICE, svc)
    agent_sock = tmp_path / "agent.sock"
    await agent_server.serve_unix(agent_sock)
    agent = AgentClient(await Client.connect_unix(agent_sock))

    class Sb:
        id = "sb"
        dir = tmp_path / ("d" * 100)  # beyond a sockaddr_un's 107 bytes with the name

    Sb.dir.mkdir(mode=0o700)
    sb = Sb()
    sb.agent = agent  # type: ignore[attr-defined]
    companion = DebugSocket()
    await companion.start(sb, {})
    try:
        st = os.lstat(Sb.dir / "debug.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        code = await admin._debug_exec(Sb.dir, ["sh", "-c", "echo hi; echo err >&2; exit 3"],
                                       terminal=False)
        assert code == 3
        out = capfdbinary.readouterr()
        assert out.out == b"hi\n" and out.err == b"err\n"
        # A process started through the socket and left running is killed when
        # the sandbox goes (the companion stops).
        assert companion.proxy is not None
        await companion.proxy.DebugExec(exec_req("left", ["sleep", "600"]))
        await companion.stop()
        left = await asyncio.wait_for(svc.debug.procs["left"].wait(), 30)
        assert left.status == 128 + 9
        assert not (Sb.dir / "debug.sock").exists()
    finally:
        await companion.stop()
        await agent.close()
        await agent_server.close()
        await svc.debug.kill_all()
        svc.reaper.uninstall()
