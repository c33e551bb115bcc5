"""Issue 17: soak and concurrency through the users' tools, counting what is left.

- ctr soak: create/start/exec/delete cycles (``ctr run -d``, ``ctr task exec``,
  ``ctr task delete -f``, ``ctr container delete``), each a pod of its own,
  beside a long-lived anchor pod that gets an exec every cycle;
- CRI soak: pod cycles (RunPodSandbox, CreateContainer, StartContainer,
  ExecSync, StopPodSandbox, RemovePodSandbox) beside an anchor pod that gets a
  container created, exec'd, stopped and removed every cycle;
- concurrency: rounds of pods created in parallel through CRI, exec and delete
  interleaved (half of them are deleted while the others still exec);
- the ctr burst of the benchmarks: pods started at once by ``ctr run -d``,
  then killed and deleted at once; every shim must exit.

After the baseline cycle (the 10th) and at the end, the counts of
tests/integration/soak_support.py (processes, fds, mounts, files, sockets,
netns, taps, veths, cgroups: all scoped to the test's private containerd and
state directories) must be equal; the anchor shim's memory may grow by
MEMORY_TOLERANCE_KIB at most. Figures go to /var/tmp/pykata-test/soak/*.json.

Cycle counts come from the environment; ``make test`` runs a short slice,
``make soak`` the full counts:

    PYKATA_SOAK_CTR_CYCLES (20; soak 500)   PYKATA_SOAK_CRI_CYCLES (10; soak 200)
    PYKATA_SOAK_ROUNDS (1; soak 10)         PYKATA_SOAK_PODS (10)
    PYKATA_SOAK_BURST_ROUNDS (1; soak 10)
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

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
from tests.integration.soak_support import (
    Figures,
    Scope,
    Snapshot,
    baseline_cycle,
    count_changes,
    cycles,
    memory_growth,
    memory_kib,
)

CTR_CYCLES = cycles("PYKATA_SOAK_CTR_CYCLES", 20)
CRI_CYCLES = cycles("PYKATA_SOAK_CRI_CYCLES", 10)
ROUNDS = cycles("PYKATA_SOAK_ROUNDS", 1)
PODS = cycles("PYKATA_SOAK_PODS", 10)
BURST_ROUNDS = cycles("PYKATA_SOAK_BURST_ROUNDS", 1)
MAX_FAILURES = 3  # a soak goes on after a failure (to count them), up to this many
SHIM_EXIT_BOUND = 60.0  # a shim still there this long after its pod went is a leak
CACHE = Path("/var/tmp/pykata-test")
RT = ["--runtime", RUNTIME_TYPE]
SLEEP = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
SLEEP_SCRIPT = "trap 'exit 0' TERM; sleep 3600 & wait"
HANDLER = "pykata"
LABEL = {"pykata.test": "soak"}

# A soak can run for an hour (make soak): no per-test timeout beyond the run's own.
pytestmark = pytest.mark.timeout(0)


def _tag() -> str:
    return uuid.uuid4().hex[:6]


def _private_config(state: Path) -> str:
    """TOML for the shims: this test's own state directory, nothing shared."""
    cfg = _with_rootfs_mode(config.load())
    cfg.runtime.state_dir = str(state)
    return config.to_toml(cfg)


def _out(r: object) -> str:
    stderr = getattr(r, "stderr", b"") or b""
    return " ".join(stderr.decode(errors="replace").split())[-400:]


# -- ctr -----------------------------------------------------------------------------------


