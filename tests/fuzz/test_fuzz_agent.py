"""Fuzzing the guest agent's request handlers through the real ttRPC server.

Every AgentService method gets well-typed requests drawn from its protobuf
descriptor (huge and odd strings, paths with '..', negative and edge numbers,
JSON payloads shaped like OCI specs but wrong, JSON nested too deeply) and
plain random bytes as its payload, in sequences on one agent (so a
CreateSandbox or an existing container is there for the calls after it).
The agent runs as in a VM (init mode, managing the network) and in
development mode; what would touch this host is faked at the lowest level:
mounts, the clock, the hostname, module loading, CPU onlining, /etc and
CopyFile writes are re-rooted into the example's temporary directory, the
network's `ip` runner and ARP ioctl are fakes, and crun is a path that does
not exist (every container engine call fails cleanly). Nothing here mounts,
signals or writes outside the temporary directory.

Properties, per call: a response comes back (no hang: long polls end by the
request's deadline), it is a payload of the method's response type or a
status whose code is a pykata error kind -- never UNKNOWN, which is what an
exception escaping a handler becomes -- with a message of one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from pykata import errors
from pykata.guest import disks, guestops, network, portfwd, service, storage, sysutil
from pykata.guest.container import Container, Process, State
from pykata.guest.reaper import Reaper, RunResult
from pykata.guest.settings import Settings
from pykata.protos import agent_pb2 as pb
from pykata.protos import ttrpc_pb2
from pykata.ttrpc import Server, frames
from pykata.ttrpc import status as st_codes
from tests.fuzz import support

HEADER = struct.Struct(">IIBB")
METHODS = {m.name: m for m in service.AGENT_SERVICE.methods}
LONG_POLLS = {"WaitProcess", "GetOOMEvent"}  # wait for an event: ended by the deadline
MACS = ["02:00:00:00:00:01", "02:00:00:00:00:02", "zz:zz", ""]
ERROR_CODES = {cls.code for cls in (errors.InvalidArgument, errors.DeadlineExceeded,
                                    errors.NotFound, errors.AlreadyExists,
                                    errors.ResourceExhausted, errors.FailedPrecondition,
                                    errors.Unimplemented, errors.Internal,
                                    errors.Unavailable)}


# -- the fakes: everything that would touch this host happens below ROOT -------------------

class Fakes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[tuple[str, str]] = []

    def inside(self, path: str) -> str:
        """A guest path as a path below the example's root ('..' cannot leave it)."""
        return str(self.root / "guest" / posixpath.normpath("/" + path).lstrip("/"))


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Fakes]:
    f = Fakes(tmp_path)
    real_mount_storage = storage.mount_storage
    real_copy_file = guestops.copy_file
    real_write_etc = guestops.write_etc
    real_online = guestops.online_cpu_mem
    real_wait_disk = disks.wait_disk
    real_load_module = sysutil.load_module_by_name
    real_wait_link = network.wait_link_by_mac

    def mount_storage(driver: str, source: str, mount_point: str, fstype: str,
                      options: Any, wait_device: float = 0.0) -> bool:
        if mount_point.startswith("/"):
            mount_point = f.inside(mount_point)
        return real_mount_storage(driver, source, mount_point, fstype, options, 0.0)

    def mount_with_options(source: str, target: str, fstype: str | None,
                           options: Any = ()) -> None:
        assert target.startswith(str(tmp_path)), f"a mount outside the sandbox: {target}"
        sysutil.parse_mount_options(options)
        source.encode(), target.encode(), (fstype or "").encode()
        f.mounts.append((source, target))

    def copy_file(path: str, *args: Any) -> None:
        real_copy_file(f.inside(path) if path.startswith("/") else path, *args)

    def set_hostname(name: str) -> None:
        if len(name.encode()) > 64:
            raise OSError(22, "sethostname: Invalid argument")

    def set_clock(unix_nano: int) -> None:
        sysutil._Timespec(unix_nano // 1_000_000_000, unix_nano % 1_000_000_000)

    async def wait_disk(serial: str, timeout: float = 0.0, sysfs: str = "",
                        dev: str = "") -> disks.Disk:
        return await real_wait_disk(serial, 0.0, str(tmp_path / "sys"), str(tmp_path / "dev"))

    async def wait_link(mac: str, timeout: float = 0.0, sys_net: str = "") -> str:
        assert sys_net.startswith(str(tmp_path))
        return await real_wait_link(mac, 0.0, sys_net)

    def no_eject(disk: disks.Disk, sysfs: str = "") -> bool:
        raise AssertionError("no disk can be in use here")

    monkeypatch.setattr(storage, "mount_storage", mount_storage)
    monkeypatch.setattr(sysutil, "mount_with_options", mount_with_options)
    monkeypatch.setattr(sysutil, "umount", lambda target, detach=False: None)
    monkeypatch.setattr(sysutil, "add_entropy", lambda data: None)
    monkeypatch.setattr(sysutil, "set_hostname", set_hostname)
    monkeypatch.setattr(sysutil, "set_clock", set_clock)
    monkeypatch.setattr(sysutil, "load_module_by_name", lambda name, params=(): (
        real_load_module(name, params, base=str(tmp_path / "modules"))))
    monkeypatch.setattr(guestops, "copy_file", copy_file)
    monkeypatch.setattr(guestops, "write_etc", lambda dns, hosts, etc="": real_write_etc(
        dns, hosts, str(tmp_path / "etc")))
    monkeypatch.setattr(guestops, "online_cpu_mem", lambda n, cpu_only, sysfs="": real_online(
        n, cpu_only, str(tmp_path / "sys/devices/system")))
    monkeypatch.setattr(disks, "wait_disk", wait_disk)
    monkeypatch.setattr(disks, "eject", no_eject)
    monkeypatch.setattr(network, "wait_link_by_mac", wait_link)
    monkeypatch.setattr(network, "fcntl", type("FakeFcntl", (), {
        "ioctl": staticmethod(lambda fd, req, arg: b"")}))
    monkeypatch.setattr(portfwd, "start", lambda: None)
    yield f


async def fake_ip(argv: list[str]) -> RunResult:
    """`ip`: succeeds, printing nothing, unless an argument could not be one."""
    bad = any(not a or "\n" in a or "\x00" in a for a in argv)
    return RunResult(tuple(argv), 2 if bad else 0, b"", b"ip: invalid argument" if bad else b"")


def _no_spawn(path: str, *args: Any, **kwargs: Any) -> int:
    raise FileNotFoundError(2, "not run by the fuzzer", path)


def make_agent(root: Path, init_mode: bool) -> service.AgentService:
    for d in ("etc", "guest", "sys/devices/system/cpu", "sys/devices/system/memory/memory0",
              "cg", "net/eth0"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "sys/devices/system/cpu/present").write_text("0-3\n")
    (root / "sys/devices/system/cpu/online").write_text("0-1\n")
    (root / "sys/devices/system/memory/memory0/state").write_text("offline\n")
    (root / "net/eth0/address").write_text(MACS[0] + "\n")
    (root / "net/eth0/mtu").write_text("1500\n")
    settings = Settings(state_dir=root / "state", engine="crun",
                        crun=str(root / "no-such-crun"), cgroup_root=root / "cg",
                        init_mode=init_mode, manage_network=init_mode)
    svc = service.AgentService(settings, Reaper())
    svc.debug.spawn = _no_spawn  # the debug console (DebugExec) runs nothing here
    svc.sandbox.storages.disks = disks.Disks(sysfs=str(root / "sys"))
    svc._network = network.Network(fake_ip, sys_net=str(root / "net"))
    # Two containers the agent already has (as if created): c1 running with a
    # terminal and an exec, c2 created. Their processes have no pid: nothing can
    # be signalled.
    spec: dict[str, Any] = {"process": {"args": ["sh"], "terminal": True, "cwd": "/"},
                            "root": {"path": "/"}}
    c1 = Container("c1", spec, settings, svc.sandbox.crun)
    c1.state = State.RUNNING
    master, slave = os.openpty()
    os.close(slave)
    c1.init.tty_fd = master
    c1.execs["e1"] = Process(c1, "e1", {"args": ["true"]})
    c2 = Container("c2", {**spec, "process": {"args": ["sh"]}}, settings, svc.sandbox.crun)
    svc.sandbox.containers.update(c1=c1, c2=c2)
    return svc


# -- requests ---------------------------------------------------------------------------

def _json_bytes(s: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        s.map(lambda v: json.dumps(v).encode()),
        s.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"", b"null", b"[]", b"{", b"\xff\xfe", b"[" * 50_000,
                         b'{"a":' * 50_000, b"1" * 5000, b'"\\ud800"']),
        st.binary(max_size=32))


