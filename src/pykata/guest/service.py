"""The agent's ttRPC services: pykata.agent.v1.AgentService and Health.

Each RPC handler is thin: it puts the container id into the logging context,
logs the call at debug level and calls ``_do_<method>``. Errors are
:mod:`pykata.errors` kinds with one line; the ttRPC server maps them to
status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pykata import __version__, errors
from pykata.guest import cgroups, logs
from pykata.guest import spec as specmod
from pykata.guest.container import Container, Crun, Process, Settings
from pykata.guest.reaper import Reaper, RunResult
from pykata.guest.storage import Disks
from pykata.protos import agent_pb2 as pb

if TYPE_CHECKING:
    from pykata.guest.network import Network

log = logging.getLogger(__name__)

AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["Health"]

DEFAULT_READ = 32 * 1024
MAX_READ = 1024 * 1024  # stays well below the ttRPC message limit


class OomWatcher:
    """Turns increases of a container's ``memory.events`` oom_kill into events.

    Exits of a container's init report at once; other kills are found by
    polling while someone waits in GetOOMEvent. Events wait in a queue until
    asked for.
    """

    POLL_SECONDS = 1.0

    def __init__(self, containers: dict[str, Container]) -> None:
        self._containers = containers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._waiters = 0

    def check(self, c: Container) -> None:
        count = cgroups.oom_kill_count(c.cgroup)
        if count > c.oom_seen:
            c.oom_seen = count
            log.info("container %s: OOM kill (count %d)", c.id, count)
            self._queue.put_nowait(c.id)

    async def next(self) -> str:
        self._waiters += 1
        try:
            while True:
                try:
                    return self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
                for c in list(self._containers.values()):
                    self.check(c)
                try:
                    async with asyncio.timeout(self.POLL_SECONDS):
                        return await self._queue.get()
                except TimeoutError:
                    continue
        finally:
            self._waiters -= 1


class HealthService:
    async def Check(self, req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def Version(self, req: pb.CheckRequest) -> pb.VersionCheckResponse:
        return pb.VersionCheckResponse(grpc_version="ttrpc", agent_version=__version__)


def _ctx(container_id: str = "") -> None:
    logs.container_id.set(container_id or "-")


class AgentService:
    def __init__(self, settings: Settings, reaper: Reaper) -> None:
        self.settings = settings
        self.reaper = reaper
        self.crun = Crun(reaper, settings)
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self.sandbox_id = ""
        self.sandbox_pidns = False
        self.pidns_owner: Container | None = None
        self.storages: list[str] = []  # guest mount points the sandbox owns
        self.pod_storages: set[str] = set()  # pod-scoped storages made so far
        self.disks = Disks()
        self.oom = OomWatcher(self.containers)
        self._network: Network | None = None
        self.manage_network = settings.init_mode

    # -- helpers ------------------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise errors.NotFound(f"container {container_id} not found") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.container(container_id).process(exec_id)

    def _require_init(self, what: str) -> None:
        if not self.settings.init_mode:
            raise errors.FailedPrecondition(
                f"not {what}: the agent is not the guest's init (development mode)")

    async def _run(self, argv: list[str]) -> RunResult:
        return await self.reaper.run(argv, timeout=30)

    def network(self) -> Network:
        if not self.manage_network:
            raise errors.FailedPrecondition(
                "not changing the network: the agent is not the guest's init"
                " (start it with --manage-network)")
        if self._network is None:
            from pykata.guest.network import Network

            self._network = Network(self._run)
        return self._network

    def _on_exit(self, c: Container) -> None:
        """A container's init exited: report an OOM kill before its cgroup goes."""
        self.oom.check(c)

    # -- sandbox ------------------------------------------------------------------------

    async def CreateSandbox(self, req: pb.CreateSandboxRequest) -> pb.Empty:
        logs.set_sandbox(req.sandbox_id)
        _ctx()
        log.debug("CreateSandbox %s hostname=%s storages=%d", req.sandbox_id, req.hostname,
                  len(req.storages))
        await self._do_create_sandbox(req)
        return pb.Empty()

    async def _do_create_sandbox(self, req: pb.CreateSandboxRequest) -> None:
        from pykata.guest import guestops, sysutil

        if self.sandbox_id:
            raise errors.AlreadyExists(f"sandbox {self.sandbox_id} is already created")
        init = self.settings.init_mode
        if init:
            if req.host_time_unix_nano:
                try:
                    sysutil.set_clock(req.host_time_unix_nano)
                except OSError as exc:
                    log.warning("cannot set the clock: %s", exc)
            if req.hostname:
                sysutil.set_hostname(req.hostname)
            guestops.write_etc(req.dns, req.hosts)
            for mod in req.kernel_modules:
                try:
                    sysutil.load_module_by_name(mod.name, mod.parameters)
                except OSError as exc:
                    raise errors.InvalidArgument(f"cannot load kernel module {mod.name}: "
                                                 f"{exc.strerror or exc}") from None
        else:
            log.info("development mode: hostname, clock, /etc and modules left alone")
        if req.random_seed:
            sysutil.add_entropy(req.random_seed)
        mounted: list[str] = []
        try:
            for st in req.storages:
                if guestops.mount_storage(st.driver, st.source, st.mount_point, st.fstype,
                                          list(st.options)):
                    mounted.append(st.mount_point)
        except BaseException:
            for mp in reversed(mounted):
                with contextlib.suppress(errors.PykataError):
                    guestops.unmount(mp)
            raise
        self.storages = mounted
        self.sandbox_pidns = req.sandbox_pidns
        self.sandbox_id = req.sandbox_id or "sandbox"
        log.info("sandbox %s created", self.sandbox_id)

    async def DestroySandbox(self, req: pb.DestroySandboxRequest) -> pb.Empty:
        _ctx()
        log.debug("DestroySandbox")
        await self._do_destroy_sandbox()
        return pb.Empty()

    async def _do_destroy_sandbox(self) -> None:
        from pykata.guest import guestops

        failures: list[str] = []
        results = await asyncio.gather(
            *(self._remove(c, 10.0) for c in list(self.containers.values())),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failures.append(str(r))
        for mp in reversed(self.storages):
            try:
                guestops.unmount(mp)
            except errors.PykataError as exc:
                failures.append(str(exc))
        self.storages = []
        self.pod_storages.clear()
        if self.settings.init_mode:
            os.sync()
        log.info("sandbox %s destroyed", self.sandbox_id)
        self.sandbox_id = ""
        self.pidns_owner = None
        logs.set_sandbox("")
        if failures:
            raise errors.Internal(f"destroy sandbox: {failures[0]}"
                                  + (f" (and {len(failures) - 1} more)" if len(failures) > 1
                                     else ""))

    # -- containers ---------------------------------------------------------------------

    async def CreateContainer(self, req: pb.CreateContainerRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("CreateContainer %s storages=%d", req.container_id, len(req.storages))
        await self._do_create_container(req)
        return pb.Empty()

    def _sandbox_namespaces(self) -> dict[str, str]:
        """The pod sandbox container's IPC and UTS namespaces (the pod's), if it runs."""
        owner = self.pidns_owner
        if owner is None or owner.init.exited or owner.init.pid <= 0:
            return {}
        return {kind: f"/proc/{owner.init.pid}/ns/{kind}" for kind in ("ipc", "uts")}

    def _pidns_path(self, wanted: bool) -> str | None:
        if not (wanted or self.sandbox_pidns):
            return None
        owner = self.pidns_owner
        if owner is None:
            return None
        if owner.init.exited or owner.init.pid <= 0:
            raise errors.FailedPrecondition(
                f"sandbox pid namespace is gone: container {owner.id} has stopped")
        return f"/proc/{owner.init.pid}/ns/pid"

    async def _do_create_container(self, req: pb.CreateContainerRequest) -> None:
        cid = specmod.check_id("container", req.container_id)
        if cid in self.containers or cid in self._creating:
            raise errors.AlreadyExists(f"container {cid} already exists")
        oci = specmod.load_json(req.oci_spec_json, "OCI spec")
        specmod.validate(oci)
        self._creating.add(cid)
        mounted: list[str] = []
        disks: list[str] = []
        try:
            await self._container_storages(cid, oci, req, mounted, disks)
            rootfs = oci["root"]["path"]
            if not os.path.isdir(rootfs):
                raise errors.InvalidArgument(
                    f"container root filesystem {rootfs} does not exist in the guest")
            pidns = self._pidns_path(req.sandbox_pidns)
            guest = specmod.guest_spec(oci, cid, self.settings.cgroup_parent, pidns,
                                       self._sandbox_namespaces())
            if os.getpid() == 1:  # the VM's network namespace is the pod's
                for key, value in specmod.network_sysctls(oci).items():
                    try:
                        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                            f.write(value)
                    except OSError as exc:
                        raise errors.InvalidArgument(
                            f"cannot set sysctl {key}={value}: {exc.strerror}") from exc
            c = Container(cid, guest, self.settings, self.crun, on_exit=self._on_exit)
            c.storages = mounted
            c.disks = disks
            await c.create(guest)
        except BaseException:
            await self._release_storages(cid, mounted, disks)
            raise
        finally:
            self._creating.discard(cid)
        self.containers[cid] = c
        if (req.sandbox_pidns or self.sandbox_pidns) and self.pidns_owner is None:
            self.pidns_owner = c

    async def _container_storages(self, cid: str, oci: dict[str, Any],
                                  req: pb.CreateContainerRequest, mounted: list[str],
                                  disks: list[str]) -> None:
        """Mount the container's storages and find its disks; what was done is
        appended to ``mounted`` and ``disks`` as it happens (for the caller to undo).
        Pod-scoped storages are mounted once and kept until the sandbox goes."""
        from pykata.guest import guestops, storage

        async def disk(serial: str) -> storage.Disk:
            started = time.monotonic()
            d = await storage.wait_disk(serial)
            log.info("container %s: disk %s is %s (%d:%d), found in %.3fs", cid, serial,
                     d.path, d.major, d.minor, time.monotonic() - started)
            self.disks.use(d, cid)
            if serial not in disks:
                disks.append(serial)
            return d

        for st in req.storages:
            source = st.source
            if st.driver == "blk" and source and not source.startswith("/"):
                source = (await disk(source)).path
            pod_scoped = storage.SANDBOX_SCOPE in st.driver_options
            if pod_scoped and st.mount_point in self.pod_storages:
                continue
            done = guestops.mount_storage(st.driver, source, st.mount_point, st.fstype,
                                          list(st.options))
            if pod_scoped:
                self.pod_storages.add(st.mount_point)
                if done:
                    self.storages.append(st.mount_point)
            elif done:
                mounted.append(st.mount_point)
        for dev in req.devices:
            if dev.type not in ("blk", "b"):
                raise errors.InvalidArgument(
                    f"device {dev.container_path}: unsupported type {dev.type!r} (known: blk)")
            d = await disk(dev.id)
            storage.use_guest_device(oci, dev.container_path, d.major, d.minor)

    async def _release_storages(self, cid: str, mounted: list[str], disks: list[str]) -> None:
        """Unmount a container's own storages, then let go of its disks (the last
        user ejects a disk). Failures are logged, never raised."""
        from pykata.guest import guestops

        for mp in reversed(mounted):
            try:
                guestops.unmount(mp)
            except errors.PykataError as exc:
                log.warning("%s", exc)
        for serial in disks:
            try:
                await self.disks.release(serial, cid)
            except Exception as exc:  # removal goes on regardless
                log.warning("container %s: cannot release disk %s: %s", cid, serial, exc)

    async def StartContainer(self, req: pb.StartContainerRequest) -> pb.ProcessResponse:
        _ctx(req.container_id)
        log.debug("StartContainer %s", req.container_id)
        return pb.ProcessResponse(pid=await self._do_start_container(req.container_id))

    async def _do_start_container(self, container_id: str) -> int:
        c = self.container(container_id)
        async with c.lock:
            return await c.start()

    async def RemoveContainer(self, req: pb.RemoveContainerRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("RemoveContainer %s timeout=%ds", req.container_id, req.timeout_seconds)
        await self._remove(self.container(req.container_id), float(req.timeout_seconds or 10))
        return pb.Empty()

    async def _remove(self, c: Container, timeout: float) -> None:
        async with c.lock:
            if self.containers.get(c.id) is not c:
                raise errors.NotFound(f"container {c.id} not found")
            await c.remove(timeout)
            del self.containers[c.id]
            if self.pidns_owner is c:
                self.pidns_owner = None
            await self._release_storages(c.id, c.storages, c.disks)

    # -- processes ----------------------------------------------------------------------

    async def ExecProcess(self, req: pb.ExecProcessRequest) -> pb.ProcessResponse:
        _ctx(req.container_id)
        log.debug("ExecProcess %s exec=%s", req.container_id, req.exec_id)
        return pb.ProcessResponse(pid=await self._do_exec_process(req))

    async def _do_exec_process(self, req: pb.ExecProcessRequest) -> int:
        if not req.exec_id:
            raise errors.InvalidArgument("exec id must not be empty")
        c = self.container(req.container_id)
        proc = specmod.validate_process(
            specmod.load_json(req.process_json, "process"), "process")
        async with c.lock:
            p = await c.exec(req.exec_id, proc)
        return p.pid

    async def SignalProcess(self, req: pb.SignalProcessRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("SignalProcess %s exec=%s signal=%d all=%s", req.container_id, req.exec_id,
                  req.signal, req.all)
        await self._do_signal_process(req)
        return pb.Empty()

    async def _do_signal_process(self, req: pb.SignalProcessRequest) -> None:
        if not 0 <= req.signal < signal.NSIG:
            raise errors.InvalidArgument(f"invalid signal {req.signal}")
        c = self.container(req.container_id)
        await c.signal(req.exec_id, req.signal, req.all)

    async def WaitProcess(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        _ctx(req.container_id)
        log.debug("WaitProcess %s exec=%s", req.container_id, req.exec_id)
        return await self._do_wait_process(req)

    async def _do_wait_process(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        p = await self.process(req.container_id, req.exec_id).wait()
        return pb.WaitProcessResponse(status=p.status if p.status is not None else 255,
                                      exited_at_unix_nano=p.exited_at,
                                      oom_killed=p.oom_killed)

    # -- stdio --------------------------------------------------------------------------

    async def WriteStdin(self, req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        _ctx(req.container_id)
        log.debug("WriteStdin %s exec=%s len=%d", req.container_id, req.exec_id, len(req.data))
        return pb.WriteStreamResponse(len=await self._do_write_stdin(req))

    async def _do_write_stdin(self, req: pb.WriteStreamRequest) -> int:
        p = self.process(req.container_id, req.exec_id)
        if p.stdin is None:
            raise errors.FailedPrecondition(f"{p.name} has no stdin")
        return await p.stdin.write(req.data)

    async def CloseStdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("CloseStdin %s exec=%s", req.container_id, req.exec_id)
        self.process(req.container_id, req.exec_id).close_stdin()
        return pb.Empty()

    async def ReadStdout(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        _ctx(req.container_id)
        log.debug("ReadStdout %s exec=%s len=%d", req.container_id, req.exec_id, req.len)
        return pb.ReadStreamResponse(data=await self._do_read(req, stderr=False))

    async def ReadStderr(self, req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        _ctx(req.container_id)
        log.debug("ReadStderr %s exec=%s len=%d", req.container_id, req.exec_id, req.len)
        return pb.ReadStreamResponse(data=await self._do_read(req, stderr=True))

    async def _do_read(self, req: pb.ReadStreamRequest, stderr: bool) -> bytes:
        p = self.process(req.container_id, req.exec_id)
        stream = p.stderr if stderr else p.stdout
        if stream is None:
            return b""  # a terminal has no separate stderr
        return await stream.read(min(req.len or DEFAULT_READ, MAX_READ))

    async def TtyWinResize(self, req: pb.TtyWinResizeRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("TtyWinResize %s exec=%s %dx%d", req.container_id, req.exec_id, req.row,
                  req.column)
        self.process(req.container_id, req.exec_id).resize(req.row, req.column)
        return pb.Empty()

    # -- container control --------------------------------------------------------------

    async def StatsContainer(self, req: pb.StatsContainerRequest) -> pb.StatsContainerResponse:
        _ctx(req.container_id)
        log.debug("StatsContainer %s", req.container_id)
        return self._do_stats_container(req.container_id)

    def _do_stats_container(self, container_id: str) -> pb.StatsContainerResponse:
        c = self.container(container_id)
        return pb.StatsContainerResponse(cgroup_stats=cgroups.cgroup_stats(c.cgroup),
                                         network_stats=cgroups.network_stats())

    async def PauseContainer(self, req: pb.PauseContainerRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("PauseContainer %s", req.container_id)
        c = self.container(req.container_id)
        async with c.lock:
            await c.pause()
        return pb.Empty()

    async def ResumeContainer(self, req: pb.ResumeContainerRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("ResumeContainer %s", req.container_id)
        c = self.container(req.container_id)
        async with c.lock:
            await c.resume()
        return pb.Empty()

    async def UpdateContainer(self, req: pb.UpdateContainerRequest) -> pb.Empty:
        _ctx(req.container_id)
        log.debug("UpdateContainer %s", req.container_id)
        await self._do_update_container(req)
        return pb.Empty()

    async def _do_update_container(self, req: pb.UpdateContainerRequest) -> None:
        c = self.container(req.container_id)
        resources: dict[str, Any] = specmod.load_json(req.resources_json, "resources")
        async with c.lock:
            await c.update(resources)

    async def ListProcesses(self, req: pb.ListProcessesRequest) -> pb.ListProcessesResponse:
        _ctx(req.container_id)
        log.debug("ListProcesses %s", req.container_id)
        c = self.container(req.container_id)
        return pb.ListProcessesResponse(processes=[
            pb.ProcessInfo(pid=pid, exec_id=exec_id, command=comm)
            for pid, exec_id, comm in c.pids()
        ])

    # -- guest --------------------------------------------------------------------------

    async def OnlineCPUMem(self, req: pb.OnlineCPUMemRequest) -> pb.OnlineCPUMemResponse:
        _ctx()
        log.debug("OnlineCPUMem nb_cpus=%d cpu_only=%s", req.nb_cpus, req.cpu_only)
        return self._do_online_cpu_mem(req)

    def _do_online_cpu_mem(self, req: pb.OnlineCPUMemRequest) -> pb.OnlineCPUMemResponse:
        from pykata.guest import guestops

        if self.settings.init_mode:
            cpus = guestops.online_cpu_mem(req.nb_cpus, req.cpu_only)
        else:
            cpus = guestops.online_cpus()
        return pb.OnlineCPUMemResponse(online_cpus=cpus, mem_total_bytes=cgroups.mem_total())

    async def GetGuestDetails(self, req: pb.GetGuestDetailsRequest) -> pb.GuestDetailsResponse:
        _ctx()
        log.debug("GetGuestDetails")
        return self._do_get_guest_details()

    def _do_get_guest_details(self) -> pb.GuestDetailsResponse:
        from pykata.guest import guestops

        return pb.GuestDetailsResponse(
            mem_block_size_bytes=guestops.mem_block_size(),
            agent_details=pb.AgentDetails(
                version=__version__, init_daemon=self.settings.init_mode,
                device_handlers=[], storage_handlers=list(guestops.STORAGE_DRIVERS)),
            kernel_release=os.uname().release,
            kernel_version=guestops.kernel_version(),
            online_cpus=guestops.online_cpus(),
            mem_total_bytes=cgroups.mem_total(),
        )

    async def GetMetrics(self, req: pb.GetMetricsRequest) -> pb.Metrics:
        _ctx()
        log.debug("GetMetrics")
        from pykata.guest import guestops

        return pb.Metrics(metrics=guestops.metrics(len(self.containers)))

    async def GetOOMEvent(self, req: pb.GetOOMEventRequest) -> pb.OOMEvent:
        _ctx()
        log.debug("GetOOMEvent")
        return pb.OOMEvent(container_id=await self.oom.next())

    async def SetGuestDateTime(self, req: pb.SetGuestDateTimeRequest) -> pb.Empty:
        _ctx()
        log.debug("SetGuestDateTime %d.%06d", req.sec, req.usec)
        from pykata.guest import sysutil

        self._require_init("setting the clock")
        try:
            sysutil.set_clock(req.sec * 1_000_000_000 + req.usec * 1000)
        except OSError as exc:
            raise errors.Internal(f"cannot set the clock: {exc.strerror}") from None
        return pb.Empty()

    async def ReseedRandomDev(self, req: pb.ReseedRandomDevRequest) -> pb.Empty:
        _ctx()
        log.debug("ReseedRandomDev len=%d", len(req.data))
        from pykata.guest import sysutil

        sysutil.add_entropy(req.data)
        return pb.Empty()

    async def CopyFile(self, req: pb.CopyFileRequest) -> pb.Empty:
        _ctx()
        log.debug("CopyFile %s offset=%d len=%d size=%d", req.path, req.offset, len(req.data),
                  req.file_size)
        from pykata.guest import guestops

        guestops.copy_file(req.path, req.data, req.offset, req.file_size, req.file_mode,
                           req.dir_mode, req.uid, req.gid)
        return pb.Empty()

    # -- network ------------------------------------------------------------------------

    async def UpdateInterface(self, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        _ctx()
        log.debug("UpdateInterface %s mac=%s", req.interface.device, req.interface.hw_addr)
        return await self.network().update_interface(req.interface)

    async def UpdateRoutes(self, req: pb.UpdateRoutesRequest) -> pb.Routes:
        _ctx()
        log.debug("UpdateRoutes %d routes", len(req.routes))
        return pb.Routes(routes=await self.network().update_routes(list(req.routes)))

    async def AddARPNeighbors(self, req: pb.AddARPNeighborsRequest) -> pb.Empty:
        _ctx()
        log.debug("AddARPNeighbors %d neighbours", len(req.neighbors))
        self.network().add_arp_neighbors(list(req.neighbors))
        return pb.Empty()

    async def ListInterfaces(self, req: pb.ListInterfacesRequest) -> pb.Interfaces:
        _ctx()
        log.debug("ListInterfaces")
        return pb.Interfaces(interfaces=await self._net_reader().list_interfaces())

    async def ListRoutes(self, req: pb.ListRoutesRequest) -> pb.Routes:
        _ctx()
        log.debug("ListRoutes")
        return pb.Routes(routes=await self._net_reader().list_routes())

    def _net_reader(self) -> Network:
        """Reading the network is harmless anywhere."""
        if self._network is None:
            from pykata.guest.network import Network

            self._network = Network(self._run)
        return self._network

    # -- shutdown (development mode) -----------------------------------------------------

    async def shutdown(self) -> None:
        """Remove every container (the agent is stopping in development mode)."""
        if not self.containers:
            return
        log.info("removing %d containers before exiting", len(self.containers))
        await asyncio.gather(*(self._remove(c, 5.0) for c in list(self.containers.values())),
                             return_exceptions=True)


def _os_errors_as_internal(
    name: str, handler: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    """An OSError escaping a handler becomes Internal with one line, not UNKNOWN."""

    @functools.wraps(handler)
    async def wrapper(self: Any, req: Any) -> Any:
        try:
            return await handler(self, req)
        except OSError as exc:
            what = f" {exc.filename}" if exc.filename else ""
            raise errors.Internal(f"{name}:{what} {exc.strerror or exc}") from None

    return wrapper


for _m in AGENT_SERVICE.methods:
    if hasattr(AgentService, _m.name):
        setattr(AgentService, _m.name, _os_errors_as_internal(_m.name, getattr(AgentService,
                                                                                 _m.name)))
