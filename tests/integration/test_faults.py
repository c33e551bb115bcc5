"""Issue 17, faults: kill -9 anything, restart containerd, nothing lost or leaked.

Through a private containerd (``ctr``) and its CRI plugin, each fault is made
while a container runs and while one is being created, PYKATA_FAULT_TRIALS
times each (1 in ``make test``, 20 in ``make soak-faults``):

- ``qemu``: SIGKILL of the pod's QEMU;
- ``virtiofsd``: SIGKILL of its virtiofsd (every process of it);
- ``shim``: SIGKILL of the pod's shim (containerd runs ``shim delete``);
- ``agent``: the agent, PID 1 of the guest, dies. Nothing inside the guest may
  signal it (the kernel drops SIGKILL sent to an init from its own pid
  namespace, and containers live in pid namespaces below it), so a test-only
  OCI ``createContainer`` hook, which the guest runs as root with every
  capability before the container's pivot_root, overwrites the agent's code
  through ``/proc/1/mem``: its next instruction traps, the kernel panics
  ("Attempted to kill init!"), the guest resets and QEMU exits (``-no-reboot``).
  While a container runs, the hook is a second container's, joining the pod;
- ``panic``: a guest kernel panic (``echo c > /proc/sysrq-trigger``): from an
  exec in the running container, or from a createContainer hook.

"While one is being created" is either right as the target process appears
(``boot``: the VM is booting; a seeded delay of up to BOOT_DELAY_MAX), or while
the create is held in a host ``prestart`` hook that waits for the test
(``hook``), or (agent, panic) a guest createContainer hook.

Each trial checks that containerd got the exit (a ``/tasks/exit`` event with
status 255 when the VM died, 137 when the shim did; its time is the fault's,
not 1970) or that the create failed with one readable error line; that
``ctr task delete`` and ``ctr container rm`` (RemovePodSandbox for CRI pods)
leave nothing of the pod (processes, mounts, state directory, shim socket,
containerd bundle); and that a pod started before all trials still runs in the
same VM and answers an exec. Figures (trials, failures, time from the fault to
the exit event) go to PYKATA_FAULT_REPORT (default
/var/tmp/pykata-test/faults/<test>.json).

containerd restarts (SIGKILL and SIGTERM) while pods run: afterwards the pods
are listed, exec works, a container that exited while containerd was down is
seen stopped, the shims' events reach the new containerd, and the pods stop
and clean up normally.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.protos import cri_api_pb2 as cri
from pykata.runtime.state import SandboxRecord, sandbox_dir
from pykata.shim.main import STALE_SOCKET_AGE, socket_path, socket_refused
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.bundles import default_spec, make_bundle
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.cri import (
    BUSYBOX_REF,
    CRIClient,
    CRIError,
    container_config,
    cri_containerd,
    pod_config,
)
from pykata.testing.images import oci_archive
from pykata.testing.leaks import pod_leftovers
from tests.integration.conftest import _with_rootfs_mode

TRIALS = max(1, int(os.environ.get("PYKATA_FAULT_TRIALS", "1")))
CRI_TRIALS = max(1, int(os.environ.get("PYKATA_FAULT_CRI_TRIALS", str(max(1, TRIALS // 2)))))
FAULTS = ("qemu", "virtiofsd", "shim", "agent", "panic")
CACHE = Path("/var/tmp/pykata-test")
REPORT_DIR = Path(os.environ.get("PYKATA_FAULT_REPORT", str(CACHE / "faults")))
RT = ["--runtime", RUNTIME_TYPE]
# Sleeps until TERM however long the run (make soak-faults takes about an hour).
SLEEP_SCRIPT = "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done"
SLEEP = ["sh", "-c", SLEEP_SCRIPT]
NS = "faults"
HANDLER = "pykata"
LABEL = {"pykata.test": "faults"}
BOOT_DELAY_MAX = 0.3  # seconds after the target appears (create is seconds long under TCG)
EXIT_BOUND = 120.0  # the exit event must come by then (a bound, not a figure)
CLEAN_BOUND = 60.0  # and everything be gone this long after the delete
VM_DEAD_STATUS = 255  # the exit status of a process whose VM died (runtime/container.py)
SHIM_DEAD_STATUS = 137  # containerd's exit for a dead shim: the status shim delete gives

# A trial can take a minute under load; soak runs of 20 trials each get room.
pytestmark = pytest.mark.timeout(300 + 120 * TRIALS)

# The guest hooks, run by the agent's engine as root with every capability,
# before pivot_root, in the container's namespaces but the VM's /proc:
# ``panic`` crashes the guest kernel; ``agent`` fills the agent's (PID 1's)
# code (the interpreter's and libc's) with int3 instructions through
# /proc/1/mem: the agent traps at its next wake-up (SIGTRAP, which even an init
# gets from the kernel), and the kernel panics "Attempted to kill init!".
PANIC_HOOK = "echo c > /proc/sysrq-trigger"
AGENT_HOOK = (
    "grep ' r-xp ' /proc/1/maps | grep -e python -e libc | while read -r range rest; do"
    " lo=${range%-*}; hi=${range#*-}; n=$(( (0x$hi - 0x$lo) / 4096 ));"
    " head -c $((n * 4096)) /dev/zero | tr '\\000' '\\314' |"
    " dd of=/proc/1/mem bs=4096 seek=$((0x$lo / 4096)) conv=notrunc 2>/dev/null; done")


# -- helpers --------------------------------------------------------------------------------


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _wait(cond: Callable[[], Any], timeout: float, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(step)


def _cmdlines() -> Iterator[tuple[int, str]]:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd:
                yield int(p.name), cmd


def _private_config(state: Path) -> str:
    """TOML for the shims: this test's own state directory."""
    cfg = _with_rootfs_mode(config.load())
    cfg.runtime.state_dir = str(state)
    return config.to_toml(cfg)


