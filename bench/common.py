"""Shared helpers for benchmarks: timing, statistics, PSS, result files, the
private containerd every section uses, and cleanup of what a section made."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from pykata.testing.containerd import PrivateContainerd

if TYPE_CHECKING:
    from pykata.runtime.sandbox import Sandbox

RESULTS = Path(__file__).parent / "results"
CACHE = Path("/var/tmp/pykata-bench")
CTD_BASE = Path("/run/pykata-bench")
CTD_ROOT = Path("/var/lib/pykata-bench/containerd")
NAMESPACE = "bench"
SHIM_MARKERS = ("pykata.shim", "containerd-shim-pykata-v2")


@dataclass
class Series:
    name: str
    command: str
    unit: str
    samples: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def line(self) -> str:
        if not self.samples:
            return f"{self.name}: no sample ({self.note or 'failed'})"
        return (f"{self.name}: median {self.median:.4g} {self.unit}, min-max "
                f"{self.lo:.4g}-{self.hi:.4g}, n={len(self.samples)}, failures={self.failures}")

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(median=self.median, min=self.lo, max=self.hi, runs=len(self.samples))
        return d


def timed(fn: Callable[[], bool], runs: int, warmup: int = 1,
          budget: float = 0.0) -> tuple[list[float], int]:
    """Run ``fn`` warmup+runs times (fewer if ``budget`` seconds run out); wall
    seconds of the successful timed runs, and the number of failed ones."""
    samples: list[float] = []
    failures = 0
    start = time.monotonic()
    for i in range(warmup + runs):
        if budget and i > warmup and time.monotonic() - start > budget:
            break
        t0 = time.perf_counter()
        ok = fn()
        dt = time.perf_counter() - t0
        if i < warmup:
            continue
        if ok:
            samples.append(dt)
        else:
            failures += 1
    return samples, failures


async def atimed(fn: Callable[[], Awaitable[object]], runs: int, warmup: int = 1,
                 budget: float = 0.0) -> list[float]:
    """Async version of :func:`timed` for coroutine functions (exceptions propagate)."""
    samples: list[float] = []
    start = time.monotonic()
    for i in range(warmup + runs):
        if budget and i > warmup and time.monotonic() - start > budget:
            break
        t0 = time.perf_counter()
        await fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            samples.append(dt)
    return samples


# -- processes and memory -------------------------------------------------------------


def pss_kib(pid: int) -> int:
    """Proportional set size of one process, KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        yield int(p.name), ppid, cmd


def shim_pids(address: Path, ids: Iterable[str] | None = None) -> dict[str, int]:
    """Container id -> pid of the pykata shim serving it for the containerd at
    ``address`` (only ``ids`` if given)."""
    want = set(ids) if ids is not None else None
    out: dict[str, int] = {}
    for pid, _, cmd in processes():
        if not any(m in cmd for m in SHIM_MARKERS) or f"-address {address} " not in cmd + " ":
            continue
        words = cmd.split()
        if "-id" in words and words.index("-id") + 1 < len(words):
            cid = words[words.index("-id") + 1]
            if want is None or cid in want:
                out[cid] = pid
    return out


def descendants(root: int) -> list[tuple[int, str]]:
    procs = list(processes())
    kids: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, cmd in procs:
        kids.setdefault(ppid, []).append((pid, cmd))
    out: list[tuple[int, str]] = []
    todo = [root]
    while todo:
        for pid, cmd in kids.get(todo.pop(), []):
            out.append((pid, cmd))
            todo.append(pid)
    return out


def unmapped_ram_file_kib(pid: int, cmd: str) -> int:
    """Guest RAM a VM cloned from a template holds in its RAM file (tmpfs) but has
    not mapped yet: PSS does not see it, the host still pays for it. 0 for VMs
    whose RAM is an anonymous memfd (every touched page is mapped by QEMU)."""
    path = next((part.split("mem-path=", 1)[1].split(",", 1)[0]
                 for part in cmd.split() if "mem-path=" in part), "")
    if not path:
        return 0
    if path.startswith("/proc/self/fd/"):  # a confined QEMU gets its RAM file as an fd
        try:
            path = os.readlink(f"/proc/{pid}/fd/{path.rsplit('/', 1)[1]}")
        except OSError:
            return 0
    try:
        allocated = os.stat(path).st_blocks // 2
        mapped = 0
        in_map = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                in_map = line.rstrip().endswith(path)
            elif in_map and line.startswith("Rss:"):
                mapped += int(line.split()[1])
    except OSError:
        return 0
    return max(0, allocated - mapped)


def pod_memory(address: Path, ids: list[str]) -> dict[str, float]:
    """PSS (KiB) of shim + QEMU + virtiofsd of the pods ``ids`` (summed over
    pods), plus guest RAM of template clones held in their RAM file but not yet
    mapped (``ram_file``), the largest shim RSS, and how many pods were found."""
    per = {"qemu": 0.0, "virtiofsd": 0.0, "shim": 0.0, "ram_file": 0.0}
    shim_rss = 0
    shims = shim_pids(address, ids)
    for pid in shims.values():
        per["shim"] += pss_kib(pid)
        shim_rss = max(shim_rss, rss_kib(pid))
        for child, cmd in descendants(pid):
            if "qemu-system" in cmd:
                per["qemu"] += pss_kib(child)
                per["ram_file"] += unmapped_ram_file_kib(child, cmd)
            elif "virtiofsd" in cmd:
                per["virtiofsd"] += pss_kib(child)
    return {**per, "total": sum(per.values()), "shim_rss_max": float(shim_rss),
            "pods_found": float(len(shims))}