class CtrEnv:
    """A private containerd (no CRI) whose pykata shims keep their state in a
    private state directory; the busybox image imported."""

    def __init__(self) -> None:
        tag = _tag()
        self.state = Path(f"/run/pykata/soak-{tag}")
        base = Path(f"/run/pykata-soak-{tag}")
        base.mkdir(parents=True)
        (base / "pykata.toml").write_text(_private_config(self.state))
        self.ctd = PrivateContainerd(base=base, root=CACHE / f"soak-ctd-{tag}",
                                     namespace="soak",
                                     env={"PYKATA_CONFIG": str(base / "pykata.toml")})
        archive = oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"),
                              CACHE / "busybox.oci.tar")
        self.ctd.start()
        assert self.ctd.proc is not None
        self.ctd.import_image(archive)
        self.scope = Scope(address=self.ctd.socket, containerd_pid=self.ctd.proc.pid,
                           dirs=(self.state, base, self.ctd.root), namespace="soak")

    def ctr(self, *args: str, timeout: float = 300) -> tuple[int, str, str]:
        r = self.ctd.ctr(*args, check=False, timeout=timeout)
        return r.returncode, r.stdout.decode(errors="replace"), _out(r)

    def remove(self, cid: str) -> None:
        self.ctr("task", "delete", "-f", cid)
        self.ctr("container", "delete", cid)

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


@pytest.fixture(scope="module")
def ctr_env() -> Iterator[CtrEnv]:
    env = CtrEnv()
    try:
        yield env
    finally:
        left = env.close()
    assert not left, f"left behind: {left}"


def _ctr_cycle(env: CtrEnv, n: int, anchor: str, fig: Figures, shim_rss: dict[int, int]
               ) -> None:
    cid = f"sk{n}-{_tag()}"
    env.scope.ids.add(cid)
    try:
        rc, _, err = env.ctr("run", "-d", *RT, BUSYBOX_REF, cid, *SLEEP)
        assert rc == 0, f"ctr run -d: {err}"
        rc, out, err = env.ctr("task", "exec", "--exec-id", "x", cid, "sh", "-c",
                               f"echo in-{n}")
        assert (rc, out) == (0, f"in-{n}\n"), f"ctr task exec: rc {rc} {out!r} {err}"
        shim = env.scope.shims().get(cid)
        if shim:
            shim_rss[n] = memory_kib(shim)[0]
        rc, out, err = env.ctr("task", "exec", "--exec-id", f"a{n}", anchor, "sh", "-c",
                               f"echo anchor-{n}")
        assert (rc, out) == (0, f"anchor-{n}\n"), f"exec in the anchor: rc {rc} {err}"
        rc, _, err = env.ctr("task", "delete", "-f", cid)
        assert rc == 0, f"ctr task delete -f: {err}"
        rc, _, err = env.ctr("container", "delete", cid)
        assert rc == 0, f"ctr container delete: {err}"
    except BaseException:
        env.remove(cid)
        raise
    finally:
        linger = env.scope.wait_shims_gone([cid], SHIM_EXIT_BOUND)
        fig.linger_seconds += linger.values()
    assert linger[cid] < SHIM_EXIT_BOUND, \
        f"the shim of {cid} still runs {SHIM_EXIT_BOUND:.0f} s after its task was deleted"


def test_ctr_soak(ctr_env: CtrEnv) -> None:
    """CTR_CYCLES create/start/exec/delete cycles: the counts after the 10th and
    at the end are equal, the anchor shim's memory stays within tolerance."""
    env, scope = ctr_env, ctr_env.scope
    fig = Figures("ctr-soak", {"cycles asked": CTR_CYCLES})
    anchor = f"anchor-{_tag()}"
    scope.ids.add(anchor)
    rc, _, err = env.ctr("run", "-d", *RT, BUSYBOX_REF, anchor, *SLEEP)
    assert rc == 0, err
    base_at = baseline_cycle(CTR_CYCLES)
    baseline: Snapshot | None = None
    shim_rss: dict[int, int] = {}
    done = 0
    try:
        for n in range(1, CTR_CYCLES + 1):
            try:
                fig.timed(partial(_ctr_cycle, env, n, anchor, fig, shim_rss))
            except AssertionError as exc:
                fig.failures.append(f"cycle {n}: {exc}")
                if len(fig.failures) >= MAX_FAILURES:
                    break
            done = n
            if n == base_at:
                baseline = scope.settle(anchor)
        end = scope.settle(anchor)
    finally:
        env.remove(anchor)
    fig.data["cycles run"] = done
    _compare(fig, baseline, end, base_at, shim_rss)
    fig.write()
    _verdict(fig)


