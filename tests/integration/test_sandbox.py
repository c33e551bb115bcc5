"""Issue 2 acceptance: a real VM from the built image, containers from OCI
bundles inside it, exit codes, exec, stdin, memory limits, clean errors."""

from __future__ import annotations

import asyncio
import platform
import uuid
from pathlib import Path
from typing import Any

import pytest

from pykata import config, errors
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, leftovers, make_bundle, read_all

pytestmark = pytest.mark.asyncio(loop_scope="module")


def bundle(tmp_path: Path, rootfs: Path, args: list[str], **kw: Any) -> Path:
    return make_bundle(tmp_path / f"b-{uuid.uuid4().hex[:6]}", rootfs, default_spec(args, **kw))


async def run(sb: Sandbox, tmp_path: Path, rootfs: Path, args: list[str],
              **kw: Any) -> tuple[bytes, bytes, int, bool]:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    c = await sb.create_container(cid, bundle(tmp_path, rootfs, args, **kw))
    await c.start()
    out, err = await asyncio.gather(read_all(c.init.read_stdout), read_all(c.init.read_stderr))
    status = await asyncio.wait_for(c.wait(), 60)
    await c.delete()
    return out, err, status.code, status.oom_killed


async def test_guest_kernel_hostname_and_exit_code(sandbox: Sandbox, tmp_path: Path,
                                                  rootfs: Path) -> None:
    out, err, code, _ = await run(
        sandbox, tmp_path, rootfs,
        ["sh", "-c", "cat /proc/version; hostname; echo oops >&2; exit 7"],
        hostname="guesthost")
    lines = out.decode().splitlines()
    assert lines[0].startswith("Linux version ")
    assert platform.release() not in lines[0], "the container saw the host kernel"
    assert "cloud-amd64" in lines[0]
    assert lines[1] == "guesthost"
    assert err == b"oops\n"
    assert code == 7