ids = support.mostly(st.sampled_from(["c1", "c2", "e1", "new"]), st.sampled_from(
    ["", "../c1", "c1/..", "-x", "a" * 129, "c1\n", "."]) | support.texts)
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "container_id": ids, "exec_id": ids, "sandbox_id": ids,
    "oci_spec_json": _json_bytes(support.oci_spec.map(
        lambda s: {**s, "root": {"path": "/"}} if isinstance(s, dict) and isinstance(
            s.get("root"), dict) and s["root"].get("path") == "rootfs" else s)),
    "process_json": _json_bytes(support.process),
    "resources_json": _json_bytes(support.resources),
    "driver": support.mostly(st.sampled_from(["virtiofs", "tmpfs", "local", "blk", "bind"]),
                             st.sampled_from(["", "nfs"]) | support.texts),
    "mount_point": support.mostly(support.abs_paths, support.paths),
    "source": support.paths, "path": support.paths,
    "container_path": support.paths,
    "options": support.mostly(st.sampled_from(["mode=0755", "mode=xyz", "mode=", "ro",
                                               "rbind", "size=1k", "nosuid"]), support.texts),
    "hw_addr": support.mostly(st.sampled_from(MACS), support.texts),
    "ll_addr": support.mostly(st.sampled_from(MACS), support.texts),
    "address": support.mostly(st.sampled_from(["10.0.0.2", "::1", "fe80::1", "300.1.1.1",
                                               ""]), support.texts),
    "type": st.sampled_from(["blk", "b", "c", "char", ""]),
}