def _compare(fig: Figures, baseline: Snapshot | None, end: Snapshot, base_at: int,
             shim_rss: dict[int, int] | None = None) -> None:
    if baseline is None:
        fig.failures.append(f"the run stopped before cycle {base_at}")
        return
    fig.data[f"counts after cycle {base_at}"] = baseline.counts
    fig.data["counts at the end"] = end.counts
    fig.data[f"anchor memory after cycle {base_at}"] = baseline.memory
    fig.data["anchor memory at the end"] = end.memory
    if shim_rss:
        last = max(shim_rss)
        fig.data["per-cycle shim rss KiB (baseline cycle, last cycle)"] = [
            shim_rss.get(base_at), shim_rss[last]]
    changes = count_changes(baseline, end)
    if changes:
        fig.failures.append(f"counts changed between cycle {base_at} and the end: {changes}")
    grown = memory_growth(baseline, end)
    if grown:
        fig.failures.append(f"anchor shim memory grew: {grown}")


def _verdict(fig: Figures) -> None:
    assert not fig.failures, "\n".join(fig.failures)


# -- CRI -----------------------------------------------------------------------------------


class CriEnv:
    def __init__(self, ctd: PrivateContainerd, net: CNINetwork, client: CRIClient,
                 state: Path) -> None:
        assert ctd.proc is not None
        self.ctd, self.net, self.c, self.state = ctd, net, client, state
        self.scope = Scope(address=ctd.socket, containerd_pid=ctd.proc.pid,
                           dirs=(state, ctd.base, ctd.root), namespace="k8s.io",
                           bridge=net.bridge)
        self.logs = Path(tempfile.mkdtemp(prefix="pykata-soak-logs-"))

    def pod(self, name: str) -> tuple[str, cri.PodSandboxConfig, Path]:
        tag = _tag()
        logs = self.logs / tag
        cfg = pod_config(f"{name}-{tag}", "soak", uid=f"{name}-{tag}", log_directory=logs,
                         hostname=f"h-{tag}", labels=LABEL)
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


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    tag = _tag()
    state = Path(f"/run/pykata/soak-cri-{tag}")
    left: list[str] = []
    with cri_containerd(Path(f"/run/pykata-soak-cri-{tag}"), CACHE / f"soak-cri-{tag}",
                        LABEL, pykata_config=_private_config(state)) as (ctd, net, client):
        env = CriEnv(ctd, net, client, state)
        try:
            yield env
        finally:
            left = env.close()
    shutil.rmtree(CACHE / f"soak-cri-{tag}", ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    assert not left, f"left behind: {left}"


def _cri_cycle(env: CriEnv, n: int, anchor: tuple[str, cri.PodSandboxConfig], fig: Figures
               ) -> None:
    pod_id = ""
    logs: Path | None = None
    try:
        pod_id, cfg, logs = env.pod(f"c{n}")
        cid = env.container(pod_id, cfg, "work")
        env.exec_ok(cid, f"pod-{n}")
        # The anchor pod: a container comes and goes in the same VM and shim.
        acid = env.container(anchor[0], anchor[1], f"a{n}")
        env.exec_ok(acid, f"anchor-{n}")
        env.c.stop_container(acid, timeout=0)
        env.c.remove_container(acid)
    except CRIError as exc:
        raise AssertionError(str(exc)) from None
    finally:
        if pod_id:
            try:
                env.remove_pod(pod_id, logs)
            except CRIError as exc:
                raise AssertionError(f"removing pod {pod_id}: {exc}") from None
    linger = env.scope.wait_shims_gone([pod_id], SHIM_EXIT_BOUND)
    fig.linger_seconds += linger.values()
    assert linger[pod_id] < SHIM_EXIT_BOUND, \
        f"the shim of pod {pod_id} still runs {SHIM_EXIT_BOUND:.0f} s after RemovePodSandbox"


def test_cri_soak(cri_env: CriEnv) -> None:
    """CRI_CYCLES pod cycles beside an anchor pod: counts after the 10th and at
    the end are equal; the anchor shim's memory stays within tolerance."""
    env, scope = cri_env, cri_env.scope
    fig = Figures("cri-soak", {"cycles asked": CRI_CYCLES})
    anchor_id, anchor_cfg, anchor_logs = env.pod("anchor")
    base_at = baseline_cycle(CRI_CYCLES)
    baseline: Snapshot | None = None
    done = 0
    try:
        for n in range(1, CRI_CYCLES + 1):
            try:
                fig.timed(partial(_cri_cycle, env, n, (anchor_id, anchor_cfg), fig))
            except AssertionError as exc:
                fig.failures.append(f"cycle {n}: {exc}")
                if len(fig.failures) >= MAX_FAILURES:
                    break
            done = n
            if n == base_at:
                baseline = scope.settle(anchor_id)
        end = scope.settle(anchor_id)
    finally:
        env.remove_pod(anchor_id, anchor_logs)
    fig.data["cycles run"] = done
    _compare(fig, baseline, end, base_at)
    fig.write()
    _verdict(fig)


counts_lock = threading.Lock()


def _parallel_pod(env: CriEnv, i: int, early: bool, start: threading.Barrier,
                  n_early: int, counts: dict[str, int]) -> None:
    """One pod of a round: made at the same moment as the others; an early pod is
    deleted after one exec, a late one keeps exec'ing until every early pod is
    gone (deletes and execs interleave), then is deleted."""
    pod_id = ""
    logs: Path | None = None
    try:
        start.wait(60)
        pod_id, cfg, logs = env.pod(f"p{i}")
        cid = env.container(pod_id, cfg, "work")
        env.exec_ok(cid, f"first-{i}")
        if not early:
            for k in range(200):  # bounded: the early pods take seconds to go
                env.exec_ok(cid, f"more-{i}-{k}")
                with counts_lock:
                    counts["execs during deletes"] += 1
                    if counts["early deleted"] >= n_early:
                        break
    finally:
        try:
            if pod_id:
                env.remove_pod(pod_id, logs)
        finally:
            if early:
                with counts_lock:
                    counts["early deleted"] += 1


def _round(env: CriEnv, pods: int) -> tuple[list[str], dict[str, int], list[str]]:
    """One round: (failures, counters, pod ids)."""
    n_early = pods // 2
    start = threading.Barrier(pods)
    counts = {"early deleted": 0, "execs during deletes": 0}
    before = set(env.scope.ids)
    failures: list[str] = []

    def one(i: int) -> None:
        try:
            _parallel_pod(env, i, i < n_early, start, n_early, counts)
        except (AssertionError, CRIError, threading.BrokenBarrierError) as exc:
            failures.append(f"pod {i}: {exc}")

    with ThreadPoolExecutor(max_workers=pods) as ex:
        list(ex.map(one, range(pods)))
    return failures, counts, sorted(env.scope.ids - before)


def test_parallel_pods(cri_env: CriEnv) -> None:
    """ROUNDS rounds of PODS pods created at once through CRI, execs and deletes
    interleaved: no failure, and the counts after each round are the counts
    before the first."""
    env, scope = cri_env, cri_env.scope
    fig = Figures("parallel-pods", {"rounds asked": ROUNDS, "pods per round": PODS})
    # One pod first: what a first pod makes once (CNI bridge, cgroup parents) is
    # not a leak of the rounds.
    pod_id, _, logs = env.pod("warm")
    env.remove_pod(pod_id, logs)
    scope.wait_shims_gone([pod_id], SHIM_EXIT_BOUND)
    baseline = scope.settle()
    fig.data["counts before the first round"] = baseline.counts
    done = 0
    for r in range(1, ROUNDS + 1):
        t0 = time.monotonic()
        failures, counters, ids = _round(env, PODS)
        fig.cycle_seconds.append(time.monotonic() - t0)
        fig.failures += [f"round {r}: {f}" for f in failures]
        linger = scope.wait_shims_gone(ids, SHIM_EXIT_BOUND)
        fig.linger_seconds += linger.values()
        fig.failures += [f"round {r}: the shim of {i} still runs {s:.0f} s after its pod went"
                         for i, s in linger.items() if s >= SHIM_EXIT_BOUND]
        fig.data.setdefault("execs during deletes per round", []).append(
            counters["execs during deletes"])
        end = scope.settle()
        changes = count_changes(baseline, end)
        if changes:
            fig.failures.append(f"round {r}: counts changed: {changes}")
        done = r
        if len(fig.failures) >= MAX_FAILURES:
            break
    fig.data["rounds run"] = done
    fig.data["counts after the last round"] = end.counts
    fig.write()
    _verdict(fig)


# -- the benchmarks' ctr burst -------------------------------------------------------------


def _burst(env: CtrEnv, pods: int, fig: Figures, r: int) -> list[str]:
    """``pods`` x ``ctr run -d`` at once, an exec in each, then each killed and
    deleted as bench/common.py remove_containers does; the ids."""
    ids = [f"bu{r}-{i}-{_tag()}" for i in range(pods)]
    env.scope.ids.update(ids)

    def start(cid: str) -> str:
        rc, _, err = env.ctr("run", "-d", *RT, BUSYBOX_REF, cid, *SLEEP)
        if rc != 0:
            return f"{cid}: ctr run -d: {err}"
        rc, out, err = env.ctr("task", "exec", "--exec-id", "x", cid, "echo", "up")
        return "" if (rc, out) == (0, "up\n") else f"{cid}: exec: rc {rc} {err}"

    def stop(cid: str) -> str:
        env.ctr("task", "kill", "-s", "KILL", cid, timeout=60)
        last = ""
        for _ in range(50):
            rc, _, last = env.ctr("task", "delete", "-f", cid, timeout=60)
            if rc == 0 or "not found" in last:
                break
            time.sleep(0.2)
        else:
            return f"{cid}: ctr task delete -f kept failing: {last}"
        rc, _, err = env.ctr("container", "delete", cid, timeout=60)
        return "" if rc == 0 else f"{cid}: ctr container delete: {err}"

    with ThreadPoolExecutor(max_workers=pods) as ex:
        fig.failures += [f"round {r}: {e}" for e in ex.map(start, ids) if e]
        fig.failures += [f"round {r}: {e}" for e in ex.map(stop, ids) if e]
    return ids


def test_ctr_burst_every_shim_exits(ctr_env: CtrEnv) -> None:
    """The benchmarks' 10-pod burst (bench/density.py): after the parallel
    deletes every shim exits by itself and nothing is left."""
    env, scope = ctr_env, ctr_env.scope
    fig = Figures("ctr-burst", {"rounds asked": BURST_ROUNDS, "pods per round": PODS})
    baseline = scope.settle()
    done = 0
    end = baseline
    for r in range(1, BURST_ROUNDS + 1):
        t0 = time.monotonic()
        ids = _burst(env, PODS, fig, r)
        fig.cycle_seconds.append(time.monotonic() - t0)
        linger = scope.wait_shims_gone(ids, SHIM_EXIT_BOUND)
        fig.linger_seconds += linger.values()
        stuck = [i for i, s in linger.items() if s >= SHIM_EXIT_BOUND]
        fig.failures += [f"round {r}: the shim of {i} still runs {SHIM_EXIT_BOUND:.0f} s"
                         " after ctr task delete" for i in stuck]
        for i in stuck:  # reaped as the benchmark did, so the next round starts clean
            env.remove(i)
        end = scope.settle()
        changes = count_changes(baseline, end)
        if changes:
            fig.failures.append(f"round {r}: counts changed: {changes}")
        done = r
        if len(fig.failures) >= MAX_FAILURES:
            break
    fig.data["rounds run"] = done
    fig.data["counts before"] = baseline.counts
    fig.data["counts after"] = end.counts
    fig.write()
    _verdict(fig)
