"""The VM cache on real QEMU: a real `pykata factory serve` (N=1) hands a
booted VM to a sandbox created through the real Sandbox.create, which runs a
container in it; the cache refills; with the server gone the next sandbox boots
cold; SIGTERM stops every cached VM and leaves no socket, state or process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.vmcache import CACHE_SUBDIR, query_status
from pykata.testing import default_spec, leftovers, make_bundle, read_all
from pykata.utils.process import start_time

BOOT_WAIT = 120.0  # seconds for the server to have its VM booted (TCG, shared cores)


def _alive(pid: int) -> bool:
    return start_time(pid) is not None


def _status(endpoint: Path) -> dict[str, Any]:
    return query_status(endpoint)


def _wait_idle(endpoint: Path, n: int, proc: subprocess.Popen[bytes],
               timeout: float = BOOT_WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the cache server exited"
        try:
            st = _status(endpoint)
            if len(st["vms"]) >= n:
                return st
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the VM cache did not reach {n} idle VM(s) in {timeout:g}s")


@pytest.fixture
def cache_config(pykata_config: config.Config, tmp_path: Path) -> Iterator[tuple[
        config.Config, Path]]:
    cfg = dataclasses.replace(pykata_config)
    cfg.factory = dataclasses.replace(pykata_config.factory, vm_cache_number=1,
                                      enable_template=False)
    state = Path(cfg.runtime.state_dir)
    cfg.factory.vm_cache_endpoint = str(state / "vmcache.sock")
    path = tmp_path / "configuration.toml"
    path.write_text(config.to_toml(cfg))
    yield cfg, path


def _serve(path: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pykata.cli.admin", "--config", str(path),
                             "factory", "serve", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


async def _echo(sb: Sandbox, tmp_path: Path, rootfs: Path, text: str) -> bytes:
    b = make_bundle(tmp_path / f"b-{uuid.uuid4().hex[:6]}", rootfs,
                    default_spec(["sh", "-c", f"echo {text}; ls /proc/1 >/dev/null"]))
    c = await sb.create_container(f"c{uuid.uuid4().hex[:6]}", b)
    await c.start()
    out = await read_all(c.init.read_stdout)
    status = await c.wait()
    assert status.code == 0
    await c.delete()
    return out


async def test_sandbox_takes_a_cached_vm_and_the_cache_refills(
        cache_config: tuple[config.Config, Path], tmp_path: Path, rootfs: Path) -> None:
    cfg, path = cache_config
    endpoint = Path(cfg.factory.vm_cache_endpoint)
    proc = _serve(path)
    handed_pid = 0
    log = ""
    try:
        st = await asyncio.to_thread(_wait_idle, endpoint, 1, proc)
        sock = os.lstat(endpoint)
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
        cached_pid = st["vms"][0]["pid"]
        assert st["vms"][0]["memory"]["pss_bytes"] > 0
        out = (await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pykata.cli.admin", "--config", str(path),
                             "factory", "status", "--json"], capture_output=True, text=True,
            check=True)).stdout
        assert json.loads(out)["vm_cache"]["server"]["vms"][0]["pid"] == cached_pid

        sb = await Sandbox.create(f"vc-{uuid.uuid4().hex[:6]}", cfg)
        try:
            assert sb.vm is not None and sb.vm.pid == cached_pid  # handed over, not booted
            assert sb.record.extra.get("vm_cache")
            sb.vm.portfwd_channel()  # the port-forward channel came with the VM
            handed_pid = cached_pid
            assert (await _echo(sb, tmp_path, rootfs, "from-the-cache")).strip() == \
                b"from-the-cache"
            assert (sb.dir / "console.log").is_file()  # its own console log from now on
            # The cache refills in the background with a new VM.
            st = await asyncio.to_thread(_wait_idle, endpoint, 1, proc)
            assert st["vms"][0]["pid"] != cached_pid and st["handed"] == 1
        finally:
            await sb.stop()
        assert not _alive(handed_pid)
        assert not leftovers(cfg.runtime.state_dir, sb.id)
        refilled = _status(endpoint)["vms"][0]["pid"]
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    # SIGTERM stopped the cached VM and left nothing.
    assert not _alive(refilled), log
    assert not os.path.lexists(endpoint)
    assert not (Path(cfg.runtime.state_dir) / CACHE_SUBDIR).exists()
    assert not leftovers(cfg.runtime.state_dir)

    # With the server gone, the next sandbox boots cold (and says why at info).
    sb = await Sandbox.create(f"vc-{uuid.uuid4().hex[:6]}", cfg)
    try:
        assert "vm_cache" not in sb.record.extra
        assert (await _echo(sb, tmp_path, rootfs, "cold")).strip() == b"cold"
    finally:
        await sb.stop()
    assert not leftovers(cfg.runtime.state_dir)


async def test_killed_server_falls_back_and_a_handed_vm_survives(
        cache_config: tuple[config.Config, Path], tmp_path: Path, rootfs: Path) -> None:
    """A sandbox keeps its VM when the server stops; a server killed with
    SIGKILL leaves a stale socket: the next sandbox boots cold, the next
    server replaces the socket."""
    cfg, path = cache_config
    endpoint = Path(cfg.factory.vm_cache_endpoint)
    proc = _serve(path, "--refill-delay", "3600")  # no replacement during this test
    try:
        await asyncio.to_thread(_wait_idle, endpoint, 1, proc)
        sb = await Sandbox.create(f"vc-{uuid.uuid4().hex[:6]}", cfg)
        try:
            assert sb.record.extra.get("vm_cache")
            pid = sb.vm.pid if sb.vm else 0
            _stop(proc)  # SIGTERM: cached VMs stop, handed ones are the sandboxes'
            assert _alive(pid)
            assert (await _echo(sb, tmp_path, rootfs, "still-here")).strip() == b"still-here"
        finally:
            await sb.stop()
        assert not _alive(pid)
    finally:
        _stop(proc)
    # SIGKILL: the socket stays behind; nothing answers it.
    proc = _serve(path)
    try:
        await asyncio.to_thread(_wait_idle, endpoint, 1, proc)
        cached = _status(endpoint)["vms"][0]["pid"]
        proc.kill()
        proc.wait(timeout=30)
        os.kill(cached, signal.SIGKILL)  # what the dead server can no longer stop
        assert os.path.lexists(endpoint)
        sb = await Sandbox.create(f"vc-{uuid.uuid4().hex[:6]}", cfg)
        try:
            assert "vm_cache" not in sb.record.extra
        finally:
            await sb.stop()
    finally:
        _stop(proc)
    proc = _serve(path)  # replaces the stale socket
    try:
        await asyncio.to_thread(_wait_idle, endpoint, 1, proc, 240.0)
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    assert not os.path.lexists(endpoint)
    assert not leftovers(cfg.runtime.state_dir)
