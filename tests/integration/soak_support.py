"""What one private containerd and its pykata shims hold, counted for the soak,
concurrency and bad-input tests (tests/integration/test_soak.py,
test_bad_input.py).

Every count is scoped to the test's own things, never the host's, since other
tests may run beside it:

- processes: the private containerd and everything below it, plus the shims
  serving it (``-m pykata.shim ... -address <its socket>``: a shim is its own
  session, reparented away from containerd) and everything below them (QEMU,
  virtiofsd);
- file descriptors of containerd, of those shims, and of the shims' children;
- mounts at or below the test's state directories (pykata's private
  ``state_dir``, containerd's base and root);
- files (of any kind) below those directories, not crossing a mount point;
- shim sockets (``/run/pykata/s/<hash>``) of the ids the test used;
- network namespaces of the test's pods still present, the taps left in
  them, veths still plugged into the test's CNI bridge;
- host cgroups named after the test's ids.

Memory is the RSS and PSS of one long-lived shim (the anchor pod's): the
soak compares it at cycle 10 and at the end with MEMORY_TOLERANCE_KIB of
slack; the counts get none.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The anchor shim's RSS and PSS may grow this much between cycle 10 and the end
# (Python's allocator keeps freed arenas, logging buffers, import caches): more is
# a leak. About 8 % of an idle shim's 50 MiB RSS.
MEMORY_TOLERANCE_KIB = 4096
SHIM_MARK = "pykata.shim"
SOCKET_DIR = Path("/run/pykata/s")
RESULTS = Path(os.environ.get("PYKATA_SOAK_RESULTS", "/var/tmp/pykata-test/soak"))


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmd: str


def proc_table(proc: Path = Path("/proc")) -> dict[int, Proc]:
    """Every process: pid -> (pid, parent pid, command line)."""
    out: dict[int, Proc] = {}
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out[int(p.name)] = Proc(int(p.name), ppid, cmd.strip())
    return out


def descendants(table: dict[int, Proc], root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in table.values():
        kids.setdefault(p.ppid, []).append(p.pid)
    out: list[int] = []
    todo = [root]
    while todo:
        for pid in kids.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return out


def shim_id(cmd: str) -> str:
    words = cmd.split()
    if "-id" in words and words.index("-id") + 1 < len(words):
        return words[words.index("-id") + 1]
    return ""


@dataclass
class Scope:
    """What belongs to one test: its containerd (socket and pid), its state
    directories, and what it learns as it goes (ids, pod netns paths)."""

    address: Path
    containerd_pid: int
    dirs: tuple[Path, ...]
    namespace: str = ""
    ids: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    bridge: str = ""
    proc: Path = Path("/proc")
    sys_net: Path = Path("/sys/class/net")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    socket_dir: Path = SOCKET_DIR

    def shims(self, table: dict[int, Proc] | None = None) -> dict[str, int]:
        """Shim id (the pod's sandbox id) -> pid of the shim serving it here."""
        table = self.proc_table() if table is None else table
        mark = f"-address {self.address} "
        return {shim_id(p.cmd): p.pid for p in table.values()
                if SHIM_MARK in p.cmd and mark in p.cmd + " " and shim_id(p.cmd)}

    def proc_table(self) -> dict[int, Proc]:
        return proc_table(self.proc)

    def processes(self, table: dict[int, Proc] | None = None) -> dict[int, str]:
        """pid -> command line of containerd, the shims, and all below them."""
        table = self.proc_table() if table is None else table
        roots = [self.containerd_pid, *self.shims(table).values()]
        pids: set[int] = set()
        for r in roots:
            if r in table:
                pids.add(r)
                pids.update(descendants(table, r))
        return {pid: table[pid].cmd for pid in sorted(pids) if pid in table}

    def fds(self, pid: int) -> int:
        try:
            return len(os.listdir(self.proc / str(pid) / "fd"))
        except OSError:
            return 0

    def mounts(self) -> list[str]:
        points = mount_points(self.proc)
        prefixes = [os.path.normpath(str(d)) for d in self.dirs]
        return sorted(p for p in points
                      if any(p == d or p.startswith(d + "/") for d in prefixes))

    def files(self, skip: Iterable[str] = ()) -> int:
        """Entries below the state directories, not crossing a mount point."""
        stop = set(skip)
        n = 0
        for d in self.dirs:
            for top, dirs, names in os.walk(d):
                keep = [x for x in dirs if os.path.join(top, x) not in stop]
                n += len(names) + len(keep)
                dirs[:] = [x for x in keep if not os.path.islink(os.path.join(top, x))]
        return n

    def sockets(self) -> list[str]:
        from pykata.shim.main import socket_path

        found = []
        for i in self.ids:
            p = socket_path(str(self.address), self.namespace, i)
            p = self.socket_dir / p.name
            if os.path.lexists(p):
                found.append(str(p))
        return sorted(found)

    def live_netns(self) -> list[str]:
        return sorted(n for n in self.netns if os.path.lexists(n))

    def taps(self) -> int:
        """Taps (``<if>_pk``) and macvtaps in the test's pod netns still there."""
        n = 0
        for ns in self.live_netns():
            r = subprocess.run(["ip", "-n", Path(ns).name, "-o", "link", "show"],
                               capture_output=True, text=True, check=False, timeout=30)
            for line in r.stdout.splitlines():
                name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
                if name.endswith("_pk") or "macvtap" in line:
                    n += 1
        return n

    def veths(self) -> int:
        if not self.bridge:
            return 0
        try:
            return len(os.listdir(self.sys_net / self.bridge / "brif"))
        except OSError:
            return 0

    def cgroups(self) -> list[str]:
        """Host cgroup directories ``<hierarchy>/<parent>/<id>`` of the test's ids."""
        found = []
        with contextlib.suppress(OSError):
            for h in self.cgroup_root.iterdir():
                with contextlib.suppress(OSError):
                    for parent in h.iterdir():
                        if not parent.is_dir():
                            continue
                        with contextlib.suppress(OSError):
                            found += [str(e) for e in parent.iterdir() if e.name in self.ids]
        return sorted(found)

    def snapshot(self, anchor: str = "") -> Snapshot:
        """The counts now, and the memory of the shim serving ``anchor``."""
        table = self.proc_table()
        procs = self.processes(table)
        shims = self.shims(table)
        mounts = self.mounts()
        shim_fds = sum(self.fds(p) for p in shims.values())
        child_fds = sum(self.fds(p) for s in shims.values() for p in descendants(table, s))
        counts = {
            "processes": len(procs),
            "shims": len(shims),
            "fds containerd": self.fds(self.containerd_pid),
            "fds shims": shim_fds,
            "fds shim children": child_fds,
            "mounts": len(mounts),
            "files": self.files(mounts),
            "shim sockets": len(self.sockets()),
            "netns": len(self.live_netns()),
            "taps": self.taps(),
            "veths": self.veths(),
            "cgroups": len(self.cgroups()),
        }
        memory: dict[str, int] = {}
        if anchor and anchor in shims:
            rss, pss = memory_kib(shims[anchor], self.proc)
            memory = {"anchor shim rss KiB": rss, "anchor shim pss KiB": pss,
                      "anchor shim fds": self.fds(shims[anchor])}
        return Snapshot(counts, memory, procs, mounts)

    def settle(self, anchor: str = "", bound: float = 30.0, interval: float = 0.5
               ) -> Snapshot:
        """A snapshot once two in a row agree on every count (at most ``bound``
        seconds of looking: the last one then)."""
        last = self.snapshot(anchor)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = self.snapshot(anchor)
            if now.counts == last.counts:
                return now
            last = now
        return last

    def wait_shims_gone(self, ids: Iterable[str], bound: float = 60.0) -> dict[str, float]:
        """Wait (at most ``bound`` s) for the shims of ``ids`` to exit; the seconds
        each one lived on after the call (``bound`` or more: still there)."""
        want = set(ids)
        t0 = time.monotonic()
        linger: dict[str, float] = {}
        while True:
            alive = want & set(self.shims())
            now = time.monotonic() - t0
            for i in want - alive - set(linger):
                linger[i] = now
            if not alive or now >= bound:
                for i in alive:
                    linger[i] = now
                return linger
            time.sleep(0.1)


def mount_points(proc: Path = Path("/proc")) -> list[str]:
    out = []
    with open(proc / "self" / "mountinfo") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4:
                out.append(_unescape(parts[4]))
    return out


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def memory_kib(pid: int, proc: Path = Path("/proc")) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


@dataclass
class Snapshot:
    counts: dict[str, int]
    memory: dict[str, int]
    processes: dict[int, str] = field(default_factory=dict)
    mount_list: list[str] = field(default_factory=list)


def count_changes(before: Snapshot, after: Snapshot) -> list[str]:
    """Every count that differs (no tolerance), with what the processes and
    mounts that came or went are."""
    out = [f"{k}: {before.counts.get(k)} -> {after.counts.get(k)}"
           for k in sorted(set(before.counts) | set(after.counts))
           if before.counts.get(k) != after.counts.get(k)]
    if out:
        new = set(after.processes.values()) - set(before.processes.values())
        out += [f"new process: {c[:200]}" for c in sorted(new)]
        out += [f"new mount: {m}" for m in sorted(set(after.mount_list) - set(before.mount_list))]
    return out


def memory_growth(before: Snapshot, after: Snapshot,
                  tolerance_kib: int = MEMORY_TOLERANCE_KIB) -> list[str]:
    """Memory figures that grew by more than ``tolerance_kib``; fds of the anchor
    shim may not grow at all."""
    out = []
    for k, v in before.memory.items():
        now = after.memory.get(k)
        if now is None:
            out.append(f"{k}: {v} -> gone")
        elif k.endswith("fds"):
            if now != v:
                out.append(f"{k}: {v} -> {now}")
        elif now - v > tolerance_kib:
            out.append(f"{k}: {v} -> {now} (+{now - v} KiB, more than {tolerance_kib} KiB)")
    return out


@dataclass
class Figures:
    """What a soak run measured: written to RESULTS/<name>.json and printed."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    cycle_seconds: list[float] = field(default_factory=list)
    linger_seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def timed(self, fn: Callable[[], None]) -> float:
        t0 = time.monotonic()
        fn()
        dt = time.monotonic() - t0
        self.cycle_seconds.append(dt)
        return dt

    def summary(self) -> dict[str, Any]:
        cs = sorted(self.cycle_seconds)
        ls = sorted(self.linger_seconds)
        out = dict(self.data)
        out["failures"] = list(self.failures)
        if cs:
            out["seconds per cycle (median, max)"] = [round(cs[len(cs) // 2], 2),
                                                      round(cs[-1], 2)]
        if ls:
            out["shim exit after delete, s (median, max)"] = [round(ls[len(ls) // 2], 2),
                                                              round(ls[-1], 2)]
        return out

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        text = json.dumps(self.summary(), indent=2, sort_keys=True)
        path.write_text(text + "\n")
        print(f"\n---- {self.name} ----\n{text}")
        return path


def cycles(env: str, default: int) -> int:
    """A cycle count from the environment (``make soak`` sets the full ones)."""
    raw = os.environ.get(env, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a number") from None
    if value < 1:
        raise ValueError(f"{env}={raw!r}: at least 1")
    return value


def baseline_cycle(total: int) -> int:
    """The cycle after which the counts are taken as the baseline: the 10th, or
    half-way in a shorter run."""
    return min(10, max(1, total // 2))
