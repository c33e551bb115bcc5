"""The agent's RPC surface and its handler decorator, driven without crun, VM or
root (development mode: the handlers that need none of them)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pykata import errors, wire
from pykata.guest import logs, service
from pykata.guest.reaper import Reaper
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb
from pykata.ttrpc import Server

T = TypeVar("T")

AGENT_METHODS = {
    "CreateSandbox", "DestroySandbox", "CreateContainer", "StartContainer",
    "RemoveContainer", "ExecProcess", "SignalProcess", "WaitProcess", "WriteStdin",
    "ReadStdout", "ReadStderr", "CloseStdin", "TtyWinResize", "StatsContainer",
    "PauseContainer", "ResumeContainer", "UpdateContainer", "ListProcesses", "OnlineCPUMem",
    "GetGuestDetails", "GetMetrics", "GetOOMEvent", "SetGuestDateTime", "ReseedRandomDev",
    "CopyFile", "UpdateInterface", "UpdateRoutes", "AddARPNeighbors", "ListInterfaces",
    "ListRoutes", "TakeSpans", "DebugExec", "SetPolicy", "PrepareCheckpoint",
    "FinishCheckpoint",
}


def run(coro: Awaitable[T]) -> T:
    async def go() -> T:
        return await coro

    return asyncio.run(go())


def make(tmp_path: Path, **kw: Any) -> service.AgentService:
    return service.AgentService(Settings(state_dir=tmp_path, **kw), Reaper())


def test_service_names_are_the_wire_names() -> None:
    assert service.AGENT_SERVICE.full_name == wire.AGENT_SERVICE
    assert service.HEALTH_SERVICE.full_name == wire.HEALTH_SERVICE


def test_every_rpc_is_served_and_decorated(tmp_path: Path) -> None:
    server = Server()
    server.register_service(service.AGENT_SERVICE, make(tmp_path))
    server.register_service(service.HEALTH_SERVICE, service.HealthService())
    served = set(server._methods)
    assert served == {(wire.AGENT_SERVICE, m) for m in AGENT_METHODS} | {
        (wire.HEALTH_SERVICE, "Check"), (wire.HEALTH_SERVICE, "Version")}
    assert {m.name for m in service.AGENT_SERVICE.methods} == AGENT_METHODS
    for name in AGENT_METHODS:
        assert getattr(getattr(service.AgentService, name), "rpc", None) == name, name


class Thing:
    @service.rpc(lambda r: f"{r.container_id} exec={r.exec_id}")
    async def CloseStdin(self, req: pb.CloseStdinRequest) -> pb.Empty:
        assert logs.container_id.get() == (req.container_id or "-")
        raise FileNotFoundError(2, "No such file or directory", "/x/y")

    @service.rpc()
    async def GetMetrics(self, req: pb.GetMetricsRequest) -> pb.Metrics:
        assert logs.container_id.get() == "-"
        raise errors.NotFound("kept as it is")


def test_rpc_decorator_logs_and_maps_os_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pykata.guest.service")
    with pytest.raises(errors.Internal) as exc:
        run(Thing().CloseStdin(pb.CloseStdinRequest(container_id="c1", exec_id="e1")))
    assert str(exc.value) == "CloseStdin: /x/y No such file or directory"
    assert "CloseStdin c1 exec=e1" in caplog.messages
    logs.container_id.set("c1")
    with pytest.raises(errors.NotFound, match="kept as it is"):
        run(Thing().GetMetrics(pb.GetMetricsRequest()))
    assert "GetMetrics" in caplog.messages


def test_sandbox_lifecycle_in_development_mode(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb1", hostname="h"))
        assert svc.sandbox.id == "sb1"
        with pytest.raises(errors.AlreadyExists, match="sandbox sb1 is already created"):
            await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb2"))
        await svc.DestroySandbox(pb.DestroySandboxRequest())
        assert svc.sandbox.id == ""
        await svc.CreateSandbox(pb.CreateSandboxRequest())
        assert svc.sandbox.id == "sandbox"
        logs.set_sandbox("")

    asyncio.run(go())


def test_wrong_requests_are_refused(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        with pytest.raises(errors.NotFound, match="container c9 not found"):
            await svc.StartContainer(pb.StartContainerRequest(container_id="c9"))
        with pytest.raises(errors.NotFound, match="container c9 not found"):
            await svc.ReadStdout(pb.ReadStreamRequest(container_id="c9"))
        with pytest.raises(errors.InvalidArgument, match="exec id must not be empty"):
            await svc.ExecProcess(pb.ExecProcessRequest(container_id="c9"))
        with pytest.raises(errors.InvalidArgument, match="invalid signal 999"):
            await svc.SignalProcess(pb.SignalProcessRequest(container_id="c9", signal=999))
        with pytest.raises(errors.FailedPrecondition, match="not setting the clock"):
            await svc.SetGuestDateTime(pb.SetGuestDateTimeRequest(sec=1))
        with pytest.raises(errors.FailedPrecondition, match="--manage-network"):
            await svc.UpdateRoutes(pb.UpdateRoutesRequest())
        with pytest.raises(errors.InvalidArgument):
            await svc.CreateContainer(pb.CreateContainerRequest(container_id="c1",
                                                                oci_spec_json=b"{"))
        assert svc.sandbox.containers == {}

    asyncio.run(go())


def test_guest_details_and_metrics(tmp_path: Path) -> None:
    svc = make(tmp_path)
    details = run(svc.GetGuestDetails(pb.GetGuestDetailsRequest()))
    assert list(details.agent_details.storage_handlers) == list(wire.STORAGE_DRIVERS)
    assert not details.agent_details.init_daemon and details.online_cpus >= 1
    assert "pykata_agent_containers 0" in run(svc.GetMetrics(pb.GetMetricsRequest())).metrics


def test_health(tmp_path: Path) -> None:
    h = service.HealthService()
    assert run(h.Check(pb.CheckRequest())).status == pb.HealthCheckResponse.SERVING
    assert run(h.Version(pb.CheckRequest())).grpc_version == "ttrpc"


# -- the agent policy (issue 19, docs/confidential.md) ---------------------------------


def _policy(**doc: Any) -> bytes:
    return json.dumps({"version": 1, **doc}).encode()


def test_the_policy_from_create_sandbox_decides_each_request(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path.resolve()
    allowed = root / "ok"
    doc = _policy(methods={"GetMetrics": "deny"}, copy_file={"paths": [f"{allowed}/"]},
                  stdio="none")

    async def go() -> None:
        svc = make(tmp_path)
        await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb1", policy=doc))
        with pytest.raises(errors.PermissionDenied) as ei:
            await svc.GetMetrics(pb.GetMetricsRequest())
        assert str(ei.value) == ("agent policy: GetMetrics denied by rule methods.GetMetrics:"
                                 " denied")
        assert str(ei.value) in caplog.messages  # the refusal is logged in the guest
        await svc.GetGuestDetails(pb.GetGuestDetailsRequest())  # the default: allow
        # Decided before the handler runs: no file written, no NotFound for c9.
        with pytest.raises(errors.PermissionDenied, match="rule copy_file.paths"):
            await svc.CopyFile(pb.CopyFileRequest(path=f"{root}/elsewhere", data=b"x",
                                                  file_size=1))
        assert not (root / "elsewhere").exists()
        with pytest.raises(errors.PermissionDenied, match="rule copy_file.paths"):
            await svc.CopyFile(pb.CopyFileRequest(path=f"{allowed}/../elsewhere", data=b"x",
                                                  file_size=1))
        await svc.CopyFile(pb.CopyFileRequest(path=f"{allowed}/f", data=b"x", file_size=1,
                                              file_mode=0o600))
        assert (allowed / "f").read_bytes() == b"x"
        for method in ("ReadStdout", "ReadStderr"):
            with pytest.raises(errors.PermissionDenied, match=f"{method} denied by rule stdio"):
                await getattr(svc, method)(pb.ReadStreamRequest(container_id="c9"))
        with pytest.raises(errors.PermissionDenied, match="WriteStdin denied by rule stdio"):
            await svc.WriteStdin(pb.WriteStreamRequest(container_id="c9", data=b"x"))
        # Fixed: the document does not allow replacing it.
        with pytest.raises(errors.PermissionDenied) as ei:
            await svc.SetPolicy(pb.SetPolicyRequest(policy=_policy()))
        assert str(ei.value) == ("agent policy: SetPolicy denied by rule set_policy: the"
                                 " policy in force cannot be replaced")
        assert str(ei.value) in caplog.messages
        with pytest.raises(errors.PermissionDenied):
            await svc.GetMetrics(pb.GetMetricsRequest())
        logs.set_sandbox("")

    caplog.set_level(logging.WARNING, logger="pykata.guest.service")
    asyncio.run(go())


def test_set_policy_replaces_only_what_allows_it(tmp_path: Path) -> None:
    async def go() -> None:
        svc = make(tmp_path)
        with pytest.raises(errors.InvalidArgument, match="invalid agent policy: version"):
            await svc.CreateSandbox(pb.CreateSandboxRequest(policy=b'{"version": 7}'))
        assert svc.sandbox.id == ""  # an invalid document changes nothing
        await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb1"))  # no document
        await svc.GetMetrics(pb.GetMetricsRequest())
        # The built-in allow-all may be replaced once...
        await svc.SetPolicy(pb.SetPolicyRequest(
            policy=_policy(methods={"GetMetrics": "deny"}, set_policy="allow")))
        with pytest.raises(errors.PermissionDenied):
            await svc.GetMetrics(pb.GetMetricsRequest())
        with pytest.raises(errors.InvalidArgument):  # invalid: the one in force stays
            await svc.SetPolicy(pb.SetPolicyRequest(policy=b"[]"))
        with pytest.raises(errors.PermissionDenied):
            await svc.GetMetrics(pb.GetMetricsRequest())
        # ...and this one says it may be replaced, by one that says it may not.
        await svc.SetPolicy(pb.SetPolicyRequest(policy=_policy()))
        await svc.GetMetrics(pb.GetMetricsRequest())
        with pytest.raises(errors.PermissionDenied, match="rule set_policy"):
            await svc.SetPolicy(pb.SetPolicyRequest(
                policy=_policy(set_policy="allow")))
        logs.set_sandbox("")

    asyncio.run(go())


def test_the_decorator_leaves_create_and_set_policy_to_their_handlers(tmp_path: Path) -> None:
    """A policy denying everything by default still lets the host reach SetPolicy
    (which refuses by its own rule) and CreateSandbox is never decided by it."""
    async def go() -> None:
        svc = make(tmp_path)
        await svc.CreateSandbox(pb.CreateSandboxRequest(
            sandbox_id="sb1", policy=_policy(default="deny", set_policy="allow")))
        with pytest.raises(errors.PermissionDenied, match="rule default"):
            await svc.GetGuestDetails(pb.GetGuestDetailsRequest())
        with pytest.raises(errors.AlreadyExists):  # not PermissionDenied: not decided here
            await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb2"))
        await svc.SetPolicy(pb.SetPolicyRequest(policy=_policy()))
        await svc.GetGuestDetails(pb.GetGuestDetailsRequest())
        logs.set_sandbox("")

    asyncio.run(go())


def test_create_container_is_decided_by_the_policy_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pykata.testing import default_spec

    spec = default_spec(["sh"])
    spec["root"] = {"path": str(tmp_path / "no-rootfs")}

    async def go() -> None:
        svc = make(tmp_path)
        await svc.CreateSandbox(pb.CreateSandboxRequest(sandbox_id="sb1", policy=_policy(
            create_container={"commands": [{"argv": ["/pause"]}]})))
        with pytest.raises(errors.PermissionDenied) as ei:
            await svc.CreateContainer(pb.CreateContainerRequest(
                container_id="c1", oci_spec_json=json.dumps(spec).encode()))
        assert str(ei.value) == ('agent policy: CreateContainer denied by rule'
                                 ' create_container.commands: ["sh"] matches no allowed command')
        assert str(ei.value) in caplog.messages
        assert svc.sandbox.containers == {}
        logs.set_sandbox("")

    caplog.set_level(logging.WARNING, logger="pykata.guest.service")
    asyncio.run(go())
