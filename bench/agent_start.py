"""The agent's start in the guest, phase by phase, against the floor: a bare
kernel reaching a trivial init, in the same run, same kernel, same QEMU machine.

Bare QEMU (no pykata runtime), the QEMU driver's machine (q35 with its trimmed
device set, or ``--machine microvm``), the lean kernel command line, guest RAM
from a shared memfd, virtio-serial agent channel, virtio-balloon. Modes, run
interleaved round by round (noise hits them alike):

``floor``
    the same kernel and devices with a tiny initrd (static busybox) whose
    ``/init`` prints the guest uptime and the kernel's "Run /init" stamp, then
    powers off. Built in a temporary directory.
``initrd``
    the agent's 28 MiB initrd.
``image`` (``image-virtio-pmem``, ``image-virtio-blk``)
    the read-only erofs root on an NVDIMM (or virtio-pmem, virtio-blk) through
    the early initrd.

Per boot: host seconds from QEMU's start to each console marker and to the
first Health/Check answered on the channel; the guest's own clock (uptime) for
the kernel running init, the early init (image modes), the agent's ``main``,
the early Check responder, the full service serving and the first Check, as the
agent reports them in its ``boot:`` line (an older agent without it: only its
"serving" line and the host's clock).

``--importtime`` boots each agent mode once more with ``PYTHONPROFILEIMPORTTIME=1``
in init's environment (the kernel passes unknown ``key=value`` parameters to
init as environment) and reports the slowest imports (guest clock).
``--kernel-log`` boots the floor once with ``initcall_debug`` and the console
quiet (the floor's init dumps the ring buffer at the end): time per initcall
and per subsystem (ACPI, PCI, ...), in guest uptime.

Every QEMU has a deadline and is killed at the end; traffic stays on unix sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Series, arg_parser, log, run_section, runs, save_series

from pykata import config
from pykata.agent.client import AgentClient
from pykata.hypervisor.qemu.accel import probe
from pykata.image.cache import ImageArtifacts, find_image
from pykata.ttrpc import Client

BOOT_TIMEOUT_S = 60.0
CHECK_TIMEOUT_S = 30.0
MEMORY_MIB = 512
MODES = ("floor", "initrd", "image")
ALL_MODES = (*MODES, "image-virtio-pmem", "image-virtio-blk")
MAX_LINES = 3000

_UPTIME = re.compile(r"^\[\s*(\d+\.\d+)\]")
_STAMP = re.compile(r"(\w+)=(\d+\.\d+)")
_IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
_INITCALL = re.compile(r"^\[\s*(\d+\.\d+)\] initcall (\S+) returned -?\d+ after (\d+) usecs")

FLOOR_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up idle < /proc/uptime
run=$(/bin/busybox dmesg | /bin/busybox grep -m1 'Run /init' | /bin/busybox cut -d] -f1 |
  /bin/busybox tr -d '[ ')
echo "floor: init uptime=$up printk=$run"
if /bin/busybox grep -q initcall_debug /proc/cmdline; then
  /bin/busybox dmesg
  echo "floor: dmesg done"
fi
/bin/busybox poweroff -f
"""


def busybox_static(image_dir: Path, work: Path) -> Path:
    """A static busybox: from the image builder's cached .deb (else the host's,
    if it is static)."""
    debs = sorted((image_dir / "cache/debs").glob("busybox-static_*.deb"))
    if debs:
        out = work / "bb"
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(out)], check=True)
        return out / "bin/busybox"
    host = shutil.which("busybox")
    if host and b"statically linked" in subprocess.run(["file", "-L", host],
                                                       capture_output=True).stdout:
        return Path(host)
    raise RuntimeError("no static busybox: build the image first (its .deb cache has one)")


def build_floor_initrd(busybox: Path, work: Path) -> Path:
    """A newc cpio with /bin/busybox, /init (FLOOR_INIT), /proc, /dev/console."""
    root = work / "floor"
    for d in ("bin", "proc", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    (root / "init").write_text(FLOOR_INIT)
    (root / "init").chmod(0o755)
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    out = work / "floor.img"
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    with open(out, "wb") as fh:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=names.encode(),
                       stdout=fh, check=True)
    return out


