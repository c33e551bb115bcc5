"""Issue 5 (Kubernetes-style volumes): emptyDir lives in the guest and is shared by
the pod's containers (or on the host through virtio-fs when
disable_guest_empty_dir is set), a memory emptyDir and the pod's /dev/shm are
guest tmpfs of the host's size, tmpfs mounts get the size asked for, and files
of a host directory (ConfigMap-like) that change on the host are seen by the
container: the test measures how long that takes with the configured virtio-fs
cache mode."""

from __future__ import annotations

import asyncio
import copy
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.runtime.container import Container
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")
log = logging.getLogger(__name__)

POD_UID = "6f1c2a3b-0000-4000-8000-00000000beef"


def empty_dir(root: Path, name: str) -> Path:
    """A directory where the kubelet keeps a pod's emptyDir volume."""
    d = root / "kubelet/pods" / POD_UID / "volumes/kubernetes.io~empty-dir" / name
    d.mkdir(parents=True)
    return d


@pytest.fixture
def host_tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Mount a host tmpfs of a given size on a directory (unmounted afterwards)."""
    mounted: list[Path] = []

    def mount(d: Path, size: str) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       check=True)
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", str(d)], check=False)


def bind(dest: str, source: Path, *opts: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(source),
            "options": ["rbind", *opts]}


async def start(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str,
                *mounts: dict[str, Any]) -> Container:
    cid = f"v{uuid.uuid4().hex[:6]}"
    spec = default_spec(["sh", "-c", script])
    spec["mounts"] += list(mounts)
    c = await sb.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    await c.start()
    return c


async def finish(c: Container) -> tuple[str, str, int]:
    out, err = b"", b""
    try:
        async with asyncio.timeout(120):
            while chunk := await c.init.read_stdout():
                out += chunk
            while chunk := await c.init.read_stderr():
                err += chunk
        code = (await asyncio.wait_for(c.wait(), 60)).code
    finally:
        await c.delete(force=True)
    return out.decode(), err.decode(), code


async def run(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str,
              *mounts: dict[str, Any]) -> str:
    out, err, code = await finish(await start(sb, tmp_path, rootfs, script, *mounts))
    assert code == 0, (out, err)
    return out


def mount_line(out: str, target: str) -> list[str]:
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == target:
            return fields
    raise AssertionError(f"{target} not mounted in: {out}")


def df_kib(out: str, target: str) -> int:
    """Total KiB of ``target`` in `df -k` output."""
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[-1] == target:
            return int(fields[1])
    raise AssertionError(f"{target} not in df output: {out}")


async def test_empty_dir_is_guest_local_and_shared_by_the_pod(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    host = empty_dir(tmp_path, "cache")
    vol = bind("/cache", host, "rprivate", "rw")
    # The first container writes and keeps running; the second sees its file.
    a = await start(sandbox, tmp_path, rootfs,
                    "echo from-a > /cache/a.txt; echo ready; trap 'exit 0' TERM;"
                    " sleep 600 & wait", vol)
    first = await asyncio.wait_for(a.init.read_stdout(), 60)
    assert first == b"ready\n"
    out = await run(sandbox, tmp_path, rootfs,
                    "cat /cache/a.txt; echo from-b > /cache/b.txt; cat /proc/mounts", vol)
    assert out.splitlines()[0] == "from-a"
    fstype = mount_line(out, "/cache")[2]
    assert fstype != "virtiofs", out
    await a.kill(15)
    await finish(a)
    # Not on the host: the volume lives in the guest, for the pod's lifetime.
    assert list(host.iterdir()) == []
    out = await run(sandbox, tmp_path, rootfs, "ls /cache", vol)
    assert out.split() == ["a.txt", "b.txt"]


async def test_empty_dir_shared_from_host_when_guest_empty_dir_disabled(
        pykata_config: config.Config, tmp_path: Path, rootfs: Path) -> None:
    cfg = copy.deepcopy(pykata_config)
    cfg.runtime.disable_guest_empty_dir = True
    host = empty_dir(tmp_path, "shared")
    sb = await Sandbox.create(f"ed-{uuid.uuid4().hex[:6]}", cfg)
    try:
        out = await run(sb, tmp_path, rootfs, "echo via-virtiofs > /vol/f; cat /proc/mounts",
                        bind("/vol", host, "rw"))
    finally:
        await sb.stop()
    assert mount_line(out, "/vol")[2] == "virtiofs"
    assert (host / "f").read_text() == "via-virtiofs\n"


async def test_memory_empty_dir_is_a_guest_tmpfs_of_the_host_size(
        sandbox: Sandbox, tmp_path: Path, rootfs: Path, host_tmpfs: Any) -> None:
    host = host_tmpfs(empty_dir(tmp_path, "mem"), "24m")
    out = await run(sandbox, tmp_path, rootfs,
                    "echo in-memory > /mem/f; df -k /mem; cat /proc/mounts",
                    bind("/mem", host, "rw"))
    assert mount_line(out, "/mem")[2] == "tmpfs"
    assert df_kib(out, "/mem") == 24 * 1024
    assert list(host.iterdir()) == []  # the guest's tmpfs, not the host's


async def test_tmpfs_mount_size_is_honoured(sandbox: Sandbox, tmp_path: Path,
                                            rootfs: Path) -> None:
    tmp = {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
           "options": ["nosuid", "nodev", "size=12m", "mode=1777"]}
    out = await run(sandbox, tmp_path, rootfs,
                    "df -k /scratch; dd if=/dev/zero of=/scratch/big bs=1M count=20"
                    " 2>/dev/null; echo rc=$?", tmp)
    assert df_kib(out, "/scratch") == 12 * 1024
    assert "rc=1" in out.splitlines()  # 20 MiB do not fit in 12 MiB


async def test_dev_shm_size(sandbox: Sandbox, tmp_path: Path, rootfs: Path,
                            host_tmpfs: Any) -> None:
    # As a tmpfs mount in the spec (runc-style specs, podman)...
    cid = f"shm{uuid.uuid4().hex[:4]}"
    spec = default_spec(["sh", "-c", "df -k /dev/shm; cat /proc/mounts"])
    for m in spec["mounts"]:
        if m["destination"] == "/dev/shm":
            m["options"] = [o for o in m["options"] if not o.startswith("size=")] + ["size=20m"]
    c = await sandbox.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    await c.start()
    out, err, code = await finish(c)
    assert code == 0, err
    assert df_kib(out, "/dev/shm") == 20 * 1024
    # ...and as a bind of the pod's host tmpfs (containerd's CRI sandbox shm).
    shm = tmp_path / "sandboxes/abc/shm"
    shm.mkdir(parents=True)
    host_tmpfs(shm, "40m")
    spec = default_spec(["sh", "-c", "echo x > /dev/shm/seg; df -k /dev/shm; cat /proc/mounts"])
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] != "/dev/shm"]
    spec["mounts"].append(bind("/dev/shm", shm, "nosuid", "nodev", "noexec"))
    cid = f"shm{uuid.uuid4().hex[:4]}"
    c = await sandbox.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    await c.start()
    out, err, code = await finish(c)
    assert code == 0, err
    assert df_kib(out, "/dev/shm") == 40 * 1024
    assert mount_line(out, "/dev/shm")[2] == "tmpfs"
    assert list(shm.iterdir()) == []


async def _seen_after(c: Container, expected: str, changed_at: float,
                      limit: float = 60.0) -> float:
    """Read the container's output until a line equals ``expected``; seconds since
    ``changed_at`` (bounded by ``limit``)."""
    buf = b""
    async with asyncio.timeout(limit):
        while True:
            chunk = await c.init.read_stdout()
            if not chunk:
                raise AssertionError(f"container ended before it saw {expected!r}: {buf!r}")
            buf += chunk
            if expected in buf.decode().splitlines():
                return time.monotonic() - changed_at


async def test_configmap_like_files_follow_the_host(sandbox: Sandbox, tmp_path: Path,
                                                    rootfs: Path) -> None:
    """A host directory mounted ro, laid out as the kubelet lays out a ConfigMap
    (``key -> ..data/key``, ``..data -> ..<timestamp>``): an in-place write and an
    atomic ``..data`` swap on the host both reach the container."""
    cm = tmp_path / "configmap"
    (cm / "..v1").mkdir(parents=True)
    (cm / "..v1" / "key").write_text("v1")
    (cm / "..data").symlink_to("..v1")
    (cm / "key").symlink_to("..data/key")
    # Print the value whenever it changes; at most 1200 polls of 0.05 s.
    script = ("last=; i=0; while [ $i -lt 1200 ]; do v=$(cat /etc/cfg/key);"
              " if [ \"$v\" != \"$last\" ]; then echo \"$v\"; last=$v; fi;"
              " [ \"$v\" = v3 ] && exit 0; i=$((i+1)); sleep 0.05; done; exit 1")
    c = await start(sandbox, tmp_path, rootfs, script, bind("/etc/cfg", cm, "ro"))
    try:
        await _seen_after(c, "v1", time.monotonic())
        await asyncio.sleep(2.0)  # let the guest cache the first value
        # 1. In place (same inode), as an editor or `kubectl cp` would.
        (cm / "..v1" / "key").write_text("v2")
        in_place = await _seen_after(c, "v2", time.monotonic())
        await asyncio.sleep(2.0)
        # 2. The kubelet's atomic update: a new directory, then rename ..data over.
        (cm / "..v3").mkdir()
        (cm / "..v3" / "key").write_text("v3")
        (cm / "..data_tmp").symlink_to("..v3")
        started = time.monotonic()
        (cm / "..data_tmp").rename(cm / "..data")
        swapped = await _seen_after(c, "v3", started)
    finally:
        await c.delete(force=True)
    cache = sandbox.config.qemu.virtio_fs_cache
    print(f"\nvirtio-fs cache={cache}: in-place change seen after {in_place:.2f}s,"
          f" ..data swap after {swapped:.2f}s")
    log.warning("virtio-fs cache=%s: in-place %.2fs, ..data swap %.2fs", cache, in_place,
                swapped)
