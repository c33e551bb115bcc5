"""Storage: sequential write and read throughput with busybox `dd` (1 MiB
blocks), side by side:

- host: `dd` on a directory of the host's disk (/var/tmp);
- virtio-fs: the same kind of host directory bind-mounted into a container of
  a pykata sandbox (virtiofsd, cache=auto);
- virtio-blk: an ext4 image on a host loop device (direct I/O) given to the
  container as a spec volume (`"type": "ext4", "source": "/dev/loopN"`): the
  runtime hot-plugs it as virtio-blk and the agent mounts it (if that path
  fails, the disk is hot-plugged at driver level with `vm.hotplug_block` and
  mounted by the privileged container; the JSON says which path ran).

Writes end with `conv=fsync`. Before each read the page caches are dropped:
the guest's (`echo 3 > /proc/sys/vm/drop_caches`) and the host's for the file
(`dd iflag=nocache count=0`) or the loop device (`blockdev --flushbufs`).
Inside the guest the time is busybox `time` (10 ms resolution) around `dd`.
"""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
    Series,
    arg_parser,
    log,
    private_sandbox,
    run_section,
    runs,
    save_series,
    sigterm_as_interrupt,
)

from pykata.runtime.sandbox import Sandbox
from pykata.testing import busybox_rootfs, default_spec, make_bundle

TIME_RE = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")
# The hot-plugged disk: wait (bounded) until the guest has probed it, make its node, mount.
FIND_VD = ("for i in $(seq 100); do ls -d /sys/block/vd* >/dev/null 2>&1 && break; sleep 0.1; "
           "done; D=$(ls -d /sys/block/vd* | head -n1); M=$(cat $D/dev); "
           "mknod /dev/bench b ${M%:*} ${M#*:}; mkdir -p /mnt/b; mount -t ext4 /dev/bench /mnt/b")


def sh(*argv: str, timeout: float = 300) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=timeout).stdout


def guest_seconds(out: str) -> float:
    m = TIME_RE.search(out)
    if not m:
        raise RuntimeError(f"no timing in the guest's output: {out[-300:]!r}")
    return int(m.group(1)) * 60 + float(m.group(2))


def privileged(spec: dict[str, Any], binds: list[tuple[str, str]]) -> dict[str, Any]:
    """CAP_SYS_ADMIN (mount, drop_caches), all devices, writable /proc/sys."""
    spec = copy.deepcopy(spec)
    for caps in spec["process"]["capabilities"].values():
        caps.append("CAP_SYS_ADMIN")
    spec["linux"]["readonlyPaths"] = [p for p in spec["linux"]["readonlyPaths"]
                                      if p != "/proc/sys"]
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    for src, dst in binds:
        spec["mounts"].append({"destination": dst, "type": "bind", "source": src,
                               "options": ["rbind", "rw"]})
    return spec


class Guest:
    def __init__(self, sb: Sandbox, work: Path, rootfs: Path, binds: list[tuple[str, str]]):
        self.sb, self.work, self.rootfs, self.binds = sb, work, rootfs, binds
        self.n = 0

    async def run(self, script: str, timeout: float = 300,
                  mounts: list[dict[str, Any]] | None = None) -> str:
        """Run ``script`` in a new privileged container (with the extra spec
        ``mounts``); its stdout+stderr."""
        self.n += 1
        cid = f"s{self.n}"
        spec = privileged(default_spec(["sh", "-c", "exec 2>&1; " + script]), self.binds)
        spec["mounts"] += mounts or []
        c = await self.sb.create_container(cid, make_bundle(self.work / cid, self.rootfs, spec))
        try:
            await c.start()
            out = b""
            async with asyncio.timeout(timeout):
                while chunk := await c.init.read_stdout():
                    out += chunk
                status = await c.wait()
        finally:
            await c.delete(force=True)
            shutil.rmtree(self.work / cid, ignore_errors=True)
        text = out.decode(errors="replace")
        if status.code != 0:
            raise RuntimeError(f"guest script failed ({status}): {text[-400:]}")
        return text