def _one_line(text: str) -> str:
    return " ".join(text.split())[-600:]


@dataclass
class Trial:
    fault: str
    phase: str  # running | creating
    mode: str  # running | exec | boot | hook | guest-hook | second-container
    n: int
    id: str
    outcome: str = ""
    exit_status: int | None = None
    detect_s: float | None = None  # fault -> exit event (running) or -> create error
    clean_s: float | None = None  # delete -> nothing left
    error: str = ""  # a create's error line
    failure: str = ""
    others: list[str] = field(default_factory=list)  # more containers to remove


@dataclass
class Report:
    name: str
    trials: list[Trial] = field(default_factory=list)

    def write(self) -> Path:
        REPORT_DIR.mkdir(parents=True, exist_ok=True)
        path = REPORT_DIR / f"{self.name}.json"
        detect = [t.detect_s for t in self.trials if t.detect_s is not None]
        summary = {
            "trials": len(self.trials),
            "failures": sum(1 for t in self.trials if t.failure),
            "detect_s": {"min": min(detect), "median": sorted(detect)[len(detect) // 2],
                         "max": max(detect)} if detect else None,
        }
        path.write_text(json.dumps({"summary": summary,
                                    "trials": [asdict(t) for t in self.trials]}, indent=1))
        return path

    def verdict(self) -> None:
        self.write()
        bad = [f"trial {t.n} ({t.mode}): {t.failure}" for t in self.trials if t.failure]
        assert not bad, f"{len(bad)} of {len(self.trials)} trials failed:\n" + "\n".join(bad)


class EventLog:
    """``ctr events`` of one containerd, read by a thread: (when, topic, event)."""

    LINE = re.compile(r"\s(/tasks/[a-z-]+)\s+(\{.*\})\s*$")

    def __init__(self, ctd: PrivateContainerd) -> None:
        self.proc = subprocess.Popen(["ctr", "--address", str(ctd.socket), "events"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = self.LINE.search(line)
            if not m:
                continue
            with contextlib.suppress(ValueError):
                ev = json.loads(m.group(2))
                with self.lock:
                    self.events.append((time.monotonic(), m.group(1), ev))

    def find(self, topic: str, cid: str, since: float) -> tuple[float, dict[str, Any]] | None:
        with self.lock:
            for t, top, ev in self.events:
                if t >= since and top == topic and ev.get("container_id") == cid \
                        and ev.get("id", cid) == cid:
                    return t, ev
        return None

    def wait(self, topic: str, cid: str, since: float, timeout: float
             ) -> tuple[float, dict[str, Any]] | None:
        return _wait(lambda: self.find(topic, cid, since), timeout, 0.05)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _exited_at(ev: dict[str, Any]) -> float:
    """The event's exited_at as unix seconds (ctr prints an RFC 3339 time)."""
    at = ev.get("exited_at")
    if isinstance(at, str):
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", at)
        assert m, f"exited_at {at!r}"
        base = datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
        return base.timestamp() + float(m.group(2) or 0)
    if isinstance(at, dict):
        return float(at.get("seconds", 0)) + float(at.get("nanos", 0)) / 1e9
    raise AssertionError(f"no exited_at in {ev}")


# -- the ctr environment -------------------------------------------------------------------


class CtrEnv:
    """A private containerd (no CRI) whose pykata shims keep their state in a
    private state directory; the busybox image; ``ctr events`` read all along;
    a bystander pod started first."""

    def __init__(self, tmp: Path) -> None:
        tag = _tag()[:6]
        self.tmp = tmp
        self.state = Path(f"/run/pykata/ft-{tag}")
        base = Path(f"/run/pykata-ft-{tag}")
        base.mkdir(parents=True)
        (base / "pykata.toml").write_text(_private_config(self.state))
        self.ctd = PrivateContainerd(base=base, root=CACHE / f"ft-ctd-{tag}", namespace=NS,
                                     env={"PYKATA_CONFIG": str(base / "pykata.toml")})
        self.rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
        self.ctd.start()
        self.ctd.import_image(oci_archive(self.rootfs, CACHE / "busybox.oci.tar"))
        self.events = EventLog(self.ctd)
        self.address = ""  # what containerd passes its shims as -address
        self.bystander = f"by-{tag}"
        self.bystander_vm = 0

    # -- processes of one pod, found by its id (never by name alone) --
    def shims(self, pod: str) -> list[int]:
        return [pid for pid, cmd in _cmdlines()
                if "pykata.shim" in cmd and f"-id {pod}" in cmd
                and str(self.ctd.socket) in cmd and " delete" not in cmd]

    def qemus(self, pod: str) -> list[int]:
        return [pid for pid, cmd in _cmdlines()
                if "qemu-system" in cmd and f"pykata-{pod}," in cmd]

    def virtiofsds(self, pod: str, ns: str = NS) -> list[int]:
        src = f"source={os.path.realpath(self.state)}/sbs/{ns}/{pod}/shared"
        return [pid for pid, cmd in _cmdlines() if "virtiofsd" in cmd and src in cmd]

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return self.ctd.ctr(*args, check=False, timeout=timeout)

    def run_detached(self, cid: str, *, spec: dict[str, Any] | None = None,
                     args: list[str] | None = None) -> subprocess.Popen[bytes]:
        """``ctr run -d`` of the image (or of ``spec`` through --config), not waited for."""
        argv = ["ctr", "--address", str(self.ctd.socket), "--namespace", NS, "run", "-d", *RT]
        if spec is not None:
            conf = self.tmp / f"{cid}.json"
            conf.write_text(json.dumps(spec))
            argv += ["--config", str(conf), cid]
        else:
            argv += [BUSYBOX_REF, cid, *(args or SLEEP)]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def spec(self, cid: str, args: list[str], *, guest_hook: str = "",
             host_hook: str = "", pod: str = "") -> dict[str, Any]:
        """A spec with its own copy of the busybox root (ctr --config runs no
        snapshotter); sysrq-trigger writable (as on runc: the default spec makes
        it read-only, not the kernel); the hooks asked for; with ``pod``, the
        container joins that pod (the CRI annotations the shim reads)."""
        spec = default_spec(args)
        spec["linux"]["readonlyPaths"] = [p for p in spec["linux"]["readonlyPaths"]
                                          if p != "/proc/sysrq-trigger"]
        bundle = make_bundle(self.tmp / "bundles" / cid, self.rootfs, spec)
        spec["root"]["path"] = str(bundle / "rootfs")
        hooks: dict[str, Any] = {}
        if guest_hook:
            hooks["createContainer"] = [{"path": "/bin/sh", "args": ["sh", "-c", guest_hook],
                                         "timeout": 60}]
        if host_hook:
            hooks["prestart"] = [{"path": "/bin/sh", "args": ["sh", "-c", host_hook],
                                  "timeout": 120}]
        if hooks:
            spec["hooks"] = hooks
        if pod:
            spec["annotations"] = {"io.kubernetes.cri.container-type": "container",
                                   "io.kubernetes.cri.sandbox-id": pod}
        return spec

    def wait_running(self, cid: str, timeout: float = 120) -> bool:
        def running() -> bool:
            out = self.ctr("task", "ls").stdout.decode()
            return any(ln.split()[:1] == [cid] and "RUNNING" in ln for ln in out.splitlines())
        return bool(_wait(running, timeout, 0.2))

    def start_bystander(self) -> None:
        r = self.ctr("run", "-d", *RT, BUSYBOX_REF, self.bystander, *SLEEP)
        assert r.returncode == 0, r.stderr.decode()
        vms = self.qemus(self.bystander)
        assert len(vms) == 1, vms
        self.bystander_vm = vms[0]
        shim = self.shims(self.bystander)
        assert len(shim) == 1, shim
        cmd = (Path(f"/proc/{shim[0]}/cmdline").read_bytes()).split(b"\0")
        self.address = cmd[cmd.index(b"-address") + 1].decode()
        # The leak check looks for a shim's socket where the shim puts it: here.
        assert socket_path(self.address, NS, self.bystander).exists()

    def bystander_ok(self, n: int) -> str:
        """'' if the bystander pod still runs in the same VM and answers an exec."""
        if self.qemus(self.bystander) != [self.bystander_vm]:
            return f"the bystander's VM changed: {self.qemus(self.bystander)}"
        r = self.ctr("task", "exec", "--exec-id", f"chk{n}-{_tag()}", self.bystander,
                     "echo", "alive", timeout=120)
        if r.returncode != 0 or r.stdout != b"alive\n":
            return f"the bystander did not answer: {r.returncode} {_one_line(r.stderr.decode())}"
        return ""

    def leaks(self, cid: str) -> list[str]:
        left = leftovers(self.state, f"{NS}/{cid}")
        left += [f"shim {p}" for p in self.shims(cid)]
        sock = socket_path(self.address, NS, cid)
        if os.path.lexists(sock):
            left.append(f"shim socket {sock}")
        bundle = self.ctd.base / "state" / "io.containerd.runtime.v2.task" / NS / cid
        if bundle.exists():
            left.append(f"containerd bundle {bundle}")
        with open("/proc/mounts") as f:
            left += [f"mount {ln.split()[1]}" for ln in f if cid in ln]
        if cid in self.ctr("container", "ls", "-q").stdout.decode().split():
            left.append(f"container {cid} still listed")
        return left

    def remove(self, cid: str) -> float:
        """Delete the task and the container; seconds until nothing is left
        (AssertionError naming what stays)."""
        t0 = time.monotonic()
        self.ctr("task", "delete", "-f", cid)
        self.ctr("container", "rm", cid)
        sock = socket_path(self.address, NS, cid)

        def settled() -> bool:
            left = self.leaks(cid)
            return not left or (left == [f"shim socket {sock}"] and socket_refused(sock))
        left = _wait(settled, CLEAN_BOUND, 0.2) and not self.leaks(cid)
        if not left:
            self.ctr("task", "delete", "-f", cid)
            self.ctr("container", "rm", cid)
            rest = self.leaks(cid)
            if rest == [f"shim socket {sock}"] and socket_refused(sock):
                # The shim died before containerd dialled it: containerd runs no
                # `shim delete` then. The next shim start sweeps such a socket once
                # it is STALE_SOCKET_AGE old: start one and look again.
                self.sweep_by_a_start(sock)
                rest = self.leaks(cid)
            assert not rest, f"left behind: {rest}"
        return time.monotonic() - t0

    def sweep_by_a_start(self, sock: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            age = time.time() - os.lstat(sock).st_mtime
            time.sleep(max(0.0, STALE_SOCKET_AGE + 1 - age))
        cid = f"sweep-{_tag()[:6]}"
        r = self.ctr("run", "--rm", *RT, BUSYBOX_REF, cid, "true", timeout=300)
        assert r.returncode == 0, f"the sweeping start failed: {_one_line(r.stderr.decode())}"

    def close(self) -> None:
        self.events.close()
        for line in self.ctr("tasks", "ls", "-q").stdout.decode().split():
            self.ctr("tasks", "kill", "-s", "KILL", line)
            self.ctr("tasks", "delete", "-f", line)
        for line in self.ctr("containers", "ls", "-q").stdout.decode().split():
            self.ctr("containers", "delete", line)
        self.ctd.stop()
        left = leftovers(self.state)
        shutil.rmtree(self.ctd.root, ignore_errors=True)
        shutil.rmtree(self.ctd.base, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
        assert not left, f"left behind by the fault tests: {left}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CtrEnv]:
    e = CtrEnv(tmp_path_factory.mktemp("faults"))
    try:
        e.start_bystander()
        yield e
    finally:
        e.close()


# -- the faults -----------------------------------------------------------------------------


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _targets(env: CtrEnv, fault: str, pod: str) -> list[int]:
    return {"qemu": env.qemus, "virtiofsd": env.virtiofsds, "shim": env.shims}[fault](pod)


def _gone(pids: list[int]) -> bool:
    """The pids are reaped (or zombies: killed, waiting for their parent)."""
    def dead(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    return all(dead(p) for p in pids)


def _expect_status(fault: str) -> int:
    return SHIM_DEAD_STATUS if fault == "shim" else VM_DEAD_STATUS


def _check_exit(env: CtrEnv, tr: Trial, cid: str, t_fault: float, wall_fault: float) -> None:
    got = env.events.wait("/tasks/exit", cid, t_fault - 1.0, EXIT_BOUND)
    assert got is not None, f"no /tasks/exit for {cid} within {EXIT_BOUND:.0f}s of the fault"
    t, ev = got
    tr.detect_s = round(max(0.0, t - t_fault), 3)
    tr.exit_status = int(ev.get("exit_status", 0))
    assert tr.exit_status == _expect_status(tr.fault), f"exit event {ev}"
    at = _exited_at(ev)
    # The exit's time is the fault's (not zero, not 1970): within the trial.
    assert wall_fault - 5 <= at <= time.time() + 5, f"exited_at {ev.get('exited_at')}"
    listed = env.ctr("task", "ls").stdout.decode()
    assert not any(ln.split()[:1] == [cid] and "RUNNING" in ln for ln in listed.splitlines()), \
        f"{cid} still RUNNING: {listed}"
    tr.outcome = f"exit {tr.exit_status}"


def _running_trial(env: CtrEnv, tr: Trial) -> None:
    cid = tr.id
    if tr.fault in ("qemu", "virtiofsd", "shim"):
        tr.mode = "running"
        r = env.ctr("run", "-d", *RT, BUSYBOX_REF, cid, *SLEEP)
        assert r.returncode == 0, _one_line(r.stderr.decode())
        pids = _targets(env, tr.fault, cid)
        assert pids, f"no {tr.fault} process of {cid}"
        assert socket_path(env.address, NS, cid).exists()
        t0, w0 = time.monotonic(), time.time()
        _kill(pids)
        _check_exit(env, tr, cid, t0, w0)
        return
    first = env.run_detached(cid, spec=env.spec(cid, SLEEP))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, _one_line(err.decode())
    if tr.fault == "panic":
        tr.mode = "exec"
        t0, w0 = time.monotonic(), time.time()
        p = subprocess.Popen(["ctr", "--address", str(env.ctd.socket), "--namespace", NS,
                              "task", "exec", "--exec-id", "panic", cid, "sh", "-c",
                              PANIC_HOOK], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _check_exit(env, tr, cid, t0, w0)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
            if p.poll() is None:
                p.kill()
                p.wait()
        return
    # agent: a second container joins the pod; its guest hook kills the agent.
    tr.mode = "second-container"
    second = f"fk-{_tag()}"  # not a prefix of cid nor cid of it: leak checks go by id
    t0, w0 = time.monotonic(), time.time()
    killer = env.run_detached(second, spec=env.spec(second, SLEEP, guest_hook=AGENT_HOOK,
                                                    pod=cid))
    try:
        _check_exit(env, tr, cid, t0, w0)
        _, err = killer.communicate(timeout=300)
        assert killer.returncode != 0, "the container that killed the agent was created"
        tr.error = _one_line(err.decode())
        assert "Attempted to kill init" in tr.error, tr.error
    finally:
        if killer.poll() is None:
            killer.kill()
            killer.wait()
        tr.others.append(second)


def _creating_trial(env: CtrEnv, tr: Trial, rng: random.Random) -> None:
    cid = tr.id
    gate = env.tmp / f"gate-{cid}"
    gate.mkdir()
    if tr.fault in ("agent", "panic"):
        tr.mode = "guest-hook"
        hook = AGENT_HOOK if tr.fault == "agent" else PANIC_HOOK
        t0 = time.monotonic()
        proc = env.run_detached(cid, spec=env.spec(cid, SLEEP, guest_hook=hook))
    elif tr.n % 2 == 0:
        tr.mode = "boot"
        t0 = time.monotonic()
        proc = env.run_detached(cid)
        pids = _wait(lambda: _targets(env, tr.fault, cid), 120, 0.005)
        assert pids, f"no {tr.fault} process of {cid} appeared"
        time.sleep(rng.uniform(0, BOOT_DELAY_MAX))
        t0 = time.monotonic()
        _kill(_targets(env, tr.fault, cid))
        assert proc.poll() is None, "the create had finished before the fault"
    else:
        tr.mode = "hook"
        hold = (f"touch {gate}/started; i=0; while [ ! -e {gate}/go ] && [ $i -lt 1200 ];"
                f" do sleep 0.1; i=$((i+1)); done")
        proc = env.run_detached(cid, spec=env.spec(cid, SLEEP, host_hook=hold))
        assert _wait((gate / "started").exists, 180), "the prestart hook did not run"
        pids = _targets(env, tr.fault, cid)
        assert pids, f"no {tr.fault} process of {cid}"
        t0 = time.monotonic()
        _kill(pids)
        _wait(lambda: _gone(pids), 30)
        assert proc.poll() is None, "the create had finished before the fault"
        (gate / "go").touch()
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        (gate / "go").touch()  # a held hook ends in any case
    tr.detect_s = round(time.monotonic() - t0, 3)
    text = err.decode(errors="replace").strip()
    tr.error = _one_line(text)
    if proc.returncode == 0:
        # Created after all (the fault came late): then containerd must get the exit.
        _check_exit(env, tr, cid, t0, time.time() - tr.detect_s)
        tr.outcome = f"created, then exit {tr.exit_status}"
        return
    assert text and len(text.splitlines()) == 1, f"not one error line: {text!r}"
    assert text.startswith("ctr: "), text
    if tr.fault in ("agent", "panic"):  # the guest said why it went down
        assert "Kernel panic" in text, text
    if tr.fault == "agent":
        assert "Attempted to kill init" in text, text
    tr.outcome = "create failed"


def _trial(env: CtrEnv, report: Report, fault: str, phase: str, n: int) -> None:
    tr = Trial(fault, phase, "", n, f"f{fault[:3]}{phase[0]}{n}-{_tag()[:6]}")
    report.trials.append(tr)
    try:
        try:
            if phase == "running":
                _running_trial(env, tr)
            else:
                _creating_trial(env, tr, random.Random(f"{fault}/{phase}/{n}"))
        finally:
            tr.clean_s = round(env.remove(tr.id), 3)
            for other in tr.others:
                env.remove(other)
        tr.failure = env.bystander_ok(n)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        tr.failure = _one_line(str(exc))
        for cid in (tr.id, *tr.others):
            with contextlib.suppress(Exception):
                env.remove(cid)


@pytest.mark.parametrize("phase", ["running", "creating"])
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(env: CtrEnv, fault: str, phase: str) -> None:
    report = Report(f"ctr-{fault}-{phase}")
    for n in range(TRIALS):
        _trial(env, report, fault, phase, n)
    report.verdict()


# -- containerd restarts (ctr) ------------------------------------------------------------


def _container_state(env: CtrEnv, cid: str) -> str:
    """The container's state as its shim last recorded it (state.json)."""
    try:
        rec = SandboxRecord.load(sandbox_dir(env.state, cid, NS))
    except Exception:
        return ""
    c = rec.containers.get(cid)
    return c.state if c is not None else ""


def _restart(ctd: PrivateContainerd, sig: int) -> float:
    """Stop containerd with ``sig`` (its shims keep running) and start it again on
    the same state; seconds it was down."""
    assert ctd.proc is not None
    t0 = time.monotonic()
    ctd.proc.send_signal(sig)
    ctd.proc.wait(30)
    ctd.proc = None
    return t0


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_containerd_restart_ctr(env: CtrEnv, how: str) -> None:
    a, b, c = (f"rs{x}-{_tag()[:6]}" for x in "abc")
    flag = env.tmp / f"stop-{c}"
    flag.mkdir()
    for cid in (a, b):
        r = env.ctr("run", "-d", *RT, BUSYBOX_REF, cid, *SLEEP)
        assert r.returncode == 0, r.stderr.decode()
    # c exits while containerd is down: it waits for a file the test makes then.
    r = env.ctr("run", "-d", *RT, "--mount", f"type=bind,src={flag},dst=/flag,options=rbind",
                BUSYBOX_REF, c, "sh", "-c", "while [ ! -e /flag/now ]; do sleep 0.1; done")
    assert r.returncode == 0, r.stderr.decode()
    shims = {cid: env.shims(cid) for cid in (a, b, c)}
    vms = {cid: env.qemus(cid) for cid in (a, b, c)}
    env.events.close()
    t0 = _restart(env.ctd, getattr(signal, how))
    (flag / "now").touch()
    # c's exit happens (and its event waits) while containerd is down: its shim
    # records the stop in the sandbox's state.json.
    assert _wait(lambda: _container_state(env, c) == "stopped", 60), "c did not exit"
    time.sleep(0.5)
    env.ctd.start()
    down = time.monotonic() - t0
    env.events = EventLog(env.ctd)
    try:
        # The shims survived and were reconnected: same processes, same VMs.
        assert {cid: env.shims(cid) for cid in (a, b, c)} == shims
        assert {cid: env.qemus(cid) for cid in (a, b, c)} == vms
        listed = env.ctr("task", "ls").stdout.decode()
        status = {ln.split()[0]: ln.split()[-1] for ln in listed.splitlines()[1:] if ln.split()}
        assert status.get(a) == status.get(b) == "RUNNING", listed
        assert status.get(c) == "STOPPED", listed
        for cid in (a, b):
            r = env.ctr("task", "exec", "--exec-id", f"x{_tag()[:6]}", cid, "cat",
                        "/proc/version")
            assert r.returncode == 0 and r.stdout.startswith(b"Linux version"), r.stderr
        # Events reach the new containerd: a's exit, published after the restart.
        t1 = time.monotonic()
        assert env.ctr("task", "kill", "-s", "KILL", a).returncode == 0
        got = env.events.wait("/tasks/exit", a, t1, EXIT_BOUND)
        assert got is not None and got[1].get("exit_status") == 137, got
        for cid in (a, b, c):
            env.remove(cid)
        # c's exit waited for the new containerd; no shim gave up an event.
        log = env.ctd.log.read_text(errors="replace")
        assert "containerd reachable again: event /tasks/exit forwarded" in log
        assert "dropping event" not in log
    finally:
        for cid in (a, b, c):
            with contextlib.suppress(AssertionError):
                env.remove(cid)
    (REPORT_DIR).mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / f"ctr-restart-{how}.json").write_text(json.dumps(
        {"containerd down s": round(down, 3), "pods": 3, "failures": 0}))
    assert env.bystander_ok(99) == ""


# -- CRI ------------------------------------------------------------------------------------


class CriEnv:
    def __init__(self, ctd: PrivateContainerd, client: CRIClient, state: Path) -> None:
        self.ctd, self.c, self.state = ctd, client, state
        self.bystander = ""
        self.bystander_cid = ""

    def pod(self, name: str, *, privileged: bool = False) -> tuple[str, str]:
        tag = _tag()
        cfg = pod_config(f"{name}-{tag}", "faults", uid=tag, labels=LABEL,
                         log_directory=self.ctd.base / "pods" / tag, privileged=privileged)
        pod_id = self.c.run_pod_sandbox(cfg, runtime_handler=HANDLER)
        ccfg = container_config("work", BUSYBOX_REF, ["/bin/sh", "-c"], [SLEEP_SCRIPT],
                                log_path="work.log", privileged=privileged)
        cid = self.c.create_container(pod_id, ccfg, cfg)
        self.c.start_container(cid)
        return pod_id, cid

    def netns(self, pod_id: str) -> str:
        st = self.c.pod_sandbox_status(pod_id, verbose=True)
        info = json.loads(dict(st.info)["info"]) if st.info else {}
        for ns in (info.get("runtimeSpec") or {}).get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network":
                return str(ns.get("path") or "")
        return ""

    def leaks(self, pod_id: str, cid: str, netns: str) -> list[str]:
        left = pod_leftovers([pod_id, cid], netns)
        left += leftovers(self.state, f"k8s.io/{pod_id}")
        if any(p.id == pod_id for p in self.c.list_pod_sandbox()):
            left.append(f"pod {pod_id} still listed")
        return left


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    tag = _tag()[:6]
    state = Path(f"/run/pykata/ftc-{tag}")
    with cri_containerd(Path(f"/run/pykata-ftc-{tag}"), CACHE / f"ftc-ctd-{tag}", LABEL,
                        pykata_config=_private_config(state)) as (ctd, _net, client):
        e = CriEnv(ctd, client, state)
        e.bystander, e.bystander_cid = e.pod("bystander")
        try:
            yield e
        finally:
            with contextlib.suppress(CRIError):
                client.stop_pod_sandbox(e.bystander)
                client.remove_pod_sandbox(e.bystander)
    left = leftovers(state)
    shutil.rmtree(state, ignore_errors=True)
    assert not left, f"left behind by the CRI fault tests: {left}"


def _quietly(fn: Callable[[], Any]) -> None:
    """``fn()``, a CRI error ignored (an exec into a VM that goes down)."""
    with contextlib.suppress(CRIError):
        fn()


def _cri_targets(e: CriEnv, fault: str, pod_id: str) -> list[int]:
    if fault == "qemu":
        return [p for p, cmd in _cmdlines() if "qemu-system" in cmd and f"pykata-{pod_id}," in cmd]
    if fault == "shim":
        return [p for p, cmd in _cmdlines() if "pykata.shim" in cmd and f"-id {pod_id}" in cmd
                and " delete" not in cmd]
    src = f"source={os.path.realpath(e.state)}/sbs/k8s.io/{pod_id}/shared"
    return [p for p, cmd in _cmdlines() if "virtiofsd" in cmd and src in cmd]


def _state(e: CriEnv, cid: str) -> int:
    return int(e.c.container_status(cid).status.state)


def _cri_running_trial(e: CriEnv, tr: Trial) -> None:
    fault = tr.fault
    pod_id, cid = e.pod(f"f{fault[:3]}", privileged=fault == "panic")
    tr.id, netns = pod_id, e.netns(pod_id)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            if fault == "panic":
                pool.submit(_quietly, lambda: e.c.exec_sync(cid, ["sh", "-c", PANIC_HOOK],
                                                            timeout=60))
            else:
                pids = _cri_targets(e, fault, pod_id)
                assert pids, f"no {fault} process of pod {pod_id}"
                _kill(pids)
            exited = _wait(lambda: _state(e, cid) == cri.CONTAINER_EXITED, EXIT_BOUND, 0.05)
        assert exited, f"container {cid} not seen exited within {EXIT_BOUND:.0f}s"
        tr.detect_s = round(time.monotonic() - t0, 3)
        tr.exit_status = int(e.c.container_status(cid).status.exit_code)
        # A dead shim: containerd's CRI gives the container its own "unknown" exit
        # code, 255 ("failed to get task exit status ... ttrpc: closed" in its
        # log), before the 137 of shim delete reaches it.
        want = VM_DEAD_STATUS if fault == "shim" else _expect_status(fault)
        assert tr.exit_status == want, tr.exit_status
    finally:
        t1 = time.monotonic()
        with contextlib.suppress(CRIError):
            e.c.stop_pod_sandbox(pod_id)
            e.c.remove_pod_sandbox(pod_id)
    clean = _wait(lambda: not e.leaks(pod_id, cid, netns), CLEAN_BOUND, 0.2)
    assert clean, f"left behind: {e.leaks(pod_id, cid, netns)}"
    tr.clean_s = round(time.monotonic() - t1, 3)
    r = e.c.exec_sync(e.bystander_cid, ["echo", "alive"], timeout=60)
    assert r.exit_code == 0 and r.stdout == b"alive\n", r
    tr.outcome = f"exit {tr.exit_status}"


@pytest.mark.parametrize("fault", ["qemu", "virtiofsd", "shim", "panic"])
def test_cri_fault_then_remove_pod_sandbox(cri_env: CriEnv, fault: str) -> None:
    """A fault in a running CRI pod: the container is seen exited, RemovePodSandbox
    leaves nothing, the bystander pod answers."""
    report = Report(f"cri-{fault}-running")
    for n in range(CRI_TRIALS):
        tr = Trial(fault, "running", "cri", n, "")
        report.trials.append(tr)
        try:
            _cri_running_trial(cri_env, tr)
        except (AssertionError, CRIError) as exc:
            tr.failure = _one_line(str(exc))
    report.verdict()


def _cri_boot_trial(e: CriEnv, tr: Trial) -> None:
    tag = _tag()
    cfg = pod_config(f"fc-{tag}", "faults", uid=tag, labels=LABEL)
    before = {p for p, cmd in _cmdlines() if "qemu-system" in cmd}

    def new_vms() -> list[int]:
        return [p for p, cmd in _cmdlines() if "qemu-system" in cmd and p not in before
                and _pod_of_qemu(p, e)]

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(e.c.run_pod_sandbox, cfg, HANDLER)
        try:
            new = _wait(new_vms, 120, 0.005)
            assert new, "no QEMU of the new pod appeared"
            pod_id = tr.id = _pod_of_qemu(new[0], e)
            t0 = time.monotonic()
            _kill(new)
            try:
                got = fut.result(timeout=300)
            except CRIError as exc:
                tr.detect_s = round(time.monotonic() - t0, 3)
                tr.error = _one_line(str(exc))
                assert len(str(exc).strip().splitlines()) == 1, str(exc)
                tr.outcome = "RunPodSandbox failed"
            else:
                raise AssertionError(f"RunPodSandbox succeeded: {got}")

            def left() -> list[str]:
                return pod_leftovers([pod_id]) + leftovers(e.state, f"k8s.io/{pod_id}")

            assert _wait(lambda: not left(), CLEAN_BOUND), f"left behind: {left()}"
        finally:
            with contextlib.suppress(Exception):
                fut.result(timeout=300)
            for pod in e.c.list_pod_sandbox(labels=LABEL):
                if pod.metadata.name == cfg.metadata.name:
                    with contextlib.suppress(CRIError):
                        e.c.stop_pod_sandbox(pod.id)
                        e.c.remove_pod_sandbox(pod.id)


def test_cri_fault_while_the_pod_is_created(cri_env: CriEnv) -> None:
    """QEMU killed while RunPodSandbox boots the VM: RunPodSandbox fails with one
    line and nothing of the pod is left."""
    report = Report("cri-qemu-creating")
    for n in range(CRI_TRIALS):
        tr = Trial("qemu", "creating", "boot", n, "")
        report.trials.append(tr)
        try:
            _cri_boot_trial(cri_env, tr)
        except AssertionError as exc:
            tr.failure = _one_line(str(exc))
    report.verdict()


def _pod_of_qemu(pid: int, e: CriEnv) -> str:
    """The sandbox id in a QEMU's ``-name pykata-<id>,...``, if it is one of this
    test's (its sandbox directory is under the test's state dir)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    try:
        name = argv[argv.index(b"-name") + 1].decode()
    except (ValueError, IndexError):
        return ""
    pod = name.removeprefix("pykata-").split(",")[0]
    return pod if (Path(os.path.realpath(e.state)) / "sbs" / "k8s.io" / pod).exists() else ""


def test_containerd_restart_cri(cri_env: CriEnv) -> None:
    """CRI pods across a containerd restart: listed READY, ExecSync works, a
    container started after the restart works, the pods stop and are removed."""
    e = cri_env
    pods = [e.pod("restart") for _ in range(2)]
    netns = {pod_id: e.netns(pod_id) for pod_id, _ in pods}
    try:
        assert e.ctd.proc is not None
        e.ctd.proc.send_signal(signal.SIGKILL)
        e.ctd.proc.wait(30)
        e.ctd.proc = None
        e.ctd.start()
        e.c.wait_ready(60)
        listed = {p.id: p.state for p in e.c.list_pod_sandbox(labels=LABEL)}
        for pod_id, cid in pods:
            assert listed.get(pod_id) == cri.SANDBOX_READY, listed
            assert _state(e, cid) == cri.CONTAINER_RUNNING
            r = e.c.exec_sync(cid, ["cat", "/proc/version"], timeout=60)
            assert r.exit_code == 0 and r.stdout.startswith(b"Linux version"), r
        # The exits of the pods' containers reach the new containerd.
        pod_id, cid = pods[0]
        e.c.stop_container(cid, timeout=5)
        assert _state(e, cid) == cri.CONTAINER_EXITED
        r = e.c.exec_sync(e.bystander_cid, ["echo", "alive"], timeout=60)
        assert r.exit_code == 0 and r.stdout == b"alive\n", r
    finally:
        for pod_id, _ in pods:
            with contextlib.suppress(CRIError):
                e.c.stop_pod_sandbox(pod_id)
                e.c.remove_pod_sandbox(pod_id)

    def left() -> list[str]:
        return [x for pod_id, cid in pods for x in e.leaks(pod_id, cid, netns[pod_id])]

    assert _wait(lambda: not left(), CLEAN_BOUND, 0.2), f"left behind: {left()}"
    assert "dropping event" not in e.ctd.log.read_text(errors="replace")
