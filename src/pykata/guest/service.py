"""The agent's ttRPC services: pykata.agent.v1.AgentService and Health.

Every AgentService handler is thin: :func:`rpc` puts the request's container
id into the logging context, logs the call at debug level, and turns an
OSError that escapes into ``Internal`` with one line; the body calls the
sandbox, a container or a guest operation and builds the response. Errors are
:mod:`pykata.errors` kinds with one line; the ttRPC server maps them to
status codes. State lives in :class:`~pykata.guest.sandbox.Sandbox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pykata import __version__, errors, wire
from pykata.guest import cgroups, guestops, logs, policy, storage, sysutil
from pykata.guest import spec as specmod
from pykata.guest.container import Process
from pykata.guest.crun import Crun
from pykata.guest.debugconsole import DebugConsole
from pykata.guest.reaper import Reaper, RunResult
from pykata.guest.sandbox import Sandbox
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.descriptor import ServiceDescriptor

    from pykata.guest.network import Network

log = logging.getLogger(__name__)

AGENT_SERVICE: ServiceDescriptor = pb.DESCRIPTOR.pool.FindServiceByName(wire.AGENT_SERVICE)
HEALTH_SERVICE: ServiceDescriptor = pb.DESCRIPTOR.pool.FindServiceByName(wire.HEALTH_SERVICE)

DEFAULT_READ = 32 * 1024
MAX_READ = 1024 * 1024  # stays well below the ttRPC message limit
MAX_MODE = 0o177777  # st_mode: the file type and permission bits

# PrepareCheckpoint waits at most this long for the blocking calls it ended to
# return (each only has to see its cancellation).
QUIESCE_WAIT = 5.0

S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")


# Methods the agent policy decides elsewhere: CreateSandbox brings the policy,
# SetPolicy asks the policy in force to be replaced (Policy.replace), and
# CreateContainer is decided once the image digest is known (Sandbox.create_container).
POLICY_ELSEWHERE = frozenset({"CreateSandbox", "SetPolicy", "CreateContainer"})


def rpc(describe: Callable[[Any], str] | None = None
        ) -> Callable[[Callable[[S, Q], Awaitable[R]]], Callable[[S, Q], Awaitable[R]]]:
    """Decorate one RPC handler (named as its method): a request with a NUL in a
    string is refused, logging context, a debug record ``"<Method> <describe(req)>"``,
    the agent policy's decision (a refusal is PermissionDenied naming the rule),
    OSError -> Internal and RecursionError (JSON nested too deeply) ->
    InvalidArgument, with one line."""

    def decorate(handler: Callable[[S, Q], Awaitable[R]]) -> Callable[[S, Q], Awaitable[R]]:
        name = handler.__name__

        @functools.wraps(handler)
        async def wrapper(self: S, req: Q) -> R:
            if isinstance(req, Message) and (field := nul_field(req)):
                raise errors.InvalidArgument(f"{name}: {field} contains a NUL character")
            logs.container_id.set(getattr(req, "container_id", "") or "-")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s", f"{name} {describe(req)}" if describe else name)
            if name not in POLICY_ELSEWHERE and isinstance(self, AgentService):
                self.policy_check(name, req)
            try:
                return await handler(self, req)
            except OSError as exc:
                what = f" {exc.filename}" if exc.filename else ""
                raise errors.Internal(f"{name}:{what} {exc.strerror or exc}") from None
            except RecursionError:  # JSON (a spec, a process) nested thousands deep
                raise errors.InvalidArgument(f"{name}: the request is nested too deeply"
                                             ) from None

        wrapper.rpc = name  # type: ignore[attr-defined]
        return wrapper

    return decorate


def nul_field(msg: Message, prefix: str = "") -> str:
    """The first string field of ``msg`` (nested ones too) holding a NUL character,
    which no path, id or name in the guest can: "" if there is none."""
    for fd, value in msg.ListFields():
        name = prefix + fd.name
        if fd.type == FieldDescriptor.TYPE_STRING:
            if any("\0" in v for v in (value if fd.is_repeated else [value])):
                return name
        elif fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for i, sub in enumerate(value if fd.is_repeated else [value]):
                found = nul_field(sub, f"{name}[{i}]." if fd.is_repeated else f"{name}.")
                if found:
                    return found
    return ""


def _ids(req: Any) -> str:
    return f"{req.container_id} exec={req.exec_id}"


class HealthService:
    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def Version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(grpc_version="ttrpc", agent_version=__version__)


class AgentService:
    def __init__(self, settings: Settings, reaper: Reaper) -> None:
        self.settings = settings
        self.reaper = reaper
        self.sandbox = Sandbox(settings, Crun(reaper, settings))
        self.debug = DebugConsole(reaper)  # container_id "": the debug console
        self._network: Network | None = None
        # Checkpoint quiesce (PrepareCheckpoint .. FinishCheckpoint): blocking
        # calls are ended and refused with UNAVAILABLE wire.QUIESCED.
        self.quiesced = False
        self._quiesce = asyncio.Event()  # set: end the blocking calls now
        self._blocking: set[asyncio.Task[Any]] = set()

    # -- helpers --------------------------------------------------------------------------

    def policy_check(self, method: str, req: Any) -> None:
        """The agent policy's decision on one request: PermissionDenied (logged,
        the request quoted briefly) when refused."""
        infos = self.sandbox.container_infos()
        infos[""] = policy.ContainerInfo("", exec_ids=frozenset(self.debug.procs))
        try:
            self.sandbox.policy.check(method, req, infos)
        except errors.PermissionDenied as exc:
            log.warning("%s", exc)
            raise

    async def _blocking_call(self, coro: Awaitable[R]) -> R:
        """Run one blocking call (WaitProcess, Read*, GetOOMEvent) so that
        PrepareCheckpoint can end it: UNAVAILABLE with wire.QUIESCED, the call's
        effect not taken (what it waits for is still there for the next call)."""
        if self.quiesced:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise errors.Unavailable(wire.QUIESCED)
        task: asyncio.Task[R] = asyncio.ensure_future(coro)
        ending = asyncio.ensure_future(self._quiesce.wait())
        self._blocking.add(task)
        try:
            await asyncio.wait({task, ending}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled():  # it finished after all: its answer stands
                return task.result()
            raise errors.Unavailable(wire.QUIESCED)
        finally:
            ending.cancel()
            if not task.done():  # our own caller was cancelled (connection gone)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self._blocking.discard(task)

    def _require_init(self, what: str) -> None:
        if not self.settings.init_mode:
            raise errors.FailedPrecondition(
                f"not {what}: the agent is not the guest's init (development mode)")

    async def _run(self, argv: list[str]) -> RunResult:
        return await self.reaper.run(argv, timeout=30)

    def _process(self, container_id: str, exec_id: str) -> Process:
        """A container's process, or (container_id "") a debug console process."""
        if not container_id:
            return self.debug.process(exec_id)
        return self.sandbox.process(container_id, exec_id)

    def _net_reader(self) -> Network:
        """Reading the network is harmless anywhere."""
        if self._network is None:
            from pykata.guest.network import Network

            self._network = Network(self._run)
        return self._network

    def network(self) -> Network:
        """The network, to change it: only as PID 1 or with --manage-network."""
        if not self.settings.manage_network:
            raise errors.FailedPrecondition(
                "not changing the network: the agent is not the guest's init"
                " (start it with --manage-network)")
        return self._net_reader()

    async def shutdown(self) -> None:
        """Remove every container (the agent is stopping in development mode)."""
        await self.sandbox.shutdown()

    # -- sandbox --------------------------------------------------------------------------

    @rpc(lambda r: f"{r.sandbox_id} hostname={r.hostname} storages={len(r.storages)}")
    async def CreateSandbox(self, req: pb.CreateSandboxRequest) -> pb.Empty:
        if not self.sandbox.id:
            logs.set_sandbox(req.sandbox_id)
        await self.sandbox.create(req)
        self.debug.enabled = req.debug_console  # fixed for the sandbox's life
        return pb.Empty()

    @rpc()
    async def DestroySandbox(self, req: pb.DestroySandboxRequest) -> pb.Empty:
        await self.sandbox.destroy()
        return pb.Empty()

    # -- containers -----------------------------------------------------------------------

    @rpc(lambda r: f"{r.container_id} storages={len(r.storages)}")
    async def CreateContainer(self, req: pb.CreateContainerRequest) -> pb.Empty:
        try:
            await self.sandbox.create_container(req)
        except errors.PermissionDenied as exc:  # the policy (or an image signature)
            log.warning("%s", exc)
            raise
        return pb.Empty()

    @rpc(lambda r: r.container_id)
    async def StartContainer(self, req: pb.StartContainerRequest) -> pb.ProcessResponse:
        c = self.sandbox.container(req.container_id)
        async with c.lock:
            return pb.ProcessResponse(pid=await c.start())

    @rpc(lambda r: f"{r.container_id} timeout={r.timeout_seconds}s")
    async def RemoveContainer(self, req: pb.RemoveContainerRequest) -> pb.Empty:
        await self.sandbox.remove_container(self.sandbox.container(req.container_id),
                                            float(req.timeout_seconds or 10))
        return pb.Empty()

    # -- processes ------------------------------------------------------------------------

    @rpc(_ids)
    async def ExecProcess(self, req: pb.ExecProcessRequest) -> pb.ProcessResponse:
        if not req.exec_id:
            raise errors.InvalidArgument("exec id must not be empty")
        c = self.sandbox.container(req.container_id)
        proc = specmod.validate_process(
            specmod.load_json(req.process_json, "process"), "process")
        async with c.lock:
            p = await c.exec(req.exec_id, proc)
        return pb.ProcessResponse(pid=p.pid)

    @rpc(lambda r: f"{_ids(r)} signal={r.signal} all={r.all}")
    async def SignalProcess(self, req: pb.SignalProcessRequest) -> pb.Empty:
        if not 0 <= req.signal < signal.NSIG:
            raise errors.InvalidArgument(f"invalid signal {req.signal}")
        if not req.container_id:
            await self.debug.signal(req.exec_id, req.signal, req.all)
            return pb.Empty()
        c = self.sandbox.container(req.container_id)
        await c.signal(req.exec_id, req.signal, req.all)
        return pb.Empty()

    @rpc(_ids)
    async def WaitProcess(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        p = await self._blocking_call(self._process(req.container_id, req.exec_id).wait())
        return pb.WaitProcessResponse(status=p.status if p.status is not None else 255,
                                      exited_at_unix_nano=p.exited_at,
                                      oom_killed=p.oom_killed)

    # -- stdio ----------------------------------------------------------------------------

    @rpc(lambda r: f"{_ids(r)} len={len(r.data)}")
    async def WriteStdin(self, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        p = self._process(req.container_id, req.exec_id)
        if p.stdin is None:
            raise errors.FailedPrecondition(f"{p.name} has no stdin")
        return pb.WriteStreamResponse(len=await p.stdin.write(req.data))

    @rpc(_ids)
    async def CloseStdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        self._process(req.container_id, req.exec_id).close_stdin()
        return pb.Empty()

    @rpc(lambda r: f"{_ids(r)} len={r.len}")
    async def ReadStdout(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return pb.ReadStreamResponse(data=await self._blocking_call(self._read(req, False)))

    @rpc(lambda r: f"{_ids(r)} len={r.len}")
    async def ReadStderr(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return pb.ReadStreamResponse(data=await self._blocking_call(self._read(req, True)))

    async def _read(self, req: pb.ReadStreamRequest, stderr: bool) -> bytes:
        p = self._process(req.container_id, req.exec_id)
        stream = p.stderr if stderr else p.stdout
        if stream is None:
            return b""  # a terminal has no separate stderr
        return await stream.read(min(req.len or DEFAULT_READ, MAX_READ))

    @rpc(lambda r: f"{_ids(r)} {r.row}x{r.column}")
    async def TtyWinResize(self, req: pb.TtyWinResizeRequest) -> pb.Empty:
        if req.row > 0xFFFF or req.column > 0xFFFF:  # struct winsize: unsigned short
            raise errors.InvalidArgument(
                f"TtyWinResize: {req.row}x{req.column} is beyond 65535x65535")
        self._process(req.container_id, req.exec_id).resize(req.row, req.column)
        return pb.Empty()

    # -- container control ----------------------------------------------------------------

    @rpc(lambda r: r.container_id)
    async def StatsContainer(self, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        c = self.sandbox.container(req.container_id)
        return pb.StatsContainerResponse(cgroup_stats=cgroups.cgroup_stats(c.cgroup),
                                         network_stats=cgroups.network_stats())

    @rpc(lambda r: r.container_id)
    async def PauseContainer(self, req: pb.PauseContainerRequest) -> pb.Empty:
        c = self.sandbox.container(req.container_id)
        async with c.lock:
            await c.pause()
        return pb.Empty()

    @rpc(lambda r: r.container_id)
    async def ResumeContainer(self, req: pb.ResumeContainerRequest) -> pb.Empty:
        c = self.sandbox.container(req.container_id)
        async with c.lock:
            await c.resume()
        return pb.Empty()

    @rpc(lambda r: r.container_id)
    async def UpdateContainer(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        c = self.sandbox.container(req.container_id)
        resources: dict[str, Any] = specmod.load_json(req.resources_json, "resources")
        async with c.lock:
            await c.update(resources)
        return pb.Empty()

    @rpc(lambda r: r.container_id)
    async def ListProcesses(self, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        c = self.sandbox.container(req.container_id)
        return pb.ListProcessesResponse(processes=[
            pb.ProcessInfo(pid=pid, exec_id=exec_id, command=comm)
            for pid, exec_id, comm in c.pids()
        ])

    # -- guest ----------------------------------------------------------------------------

    @rpc(lambda r: f"nb_cpus={r.nb_cpus} cpu_only={r.cpu_only}")
    async def OnlineCPUMem(self, req: pb.OnlineCPUMemRequest) -> pb.OnlineCPUMemResponse:
        if self.settings.init_mode:
            cpus = guestops.online_cpu_mem(req.nb_cpus, req.cpu_only)
        else:
            cpus = guestops.online_cpus()
        return pb.OnlineCPUMemResponse(online_cpus=cpus, mem_total_bytes=cgroups.mem_total())

    @rpc()
    async def GetGuestDetails(self, req: pb.GetGuestDetailsRequest) -> pb.GuestDetailsResponse:
        return pb.GuestDetailsResponse(
            mem_block_size_bytes=guestops.mem_block_size(),
            agent_details=pb.AgentDetails(
                version=__version__, init_daemon=self.settings.init_mode,
                device_handlers=[], storage_handlers=list(storage.STORAGE_DRIVERS)),
            kernel_release=os.uname().release,
            kernel_version=guestops.kernel_version(),
            online_cpus=guestops.online_cpus(),
            mem_total_bytes=cgroups.mem_total(),
        )

    @rpc()
    async def GetMetrics(self, req: pb.GetMetricsRequest) -> pb.Metrics:
        return pb.Metrics(metrics=guestops.metrics(len(self.sandbox.containers)))

    @rpc()
    async def GetOOMEvent(self, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        return pb.OOMEvent(container_id=await self._blocking_call(self.sandbox.oom.next()))

    @rpc(lambda r: f"{r.sec}.{r.usec:06d}")
    async def SetGuestDateTime(self, req: pb.SetGuestDateTimeRequest) -> pb.Empty:
        self._require_init("setting the clock")
        try:
            sysutil.set_clock(req.sec * 1_000_000_000 + req.usec * 1000)
        except OSError as exc:
            raise errors.Internal(f"cannot set the clock: {exc.strerror}") from None
        return pb.Empty()

    @rpc(lambda r: f"len={len(r.data)}")
    async def ReseedRandomDev(self, req: pb.ReseedRandomDevRequest) -> pb.Empty:
        sysutil.add_entropy(req.data)
        return pb.Empty()

    # -- checkpoint (docs/checkpoint-design.md): the host quiesces the agent before
    # it saves the VM, so no call is in flight and nothing is half-sent.

    @rpc()
    async def PrepareCheckpoint(self, req: pb.Empty) -> pb.Empty:
        self.quiesced = True
        self._quiesce.set()
        pending = set(self._blocking)
        if pending:
            _, late = await asyncio.wait(pending, timeout=QUIESCE_WAIT)
            if late:
                raise errors.DeadlineExceeded(
                    f"PrepareCheckpoint: {len(late)} blocking calls did not end")
        log.info("quiesced for a checkpoint (%d blocking calls ended)", len(pending))
        return pb.Empty()

    @rpc(lambda r: f"time_ns={r.time_ns} seed={len(r.seed)} bytes")
    async def FinishCheckpoint(self, req: pb.FinishCheckpointRequest) -> pb.Empty:
        if req.time_ns > 0:
            if self.settings.init_mode:
                try:
                    sysutil.set_clock(req.time_ns)
                except OSError as exc:
                    raise errors.Internal(
                        f"cannot set the clock: {exc.strerror}") from None
            else:
                log.info("FinishCheckpoint: not setting the clock (not the guest's init)")
        if req.seed:
            sysutil.add_entropy(req.seed)
        self._quiesce.clear()
        self.quiesced = False
        log.info("running again after a checkpoint")
        return pb.Empty()

    @rpc(lambda r: f"{r.path} offset={r.offset} len={len(r.data)} size={r.file_size}")
    async def CopyFile(self, req: pb.CopyFileRequest) -> pb.Empty:
        for what, mode in (("file_mode", req.file_mode), ("dir_mode", req.dir_mode)):
            if mode > MAX_MODE:  # file type and permission bits, nothing more
                raise errors.InvalidArgument(f"CopyFile: {what} {mode:#o} is not a file mode")
        guestops.copy_file(req.path, req.data, req.offset, req.file_size, req.file_mode,
                           req.dir_mode, req.uid, req.gid)
        return pb.Empty()

    # -- network --------------------------------------------------------------------------

    @rpc(lambda r: f"{r.interface.device} mac={r.interface.hw_addr}")
    async def UpdateInterface(self, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        return await self.network().update_interface(req.interface)

    @rpc(lambda r: f"{len(r.routes)} routes")
    async def UpdateRoutes(self, req: pb.UpdateRoutesRequest) -> pb.Routes:
        return pb.Routes(routes=await self.network().update_routes(list(req.routes)))

    @rpc(lambda r: f"{len(r.neighbors)} neighbours")
    async def AddARPNeighbors(self, req: pb.AddARPNeighborsRequest) -> pb.Empty:
        self.network().add_arp_neighbors(list(req.neighbors))
        return pb.Empty()

    @rpc()
    async def ListInterfaces(self, req: pb.ListInterfacesRequest) -> pb.Interfaces:
        return pb.Interfaces(interfaces=await self._net_reader().list_interfaces())

    @rpc()
    async def ListRoutes(self, req: pb.ListRoutesRequest) -> pb.Routes:
        return pb.Routes(routes=await self._net_reader().list_routes())

    # -- observability: the agent's spans (guest/tracing.py), the debug console
    # (guest/debugconsole.py).

    @rpc()
    async def TakeSpans(self, req: pb.TakeSpansRequest) -> pb.TraceSpans:
        from pykata.guest import tracing

        return tracing.RECORDER.take()

    @rpc(_ids)
    async def DebugExec(self, req: pb.ExecProcessRequest) -> pb.ProcessResponse:
        if req.container_id:
            raise errors.InvalidArgument("DebugExec: container_id must be empty")
        self.debug.require()  # refused before the request is even parsed
        proc = specmod.load_json(req.process_json, "process")
        return pb.ProcessResponse(pid=self.debug.exec(req.exec_id, proc).pid)

    @rpc(lambda r: f"{len(r.policy)} bytes")
    async def SetPolicy(self, req: pb.SetPolicyRequest) -> pb.Empty:
        try:
            self.sandbox.policy = self.sandbox.policy.replace(req.policy)
        except errors.PermissionDenied as exc:
            log.warning("%s", exc)
            raise
        log.info("agent policy replaced: %d bytes", len(req.policy))
        return pb.Empty()