def request_of(name: str) -> st.SearchStrategy[bytes]:
    """A request for method ``name``: well-typed (from its descriptor) nine times in
    ten, else random bytes."""
    desc = METHODS[name].input_type
    cls = message_factory.GetMessageClass(desc)
    typed = support.message_of(desc, cls, OVERRIDES).map(lambda m: m.SerializeToString())
    return st.one_of(typed, typed, typed, typed, st.binary(max_size=64))


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(METHODS)))
    return name, draw(request_of(name))


async def _serve(svc: service.AgentService, script: list[tuple[str, bytes]]
                 ) -> list[tuple[str, ttrpc_pb2.Response]]:
    server = Server()
    server.register_service(service.AGENT_SERVICE, svc)
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_unix_connection(sock=a)
    serving = asyncio.ensure_future(server.serve_stream(sr, sw))
    r, w = await asyncio.open_unix_connection(sock=b, limit=frames.MAX_DATA * 2)
    out = []
    try:
        for i, (name, payload) in enumerate(script):
            deadline = 50_000_000 if name in LONG_POLLS else 30_000_000_000
            req = ttrpc_pb2.Request(service=service.AGENT_SERVICE.full_name, method=name,
                                    payload=payload, timeout_nano=deadline)
            sid = 2 * i + 1
            w.write(frames.encode(sid, frames.TYPE_REQUEST, req.SerializeToString()))
            await w.drain()
            f = await support.hang_guard(frames.read_frame(r))
            assert (f.stream_id, f.type) == (sid, frames.TYPE_RESPONSE)
            out.append((name, ttrpc_pb2.Response.FromString(f.data)))
    finally:
        w.close()
        await support.hang_guard(serving)
        with contextlib.suppress(Exception):
            await svc.sandbox.shutdown()
    return out


def _check(name: str, resp: ttrpc_pb2.Response) -> None:
    code, msg = resp.status.code, resp.status.message
    if code == 0:
        out_cls = message_factory.GetMessageClass(METHODS[name].output_type)
        out_cls.FromString(resp.payload)
        return
    assert code != st_codes.UNKNOWN, f"{name}: an exception escaped the handler: {msg}"
    assert code in ERROR_CODES, (name, code, msg)
    support.assert_one_line(msg, f"{name} error")
    if name not in LONG_POLLS:
        assert code != st_codes.DEADLINE_EXCEEDED, f"{name} did not answer: {msg}"


def _close(svc: service.AgentService) -> None:
    for c in svc.sandbox.containers.values():
        for p in c.processes():
            if p.tty_fd >= 0:
                os.close(p.tty_fd)
                p.tty_fd = -1


def _run_script(fakes: Fakes, script: list[tuple[str, bytes]], init_mode: bool) -> None:
    root = Path(tempfile.mkdtemp(dir=fakes.root))
    svc = make_agent(root, init_mode)
    try:
        results = support.run(lambda: _serve(svc, script))
    finally:
        _close(svc)
        shutil.rmtree(root, ignore_errors=True)
    for name, resp in results:
        _check(name, resp)