async def test_exec_in_running_container(sandbox: Sandbox, tmp_path: Path,
                                         rootfs: Path) -> None:
    # PID 1 of a pid namespace ignores signals it has no handler for: trap TERM.
    init = ["sh", "-c", "trap 'exit 143' TERM; sleep 600 & wait"]
    c = await sandbox.create_container("execme", bundle(tmp_path, rootfs, init))
    await c.start()
    p = await c.exec("e1", {"args": ["sh", "-c", "echo from-exec; hostname; exit 3"],
                            "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
    out = await read_all(p.read_stdout)
    assert (await asyncio.wait_for(p.wait(), 60)).code == 3
    assert out.decode().splitlines()[0] == "from-exec"
    with pytest.raises(errors.AlreadyExists):
        await c.exec("e1", {"args": ["true"], "cwd": "/"})
    with pytest.raises(errors.FailedPrecondition, match="running"):
        await c.delete()
    await c.kill(15)
    status = await asyncio.wait_for(c.wait(), 60)
    assert status.code == 128 + 15
    with pytest.raises(errors.FailedPrecondition):
        await c.exec("e2", {"args": ["true"], "cwd": "/"})
    await c.delete()
    with pytest.raises(errors.NotFound):
        sandbox.container("execme")


async def test_stdin_reaches_cat(sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    c = await sandbox.create_container("catme", bundle(tmp_path, rootfs, ["cat"]))
    await c.start()
    await c.init.write_stdin(b"hello through virtio\n")
    await c.init.close_stdin()
    out = await read_all(c.init.read_stdout)
    assert out == b"hello through virtio\n"
    assert (await asyncio.wait_for(c.wait(), 60)).code == 0
    await c.delete()


async def test_memory_limit_enforced_in_guest(sandbox: Sandbox, tmp_path: Path,
                                              rootfs: Path) -> None:
    # 64 MiB limit; the init process becomes `tail`, which keeps the whole
    # newline-free stream from /dev/zero in memory until the OOM killer stops it.
    script = "cat /sys/fs/cgroup/memory.max; exec tail /dev/zero"
    spec_kw: dict[str, Any] = {"memory_limit": 64 << 20}
    out, _, code, oom = await run(sandbox, tmp_path, rootfs, ["sh", "-c", script], **spec_kw)
    assert out.decode().splitlines()[0] == str(64 << 20)
    assert code == 137
    assert oom is True


async def test_invalid_spec_is_a_clear_error_and_leaves_nothing(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    b = bundle(tmp_path, rootfs, ["true"])
    spec = default_spec([])
    (b / "config.json").write_text(__import__("json").dumps(spec))
    with pytest.raises(errors.InvalidArgument, match="process.args"):
        await sandbox.create_container("bad1", b)
    (b / "config.json").write_text("{not json")
    with pytest.raises(errors.InvalidArgument, match="config.json"):
        await sandbox.create_container("bad2", b)
    with pytest.raises(errors.InvalidArgument, match="invalid container id"):
        await sandbox.create_container("../x", b)
    assert "bad1" not in sandbox.containers and "bad2" not in sandbox.containers
    assert not (sandbox.shared_dir / "bad1").exists()


async def test_missing_binary_in_container_fails_cleanly(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    b = bundle(tmp_path, rootfs, ["/no/such/binary"])
    with pytest.raises(errors.PykataError, match="/no/such/binary"):
        c = await sandbox.create_container("nobin", b)
        await c.start()
    if "nobin" in sandbox.containers:
        await sandbox.containers["nobin"].delete(force=True)
    assert not (sandbox.shared_dir / "nobin").exists()


@pytest.mark.parametrize("broken", ["kernel", "initrd", "qemu"])
async def test_missing_assets_name_the_cause_and_leave_nothing(
        pykata_config: config.Config, broken: str) -> None:
    import copy

    cfg = copy.deepcopy(pykata_config)
    if broken == "kernel":
        cfg.qemu.kernel = "/nonexistent/vmlinux"
        expect = r"guest kernel /nonexistent/vmlinux not found.*pykata image build"
    elif broken == "initrd":
        cfg.qemu.initrd = "/nonexistent/initrd.img"
        expect = r"guest initrd /nonexistent/initrd.img not found.*pykata image build"
    else:
        cfg.qemu.path = "/nonexistent/qemu-system-x86_64"
        expect = r"QEMU binary /nonexistent/qemu-system-x86_64 not found"
    sid = f"broken-{broken}"
    with pytest.raises(errors.NotFound, match=expect):
        await Sandbox.create(sid, cfg)
    assert leftovers(cfg.runtime.state_dir, sid) == []


async def test_vm_that_cannot_boot_reports_console(pykata_config: config.Config,
                                                    tmp_path: Path) -> None:
    import copy

    cfg = copy.deepcopy(pykata_config)
    bogus = tmp_path / "initrd.img"
    bogus.write_bytes(b"this is not an initrd")
    cfg.qemu.initrd = str(bogus)
    cfg.agent.dial_timeout = 20
    with pytest.raises(errors.PykataError) as ei:
        await Sandbox.create("noboot", cfg)
    assert isinstance(ei.value, errors.Unavailable | errors.DeadlineExceeded)
    assert leftovers(cfg.runtime.state_dir, "noboot") == []


async def test_bind_mounts_rw_and_ro(sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    host = tmp_path / "shared-data"
    host.mkdir()
    (host / "in.txt").write_text("from-host\n")
    spec = default_spec(["sh", "-c", "cat /rw/in.txt; echo from-guest > /rw/out.txt; "
                                     "echo x > /ro/y; echo ro-rc=$?"])
    spec["mounts"] += [
        {"destination": "/rw", "type": "bind", "source": str(host), "options": ["rbind", "rw"]},
        {"destination": "/ro", "type": "bind", "source": str(host), "options": ["rbind", "ro"]},
    ]
    b = make_bundle(tmp_path / "bind-bundle", rootfs, spec)
    c = await sandbox.create_container("binds", b)
    await c.start()
    out, err = await asyncio.gather(read_all(c.init.read_stdout), read_all(c.init.read_stderr))
    await asyncio.wait_for(c.wait(), 60)
    await c.delete()
    assert out.decode().splitlines() == ["from-host", "ro-rc=1"]
    assert b"Read-only file system" in err
    assert (host / "out.txt").read_text() == "from-guest\n"
    assert not (host / "y").exists()
    assert not (sandbox.shared_dir / "binds").exists()
