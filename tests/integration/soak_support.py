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
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata import config
from pykata.protos import cri_api_pb2 as cri
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.cri import (
    BUSYBOX_REF,
    CNINetwork,
    CRIClient,
    CRIError,
    container_config,
    cri_containerd,
    pod_config,
)
from pykata.testing.images import oci_archive
from tests.integration.conftest import _with_rootfs_mode

# The anchor shim's RSS and PSS may grow this much between cycle 10 and the end
# (Python's allocator keeps freed arenas, logging buffers, import caches): more is
# a leak. About 8 % of an idle shim's 50 MiB RSS.
MEMORY_TOLERANCE_KIB = 4096
SHIM_MARK = "pykata.shim"
SOCKET_DIR = Path("/run/pykata/s")
RESULTS = Path(os.environ.get("PYKATA_SOAK_RESULTS", "/var/tmp/pykata-test/soak"))
CACHE = Path("/var/tmp/pykata-test")
HANDLER = "pykata"
LABEL = {"pykata.test": "soak"}
# A long-lived container: sleeps until TERM, however long the soak runs (a
# single `sleep 3600` once ended a 500-cycle soak's anchor pod after an hour).
SLEEP_SCRIPT = "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"
SLEEP = ["sh", "-c", SLEEP_SCRIPT]


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

    def files(self, skip: Iterable[str] = ()) -> list[str]:
        """Entries below the state directories, not crossing a mount point."""
        stop = set(skip)
        found: list[str] = []
        for d in self.dirs:
            for top, dirs, names in os.walk(d):
                keep = [x for x in dirs if os.path.join(top, x) not in stop]
                found += [os.path.join(top, x) for x in names + keep]
                dirs[:] = [x for x in keep if not os.path.islink(os.path.join(top, x))]
        return found

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
        files = self.files(mounts)
        shim_fds = sum(self.fds(p) for p in shims.values())
        child_fds = sum(self.fds(p) for s in shims.values() for p in descendants(table, s))
        counts = {
            "processes": len(procs),
            "shims": len(shims),
            "fds containerd": self.fds(self.containerd_pid),
            "fds shims": shim_fds,
            "fds shim children": child_fds,
            "mounts": len(mounts),
            "files": len(files),
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
                      "anchor shim fds": self.fds(shims[anchor]),
                      "anchor shim threads": threads(shims[anchor], self.proc)}
        return Snapshot(counts, memory, procs, mounts, files)

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


def threads(pid: int, proc: Path = Path("/proc")) -> int:
    """Threads of ``pid`` (0 if it is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


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
    file_list: list[str] = field(default_factory=list)


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
        came = sorted(set(after.file_list) - set(before.file_list))
        went = sorted(set(before.file_list) - set(after.file_list))
        out += [f"new file: {f}" for f in came[:20]] + (
            [f"... and {len(came) - 20} more new files"] if len(came) > 20 else [])
        out += [f"file gone: {f}" for f in went[:10]]
    return out


def memory_growth(before: Snapshot, after: Snapshot,
                  tolerance_kib: int = MEMORY_TOLERANCE_KIB) -> list[str]:
    """Memory figures that grew by more than ``tolerance_kib``; the anchor shim's
    fds and threads may not grow at all."""
    out = []
    for k, v in before.memory.items():
        now = after.memory.get(k)
        if now is None:
            out.append(f"{k}: {v} -> gone")
        elif k.endswith(("fds", "threads")):
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


def tag() -> str:
    return uuid.uuid4().hex[:6]


def private_config(state: Path) -> str:
    """TOML for the shims: this test's own state directory, nothing shared."""
    cfg = _with_rootfs_mode(config.load())
    cfg.runtime.state_dir = str(state)
    # PYKATA_SOAK_PODS VMs boot at once on this host's 2 cores under TCG: 10 of
    # them took over 45 s (the default dial timeout) each to reach the agent. The
    # operator's knob for a host this loaded is [agent] dial_timeout; the soak sets
    # it for the parallelism it asks for (a failure is still a failure).
    pods = int(os.environ.get("PYKATA_SOAK_PODS", "4"))
    cfg.agent.dial_timeout = max(cfg.agent.dial_timeout, 11 * pods)  # < the CRI call's 120 s
    # And the guest's create: 2 of 100 burst creates passed 60 s at load 16.
    cfg.runtime.create_container_timeout = max(cfg.runtime.create_container_timeout, 11 * pods)
    return config.to_toml(cfg)


def stderr_line(r: object) -> str:
    stderr = getattr(r, "stderr", b"") or b""
    return " ".join(stderr.decode(errors="replace").split())[-400:]




# -- environments ---------------------------------------------------------------