def host_dd(path: Path, mib: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    sh("busybox", "dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync")
    w = time.perf_counter() - t0
    drop_file(path)
    t0 = time.perf_counter()
    sh("busybox", "dd", f"if={path}", "of=/dev/null", "bs=1M")
    r = time.perf_counter() - t0
    path.unlink()
    return w, r


def drop_file(path: Path) -> None:
    """Drop the host's page cache of one file (GNU dd: nocache + count=0)."""
    subprocess.run(["dd", f"if={path}", "iflag=nocache", "count=0"], capture_output=True,
                   check=False, timeout=60)


async def vfs_dd(g: Guest, host_dir: Path, mib: int) -> tuple[float, float]:
    out = await g.run(f"time dd if=/dev/zero of=/data/f bs=1M count={mib} conv=fsync")
    w = guest_seconds(out)
    await asyncio.to_thread(drop_file, host_dir / "f")
    out = await g.run("echo 3 > /proc/sys/vm/drop_caches; time dd if=/data/f of=/dev/null "
                      "bs=1M")
    r = guest_seconds(out)
    (host_dir / "f").unlink()
    return w, r


async def blk_dd_spec(g: Guest, loop: str, mib: int) -> tuple[float, float]:
    """The block device as a volume of the container spec (type ext4, source the
    loop device): the runtime hot-plugs it and the agent mounts it."""
    vol = [{"destination": "/blk", "type": "ext4", "source": loop, "options": ["rw"]}]
    out = await g.run(f"time dd if=/dev/zero of=/blk/f bs=1M count={mib} conv=fsync",
                      mounts=vol)
    w = guest_seconds(out)
    await asyncio.to_thread(sh, "blockdev", "--flushbufs", loop)
    out = await g.run("echo 3 > /proc/sys/vm/drop_caches && time dd if=/blk/f of=/dev/null "
                      "bs=1M; rm /blk/f", mounts=vol)
    return w, guest_seconds(out)


async def blk_dd(g: Guest, loop: str, mib: int) -> tuple[float, float]:
    """Driver level: ``vm.hotplug_block`` once, mounted by the privileged container."""
    out = await g.run(f"{FIND_VD} && time dd if=/dev/zero of=/mnt/b/f bs=1M count={mib} "
                      "conv=fsync; umount /mnt/b")
    w = guest_seconds(out)
    await asyncio.to_thread(sh, "blockdev", "--flushbufs", loop)
    out = await g.run(f"{FIND_VD} && echo 3 > /proc/sys/vm/drop_caches && time dd "
                      "if=/mnt/b/f of=/dev/null bs=1M; rm /mnt/b/f; umount /mnt/b")
    r = guest_seconds(out)
    return w, r


async def bench(n: int, mib: int) -> tuple[list[Series], dict[str, object]]:
    tag = uuid.uuid4().hex[:6]
    work = CACHE / f"storage-{tag}"
    host_dir, vfs_dir, img = work / "host", work / "vfs", work / "disk.img"
    for d in (host_dir, vfs_dir):
        d.mkdir(parents=True)
    loop = ""
    res: dict[str, tuple[list[float], list[float]]] = {}
    info: dict[str, object] = {"mib": mib}
    try:
        for k in ("host", "virtio-fs", "virtio-blk"):
            res[k] = ([], [])
        log(f"storage: host dd x{n}")
        for _ in range(n):
            w, r = await asyncio.to_thread(host_dd, host_dir / "f", mib)
            res["host"][0].append(w)
            res["host"][1].append(r)
        await asyncio.to_thread(sh, "truncate", "-s", f"{mib + 96}M", str(img))
        await asyncio.to_thread(sh, "mkfs.ext4", "-q", "-F", str(img))
        loop = (await asyncio.to_thread(sh, "losetup", "--direct-io=on", "-f", "--show",
                                        str(img))).strip()
        async with private_sandbox("sto") as sb:
            assert sb.vm is not None
            g = Guest(sb, work / "bundles", busybox_rootfs(CACHE / "busybox-rootfs"),
                      [(str(vfs_dir), "/data")])
            log(f"storage: virtio-fs dd x{n}")
            for _ in range(n):
                w, r = await vfs_dd(g, vfs_dir, mib)
                res["virtio-fs"][0].append(w)
                res["virtio-fs"][1].append(r)
            log(f"storage: virtio-blk (spec volume) dd x{n}")
            try:
                for _ in range(n):
                    w, r = await blk_dd_spec(g, loop, mib)
                    res["virtio-blk"][0].append(w)
                    res["virtio-blk"][1].append(r)
                info["virtio-blk-path"] = "spec volume (type ext4, source the loop device)"
            except Exception as exc:
                log(f"storage: the block volume path failed ({exc}); driver-level hot-plug")
                res["virtio-blk"] = ([], [])
                info["virtio-blk-path"] = f"driver-level hotplug_block (spec volume failed: {exc})"
                try:
                    await sb.vm.hotplug_block("bench0", Path(loop))
                except Exception as exc2:
                    info["virtio-blk"] = f"not measured: hot-plug failed: {exc2}"
                else:
                    for _ in range(n):
                        w, r = await blk_dd(g, loop, mib)
                        res["virtio-blk"][0].append(w)
                        res["virtio-blk"][1].append(r)
    finally:
        if loop:
            await asyncio.to_thread(subprocess.run, ["losetup", "-d", loop], check=False,
                                    timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    series: list[Series] = []
    cmds = {"host": "busybox dd on the host (/var/tmp)",
            "virtio-fs": "dd in a container, host dir bind-mounted (virtio-fs)",
            "virtio-blk": "dd in a container, ext4 volume on a loop device (virtio-blk)"}
    for k, (ws, rs) in res.items():
        note = str(info.get(k, "")) if not ws else ""
        series.append(Series(f"{k} write", f"{cmds[k]}: dd if=/dev/zero bs=1M count={mib} "
                             "conv=fsync", "MiB/s", [mib / x for x in ws if x > 0], note=note))
        series.append(Series(f"{k} read", f"{cmds[k]}: dd of=/dev/null bs=1M, caches dropped",
                             "MiB/s", [mib / x for x in rs if x > 0], note=note))
    return series, info


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--mib", type=int, default=0, help="MiB per dd (default 256)")
    args = ap.parse_args()
    sigterm_as_interrupt()
    n = runs(args, 3, 1)
    mib = args.mib or (32 if args.quick else 256)
    series, info = asyncio.run(bench(n, mib))
    save_series("storage", series, info=info)
    return 0


if __name__ == "__main__":
    run_section(main)
