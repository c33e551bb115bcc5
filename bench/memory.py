"""Less memory per pod (issue 14): what each knob saves and whether it is safe.

Bare QEMU with pykata's guest kernel and initrd (read-only; a small extra cpio is
appended in a private directory: a shell init on the serial console and the
cloud kernel's virtio_mem.ko), machine options as the driver sets them, guest
RAM in a shared memfd as the driver does, virtio-balloon with free page
reporting on. Parts (``--only tcg,sweep,sweep-single,mem,ksm``):

tcg  the TCG translation cache (``-accel tcg,tb-size=N``): idle QEMU PSS/RSS and
     the RSS of the JIT buffer itself, a CPU-bound shell loop and Python start
     timed in the guest, then a vCPU hot-plugged over QMP (``device_add`` of the
     type ``query-hotpluggable-cpus`` reports) into ``-smp 1,maxcpus=M``: does
     QEMU survive (the QEMU 7.2 abort is an assertion in tcg/region.c), does the
     guest bring the CPU online and run on it. ``info jit`` at the moment of the
     hot-plug shows how full the cache was. Also ``thread=single`` (one TCG
     thread for all vCPUs).
sweep, sweep-single  hot-plug after 0..k Python starts (different fill levels of
     the cache), with MTTCG and with ``thread=single``.
mem  memory hot-plug of 512 MiB with virtio-mem vs pc-dimm: host PSS after the
     plug, after touching 256 MiB in the guest, after freeing it (free page
     reporting), after unplugging.
ksm  3 idle VMs, KSM on: pages_shared/pages_sharing, PSS before/after, ksmd CPU,
     for guest RAM as the driver maps it (memfd share=on), as a private memfd
     (share=off), and with the process-wide prctl(PR_SET_MEMORY_MERGE). The KSM
     settings found are restored at the end.

At most 5 VMs at once; every wait bounded; every QEMU killed in a finally.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import CACHE, arg_parser, log, run_section, save, sigterm_as_interrupt

from pykata import config

QEMU = "/usr/bin/qemu-system-x86_64"
WORK = CACHE / "memory"
KSM = Path("/sys/kernel/mm/ksm")
PR_SET_MEMORY_MERGE = 67
MIB = 1 << 20
MAX_VMS = 5

GUEST_INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/ttyS0 >/dev/ttyS0 2>&1
K=/lib/modules/$(uname -r)/kernel/drivers/virtio
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
         virtio_balloon; do
  insmod $K/$m.ko
done
insmod /bench/virtio_mem.ko
mkdir -p /w
mount -t tmpfs -o size=1536m tmpfs /w
stty -echo 2>/dev/null
export PS1=''
echo BENCH-READY
exec sh
"""


# -- the guest image plus the bench overlay -------------------------------------------


def bench_initrd() -> Path:
    """pykata's initrd with an extra cpio appended (the kernel unpacks both):
    /bench-init and /bench/virtio_mem.ko. Cached under WORK by content."""
    cfg = config.load()
    base = cfg.initrd_path().resolve()
    out = WORK / f"initrd-{base.parent.name}.img"
    if out.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        t = Path(tmp)
        debs = sorted(Path(cfg.image.output_dir, "cache", "debs").glob("linux-image-*.deb"))
        if not debs:
            raise RuntimeError("no kernel .deb in the image cache")
        x = t / "deb"
        x.mkdir()
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(debs[-1])],
                               stdout=subprocess.PIPE)
        subprocess.run(["tar", "x", "-C", str(x), "--wildcards",
                        "./lib/modules/*/kernel/drivers/virtio/virtio_mem.ko",
                        "./boot/config-*"], stdin=tar.stdout, check=True, timeout=120)
        tar.wait(timeout=120)
        ov = t / "ov"
        (ov / "bench").mkdir(parents=True)
        shutil.copy(next(x.glob("lib/modules/*/kernel/drivers/virtio/virtio_mem.ko")),
                    ov / "bench" / "virtio_mem.ko")
        shutil.copy(next(x.glob("boot/config-*")), WORK / "guest-kernel.config")
        init = ov / "bench-init"
        init.write_text(GUEST_INIT)
        init.chmod(0o755)
        names = subprocess.run(["find", "."], cwd=ov, capture_output=True, check=True,
                               timeout=30).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=ov, input=names,
                              capture_output=True, check=True, timeout=30).stdout
        data = base.read_bytes()
        data += b"\0" * (-len(data) % 4)
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(data + cpio)
        tmp_out.rename(out)
    return out