@dataclass
class Machine:
    kind: str  # q35 | microvm
    accel: str
    qemu: str
    machine_options: str
    tb_size: int

    def base(self, mopt: str = "") -> list[str]:
        accel = self.accel + (f",tb-size={self.tb_size}" if self.accel == "tcg" and self.tb_size
                              else "")
        if self.kind == "microvm":
            machine = "microvm,memory-backend=pykata-mem,pit=off,pic=off,rtc=off"
            mem = f"{MEMORY_MIB}M"
        else:
            machine = ",".join(x for x in ("q35", "memory-backend=pykata-mem",
                                           self.machine_options, mopt) if x)
            mem = f"{MEMORY_MIB}M,slots=10,maxmem=4G"
        return [self.qemu, "-machine", machine, "-accel", accel,
                "-cpu", "max" if self.accel == "tcg" else "host",
                "-smp", "1,maxcpus=2" if self.kind == "q35" else "1", "-m", mem,
                "-object", f"memory-backend-memfd,id=pykata-mem,size={MEMORY_MIB}M,share=on",
                "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]

    def dev(self, name: str) -> str:
        """virtio-X-pci on q35, virtio-X-device (virtio-mmio) on microvm."""
        return f"{name}-{'device' if self.kind == 'microvm' else 'pci'}"


def mode_args(m: Machine, mode: str, art: ImageArtifacts, floor: Path
              ) -> tuple[list[str], str, str]:
    """(QEMU arguments, machine option, kernel parameters) of a mode."""
    if mode == "floor":
        return ["-initrd", str(floor)], "", ""
    if mode == "initrd":
        return ["-initrd", str(art.initrd)], "", ""
    img = art.root_images["erofs"]
    assert art.early_initrd is not None
    args = ["-initrd", str(art.early_initrd)]
    backend = (f"memory-backend-file,id=rootimg,mem-path={img},size={img.stat().st_size},"
               "share=on,readonly=on")
    pmem = "root=/dev/pmem0 rootfstype=erofs rootflags=dax"
    if mode == "image":
        return ([*args, "-object", backend, "-device",
                 "nvdimm,id=rootnv,memdev=rootimg,unarmed=on"], "nvdimm=on", pmem)
    if mode == "image-virtio-pmem":
        return [*args, "-object", backend, "-device",
                "virtio-pmem-pci,id=rootpmem,memdev=rootimg"], "", pmem
    return ([*args, "-drive", f"if=none,id=rootdisk,file={img},format=raw,"
                              f"offset={art.root_data_offset},readonly=on",
             "-device", f"{m.dev('virtio-blk')},drive=rootdisk"], "",
            "root=/dev/vda rootfstype=erofs")


def kernel_params(base: str, extra: str, agent_log: str, kernel_log: bool) -> str:
    words = base.split()
    if kernel_log:
        words = [w for w in words if w != "quiet" and not w.startswith("loglevel=")]
        words += ["initcall_debug", "loglevel=1"]
    words += extra.split()
    if agent_log != "info":
        words.append(f"pykata.agent.log={agent_log}")
    return " ".join(["console=ttyS0", *words])


def qemu_argv(m: Machine, mode: str, sock: Path, art: ImageArtifacts, floor: Path,
              kernel: Path, params: str) -> list[str]:
    extra, mopt, kparams = mode_args(m, mode, art, floor)
    if m.kind == "microvm":
        kparams += " tsc_early_khz=" + str(host_tsc_khz())
    return [
        *m.base(mopt), "-kernel", str(kernel), *extra,
        "-append", f"{params} {kparams}".strip(),
        "-serial", "stdio",
        "-device", f"{m.dev('virtio-serial')},id=vser0",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=agent.channel.0",
        "-device", f"{m.dev('virtio-balloon')},id=balloon0,free-page-reporting=on",
    ]


def host_tsc_khz() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2000000


@dataclass
class Boot:
    """One VM: its console read in a thread; host seconds since QEMU's start per
    marker, the guest stamps it printed."""

    mode: str
    proc: subprocess.Popen[bytes]
    t0: float
    marks: dict[str, float] = field(default_factory=dict)
    guest: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def read_console(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic() - self.t0
            line = raw.decode(errors="replace").rstrip()
            if len(self.lines) < MAX_LINES:
                self.lines.append(line)
            m = _UPTIME.match(line)
            for key, needle in (("early", "pykata-early: start"),
                                ("root", "pykata-early: root"),
                                ("first_line", "pykata-agent"),
                                ("serving", " serving on "),
                                ("floor", "floor: init")):
                if needle in line and key not in self.marks:
                    self.marks[key] = now
                    if m and key in ("serving", "first_line"):
                        self.guest.setdefault(f"{key}_line", float(m.group(1)))
            if "floor: init" in line or " boot: " in line or "pykata-early:" in line:
                for k, v in _STAMP.findall(line):
                    self.guest.setdefault(("early_" if "pykata-early" in line else "") + k,
                                          float(v))
            if "serving" in self.marks:
                self.ready.set()
        self.ready.set()  # QEMU ended: nobody waits forever

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
    b.reader = threading.Thread(target=b.read_console, daemon=True)
    b.reader.start()
    return b


async def first_check(sock: Path, b: Boot) -> None:
    """Connect as soon as QEMU's socket exists and call Check until one is answered."""
    deadline = time.monotonic() + CHECK_TIMEOUT_S
    while not sock.exists():
        if time.monotonic() > deadline or b.proc.poll() is not None:
            raise RuntimeError("no agent socket")
        await asyncio.sleep(0.01)
    reader, writer = await asyncio.open_unix_connection(str(sock))
    agent = AgentClient(Client(reader, writer), default_timeout=20.0)
    try:
        while True:
            try:
                if await agent.check(timeout=2.0):
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        b.marks["check"] = time.monotonic() - b.t0
        # What the host does next: CreateSandbox must wait for the full service;
        # a cheap call on the agent service stands for it here.
        await agent.version()
        b.marks["agent_service"] = time.monotonic() - b.t0
        await asyncio.sleep(0.3)  # the agent's boot line follows the first Check
    finally:
        await agent.close()


def boot_once(argv: list[str], sock: Path, mode: str, wait_serving: bool = False) -> Boot:
    b = start(argv, mode)
    try:
        if mode == "floor":  # its init powers off: wait for QEMU to end
            b.proc.wait(timeout=BOOT_TIMEOUT_S)
            assert b.reader is not None
            b.reader.join(10.0)
            if "floor" not in b.marks:
                raise RuntimeError("floor: no init line: " + " | ".join(b.lines[-6:]))
            return b
        asyncio.run(asyncio.wait_for(first_check(sock, b), BOOT_TIMEOUT_S))
        if wait_serving:
            b.ready.wait(BOOT_TIMEOUT_S)
            time.sleep(1.0)
        return b
    finally:
        b.stop()


def import_profile(lines: Sequence[str], top: int = 25) -> list[dict[str, object]]:
    """The slowest imports of a -X importtime console dump: (module, self us,
    cumulative us, depth), slowest cumulative first."""
    out: list[dict[str, object]] = []
    for line in lines:
        m = _IMPORT.search(line)
        if m:
            out.append({"module": m.group(4), "self_us": int(m.group(1)),
                        "cumulative_us": int(m.group(2)), "depth": len(m.group(3)) // 2})
    total = sum(int(str(x["self_us"])) for x in out)
    out.sort(key=lambda x: -int(str(x["cumulative_us"])))
    return [{"total_self_us": total, "modules": len(out)}, *out[:top]]


SUBSYSTEMS = (("acpi", ("acpi",)), ("pci", ("pci", "pcie")), ("virtio", ("virtio",)),
              ("nvdimm", ("nd_", "nvdimm", "nfit")), ("crypto", ("crypto", "aes", "sha", "crc")),
              ("tty/serial", ("serial", "tty", "8250")), ("net", ("net", "inet", "tcp", "ipv6")))


def initcall_profile(lines: Sequence[str], top: int = 20) -> dict[str, object]:
    calls: list[tuple[str, int]] = []
    for line in lines:
        m = _INITCALL.match(line)
        if m:
            calls.append((m.group(2), int(m.group(3))))
    per: dict[str, int] = {}
    for name, us in calls:
        low = name.lower()
        for sub, keys in SUBSYSTEMS:
            if any(k in low for k in keys):
                per[sub] = per.get(sub, 0) + us
                break
        else:
            per["other"] = per.get("other", 0) + us
    calls.sort(key=lambda c: -c[1])
    return {"initcalls": len(calls), "total_us": sum(us for _, us in calls),
            "per_subsystem_us": per, "slowest": [{"initcall": n, "us": us}
                                                 for n, us in calls[:top]]}


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--image-dir", default="",
                    help="an image built with --rootfs both (default: [image] output_dir)")
    ap.add_argument("--label", default="", help="a name for this image in the results")
    ap.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(ALL_MODES)}")
    ap.add_argument("--machine", choices=("q35", "microvm"), default="q35")
    ap.add_argument("--kernel-params", default="", help="added to the lean command line")
    ap.add_argument("--base-params", default=None, help="instead of the lean command line")
    ap.add_argument("--agent-log", default="info", choices=("info", "debug"))
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--kernel-log", action="store_true")
    ap.add_argument("--output", default="agent_start", help="results file name")
    args = ap.parse_args()
    n = min(runs(args, 5, 2), 20)
    cfg = config.load()
    image_dir = Path(args.image_dir or cfg.image.output_dir)
    art = find_image(image_dir)
    if art is None:
        log(f"no image in {image_dir}: pykata image build --output {image_dir}")
        return 1
    modes = [m for m in args.modes.split(",") if m]
    if any(m.startswith("image") for m in modes) and "erofs" not in art.root_images:
        log(f"the image in {image_dir} has no erofs root image")
        return 1
    kernel = art.vmlinux or art.kernel
    accel = probe(cfg.qemu.path, cfg.qemu.accelerator).accel
    mach = Machine(args.machine, accel, cfg.qemu.path, cfg.qemu.machine_options,
                   cfg.qemu.tb_size)
    base = config.LEAN_KERNEL_PARAMS if args.base_params is None else args.base_params
    params = kernel_params(base, args.kernel_params, args.agent_log, False)
    series: dict[str, Series] = {}
    label = args.label or art.digest

    def add(name: str, unit: str, value: float, note: str = "") -> None:
        s = series.setdefault(name, Series(name, name.split(": ", 1)[0], unit, note=note))
        s.samples.append(value)

    extra: dict[str, object] = {}
    argv_by_mode: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="pykata-agent-start-") as tmp:
        work = Path(tmp)
        floor = build_floor_initrd(busybox_static(image_dir, work), work)
        for r in range(n):
            for mode in modes:
                sock = work / f"{mode}-{r}.sock"
                argv_by_mode[mode] = qemu_argv(mach, mode, sock, art, floor, kernel, params)
                try:
                    b = boot_once(argv_by_mode[mode], sock, mode)
                except Exception as exc:
                    log(f"round {r + 1} {mode}: {exc}")
                    series.setdefault(f"{mode}: failed", Series(f"{mode}: failed", mode, "s")
                                      ).failures += 1
                    continue
                for key, value in b.marks.items():
                    add(f"{mode}: host {key}", "s", value, "host clock from QEMU start")
                for key, value in b.guest.items():
                    add(f"{mode}: guest {key}", "s", value, "guest uptime")
                log(f"round {r + 1} {mode}: "
                    + " ".join(f"{k}={v:.2f}" for k, v in sorted(b.marks.items()))
                    + " | guest " + " ".join(f"{k}={v:.3f}" for k, v in sorted(b.guest.items())))
        if args.importtime:
            for mode in (m for m in modes if m != "floor"):
                sock = work / f"{mode}-importtime.sock"
                b = boot_once(qemu_argv(mach, mode, sock, art, floor, kernel,
                                        params + " PYTHONPROFILEIMPORTTIME=1"), sock, mode,
                              wait_serving=True)
                extra[f"importtime {mode}"] = import_profile(b.lines)
                log(f"importtime {mode}: {extra[f'importtime {mode}']}")
        if args.kernel_log:
            sock = work / "floor-klog.sock"
            b = boot_once(qemu_argv(mach, "floor", sock, art, floor, kernel,
                                    kernel_params(base, args.kernel_params, "info", True)),
                          sock, "floor")
            extra["kernel initcalls (floor)"] = initcall_profile(b.lines)
            log(f"initcalls: {extra['kernel initcalls (floor)']}")
    save_series(args.output, list(series.values()), accel=accel, rounds=n, machine=args.machine,
                image=label, digest=art.digest, kernel=str(kernel), kernel_params=params,
                argv=argv_by_mode, **extra)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_section(main)
