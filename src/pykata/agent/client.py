"""Typed host-side client of the guest agent (pykata.agent.v1 over ttRPC)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from pykata import errors
from pykata.agent import convert
from pykata.agent.rpcstats import STATS
from pykata.protos import agent_pb2 as pb
from pykata.runtime.types import (
    ContainerStats,
    Device,
    ExitStatus,
    GuestDetails,
    GuestPull,
    ProcessInfo,
    Storage,
)
from pykata.ttrpc import Client
from pykata.wire import AGENT_SERVICE, HEALTH_SERVICE

M = TypeVar("M", bound=Message)

# Calls that go through while the client is quiesced for a checkpoint (every
# other call waits until finish_checkpoint): the quiesce itself and health.
QUIESCE_EXEMPT = frozenset({"PrepareCheckpoint", "FinishCheckpoint", "Check"})
QUIESCE_DRAIN = 10.0  # seconds prepare_checkpoint waits for the calls in flight
COPY_CHUNK = 256 << 10  # bytes of a file per CopyFile request


class AgentClient:
    """One connection to one agent. Long-polling calls (ReadStdout, WaitProcess,
    GetOOMEvent) run concurrently on it without blocking the others."""

    def __init__(self, conn: Client, default_timeout: float = 60.0) -> None:
        self.conn = conn
        self.default_timeout = default_timeout
        # Open unless quiesced for a checkpoint (prepare_checkpoint ..
        # finish_checkpoint): calls then wait here before they are sent.
        self._open = asyncio.Event()
        self._open.set()

    async def _call(self, method: str, req: Message, resp_type: type[M],
                    timeout: float | bool | None = True, service: str = AGENT_SERVICE) -> M:
        t: float | None
        if timeout is True:
            t = self.default_timeout
        elif timeout is False:
            t = None
        else:
            t = timeout
        # Calls with a deadline are timed (pykata_agent_rpc_duration_seconds); the
        # long polls without one (WaitProcess, ReadStdout, GetOOMEvent...) last as
        # long as what they wait for, which says nothing about the agent.
        # A cancelled call (its caller went) is not counted.
        if not self._open.is_set() and method not in QUIESCE_EXEMPT:
            await self._open.wait()
        started = time.monotonic()
        try:
            resp = await self.conn.call(service, method, req, resp_type, timeout=t)
        except errors.PykataError as exc:
            if t is not None:
                STATS.observe(method, time.monotonic() - started, failed=True)
            # The status message is the guest's text: bounded and quoted before it
            # goes anywhere (same class and code, so callers still match on kind).
            exc.message = convert.guest_text(exc.message)
            exc.args = (exc.message,)
            raise
        if t is not None:
            STATS.observe(method, time.monotonic() - started)
        return resp

    async def close(self) -> None:
        self._open.set()  # held calls go on, and fail on the closed connection
        await self.conn.close()

    # -- checkpoint (docs/checkpoint-design.md) --------------------------------------
    @property
    def in_flight(self) -> int:
        """Calls sent and not answered yet."""
        return len(self.conn._pending)

    @property
    def next_stream_id(self) -> int:
        return self.conn._next_id

    @next_stream_id.setter
    def next_stream_id(self, value: int) -> None:
        if value < 1 or value % 2 == 0:
            raise errors.InvalidArgument(f"a ttRPC client stream id is odd, not {value}")
        self.conn._next_id = value

    async def prepare_checkpoint(self, drain: float = QUIESCE_DRAIN) -> None:
        """Quiesce for a checkpoint: hold every new call, have the agent end its
        blocking calls (they answer wire.QUIESCED), and return once no call is in
        flight, so nothing is half-sent when the VM stops. DeadlineExceeded if a
        call is still out after ``drain`` seconds (the gate stays closed: call
        finish_checkpoint to undo)."""
        self._open.clear()
        await self._call("PrepareCheckpoint", pb.Empty(), pb.Empty)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while self.in_flight:
            if loop.time() >= deadline:
                raise errors.DeadlineExceeded(
                    f"checkpoint: {self.in_flight} agent calls still in flight after"
                    f" {drain:g}s")
            await asyncio.sleep(0.01)

    async def finish_checkpoint(self, time_ns: int = 0, seed: bytes = b"") -> None:
        """The VM runs again (resumed, or restored): set the guest clock to
        ``time_ns`` (0: leave it), add ``seed`` to its entropy, serve blocking
        calls again; held calls go out."""
        try:
            await self._call("FinishCheckpoint", pb.FinishCheckpointRequest(
                time_ns=time_ns, seed=seed), pb.Empty)
        finally:
            self._open.set()

    # -- health ----------------------------------------------------------------------
    async def check(self, timeout: float = 5.0) -> bool:
        resp = await self._call("Check", pb.CheckRequest(), pb.HealthCheckResponse,
                                timeout=timeout, service=HEALTH_SERVICE)
        return resp.status == pb.HealthCheckResponse.SERVING

    async def version(self) -> str:
        resp = await self._call("Version", pb.CheckRequest(), pb.VersionCheckResponse,
                                service=HEALTH_SERVICE)
        return convert.guest_text(resp.agent_version)

    # -- sandbox ---------------------------------------------------------------------
    async def create_sandbox(self, sandbox_id: str, hostname: str, storages: Sequence[Storage],
                             dns: Sequence[str] = (), hosts: str = "", sandbox_pidns: bool = False,
                             kernel_modules: Sequence[str] = (), random_seed: bytes = b"",
                             debug_console: bool = False, policy: bytes = b"",
                             image_policy: bytes = b"") -> None:
        req = pb.CreateSandboxRequest(
            debug_console=debug_console, policy=policy, image_policy=image_policy,
            sandbox_id=sandbox_id, hostname=hostname, dns=list(dns), hosts=hosts,
            storages=convert.storages_to_pb(storages), sandbox_pidns=sandbox_pidns,
            host_time_unix_nano=time.time_ns(), random_seed=random_seed,
            kernel_modules=[pb.KernelModule(name=m) for m in kernel_modules],
        )
        await self._call("CreateSandbox", req, pb.Empty)

    async def set_policy(self, policy: bytes) -> None:
        """Replace the agent policy (PermissionDenied unless the one in force allows it)."""
        await self._call("SetPolicy", pb.SetPolicyRequest(policy=policy), pb.Empty)

    async def destroy_sandbox(self, timeout: float = 10.0) -> None:
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), pb.Empty, timeout=timeout)

    async def guest_details(self) -> GuestDetails:
        resp = await self._call("GetGuestDetails", pb.GetGuestDetailsRequest(),
                                pb.GuestDetailsResponse)
        return convert.guest_details(resp)

    async def online_cpu_mem(self, nb_cpus: int = 0, cpu_only: bool = False) -> tuple[int, int]:
        resp = await self._call("OnlineCPUMem", pb.OnlineCPUMemRequest(
            wait=True, nb_cpus=nb_cpus, cpu_only=cpu_only), pb.OnlineCPUMemResponse)
        return resp.online_cpus, resp.mem_total_bytes

    async def metrics(self) -> str:
        return (await self._call("GetMetrics", pb.GetMetricsRequest(), pb.Metrics)).metrics

    async def oom_event(self) -> str:
        """Blocks until a container is OOM-killed; its id."""
        resp = await self._call("GetOOMEvent", pb.GetOOMEventRequest(), pb.OOMEvent,
                                timeout=False)
        return convert.guest_text(resp.container_id)

    # -- containers ------------------------------------------------------------------
    async def create_container(self, container_id: str, spec: dict[str, Any],
                               storages: Sequence[Storage] = (), sandbox_pidns: bool = False,
                               timeout: float | None = None,
                               devices: Sequence[Device] = (),
                               guest_pull: GuestPull | None = None) -> None:
        req = pb.CreateContainerRequest(
            container_id=container_id, oci_spec_json=json.dumps(spec).encode(),
            storages=convert.storages_to_pb(storages), sandbox_pidns=sandbox_pidns,
            devices=convert.devices_to_pb(devices),
        )
        if guest_pull is not None:
            req.guest_pull.CopyFrom(pb.GuestPull(
                image=guest_pull.image, username=guest_pull.username,
                password=guest_pull.password, auth=guest_pull.auth,
                identity_token=guest_pull.identity_token,
                registry_token=guest_pull.registry_token,
                plain_http_registries=list(guest_pull.plain_http_registries),
                storage_bytes=guest_pull.storage_bytes))
        await self._call("CreateContainer", req, pb.Empty, timeout=timeout or True)

    async def copy_file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0,
                        gid: int = 0, dir_mode: int = 0o755) -> None:
        """Write ``data`` as the guest file ``path`` (CopyFile, in chunks of
        COPY_CHUNK; the agent moves it into place with the last one)."""
        offset = 0
        while True:
            part = data[offset:offset + COPY_CHUNK]
            await self._call("CopyFile", pb.CopyFileRequest(
                path=path, file_size=len(data), file_mode=mode, dir_mode=dir_mode, uid=uid,
                gid=gid, offset=offset, data=part), pb.Empty)
            offset += len(part)
            if offset >= len(data):
                return

    async def start_container(self, container_id: str) -> int:
        resp = await self._call("StartContainer", pb.StartContainerRequest(
            container_id=container_id), pb.ProcessResponse)
        return resp.pid

    async def remove_container(self, container_id: str, timeout_s: int = 10) -> None:
        await self._call("RemoveContainer", pb.RemoveContainerRequest(
            container_id=container_id, timeout_seconds=timeout_s), pb.Empty,
            timeout=timeout_s + 5.0)

    async def exec_process(self, container_id: str, exec_id: str,
                           process: dict[str, Any]) -> int:
        resp = await self._call("ExecProcess", pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id,
            process_json=json.dumps(process).encode()), pb.ProcessResponse)
        return resp.pid

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all_processes: bool = False) -> None:
        await self._call("SignalProcess", pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes),
            pb.Empty)

    async def wait_process(self, container_id: str, exec_id: str = "") -> ExitStatus:
        resp = await self._call("WaitProcess", pb.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id), pb.WaitProcessResponse, timeout=False)
        return convert.exit_status(resp)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        resp = await self._call("WriteStdin", pb.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data), pb.WriteStreamResponse,
            timeout=False)
        return resp.len

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._call("CloseStdin", pb.CloseStdinRequest(
            container_id=container_id, exec_id=exec_id), pb.Empty)

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        """Up to ``size`` bytes as soon as there are any; b"" at end of stream."""
        resp = await self._call("ReadStdout", pb.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, len=size), pb.ReadStreamResponse,
            timeout=False)
        return resp.data

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        resp = await self._call("ReadStderr", pb.ReadStreamRequest(
            container_id=container_id, exec_id=exec_id, len=size), pb.ReadStreamResponse,
            timeout=False)
        return resp.data

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call("TtyWinResize", pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=cols), pb.Empty)

    async def stats(self, container_id: str) -> ContainerStats:
        resp = await self._call("StatsContainer", pb.StatsContainerRequest(
            container_id=container_id), pb.StatsContainerResponse)
        return convert.stats(resp)

    async def pause(self, container_id: str) -> None:
        await self._call("PauseContainer", pb.PauseContainerRequest(
            container_id=container_id), pb.Empty)

    async def resume(self, container_id: str) -> None:
        await self._call("ResumeContainer", pb.ResumeContainerRequest(
            container_id=container_id), pb.Empty)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        await self._call("UpdateContainer", pb.UpdateContainerRequest(
            container_id=container_id, resources_json=json.dumps(resources).encode()), pb.Empty)

    async def update_interface(self, name: str, mac: str, mtu: int,
                               addresses: Sequence[tuple[int, str, int]]) -> None:
        """Configure the guest NIC with MAC ``mac``: name, MTU, addresses, up."""
        iface = pb.Interface(device=name, name=name, hw_addr=mac, mtu=mtu, ip_addresses=[
            pb.IPAddress(family=fam, address=addr, mask=str(prefix))
            for fam, addr, prefix in addresses])
        await self._call("UpdateInterface", pb.UpdateInterfaceRequest(interface=iface),
                         pb.Interface)

    async def update_routes(self, routes: Sequence[tuple[str, str, str, int]]) -> None:
        """Routes as (destination or "" for default, gateway, device, family)."""
        req = pb.UpdateRoutesRequest(routes=[
            pb.Route(dest=d, gateway=g, device=dev, family=fam) for d, g, dev, fam in routes])
        await self._call("UpdateRoutes", req, pb.Routes)

    async def list_processes(self, container_id: str) -> list[ProcessInfo]:
        resp = await self._call("ListProcesses", pb.ListProcessesRequest(
            container_id=container_id), pb.ListProcessesResponse)
        return convert.processes(resp)
