"""Guest root side by side, bare QEMU (no pykata runtime), same kernel, same run:
the initrd against the read-only root image (erofs / ext4) on an NVDIMM or
virtio-pmem with DAX, and erofs on a read-only virtio-blk disk.

Each VM boots with the machine options of the QEMU driver (q35 with its
trimmed device set, the lean kernel command line, guest RAM from a shared memfd,
virtio-serial agent channel, virtio-balloon with free page reporting). Measured
per boot, from the host's clock at QEMU's start: the early init's "root mounted"
line (image modes), the agent's first log line ("python up"), its "serving"
line, and the first Health/Check answered over the channel; then the guest's
meminfo (agent GetMetrics) and QEMU's PSS (smaps_rollup). A second phase boots
two VMs of each mode at once and reads both PSS: the image pages are shared
through the host page cache, the initrd is each VM's own.

Build the image first (a separate output directory, not the suite's):
``pykata image build --output /var/lib/pykata-dax --rootfs both --image-fs erofs,ext4``.
Every QEMU gets a timeout and is killed at the end; traffic stays on a unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Series, arg_parser, log, pss_kib, rss_kib, run_section, runs, save_series

from pykata import config
from pykata.agent.client import AgentClient
from pykata.hypervisor.qemu.accel import probe
from pykata.image.cache import find_image
from pykata.ttrpc import Client

BOOT_TIMEOUT_S = 60.0
MEMORY_MIB = 512
MAXMEM = "4G"
SLOTS = 10
MODES = ("initrd", "erofs-nvdimm", "ext4-nvdimm", "erofs-virtio-pmem", "erofs-virtio-blk")

_UPTIME = re.compile(r"^\[\s*(\d+\.\d+)\]")


def mode_args(mode: str, images: dict[str, Path], early: Path | None, initrd: Path,
              data_offset: int) -> tuple[list[str], str, str]:
    """(QEMU arguments, machine option to add, kernel parameters) of a root mode."""
    if mode == "initrd":
        return ["-initrd", str(initrd)], "", ""
    fs, _, dev = mode.partition("-")
    img = images[fs]
    size = img.stat().st_size
    assert early is not None
    args = ["-initrd", str(early)]
    backend = (f"memory-backend-file,id=rootimg,mem-path={img},size={size},share=on,"
               "readonly=on")
    if dev == "nvdimm":
        return ([*args, "-object", backend,
                 "-device", "nvdimm,id=rootnv,memdev=rootimg,unarmed=on"],
                "nvdimm=on", f"root=/dev/pmem0 rootfstype={fs} rootflags=dax")
    if dev == "virtio-pmem":
        return ([*args, "-object", backend,
                 "-device", "virtio-pmem-pci,id=rootpmem,memdev=rootimg"],
                "", f"root=/dev/pmem0 rootfstype={fs} rootflags=dax")
    return ([*args, "-drive", f"if=none,id=rootdisk,file={img},format=raw,"
                              f"offset={data_offset},readonly=on",
             "-device", "virtio-blk-pci,drive=rootdisk"],
            "", f"root=/dev/vda rootfstype={fs}")


def qemu_argv(cfg: config.Config, accel: str, mode: str, sock: Path, images: dict[str, Path],
              early: Path | None, initrd: Path, data_offset: int) -> list[str]:
    q = cfg.qemu
    extra, mopt, kparams = mode_args(mode, images, early, initrd, data_offset)
    machine = ",".join(x for x in (q.machine_type, "memory-backend=pykata-mem",
                                   q.machine_options, mopt) if x)
    accel_opt = accel + (f",tb-size={q.tb_size}" if accel == "tcg" and q.tb_size else "")
    return [
        q.path, "-machine", machine, "-accel", accel_opt,
        "-cpu", "max" if accel == "tcg" else "host", "-smp", "1,maxcpus=2",
        "-m", f"{MEMORY_MIB}M,slots={SLOTS},maxmem={MAXMEM}",
        "-object", f"memory-backend-memfd,id=pykata-mem,size={MEMORY_MIB}M,share=on",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(cfg.kernel_path()), *extra,
        "-append", f"console=ttyS0 {config.LEAN_KERNEL_PARAMS} {kparams} "
                   "pykata.agent.log=debug".replace("  ", " "),
        "-serial", "stdio",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.channel.0",
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
    ]


@dataclass
class Boot:
    """One VM: its console read in a thread, the host time each marker appeared."""

    mode: str
    proc: subprocess.Popen[bytes]
    t0: float
    marks: dict[str, float] = field(default_factory=dict)  # host seconds since start
    uptime: dict[str, float] = field(default_factory=dict)  # guest uptime in the line
    lines: list[str] = field(default_factory=list)
    serving: threading.Event = field(default_factory=threading.Event)

    def read_console(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic() - self.t0
            line = raw.decode(errors="replace").rstrip()
            if len(self.lines) < 400:
                self.lines.append(line)
            m = _UPTIME.match(line)
            for key, needle in (("root", "pykata-early: root"), ("python", "python up"),
                                ("serving", " serving on ")):
                if needle in line and key not in self.marks:
                    self.marks[key] = now
                    if m:
                        self.uptime[key] = float(m.group(1))
            if "serving" in self.marks:
                self.serving.set()
        self.serving.set()  # QEMU ended: nobody waits forever

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start(argv: list[str], mode: str) -> Boot:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    b = Boot(mode, proc, t0)
    threading.Thread(target=b.read_console, daemon=True).start()
    return b


def parse_meminfo(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        m = re.match(r'pykata_guest_meminfo\{item="([^"]+)"\}\s+(\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def agent_check(sock: Path, b: Boot) -> dict[str, float]:
    """Connect, time the first answered Check (host seconds since QEMU started),
    then read the guest's meminfo."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    agent = AgentClient(Client(reader, writer), default_timeout=20.0)
    try:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                if await agent.check(timeout=2.0):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        b.marks["check"] = time.monotonic() - b.t0
        await asyncio.sleep(2.0)  # let free page reporting hand back what boot freed
        return parse_meminfo(await agent.metrics())
    finally:
        await agent.close()


def smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1])
    return out


def boot_once(argv: list[str], sock: Path, mode: str) -> tuple[Boot, dict[str, float],
                                                               dict[str, int]]:
    b = start(argv, mode)
    try:
        if not b.serving.wait(BOOT_TIMEOUT_S) or "serving" not in b.marks:
            raise RuntimeError(f"{mode}: no agent within {BOOT_TIMEOUT_S:.0f} s: "
                               + " | ".join(b.lines[-8:]))
        mem = asyncio.run(asyncio.wait_for(agent_check(sock, b), 40.0))
        return b, mem, smaps(b.proc.pid)
    finally:
        b.stop()


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--image-dir", default="/var/lib/pykata-dax",
                    help="an image built with --rootfs both --image-fs erofs,ext4")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--no-pairs", action="store_true", help="skip the two-VMs-at-once phase")
    args = ap.parse_args()
    n = min(runs(args, 5, 2), 20)
    image_dir = Path(args.image_dir)
    art = find_image(image_dir)
    if art is None:
        log(f"no image in {image_dir}: pykata image build --output {image_dir} --rootfs both"
            " --image-fs erofs,ext4")
        return 1
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m != "initrd" and m.partition("-")[0] not in art.root_images:
            log(f"{m}: the image in {image_dir} has no {m.partition('-')[0]} root image")
            return 1
    cfg = config.load()
    cfg.image.output_dir = str(image_dir)
    cfg.qemu.kernel = str(art.vmlinux or art.kernel)
    accel = probe(cfg.qemu.path, cfg.qemu.accelerator).accel
    series: dict[str, Series] = {}

    def add(name: str, unit: str, value: float, note: str = "") -> None:
        s = series.setdefault(name, Series(name, name.split(": ", 1)[0], unit, note=note))
        s.samples.append(value)

    argv_by_mode: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="pykata-rootfs-bench-") as tmp:
        def argv(mode: str, sock: Path) -> list[str]:
            return qemu_argv(cfg, accel, mode, sock, art.root_images, art.early_initrd,
                             art.initrd, art.root_data_offset)

        for r in range(n):
            for mode in modes:  # interleaved: noise hits every mode alike
                sock = Path(tmp) / f"{mode}.sock"
                argv_by_mode[mode] = argv(mode, sock)
                try:
                    b, mem, sm = boot_once(argv_by_mode[mode], sock, mode)
                except Exception as exc:
                    log(f"round {r + 1} {mode}: {exc}")
                    series.setdefault(f"{mode}: agent Check answered",
                                      Series(f"{mode}: agent Check answered", mode, "s")
                                      ).failures += 1
                    continue
                for key, what in (("root", "root mounted"), ("python", "agent's first line"),
                                  ("serving", "agent serving"),
                                  ("check", "agent Check answered")):
                    if key in b.marks:
                        add(f"{mode}: {what}", "s", b.marks[key], note="host clock from QEMU start")
                    if key in b.uptime:
                        add(f"{mode}: {what} (guest uptime)", "s", b.uptime[key])
                used = (mem.get("MemTotal", 0) - mem.get("MemAvailable", 0)) / 2**20
                add(f"{mode}: guest MemTotal-MemAvailable", "MiB", used)
                add(f"{mode}: guest page cache (Cached)", "MiB", mem.get("Cached", 0) / 2**20)
                add(f"{mode}: QEMU PSS", "MiB", sm.get("Pss", 0) / 1024)
                add(f"{mode}: QEMU Pss_File", "MiB", sm.get("Pss_File", 0) / 1024)
                add(f"{mode}: QEMU Pss_Shmem (guest RAM)", "MiB", sm.get("Pss_Shmem", 0) / 1024)
                log(f"round {r + 1} {mode}: check {b.marks.get('check', 0):.2f} s, "
                    f"guest used {used:.0f} MiB, PSS {sm.get('Pss', 0) / 1024:.0f} MiB")

        if not args.no_pairs:
            for mode in modes:
                socks = [Path(tmp) / f"{mode}-pair{i}.sock" for i in (0, 1)]
                boots = [start(argv(mode, s), mode) for s in socks]
                try:
                    ok = all(b.serving.wait(BOOT_TIMEOUT_S) and "serving" in b.marks
                             for b in boots)
                    if not ok:
                        log(f"pair {mode}: not both serving")
                        continue
                    time.sleep(3.0)  # idle, free pages reported
                    pss = [pss_kib(b.proc.pid) / 1024 for b in boots]
                    rss = [rss_kib(b.proc.pid) / 1024 for b in boots]
                    add(f"{mode}: QEMU PSS, 2 VMs at once (per VM)", "MiB", sum(pss) / 2)
                    add(f"{mode}: QEMU RSS, 2 VMs at once (per VM)", "MiB", sum(rss) / 2)
                    log(f"pair {mode}: PSS {pss[0]:.0f} + {pss[1]:.0f} MiB, "
                        f"RSS {rss[0]:.0f} + {rss[1]:.0f} MiB")
                finally:
                    for b in boots:
                        b.stop()

    sizes = {"initrd.img": art.initrd.stat().st_size,
             **{p.name: p.stat().st_size for p in art.root_images.values()}}
    if art.early_initrd:
        sizes[art.early_initrd.name] = art.early_initrd.stat().st_size
    save_series("rootfs_boot", list(series.values()), accel=accel, rounds=n,
                argv={m: a for m, a in argv_by_mode.items()}, sizes=sizes,
                digest=art.digest, kernel=str(cfg.kernel_path()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_section(main)