class CtrEnv:
    """A private containerd (no CRI) whose pykata shims keep their state in a
    private state directory; the busybox image imported."""

    def __init__(self, name: str = "soak") -> None:
        t = tag()
        self.state = Path(f"/run/pykata/{name}-{t}")
        base = Path(f"/run/pykata-{name}-{t}")
        base.mkdir(parents=True)
        (base / "pykata.toml").write_text(private_config(self.state))
        self.ctd = PrivateContainerd(base=base, root=CACHE / f"{name}-ctd-{t}",
                                     namespace="soak",
                                     env={"PYKATA_CONFIG": str(base / "pykata.toml")})
        archive = oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"),
                              CACHE / "busybox.oci.tar")
        self.ctd.start()
        assert self.ctd.proc is not None
        self.ctd.import_image(archive)
        self.scope = Scope(address=self.ctd.socket, containerd_pid=self.ctd.proc.pid,
                           dirs=(self.state, base, self.ctd.root), namespace="soak")
        self._warm = False

    def ctr(self, *args: str, timeout: float = 300) -> tuple[int, str, str]:
        r = self.ctd.ctr(*args, check=False, timeout=timeout)
        return r.returncode, r.stdout.decode(errors="replace"), stderr_line(r)

    def remove(self, cid: str) -> None:
        self.ctr("task", "delete", "-f", cid)
        self.ctr("container", "delete", cid)

    def warm(self) -> None:
        """One container run to its end and removed, once per environment: what
        a first pod makes once (containerd's namespace directories, pykata's
        state directories) is then not counted as a leak of what follows."""
        if self._warm:
            return
        cid = f"warm-{tag()}"
        self.scope.ids.add(cid)
        rc, _, err = self.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, BUSYBOX_REF, cid, "true")
        assert rc == 0, f"the warm-up container failed: {err}"
        self.scope.wait_shims_gone([cid], 30)
        self._warm = True

    def close(self) -> list[str]:
        for cid in self.ctr("tasks", "ls", "-q")[1].split():
            self.ctr("tasks", "delete", "-f", cid)
        for cid in self.ctr("containers", "ls", "-q")[1].split():
            self.ctr("containers", "delete", cid)
        self.scope.wait_shims_gone(self.scope.ids, 30)
        left = leftovers(self.state) + [f"shim {i}" for i in self.scope.shims()]
        self.ctd.stop()
        shutil.rmtree(self.ctd.root, ignore_errors=True)
        shutil.rmtree(self.ctd.base, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        return left



class CriEnv:
    """A private containerd with the CRI plugin (cri_containerd) whose pykata shims
    keep their state in a private state directory; pods of the test carry LABEL."""

    def __init__(self, ctd: PrivateContainerd, net: CNINetwork, client: CRIClient,
                 state: Path) -> None:
        assert ctd.proc is not None
        self.ctd, self.net, self.c, self.state = ctd, net, client, state
        self.scope = Scope(address=ctd.socket, containerd_pid=ctd.proc.pid,
                           dirs=(state, ctd.base, ctd.root), namespace="k8s.io",
                           bridge=net.bridge)
        self.logs = Path(tempfile.mkdtemp(prefix="pykata-soak-logs-"))

    def pod_config(self, name: str, **kw: Any) -> tuple[cri.PodSandboxConfig, Path]:
        t = tag()
        logs = self.logs / t
        kw.setdefault("hostname", f"h-{t}")
        return pod_config(f"{name}-{t}", "soak", uid=f"{name}-{t}", log_directory=logs,
                          labels=LABEL, **kw), logs

    def pod(self, name: str, **kw: Any) -> tuple[str, cri.PodSandboxConfig, Path]:
        cfg, logs = self.pod_config(name, **kw)
        pod_id = self.c.run_pod_sandbox(cfg, runtime_handler=HANDLER)
        self.scope.ids.add(pod_id)
        info = json.loads(self.c.pod_sandbox_status(pod_id, verbose=True).info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network" and ns.get("path"):
                self.scope.netns.add(ns["path"])
        return pod_id, cfg, logs

    def container(self, pod_id: str, cfg: cri.PodSandboxConfig, name: str) -> str:
        cid = self.c.create_container(pod_id, container_config(
            name, BUSYBOX_REF, ["/bin/sh", "-c"], [SLEEP_SCRIPT], log_path=f"{name}.log"), cfg)
        self.scope.ids.add(cid)
        self.c.start_container(cid)
        return cid

    def exec_ok(self, cid: str, word: str) -> None:
        r = self.c.exec_sync(cid, ["sh", "-c", f"echo {word}"], timeout=60)
        assert (r.stdout, r.exit_code) == (f"{word}\n".encode(), 0), \
            f"exec in {cid}: {r.exit_code} {r.stdout!r} {r.stderr!r}"

    def remove_pod(self, pod_id: str, logs: Path | None = None) -> None:
        try:
            self.c.stop_pod_sandbox(pod_id)
            self.c.remove_pod_sandbox(pod_id)
        finally:
            if logs is not None:  # the kubelet removes a pod's log directory
                shutil.rmtree(logs, ignore_errors=True)

    def close(self) -> list[str]:
        for pod in self.c.list_pod_sandbox(labels=LABEL):
            try:
                self.remove_pod(pod.id)
            except CRIError:
                pass
        self.scope.wait_shims_gone(self.scope.ids, 30)
        shutil.rmtree(self.logs, ignore_errors=True)
        return leftovers(self.state) + [f"shim {i}" for i in self.scope.shims()] + [
            f"netns {n}" for n in self.scope.live_netns()]


@contextlib.contextmanager
def cri_env(name: str = "soak") -> Iterator[CriEnv]:
    """A CriEnv; on the way out every pod of LABEL is removed, and what is left
    (pykata processes, mounts or state of the private state dir, shims, netns)
    fails the test."""
    t = tag()
    state = Path(f"/run/pykata/{name}-cri-{t}")
    left: list[str] = []
    with cri_containerd(Path(f"/run/pykata-{name}-cri-{t}"), CACHE / f"{name}-cri-{t}",
                        LABEL, pykata_config=private_config(state)) as (ctd, net, client):
        env = CriEnv(ctd, net, client, state)
        try:
            yield env
        finally:
            left = env.close()
    shutil.rmtree(CACHE / f"{name}-cri-{t}", ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    assert not left, f"left behind: {left}"


@contextlib.contextmanager
def ctr_env(name: str = "soak") -> Iterator[CtrEnv]:
    """A CtrEnv; on the way out every task and container is deleted, and what is
    left (pykata processes, mounts or state of the private state dir, shims)
    fails the test."""
    env = CtrEnv(name)
    try:
        yield env
    finally:
        left = env.close()
    assert not left, f"left behind: {left}"