@pytest.mark.parametrize("init_mode", [True, False], ids=["vm", "dev"])
@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(data=st.data())
def test_each_method_answers_clearly(fakes: Fakes, method: str, init_mode: bool,
                                     data: st.DataObject) -> None:
    """One method at a time (each gets the whole budget), on the agent with its two
    containers, after a CreateSandbox half of the time."""
    script = [(method, data.draw(request_of(method), label="request"))]
    if method != "CreateSandbox" and data.draw(st.booleans(), label="sandbox first"):
        script.insert(0, ("CreateSandbox", b""))
    _run_script(fakes, script, init_mode)


@given(st.lists(calls(), min_size=2, max_size=6), st.booleans())
def test_sequences_of_requests_answer_clearly(fakes: Fakes, script: list[tuple[str, bytes]],
                                              init_mode: bool) -> None:
    """Any methods in any order on one agent (a sandbox, containers created and
    removed, then used)."""
    _run_script(fakes, script, init_mode)


# -- inputs that broke a handler once (each was a finding of this fuzzer) ----------------

def _spec(**extra: Any) -> bytes:
    return json.dumps({"process": {"args": ["true"]}, "root": {"path": "/"}, **extra}).encode()


# Inputs this fuzzer found that crashed a handler (all fixed): regression tests.
FOUND: list[tuple[str, Any]] = [
    ("CopyFile", pb.CopyFileRequest(path="/x\x00y")),
    ("CopyFile", pb.CopyFileRequest(path="/x", dir_mode=2**32 - 1)),
    ("CreateContainer", pb.CreateContainerRequest(container_id="n1",
                                                  oci_spec_json=b"[" * 50_000)),
    ("ExecProcess", pb.ExecProcessRequest(container_id="c1", exec_id="x",
                                          process_json=b'{"a":' * 50_000)),
    ("UpdateContainer", pb.UpdateContainerRequest(container_id="c1",
                                                  resources_json=b"[" * 50_000)),
    ("TtyWinResize", pb.TtyWinResizeRequest(container_id="c1", row=70_000, column=5)),
    ("CreateSandbox", pb.CreateSandboxRequest(storages=[pb.Storage(
        driver="local", mount_point="/m", options=["mode=xyz"])])),
    ("CreateContainer", pb.CreateContainerRequest(container_id="n2", oci_spec_json=_spec(
        linux={"namespaces": [{"type": ["x"], "path": "pykata:sandbox"}]}))),
    ("CreateContainer", pb.CreateContainerRequest(container_id="n3", oci_spec_json=_spec(
        linux={"namespaces": 5}))),
    ("CreateContainer", pb.CreateContainerRequest(container_id="n4", oci_spec_json=_spec(
        linux={"sysctl": {"net.x": 1}, "namespaces": [5, {"type": "pid"}]}))),
    ("UpdateInterface", pb.UpdateInterfaceRequest(interface=pb.Interface(
        hw_addr=MACS[0], ip_addresses=[pb.IPAddress(address="10.0.0.1", mask="x")]))),
    ("AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=[pb.ARPNeighbor(
        to_ip_address=pb.IPAddress(address="1.2.3"), ll_addr="zz")])),
    ("AddARPNeighbors", pb.AddARPNeighborsRequest(neighbors=[pb.ARPNeighbor(
        to_ip_address=pb.IPAddress(address="10.0.0.9"), ll_addr="02:00:00:00:00:09",
        device="x" * 40)])),
]


def _params() -> list[Any]:
    out = []
    for i, (name, req) in enumerate(FOUND):
        for mode in (True, False):
            out.append(pytest.param(name, req, mode, id=f"{i}-{name}-{'vm' if mode else 'dev'}"))
    return out


@pytest.mark.parametrize(("name", "request_", "init_mode"), _params())
def test_found_inputs_get_clear_errors(fakes: Fakes, name: str, request_: Any,
                                       init_mode: bool) -> None:
    """Each input gets a clear error, never an exception escaping (UNKNOWN)."""
    root = Path(tempfile.mkdtemp(dir=fakes.root))
    svc = make_agent(root, init_mode)
    try:
        [(_, resp)] = support.run(lambda: _serve(svc, [(name, request_.SerializeToString())]))
    finally:
        _close(svc)
        shutil.rmtree(root, ignore_errors=True)
    assert resp.status.code != st_codes.UNKNOWN, resp.status.message
    _check(name, resp)