def guest_kernel_config(keys: tuple[str, ...]) -> dict[str, str]:
    bench_initrd()
    vals: dict[str, str] = {}
    for line in (WORK / "guest-kernel.config").read_text().splitlines():
        for k in keys:
            if line.startswith(f"{k}="):
                vals[k] = line.split("=", 1)[1]
            elif line == f"# {k} is not set":
                vals[k] = "n"
    return {k: vals.get(k, "absent") for k in keys}


# -- one VM: serial shell + QMP ----------------------------------------------------------


class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QmpError("QMP closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, **args: Any) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        self.file.write(json.dumps(req).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QmpError(f"{name}: {msg['error'].get('desc')}")
            return msg.get("return")

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def wait_event(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("event") == name for e in self.events):
                return True
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                msg = self._read()
            except TimeoutError:
                break
            if "event" in msg:
                self.events.append(msg)
        self.sock.settimeout(20.0)
        return any(e.get("event") == name for e in self.events)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class VM:
    """A bare QEMU running the bench init: a shell on ttyS0 (stdio pipes) and QMP."""

    def __init__(self, *, tb_size: int = 0, maxcpus: int = 2, tcg_thread: str = "",
                 mem_mib: int = 512, maxmem_mib: int = 0, slots: int = 0,
                 share: bool = True, mem_merge: str = "", extra: list[str] | None = None,
                 prctl_merge: bool = False, kernel_extra: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vm-", dir=WORK))
        cfg = config.load()
        q = cfg.qemu
        accel = "tcg"
        if tcg_thread:
            accel += f",thread={tcg_thread}"
        if tb_size:
            accel += f",tb-size={tb_size}"
        machine = f"{q.machine_type},{q.machine_options},memory-backend=mem0"
        if mem_merge:
            machine += f",mem-merge={mem_merge}"
        m = f"{mem_mib}M"
        if maxmem_mib:
            m += f",maxmem={maxmem_mib}M" + (f",slots={slots}" if slots else "")
        self.qmp_path = self.dir / "qmp.sock"
        self.argv = [
            QEMU, "-machine", machine, "-accel", accel, "-cpu", "max",
            "-smp", f"1,maxcpus={maxcpus}", "-m", m,
            "-object", f"memory-backend-memfd,id=mem0,size={mem_mib}M,"
                       f"share={'on' if share else 'off'}",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(cfg.kernel_path()), "-initrd", str(bench_initrd()),
            "-append", f"console=ttyS0 {config.LEAN_KERNEL_PARAMS} rdinit=/bench-init "
                       f"memhp_default_state=online_movable {kernel_extra}".strip(),
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
            *(extra or []),
        ]
        self.stderr = open(self.dir / "stderr", "wb")
        preexec: Callable[[], None] | None = _prctl_merge if prctl_merge else None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, preexec_fn=preexec)
        self.out = bytearray()
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        self.qmp: Qmp | None = None
        self.seq = 0
        self.boot_s = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self.cond:
                if chunk:
                    self.out += chunk
                self.cond.notify_all()
            if not chunk:
                return

    def _wait_for(self, pattern: bytes, start: int, timeout: float) -> re.Match[bytes] | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                mt = rx.search(self.out, start)
                if mt:
                    return mt
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.cond.wait(min(left, 0.5))

    def start(self, timeout: float = 90.0) -> VM:
        if self._wait_for(rb"BENCH-READY", 0, timeout) is None:
            raise RuntimeError(f"guest not ready in {timeout:g}s: {self.tail()}")
        self.boot_s = time.perf_counter() - self.t0
        self.qmp = Qmp(self.qmp_path)
        return self

    def sh(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``cmd`` in the guest shell: (exit status, output)."""
        assert self.proc.stdin is not None
        self.seq += 1
        n = self.seq
        with self.cond:
            start = len(self.out)
        self.proc.stdin.write(f"{cmd}\necho __M{n}''__ $?\n".encode())
        self.proc.stdin.flush()
        mt = self._wait_for(rb"__M%d__ (\d+)" % n, start, timeout)
        if mt is None:
            raise RuntimeError(f"guest command timed out or VM gone: {cmd!r}: {self.tail()}")
        text = self.out[start:mt.start()].decode(errors="replace").replace("\r", "")
        return int(mt.group(1)), text.strip()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 600) -> str:
        self.stderr.flush()
        with contextlib.suppress(OSError):
            err = (self.dir / "stderr").read_bytes()[-n:].decode(errors="replace")
            if err.strip():
                return err.strip()
        return self.out[-n:].decode(errors="replace")

    def kill(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
        self.reader.join(timeout=5)
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _prctl_merge() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        os.write(2, b"prctl(PR_SET_MEMORY_MERGE) failed\n")


@contextlib.contextmanager
def vms(n: int, **kw: Any) -> Iterator[list[VM]]:
    """``n`` VMs started in parallel and ready; all killed afterwards."""
    assert n <= MAX_VMS
    out: list[VM] = []
    try:
        for _ in range(n):
            out.append(VM(**kw))
        for v in out:
            v.start()
        yield out
    finally:
        for v in out:
            v.kill()


# -- host-side memory -------------------------------------------------------------------


def rollup(pid: int) -> dict[str, float]:
    """smaps_rollup fields of interest, MiB."""
    want = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "AnonHugePages")
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            k, _, rest = line.partition(":")
            if k in want:
                out[k] = int(rest.split()[0]) / 1024
    return out


def jit_rss_mib(pid: int) -> float:
    """Resident size of QEMU's TCG code buffer: its anonymous rwx mappings."""
    total = 0
    in_jit = False
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                parts = line.split()
                in_jit = parts[1].startswith("rwx") and len(parts) < 6
            elif in_jit and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total / 1024


def info_jit(vm: VM) -> dict[str, float]:
    """Fill state of the translation cache from HMP ``info jit``."""
    assert vm.qmp is not None
    text = vm.qmp.hmp("info jit")
    out: dict[str, float] = {}
    mt = re.search(r"gen code size\s+(\d+)/(\d+)", text)
    if mt:
        out["gen_code_mib"] = int(mt.group(1)) / MIB
        out["buffer_mib"] = int(mt.group(2)) / MIB
    for key, rx in (("tb_count", r"TB count\s+(\d+)"), ("flushes", r"TB flush count\s+(\d+)")):
        mt = re.search(rx, text)
        if mt:
            out[key] = float(mt.group(1))
    return out


def uptime_cmd(body: str) -> str:
    return ("t0=$(cut -d' ' -f1 /proc/uptime); " + body +
            "; t1=$(cut -d' ' -f1 /proc/uptime); echo T $t0 $t1")


def guest_seconds(vm: VM, body: str, timeout: float = 120.0) -> float:
    _, out = vm.sh(uptime_cmd(body), timeout)
    mt = re.search(r"T ([\d.]+) ([\d.]+)", out)
    if not mt:
        raise RuntimeError(f"no timing in {out!r}")
    return float(mt.group(2)) - float(mt.group(1))


SHELL_LOOP = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"
PY_START = "for k in 1 2 3; do python3.11 -S -c 'import json, asyncio' ; done"


def n_regions(tb_mib: int, maxcpus: int, mttcg: bool = True) -> int:
    """tcg_n_regions() of QEMU 7.2 (tcg/region.c)."""
    size = tb_mib or 1024
    if maxcpus == 1 or not mttcg:
        return 1
    n = size // 2
    return maxcpus if n <= maxcpus else min(n, maxcpus * 8)


# -- part 1: the TCG translation cache ------------------------------------------------------


def hotplug_cpu(vm: VM) -> dict[str, Any]:
    """device_add one CPU; did QEMU survive, did the guest run on it."""
    assert vm.qmp is not None
    res: dict[str, Any] = {"jit_before": info_jit(vm)}
    cpus = vm.qmp.cmd("query-hotpluggable-cpus")
    free = [c for c in cpus if "qom-path" not in c]
    free.sort(key=lambda c: tuple(c["props"].get(k, 0)
                                  for k in ("socket-id", "die-id", "core-id", "thread-id")))
    if not free:
        return {**res, "ok": False, "error": "no free CPU slot"}
    slot = free[0]
    args = {"driver": slot["type"], "id": "hpcpu1", **slot["props"]}
    try:
        vm.qmp.cmd("device_add", **args)
    except (QmpError, OSError) as exc:
        res["qmp_error"] = str(exc)
    deadline = time.monotonic() + 3
    while vm.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not vm.alive():
        return {**res, "ok": False, "aborted": True, "exit": vm.proc.returncode,
                "error": vm.tail(300)}
    try:
        st, out = vm.sh("for k in $(seq 50); do [ -e /sys/devices/system/cpu/cpu1/online ] "
                        "&& break; sleep 0.2; done; echo 1 > /sys/devices/system/cpu/cpu1/online"
                        " && taskset 2 sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); "
                        "done; echo ran-on-cpu1' && cat /sys/devices/system/cpu/online",
                        timeout=60)
    except RuntimeError as exc:
        return {**res, "ok": False, "aborted": not vm.alive(), "error": str(exc)[-300:]}
    ok = st == 0 and "ran-on-cpu1" in out and vm.alive()
    return {**res, "ok": ok, "aborted": not vm.alive(), "guest": out[-80:]}


def tcg_trial(tb: int, maxcpus: int, thread: str, workload: bool) -> dict[str, Any]:
    r: dict[str, Any] = {"tb_size": tb, "maxcpus": maxcpus, "thread": thread or "multi"}
    vm = VM(tb_size=tb, maxcpus=maxcpus, tcg_thread=thread)
    try:
        vm.start()
        r["boot_s"] = vm.boot_s
        time.sleep(3)
        r["idle"] = rollup(vm.pid)
        r["idle_jit_rss_mib"] = jit_rss_mib(vm.pid)
        r["idle_jit"] = info_jit(vm)
        if workload:
            r["shell_loop_s"] = guest_seconds(vm, SHELL_LOOP)
            r["py_start_x3_s"] = guest_seconds(vm, PY_START)
            r["after_work"] = rollup(vm.pid)
            r["after_work_jit_rss_mib"] = jit_rss_mib(vm.pid)
        r["hotplug"] = hotplug_cpu(vm)
        if r["hotplug"].get("ok"):
            r["smp2_parallel_s"] = guest_seconds(
                vm, f"(taskset 1 sh -c '{SHELL_LOOP}') & (taskset 2 sh -c '{SHELL_LOOP}') & wait")
    except RuntimeError as exc:
        r["error"] = str(exc)[-400:]
        r.setdefault("hotplug", {"ok": False, "aborted": not vm.alive()})
    finally:
        vm.kill()
    return r


def tcg_part(trials: int, sizes: list[int], extra_sizes: list[int]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    plan: list[tuple[int, int, str]] = [(s, 2, "") for s in sizes]
    plan += [(s, 4, "") for s in extra_sizes]
    plan += [(s, 2, "single") for s in extra_sizes]
    for tb, maxcpus, thread in plan:
        for i in range(trials if (maxcpus, thread) == (2, "") else max(1, trials - 2)):
            r = tcg_trial(tb, maxcpus, thread, workload=i < 2 and (maxcpus, thread) == (2, ""))
            r["regions"] = n_regions(tb, maxcpus, thread != "single")
            hp = r["hotplug"]
            log(f"tcg tb={tb or 'default'} maxcpus={maxcpus} {thread or 'multi'} #{i}: "
                f"pss {r.get('idle', {}).get('Pss', 0):.0f} MiB jit "
                f"{r.get('idle_jit_rss_mib', 0):.0f} MiB hotplug "
                f"{'ok' if hp.get('ok') else 'ABORT' if hp.get('aborted') else 'fail'} "
                f"jit {hp.get('jit_before', {})}")
            rows.append(r)
    return {"trials": rows, "summary": tcg_summary(rows)}


def sweep_part(sizes: list[int], max_runs: int, thread: str = "") -> list[dict[str, Any]]:
    """Hot-plug at different fill levels of the cache: boot, k Python starts (each
    translates new code), then device_add. QEMU 7.2 aborts exactly when the boot
    vCPU already holds the last region (region.current == n), whatever the size."""
    rows: list[dict[str, Any]] = []
    for tb in sizes:
        n = n_regions(tb, 2, mttcg=not thread)
        for k in range(max_runs + 1):
            vm = VM(tb_size=tb, maxcpus=2, tcg_thread=thread)
            r: dict[str, Any] = {"tb_size": tb, "thread": thread or "multi", "regions": n,
                                 "region_mib": tb / n, "python_runs": k}
            try:
                vm.start()
                time.sleep(1)
                if k:
                    vm.sh(f"for j in $(seq {k}); do python3.11 -S -c 'import json, asyncio';"
                          " done", timeout=120)
                hp = hotplug_cpu(vm)
                jit = hp.get("jit_before", {})
                level = jit.get("gen_code_mib", 0.0)
                r.update(code_mib=level, flushes=jit.get("flushes"), ok=hp.get("ok"),
                         aborted=hp.get("aborted", False),
                         region_index=int(level // (tb / n)),
                         error=hp.get("error", "")[-200:])
            except RuntimeError as exc:
                r.update(aborted=not vm.alive(), error=str(exc)[-200:])
            finally:
                vm.kill()
            log(f"sweep tb={tb} {thread or 'multi'} k={k}: code "
                f"{r.get('code_mib', 0):.1f} MiB region "
                f"{r.get('region_index')}/{n} {'ABORT' if r.get('aborted') else 'ok'}")
            rows.append(r)
    return rows


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def tcg_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    keys: list[tuple[int, int, str]] = []
    for r in rows:
        k = (r["tb_size"], r["maxcpus"], r["thread"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = [r for r in rows if (r["tb_size"], r["maxcpus"], r["thread"]) == k]
        out.append({
            "tb_size": k[0], "maxcpus": k[1], "thread": k[2], "regions": rs[0]["regions"],
            "trials": len(rs),
            "hotplug_ok": sum(1 for r in rs if r["hotplug"].get("ok")),
            "aborts": sum(1 for r in rs if r["hotplug"].get("aborted")),
            "idle_pss_mib": _med([r["idle"]["Pss"] for r in rs if "idle" in r]),
            "idle_rss_mib": _med([r["idle"]["Rss"] for r in rs if "idle" in r]),
            # the VM's own memory: PSS of the QEMU binary and libraries (Pss_File)
            # depends on how many other QEMUs run on the host
            "idle_own_mib": _med([r["idle"]["Pss_Anon"] + r["idle"]["Pss_Shmem"]
                                  for r in rs if "idle" in r]),
            "after_work_own_mib": _med([r["after_work"]["Pss_Anon"]
                                        + r["after_work"]["Pss_Shmem"]
                                        for r in rs if "after_work" in r]),
            "idle_jit_rss_mib": _med([r["idle_jit_rss_mib"] for r in rs
                                      if "idle_jit_rss_mib" in r]),
            "after_work_pss_mib": _med([r["after_work"]["Pss"] for r in rs
                                        if "after_work" in r]),
            "gen_code_at_hotplug_mib": _med([r["hotplug"]["jit_before"].get("gen_code_mib", 0)
                                             for r in rs if "jit_before" in r["hotplug"]]),
            "flushes_at_hotplug": _med([r["hotplug"]["jit_before"].get("flushes", 0)
                                        for r in rs if "jit_before" in r["hotplug"]]),
            "boot_s": _med([r["boot_s"] for r in rs if "boot_s" in r]),
            "shell_loop_s": _med([r["shell_loop_s"] for r in rs if "shell_loop_s" in r]),
            "py_start_x3_s": _med([r["py_start_x3_s"] for r in rs if "py_start_x3_s" in r]),
            "smp2_parallel_s": _med([r["smp2_parallel_s"] for r in rs
                                     if "smp2_parallel_s" in r]),
        })
    return out


# -- part 2: memory hot-plug ----------------------------------------------------------------


def guest_meminfo(vm: VM) -> dict[str, float]:
    _, out = vm.sh("grep -E '^(MemTotal|MemFree):' /proc/meminfo")
    vals = dict(re.findall(r"(\w+):\s+(\d+) kB", out))
    return {k: int(v) / 1024 for k, v in vals.items()}


def mem_trial(kind: str, online: str = "online_movable", plug_mib: int = 512,
              touch_mib: int = 256) -> dict[str, Any]:
    extra: list[str] = []
    if kind == "virtio-mem":
        extra = ["-object", "memory-backend-memfd,id=vmem0,size=1024M,share=on",
                 "-device", "virtio-mem-pci,id=vmem0dev,memdev=vmem0,requested-size=0"]
    vm = VM(maxcpus=2, maxmem_mib=2560, slots=4 if kind == "pc-dimm" else 0, extra=extra,
            kernel_extra=f"memhp_default_state={online}")
    r: dict[str, Any] = {"kind": kind, "memhp_default_state": online, "steps": []}

    def step(name: str) -> None:
        r["steps"].append({"step": name, "host": rollup(vm.pid), "guest": guest_meminfo(vm)})
        log(f"mem {kind} ({online}) {name}: pss {r['steps'][-1]['host'].get('Pss', 0):.0f} MiB, "
            f"guest {r['steps'][-1]['guest']}")

    try:
        vm.start()
        assert vm.qmp is not None
        time.sleep(4)
        step("idle")
        t0 = time.perf_counter()
        if kind == "virtio-mem":
            vm.qmp.cmd("qom-set", path="/machine/peripheral/vmem0dev",
                       property="requested-size", value=plug_mib * MIB)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and vm.qmp.cmd(
                    "qom-get", path="/machine/peripheral/vmem0dev",
                    property="size") < plug_mib * MIB:
                time.sleep(0.2)
        else:
            vm.qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": "dimm0",
                                        "size": plug_mib * MIB, "share": True})
            vm.qmp.cmd("device_add", driver="pc-dimm", id="dimm0dev", memdev="dimm0")
        # until the guest sees it
        deadline = time.monotonic() + 60
        total0 = r["steps"][0]["guest"].get("MemTotal", 0)
        while time.monotonic() < deadline and \
                guest_meminfo(vm).get("MemTotal", 0) < total0 + plug_mib * 0.9:
            time.sleep(0.3)
        r["plug_s"] = time.perf_counter() - t0
        time.sleep(3)
        step("plugged")
        st, out = vm.sh(f"dd if=/dev/zero of=/w/f bs=1M count={touch_mib} 2>&1 | tail -1",
                        timeout=120)
        r["touch"] = {"status": st, "dd": out[-120:]}
        time.sleep(2)
        step(f"touched {touch_mib} MiB")
        vm.sh("rm -f /w/f; sync; echo 3 > /proc/sys/vm/drop_caches")
        time.sleep(12)  # free page reporting works in ~2 s batches
        step("freed")
        t0 = time.perf_counter()
        if kind == "virtio-mem":
            vm.qmp.cmd("qom-set", path="/machine/peripheral/vmem0dev",
                       property="requested-size", value=0)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and vm.qmp.cmd(
                    "qom-get", path="/machine/peripheral/vmem0dev", property="size") > 0:
                time.sleep(0.3)
            r["unplugged"] = vm.qmp.cmd("qom-get", path="/machine/peripheral/vmem0dev",
                                        property="size") == 0
        else:
            vm.qmp.cmd("device_del", id="dimm0dev")
            r["unplugged"] = vm.qmp.wait_event("DEVICE_DELETED", 60)
            if r["unplugged"]:
                vm.qmp.cmd("object-del", id="dimm0")
        r["unplug_s"] = time.perf_counter() - t0
        time.sleep(3)
        step("unplugged" if r["unplugged"] else "unplug requested (not done)")
    except (RuntimeError, QmpError, OSError) as exc:
        r["error"] = str(exc)[-400:]
    finally:
        vm.kill()
    return r


def mem_part(trials: int) -> dict[str, Any]:
    # online_movable: hot-plugged memory can be unplugged again; online: what the
    # driver asks for today (memhp_default_state=online, runtime/sizing.py).
    rows = [mem_trial(kind, online) for _ in range(trials)
            for online in ("online_movable", "online") for kind in ("virtio-mem", "pc-dimm")]
    return {"guest_kernel": guest_kernel_config(
        ("CONFIG_VIRTIO_MEM", "CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE",
         "CONFIG_MHP_MEMMAP_ON_MEMORY", "CONFIG_PAGE_REPORTING", "CONFIG_VIRTIO_BALLOON",
         "CONFIG_ACPI_HOTPLUG_MEMORY", "CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE")),
            "trials": rows}


# -- part 3: KSM ----------------------------------------------------------------------------

KSM_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
             "advisor_mode", "smart_scan", "merge_across_nodes")
KSM_STATS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
             "full_scans", "general_profit", "ksm_zero_pages")


def ksm_read(names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in names:
        with contextlib.suppress(OSError):
            out[n] = (KSM / n).read_text().strip()
    return out


def ksm_write(name: str, value: str) -> bool:
    try:
        (KSM / name).write_text(value)
        return True
    except OSError:
        return False


def ksm_restore(saved: dict[str, str]) -> None:
    ksm_write("run", "2")  # unmerge what we merged (nothing else was mergeable while off)
    for k in ("pages_to_scan", "sleep_millisecs", "use_zero_pages", "max_page_sharing",
              "smart_scan"):
        if k in saved:
            ksm_write(k, saved[k])
    if "advisor_mode" in saved:
        mt = re.search(r"\[(\w[\w-]*)\]", saved["advisor_mode"])
        if mt:
            ksm_write("advisor_mode", mt.group(1))
    ksm_write("run", saved.get("run", "0"))


def ksmd_ticks() -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip() == "ksmd":
                    f = (p / "stat").read_text().rsplit(")", 1)[1].split()
                    return int(f[11]) + int(f[12])
    return -1


def ksm_proc(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = float(v)
    return out


def ksm_config(name: str, n: int, window: float, pages_to_scan: int,
               **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"config": name, "vms": n, "pages_to_scan": pages_to_scan,
                         "window_s": window}
    ksm_write("run", "2")
    ksm_write("run", "0")
    with vms(n, **kw) as vs:
        time.sleep(5)
        assert vs[0].qmp is not None
        r["mem_merge"] = vs[0].qmp.cmd("qom-get", path="/machine", property="mem-merge")
        r["pss_before_mib"] = sum(rollup(v.pid).get("Pss", 0) for v in vs)
        r["rss_before_mib"] = sum(rollup(v.pid).get("Rss", 0) for v in vs)
        ksm_write("pages_to_scan", str(pages_to_scan))
        ksm_write("sleep_millisecs", "20")
        ticks0, t0 = ksmd_ticks(), time.monotonic()
        ksm_write("run", "1")
        samples = []
        while time.monotonic() - t0 < window:
            time.sleep(10)
            s = ksm_read(("pages_shared", "pages_sharing", "full_scans"))
            samples.append({"t": round(time.monotonic() - t0, 1), **s})
        ticks1, t1 = ksmd_ticks(), time.monotonic()
        r["ksmd_cpu_pct"] = 100.0 * (ticks1 - ticks0) / os.sysconf("SC_CLK_TCK") / (t1 - t0)
        r["samples"] = samples
        r["stats"] = ksm_read(KSM_STATS)
        r["pss_after_mib"] = sum(rollup(v.pid).get("Pss", 0) for v in vs)
        r["per_vm_ksm"] = [ksm_proc(v.pid) for v in vs]
        ksm_write("run", "0")
    log(f"ksm {name}: pss {r['pss_before_mib']:.0f} -> {r['pss_after_mib']:.0f} MiB "
        f"({n} VMs), sharing {r['stats'].get('pages_sharing')}, shared "
        f"{r['stats'].get('pages_shared')}, ksmd {r['ksmd_cpu_pct']:.1f}% CPU")
    return r


def ksm_part(n: int, window: float) -> dict[str, Any]:
    r: dict[str, Any] = {"present": KSM.is_dir()}
    if not KSM.is_dir():
        return r
    saved = ksm_read(KSM_KNOBS)
    r["found"] = saved
    r["writable"] = ksm_write("pages_to_scan", saved.get("pages_to_scan", "100"))
    if not r["writable"]:
        return r
    configs: list[tuple[str, dict[str, Any]]] = [
        ("driver: memfd share=on", {}),
        ("memfd share=off (private)", {"share": False}),
        ("memfd share=on + prctl(PR_SET_MEMORY_MERGE)", {"prctl_merge": True}),
        ("memfd share=off + prctl(PR_SET_MEMORY_MERGE)", {"share": False,
                                                          "prctl_merge": True}),
    ]
    try:
        r["configs"] = [ksm_config(name, n, window, 1000, **kw) for name, kw in configs]
        # ksmd at its default rate, steady state, on the most mergeable setup
        r["default_rate"] = ksm_config("memfd share=off + prctl, default rate", n, window,
                                       int(saved.get("pages_to_scan", "100")),
                                       share=False, prctl_merge=True)
    finally:
        ksm_restore(saved)
        r["restored"] = ksm_read(KSM_KNOBS)
    return r


def merge_save(path: Path, data: dict[str, Any], part: str) -> None:
    """Write ``part`` (and the run's header keys) into the results file, keeping
    the other parts (two parts may run in separate processes)."""
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(path.read_text())
    parts = ("tcg", "sweep", "sweep-single", "mem", "ksm")
    old.update({k: v for k, v in data.items() if k not in parts})
    old[part] = data[part]
    old.setdefault("when_" + part, data["when"])
    old["when_" + part] = data["when"]
    save("memory", old)


def _f(x: Any, fmt: str = "{:.0f}") -> str:
    return "-" if not isinstance(x, (int, float)) or x != x else fmt.format(x)


def render(data: dict[str, Any]) -> str:
    """Markdown tables of a results file (docs/memory.md quotes them)."""
    out: list[str] = []
    tcg = tcg_summary(data.get("tcg", {}).get("trials", []))
    if tcg:
        out += ["| tb-size MiB | maxcpus | TCG threads | regions | idle PSS | idle own "
                "(anon+shmem) | JIT RSS idle | own after work | code at hot-plug (MiB) | "
                "hot-plug ok / aborts / trials | shell loop s | python x3 s | "
                "2-vCPU loop s |",
                "|" + "---|" * 13]
        for r in tcg:
            out.append(
                f"| {r['tb_size'] or 'default (1024)'} | {r['maxcpus']} | {r['thread']} | "
                f"{r['regions']} | {_f(r['idle_pss_mib'])} | {_f(r['idle_own_mib'])} | "
                f"{_f(r['idle_jit_rss_mib'])} | {_f(r['after_work_own_mib'])} | "
                f"{_f(r['gen_code_at_hotplug_mib'], '{:.1f}')} | {r['hotplug_ok']} / "
                f"{r['aborts']} / {r['trials']} | {_f(r['shell_loop_s'], '{:.2f}')} | "
                f"{_f(r['py_start_x3_s'], '{:.2f}')} | {_f(r['smp2_parallel_s'], '{:.2f}')} |")
    mem = data.get("mem", {}).get("trials", [])
    if mem:
        out += ["", "| device | memhp_default_state | step | QEMU PSS MiB | of it shmem | "
                "guest MemTotal | guest MemFree |", "|" + "---|" * 7]
        for t in mem:
            for st in t["steps"]:
                out.append(f"| {t['kind']} | {t['memhp_default_state']} | {st['step']} | "
                           f"{_f(st['host'].get('Pss'))} | {_f(st['host'].get('Pss_Shmem'))} | "
                           f"{_f(st['guest'].get('MemTotal'))} | "
                           f"{_f(st['guest'].get('MemFree'))} |")
            if "error" in t:
                out.append(f"| {t['kind']} | {t['memhp_default_state']} | error: "
                           f"{t['error'][:80]} | | | | |")
        out += ["", "| device | memhp_default_state | plug s | unplugged | unplug s |",
                "|---|---|---|---|---|"]
        for t in mem:
            out.append(f"| {t['kind']} | {t['memhp_default_state']} | "
                       f"{_f(t.get('plug_s'), '{:.2f}')} | {t.get('unplugged')} | "
                       f"{_f(t.get('unplug_s'), '{:.2f}')} |")
    sw = data.get("sweep", []) + data.get("sweep-single", [])
    if sw:
        out += ["", "| tb-size MiB | TCG threads | regions x MiB | Python starts before | "
                "code in cache MiB |"
                " region in use | flushes | hot-plug |", "|" + "---|" * 8]
        for r in sw:
            out.append(f"| {r['tb_size']} | {r.get('thread', 'multi')} | "
                       f"{r['regions']} x {r['region_mib']:g} | "
                       f"{r['python_runs']} | {_f(r.get('code_mib'), '{:.1f}')} | "
                       f"{r.get('region_index', '-')} | {_f(r.get('flushes'))} | "
                       f"{'ABORT' if r.get('aborted') else 'ok' if r.get('ok') else 'fail'} |")
    ksm = data.get("ksm", {})
    cfgs = ksm.get("configs", []) + ([ksm["default_rate"]] if "default_rate" in ksm else [])
    if cfgs:
        out += ["", "| guest RAM / QEMU | VMs | pages_to_scan | mem-merge | PSS before MiB | "
                "PSS after MiB | saved MiB | pages_shared | pages_sharing | full scans | "
                "ksmd CPU % |", "|" + "---|" * 11]
        for c in cfgs:
            st = c.get("stats", {})
            out.append(f"| {c['config']} | {c['vms']} | {c['pages_to_scan']} | "
                       f"{c.get('mem_merge')} | {_f(c['pss_before_mib'])} | "
                       f"{_f(c['pss_after_mib'])} | "
                       f"{_f(c['pss_before_mib'] - c['pss_after_mib'])} | "
                       f"{st.get('pages_shared')} | {st.get('pages_sharing')} | "
                       f"{st.get('full_scans')} | {_f(c['ksmd_cpu_pct'], '{:.1f}')} |")
    return "\n".join(out) + "\n"


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--only", default="tcg,sweep,sweep-single,mem,ksm")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--sizes", default="0,256,128,64,32,16,8,4")
    ap.add_argument("--extra-sizes", default="8,16,32",
                    help="tb sizes also tried with maxcpus=4 and with thread=single")
    ap.add_argument("--sweep-sizes", default="8,16,32")
    ap.add_argument("--sweep-runs", type=int, default=5)
    ap.add_argument("--ksm-vms", type=int, default=3)
    ap.add_argument("--ksm-window", type=float, default=60.0)
    ap.add_argument("--render", action="store_true", help="print the tables and exit")
    args = ap.parse_args()
    out_path = Path(__file__).parent / "results" / "memory.json"
    if args.render:
        print(render(json.loads(out_path.read_text())), end="")
        return 0
    sigterm_as_interrupt()
    parts = args.only.split(",")
    trials = 2 if args.quick else args.trials
    WORK.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    data["when"] = time.strftime("%Y-%m-%d %H:%M")
    data["qemu"] = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.splitlines()[0]
    data["host_thp"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    if "tcg" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        data["tcg"] = tcg_part(trials, sizes, [int(s) for s in args.extra_sizes.split(",")])
        merge_save(out_path, data, "tcg")
    if "sweep" in parts:
        data["sweep"] = sweep_part([int(x) for x in args.sweep_sizes.split(",")],
                                   args.sweep_runs)
        merge_save(out_path, data, "sweep")
    if "sweep-single" in parts:
        data["sweep-single"] = sweep_part([int(x) for x in args.sweep_sizes.split(",")],
                                          args.sweep_runs, "single")
        merge_save(out_path, data, "sweep-single")
    if "mem" in parts:
        data["mem"] = mem_part(1 if args.quick else 2)
        merge_save(out_path, data, "mem")
    if "ksm" in parts:
        data["ksm"] = ksm_part(min(args.ksm_vms, MAX_VMS),
                               20.0 if args.quick else args.ksm_window)
        merge_save(out_path, data, "ksm")
    return 0


if __name__ == "__main__":
    run_section(main)