# -- VM templating --------------------------------------------------------------------

TEMPLATE_DIR = Path("/dev/shm/pykata-bench")


def template_config() -> Path:
    """A pykata configuration with VM templating on (template under TEMPLATE_DIR),
    for ``ctr run --runtime-config-path``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / "template.toml"
    p.write_text(f'[factory]\nenable_template = true\n'
                 f'template_path = "{TEMPLATE_DIR}/template"\n')
    return p


def build_template() -> float:
    """``pykata factory init`` with template_config(); its wall seconds."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(["pykata", "--config", str(template_config()), "factory", "init"],
                   check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def destroy_template() -> None:
    import shutil
    import subprocess

    subprocess.run(["pykata", "--config", str(template_config()), "factory", "destroy"],
                   check=False, capture_output=True, timeout=60)
    shutil.rmtree(TEMPLATE_DIR, ignore_errors=True)


# -- the private containerd of the benchmarks ------------------------------------------


def start_containerd(section: str) -> PrivateContainerd:
    """A private containerd (no CRI) with the busybox image imported."""
    from pykata.testing import busybox_rootfs
    from pykata.testing.images import oci_archive

    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    archive = oci_archive(rootfs, CACHE / "busybox.oci.tar")
    ctd = PrivateContainerd(base=CTD_BASE / section, root=CTD_ROOT, namespace=NAMESPACE)
    ctd.start()
    try:
        ctd.import_image(archive)
    except BaseException:
        ctd.stop()
        raise
    return ctd


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def remove_containers(ctd: PrivateContainerd, ids: list[str]) -> None:
    """Kill and delete containers (in parallel), then make sure no shim, VM or
    sandbox state of theirs is left (also after a failure)."""
    if not ids:
        return

    def one(cid: str) -> None:
        ctd.ctr("task", "kill", "-s", "KILL", cid, check=False, timeout=60)
        for _ in range(50):
            r = ctd.ctr("task", "delete", "-f", cid, check=False, timeout=60)
            if r.returncode == 0 or b"not found" in r.stderr:
                break
            time.sleep(0.2)
        ctd.ctr("container", "delete", cid, check=False, timeout=60)

    with ThreadPoolExecutor(max_workers=min(len(ids), 10)) as ex:
        list(ex.map(one, ids))
    reap_shims(ctd.socket, ids)


def reap_shims(address: Path, ids: list[str]) -> None:
    """Last resort: terminate shims (and their QEMU/virtiofsd) of ``ids`` still
    running, and clean their sandbox state."""
    deadline = time.monotonic() + 15
    while shim_pids(address, ids) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = shim_pids(address, ids)
    for cid, pid in left.items():
        print(f"  reaping shim of {cid} (pid {pid})", file=sys.stderr)
        for child, _ in descendants(pid):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        from pykata import config
        from pykata.runtime.cleanup import cleanup

        state = config.load().runtime.state_dir
        for cid in left:
            with contextlib.suppress(Exception):
                asyncio.run(cleanup(state, cid))


# -- command line and results ------------------------------------------------------------


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--quick", action="store_true", help="few runs, small sizes (development)")
    ap.add_argument("--runs", type=int, default=0, help="override the run count")
    return ap


def runs(args: argparse.Namespace, full: int, quick: int) -> int:
    return int(args.runs) if args.runs else (quick if args.quick else full)


def sigterm_as_interrupt() -> None:
    """SIGTERM (run.py's timeout) unwinds like Ctrl-C so that cleanup runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def run_section(main: Callable[[], int]) -> NoReturn:
    """A section script's entry point: its exit code; 130 after Ctrl-C or
    run.py's SIGTERM (the section's own finally blocks have cleaned up)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted (what the section made is cleaned up)")
        sys.exit(130)


def save_series(name: str, series: list[Series], **extra: object) -> None:
    """Save a section's series (and ``extra`` keys) and print one line per series."""
    save(name, {"series": [s.to_json() for s in series], **extra})
    for s in series:
        print(s.line())


@contextlib.asynccontextmanager
async def private_sandbox(prefix: str) -> AsyncIterator[Sandbox]:
    """A sandbox made in-process under a state directory of its own; stopped,
    cleaned up and its state removed afterwards, also after a failure."""
    from pykata import config
    from pykata.runtime.cleanup import cleanup
    from pykata.runtime.sandbox import Sandbox

    cfg = config.load()
    tag = uuid.uuid4().hex[:6]
    state = Path(f"/run/pykata/bench-{tag}")
    cfg.runtime.state_dir = str(state)
    sid = f"{prefix}-{tag}"
    sb: Sandbox | None = None
    try:
        sb = await Sandbox.create(sid, cfg)
        yield sb
    finally:
        if sb is not None:
            await sb.stop()
        with contextlib.suppress(Exception):
            await cleanup(state, sid)
        shutil.rmtree(state, ignore_errors=True)


def save(name: str, data: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data.setdefault("when", time.strftime("%Y-%m-%d %H:%M"))
    data.setdefault("host", os.uname().release)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return p


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
