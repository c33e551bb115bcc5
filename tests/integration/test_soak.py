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

    PYKATA_SOAK_CTR_CYCLES (8; soak 500)    PYKATA_SOAK_CRI_CYCLES (4; soak 200)
    PYKATA_SOAK_ROUNDS (1; soak 10)         PYKATA_SOAK_PODS (4; soak 10)
    PYKATA_SOAK_BURST_ROUNDS (1; soak 10)

(the baseline is taken half-way in a run shorter than 20 cycles)
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from pykata.protos import cri_api_pb2 as cri
from pykata.testing.containerd import RUNTIME_TYPE
from pykata.testing.cri import BUSYBOX_REF, CRIError
from tests.integration import soak_support
from tests.integration.soak_support import (
    SLEEP,
    CriEnv,
    CtrEnv,
    Figures,
    Snapshot,
    baseline_cycle,
    count_changes,
    cycles,
    descendants,
    memory_growth,
    memory_kib,
    tag,
)

CTR_CYCLES = cycles("PYKATA_SOAK_CTR_CYCLES", 8)
CRI_CYCLES = cycles("PYKATA_SOAK_CRI_CYCLES", 4)
ROUNDS = cycles("PYKATA_SOAK_ROUNDS", 1)
PODS = cycles("PYKATA_SOAK_PODS", 4)
BURST_ROUNDS = cycles("PYKATA_SOAK_BURST_ROUNDS", 1)
MAX_FAILURES = 3  # a soak goes on after a failure (to count them), up to this many
SHIM_EXIT_BOUND = 60.0  # a shim still there this long after its pod went is a leak
RT = ["--runtime", RUNTIME_TYPE]

# A soak can run for an hour (make soak): no per-test timeout beyond the run's own.
pytestmark = pytest.mark.timeout(0)


# -- ctr -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctr_env() -> Iterator[CtrEnv]:
    with soak_support.ctr_env() as env:
        yield env


def _ctr_cycle(env: CtrEnv, n: int, anchor: str, fig: Figures, shim_rss: dict[int, int]
               ) -> None:
    cid = f"sk{n}-{tag()}"
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
    anchor = f"anchor-{tag()}"
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


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    with soak_support.cri_env() as env:
        yield env


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
    pod_id, cfg, logs = env.pod("warm")
    env.container(pod_id, cfg, "warm")  # CRI's containers directories come with a first one
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


# -- a client that goes away mid-create ------------------------------------------------------


def test_ctr_client_gone_while_the_vm_boots(ctr_env: CtrEnv) -> None:
    """``ctr run -d`` killed while its pod's VM boots: containerd gives up on the
    Create (Delete, then Shutdown); the shim goes and nothing of the pod is left."""
    env, scope = ctr_env, ctr_env.scope
    fig = Figures("ctr-client-gone")
    env.warm()
    baseline = scope.settle()
    cid = f"gone-{tag()}"
    scope.ids.add(cid)
    argv = ["ctr", "--address", str(env.ctd.socket), "--namespace", env.ctd.namespace,
            "run", "-d", *RT, BUSYBOX_REF, cid, *SLEEP]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    booting = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not booting:
            table = scope.proc_table()
            shim = scope.shims(table).get(cid)
            booting = shim is not None and any(
                "qemu-system" in table[p].cmd for p in descendants(table, shim) if p in table)
            time.sleep(0.05)
        still_running = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert booting, "the pod's VM never started booting"
    assert still_running, "ctr run -d returned before it could be killed mid-create"
    linger = scope.wait_shims_gone([cid], SHIM_EXIT_BOUND)
    fig.linger_seconds += linger.values()
    env.remove(cid)  # the container record ctr made before it died
    end = scope.settle()
    fig.data["counts before"] = baseline.counts
    fig.data["counts after"] = end.counts
    if linger[cid] >= SHIM_EXIT_BOUND:
        fig.failures.append(f"the shim of {cid} still runs {SHIM_EXIT_BOUND:.0f} s after"
                            " its client went away")
    changes = count_changes(baseline, end)
    if changes:
        fig.failures.append(f"counts changed: {changes}")
    fig.write()
    _verdict(fig)


# -- the benchmarks' ctr burst -------------------------------------------------------------


def _burst(env: CtrEnv, pods: int, fig: Figures, r: int) -> list[str]:
    """``pods`` x ``ctr run -d`` at once, an exec in each, then each killed and
    deleted as bench/common.py remove_containers does; the ids."""
    ids = [f"bu{r}-{i}-{tag()}" for i in range(pods)]
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
    env.warm()
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
