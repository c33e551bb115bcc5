"""The VM cache without a VM: its protocol, bounds, socket safety, peer-cred
refusal, the ack-before-release handover (a fake exportable VM), and the
sandbox's fallback decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pykata import errors
from pykata.config import Config
from pykata.hypervisor.base import AgentChannel
from pykata.hypervisor.handoff import ExportableVM, Handoff
from pykata.runtime import vmcache
from pykata.runtime.sandbox import Sandbox
from pykata.testing.fakes import FakeAgent, fake_config, fake_parts

KEY = "0123abcd"


# -- protocol -------------------------------------------------------------------------------
def test_request_round_trip_and_bounds() -> None:
    line = vmcache.encode_request({"op": "take", "key": KEY, "who": "ns@pod"})
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert vmcache.decode_request(line[:-1]) == {"op": "take", "key": KEY, "who": "ns@pod"}
    with pytest.raises(errors.InvalidArgument, match="at most"):
        vmcache.encode_request({"op": "take", "key": KEY, "who": "x" * 5000})
    with pytest.raises(errors.InvalidArgument, match="longer than"):
        vmcache.decode_request(b"{" + b" " * vmcache.MAX_REQUEST + b"}")


@pytest.mark.parametrize(("line", "message"), [
    (b"not json", "not JSON"),
    (b"[1]", "unknown request"),
    (b'{"op": "shutdown"}', "unknown request"),
    (b'{"op": "take"}', "hex digest"),
    (b'{"op": "take", "key": "../x"}', "hex digest"),
    (b'{"op": "take", "key": "ab", "who": 7}', "short string"),
])
def test_bad_requests_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        vmcache.decode_request(line)


def test_reply_framing_and_bounds() -> None:
    data = vmcache.encode_reply({"ok": False, "reason": "empty"})
    n = vmcache.reply_length(data[:4])
    assert vmcache.decode_reply(data[4:4 + n]) == {"ok": False, "reason": "empty"}
    with pytest.raises(errors.InvalidArgument, match="announced"):
        vmcache.reply_length((vmcache.MAX_REPLY + 1).to_bytes(4, "big"))
    with pytest.raises(errors.InvalidArgument, match="at most"):
        vmcache.encode_reply({"ok": True, "x": "y" * vmcache.MAX_REPLY})
    with pytest.raises(errors.InvalidArgument, match="without ok"):
        vmcache.decode_reply(b'{"vm": {}}')


def _open_fds() -> list[int]:
    return [int(p.name) for p in Path("/proc/self/fd").iterdir()]


def test_fds_travel_with_the_reply_and_extra_fds_are_refused() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        vmcache.send_reply(a, {"ok": True, "vm": {}}, [r, w])
        reply, fds = vmcache.recv_reply(b, 4)
        assert reply["ok"] and len(fds) == 2
        assert os.get_inheritable(fds[0]) is False  # close-on-exec
        for fd in fds:
            os.close(fd)
        before = len(_open_fds())
        vmcache.send_reply(a, {"ok": True}, [r, w])
        with pytest.raises(errors.InvalidArgument, match="more fds"):
            vmcache.recv_reply(b, 0)  # none expected: what came is closed
        assert len(_open_fds()) == before
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_handoff_names_must_match_the_fds() -> None:
    r, w = os.pipe()
    before = len(_open_fds())
    with pytest.raises(errors.InvalidArgument):
        Handoff.received({}, ["qmp", "bogus"], [r, w])
    assert len(_open_fds()) == before - 2  # both closed
    r, w = os.pipe()
    with pytest.raises(errors.InvalidArgument):
        Handoff.received({}, ["console", "qmp"], [r, w])  # out of order
    r, w = os.pipe()
    h = Handoff.received({"pid": 1}, ["qmp", "console"], [r, w])
    assert h.names() == ["qmp", "console"] and h.take("qmp") == r
    os.close(r)
    h.close()
    assert h.fds == {}


# -- the socket -----------------------------------------------------------------------------
def test_bind_endpoint_is_private_and_refuses_what_is_not_ours(tmp_path: Path) -> None:
    d = tmp_path / "run"
    path = d / "cache.sock"
    sock = vmcache.bind_endpoint(path)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
        with pytest.raises(errors.AlreadyExists):
            vmcache.bind_endpoint(path)  # a live server answers there
    finally:
        sock.close()
    vmcache.bind_endpoint(path).close()  # a stale socket of ours is replaced
    os.unlink(path)
    path.symlink_to("/etc/passwd")
    with pytest.raises(errors.FailedPrecondition, match="not a socket of ours"):
        vmcache.bind_endpoint(path)
    assert path.is_symlink()  # refused, not removed
    path.unlink()
    path.write_text("")
    with pytest.raises(errors.FailedPrecondition, match="not a socket of ours"):
        vmcache.bind_endpoint(path)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(errors.FailedPrecondition, match="writable"):
        vmcache.bind_endpoint(open_dir / "cache.sock")


# -- the server, with a fake VM -------------------------------------------------------------
class FakeExportable(ExportableVM):
    name = "fake"

    def __init__(self) -> None:
        super().__init__(spec=None)  # type: ignore[arg-type]
        self.events: list[str] = []

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None:
        self.events.append("stop")

    async def wait(self) -> int:
        await asyncio.Event().wait()
        return 0

    @property
    def pid(self) -> int | None:
        return None

    def agent_channel(self) -> AgentChannel:
        raise NotImplementedError

    async def export(self) -> Handoff:
        r, w = os.pipe()
        self.events.append("export")
        return Handoff({"pid": 1, "channel": "serial"}, {"console": r, "output": w})

    async def release(self) -> None:
        self.events.append("release")


def _config(tmp_path: Path) -> Config:
    cfg = fake_config(tmp_path / "state")
    cfg.factory.vm_cache_number = 1
    cfg.factory.vm_cache_endpoint = str(tmp_path / "run" / "cache.sock")
    return cfg


@contextlib.asynccontextmanager
async def serving(server: vmcache.CacheServer) -> AsyncIterator[vmcache.CacheServer]:
    stop = asyncio.Event()
    up = asyncio.Event()
    task = asyncio.ensure_future(server.run(stop, up.set))
    await asyncio.wait_for(up.wait(), 5)
    try:
        yield server
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _slot(server: vmcache.CacheServer, vm: FakeExportable) -> vmcache.Slot:
    run = server.dir / "vm-1"
    run.mkdir()
    slot = vmcache.Slot("vm-1", vm, KEY, "cold", run)
    server.ready.append(slot)
    return slot


async def test_a_vm_is_released_only_after_the_taker_confirms(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = vmcache.CacheServer(cfg, number=0)
    async with serving(server):
        vm = FakeExportable()
        _slot(server, vm)
        ep = Path(cfg.factory.vm_cache_endpoint)
        with pytest.raises(errors.Unavailable, match="none: shape differs"):
            await asyncio.to_thread(vmcache._take, ep, "ffff", "pod")
        taken = await asyncio.to_thread(vmcache._take, ep, KEY, "pod")
        assert taken.name == "vm-1" and sorted(taken.handoff.fds) == ["console", "output"]
        assert vm.events == ["export"]  # not released yet
        await taken.accept()
        taken.handoff.close()
        assert vm.events == ["export", "release"] and server.handed == 1
        assert not (server.dir / "vm-1").exists()
        with pytest.raises(errors.Unavailable, match="none: empty"):
            await asyncio.to_thread(vmcache._take, ep, KEY, "pod")

        vm2 = FakeExportable()
        _slot(server, vm2)
        taken = await asyncio.to_thread(vmcache._take, ep, KEY, "pod")
        taken.abort()  # the taker goes away without confirming: the server stops it
        for _ in range(100):
            if "stop" in vm2.events:
                break
            await asyncio.sleep(0.02)
        assert vm2.events == ["export", "stop"] and server.handed == 1
        status = await asyncio.to_thread(vmcache.query_status, ep)
        assert status["vms"] == [] and status["number"] == 0
    assert not ep.exists() and not server.dir.exists()  # stopped: nothing left


async def test_other_uids_are_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = vmcache.CacheServer(cfg, number=0, allowed_uids=(12345,))
    async with serving(server):
        vm = FakeExportable()
        _slot(server, vm)
        with pytest.raises(errors.Unavailable, match="refused"):
            await asyncio.to_thread(vmcache.query_status, Path(cfg.factory.vm_cache_endpoint))
        with pytest.raises(errors.Unavailable, match="refused"):
            await asyncio.to_thread(vmcache._take, Path(cfg.factory.vm_cache_endpoint),
                                    KEY, "pod")
        assert vm.events == [] and server.refused == 2


async def test_garbage_and_oversized_requests_get_an_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server = vmcache.CacheServer(cfg, number=0)
    async with serving(server):
        for payload in (b"hello\n", b"x" * (vmcache.MAX_REQUEST + 10)):
            sock = vmcache.connect(Path(cfg.factory.vm_cache_endpoint))
            try:
                sock.sendall(payload)
                reply, _ = await asyncio.to_thread(vmcache.recv_reply, sock)
            finally:
                sock.close()
            assert reply["ok"] is False


# -- fallback decisions ---------------------------------------------------------------------
async def test_sandbox_boots_cold_without_a_server(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path)
    caplog.set_level(logging.INFO, "pykata.runtime.vmcache")
    sb = await Sandbox.create("pod", cfg, parts=fake_parts(FakeAgent()))
    try:
        assert "vm_cache" not in sb.record.extra
        assert "boots without the VM cache: no VM cache at" in caplog.text
    finally:
        await sb.stop()


async def test_sandbox_boots_cold_when_the_cache_is_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path)
    caplog.set_level(logging.INFO, "pykata.runtime.vmcache")
    async with serving(vmcache.CacheServer(cfg, number=0)):
        sb = await Sandbox.create("pod", cfg, parts=fake_parts(FakeAgent()))
        await sb.stop()
    assert "vm_cache" not in sb.record.extra
    assert caplog.text.count("boots without the VM cache") == 1


async def test_cache_off_never_connects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    cfg.factory.vm_cache_number = 0

    async def boom(*a: object) -> None:
        raise AssertionError("the cache was asked")

    monkeypatch.setattr(vmcache, "take", boom)
    sb = await Sandbox.create("pod", cfg, parts=fake_parts(FakeAgent()))
    await sb.stop()


def test_memory_of_a_process_and_its_ram_file(tmp_path: Path) -> None:
    import mmap

    f = tmp_path / "ram"
    with open(f, "wb") as out:
        out.truncate(8 << 20)
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 8 << 20)
        m[: 1 << 20] = b"x" * (1 << 20)  # 1 MiB mapped and touched
        with open(f, "r+b") as again:  # 2 MiB more written, never mapped
            again.seek(4 << 20)
            again.write(b"y" * (2 << 20))
        mem = vmcache.vm_memory(os.getpid(), str(f))
        m.close()
    assert mem["pss_bytes"] > 0 and mem["ram_file_bytes"] >= 3 << 20
    assert 2 << 20 <= mem["ram_file_unmapped_bytes"] <= 3 << 20
    assert mem["total_bytes"] == mem["pss_bytes"] + mem["ram_file_unmapped_bytes"]
    assert vmcache.vm_memory(2**22 + 12345)["pss_bytes"] == 0  # no such process
