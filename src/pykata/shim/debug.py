"""How `pykata exec` reaches the guest: the shim serves the debug console.

The agent channel belongs to the shim, so the shim relays. Beside a booted
sandbox it listens on ``debug.sock`` in the sandbox directory (root-only 0700;
the socket 0600) and serves a part of pykata.agent.v1.AgentService there:
DebugExec and the stdio, signal, resize and wait calls, for container_id ""
only (the debug console's processes, never a container's). Each call goes to
the agent as it is; the agent decides: it refuses unless the sandbox was
created with ``debug_console`` (``[agent] debug_console`` when the sandbox
started), so a socket reachable by root changes nothing by itself.

Debug processes started here and not waited for are killed when the sandbox
goes (the companion stops).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from pykata import errors
from pykata.agent.client import AgentClient
from pykata.protos import agent_pb2 as pb
from pykata.ttrpc import Server
from pykata.utils.unixsock import bind_private
from pykata.wire import AGENT_SERVICE

log = logging.getLogger("pykata.shim.debug")

SOCKET_NAME = "debug.sock"
MAX_STARTED = 64  # exec ids remembered for the kill at stop (oldest forgotten)

M = TypeVar("M", bound=Message)


def socket_path(sandbox_dir: Path) -> Path:
    return sandbox_dir / SOCKET_NAME


class DebugProxy:
    """The AgentService calls of the debug console, relayed to one sandbox's agent."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.started: dict[str, None] = {}  # exec ids started and not waited for

    def _agent(self) -> AgentClient:
        agent = self.sandbox.agent
        if not isinstance(agent, AgentClient):
            raise errors.Unimplemented("the debug console needs the agent's own connection")
        return agent

    async def _relay(self, method: str, req: Any, resp_type: type[M],
                     timeout: float | bool = True) -> M:
        if getattr(req, "container_id", ""):
            raise errors.InvalidArgument(
                f"{method}: the debug socket serves the debug console only (container_id"
                " must be empty)")
        return await self._agent()._call(method, req, resp_type, timeout=timeout)

    async def DebugExec(self, req: pb.ExecProcessRequest) -> pb.ProcessResponse:
        resp = await self._relay("DebugExec", req, pb.ProcessResponse)
        self.started[req.exec_id] = None
        while len(self.started) > MAX_STARTED:
            self.started.pop(next(iter(self.started)))
        log.info("debug console: process %s started in sandbox %s (guest pid %d)",
                 req.exec_id[:64], self.sandbox.id, resp.pid)
        return resp

    async def WaitProcess(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        resp = await self._relay("WaitProcess", req, pb.WaitProcessResponse, timeout=False)
        self.started.pop(req.exec_id, None)
        return resp

    async def ReadStdout(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._relay("ReadStdout", req, pb.ReadStreamResponse, timeout=False)

    async def ReadStderr(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return await self._relay("ReadStderr", req, pb.ReadStreamResponse, timeout=False)

    async def WriteStdin(self, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        return await self._relay("WriteStdin", req, pb.WriteStreamResponse, timeout=60.0)

    async def CloseStdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        return await self._relay("CloseStdin", req, pb.Empty)

    async def TtyWinResize(self, req: pb.TtyWinResizeRequest) -> pb.Empty:
        return await self._relay("TtyWinResize", req, pb.Empty)

    async def SignalProcess(self, req: pb.SignalProcessRequest) -> pb.Empty:
        return await self._relay("SignalProcess", req, pb.Empty)

    async def kill_started(self) -> None:
        """SIGKILL (with its session) what was started here and not waited for."""
        for exec_id in list(self.started):
            with contextlib.suppress(Exception):
                await self._relay("SignalProcess", pb.SignalProcessRequest(
                    exec_id=exec_id, signal=signal.SIGKILL, all=True), pb.Empty, timeout=5.0)
        self.started.clear()


def companions(sandbox_id: str) -> list[Any]:
    """Issue 18's companions of a sandbox: its guest log relay, its debug socket."""
    from pykata.shim.guestlog import GuestLogRelay

    return [GuestLogRelay(sandbox_id), DebugSocket()]


class DebugSocket:
    """The shim companion serving ``debug.sock`` for one sandbox."""

    name = "debug console socket"

    def __init__(self) -> None:
        self.path: Path | None = None
        self.server: Server | None = None
        self.proxy: DebugProxy | None = None

    async def start(self, sandbox: Any, spec: dict[str, Any]) -> None:
        path = socket_path(Path(sandbox.dir))
        sock = bind_private(path, 8, umask=False)  # the shim has threads; the dir is root's
        self.path = path
        self.proxy = DebugProxy(sandbox)
        server = Server(max_in_flight=32)
        server.register_service(
            pb.DESCRIPTOR.pool.FindServiceByName(AGENT_SERVICE), self.proxy)
        try:
            await server.serve_socket(sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self.server = server

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.kill_started()
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None
