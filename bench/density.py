"""Per-pod host memory and density.

1. Memory as pods are added: idle pykata pods (`ctr run -d --runtime
   io.containerd.pykata.v2 IMAGE id sleep 3600`) are started in parallel
   batches up to 1, 2, 4, 8, 10 pods; after each step the PSS of every pod's
   shim + QEMU + virtiofsd is summed (per pod and total).
2. Density: N pods started all at once from zero within a time budget: how
   many come up, how many fail, the time until all are running, and how many
   of them, all held at once, answer an exec (`ctr task exec ... true`).

`--fast-only --pods 50` is the density target of issue 14: 50 idle pods from
the VM template held at once, each answering an exec.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    arg_parser,
    build_template,
    destroy_template,
    log,
    new_id,
    pod_memory,
    remove_containers,
    run_section,
    save,
    sigterm_as_interrupt,
    start_containerd,
    template_config,
)

from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF

RUN_CMD = f"ctr run -d --runtime {RUNTIME_TYPE} IMAGE id sleep 3600"
MEMORY_PARTS = ("qemu", "virtiofsd", "shim", "ram_file", "total")


def start_pods(ctd: PrivateContainerd, ids: list[str], budget: float, extra: list[str]
               ) -> tuple[list[str], list[str], float, list[float]]:
    """Start ``ids`` at once; (started, failed, seconds until the last one
    returned, per-pod seconds)."""
    t0 = time.perf_counter()

    def one(cid: str) -> tuple[str, bool, float]:
        s = time.perf_counter()
        try:
            r = ctd.ctr("run", "-d", "--runtime", RUNTIME_TYPE, *extra, BUSYBOX_REF, cid,
                        "sleep", "3600", check=False, timeout=budget)
        except Exception as exc:  # timeout: counts as a failure
            log(f"  {cid}: {exc}")
            return cid, False, time.perf_counter() - s
        if r.returncode != 0:
            log(f"  {cid}: {r.stderr.decode(errors='replace').strip()[-200:]}")
        return cid, r.returncode == 0, time.perf_counter() - s

    with ThreadPoolExecutor(max_workers=max(1, len(ids))) as ex:
        results = list(ex.map(one, ids))
    total = time.perf_counter() - t0
    ok = [c for c, good, _ in results if good]
    bad = [c for c, good, _ in results if not good]
    return ok, bad, total, [dt for _, good, dt in results if good]


def exec_all(ctd: PrivateContainerd, ids: list[str], budget: float) -> tuple[int, list[float]]:
    """``ctr task exec ... true`` in every pod at once: (answered, seconds each)."""

    def one(cid: str) -> tuple[bool, float]:
        s = time.perf_counter()
        try:
            r = ctd.ctr("task", "exec", "--exec-id", "x", cid, "true", check=False,
                        timeout=budget)
        except Exception as exc:
            log(f"  exec in {cid}: {exc}")
            return False, time.perf_counter() - s
        if r.returncode != 0:
            log(f"  exec in {cid}: {r.stderr.decode(errors='replace').strip()[-200:]}")
        return r.returncode == 0, time.perf_counter() - s

    with ThreadPoolExecutor(max_workers=max(1, min(len(ids), 16))) as ex:
        results = list(ex.map(one, ids))
    return sum(ok for ok, _ in results), [dt for ok, dt in results if ok]


def settle(seconds: float) -> None:
    """Idle pods: give the guests a moment to finish booting work before PSS."""
    time.sleep(seconds)


def memory_steps(ctd: PrivateContainerd, steps: list[int], budget: float, idle: float,
                 ids: list[str], extra: list[str]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    running: list[str] = []
    for total in steps:
        batch = [new_id("m") for _ in range(total - len(running))]
        ids.extend(batch)
        log(f"density: memory step to {total} pods (+{len(batch)} in parallel)")
        ok, bad, secs, _ = start_pods(ctd, batch, budget, extra)
        running += ok
        settle(idle)
        mem = pod_memory(ctd.socket, running)
        pods = len(running)
        out.append({
            "pods": pods, "added": len(batch), "failed": len(bad), "batch_seconds": secs,
            "kib_total": mem, "kib_per_pod": {k: v / pods for k, v in mem.items()
                                              if k in MEMORY_PARTS}
            if pods else {},
            "shim_rss_max_kib": mem["shim_rss_max"],
        })
        if bad:
            log(f"density: {len(bad)} pods failed at step {total}: stopping the steps")
            break
    remove_containers(ctd, ids)
    ids.clear()
    return out


def burst(ctd: PrivateContainerd, n: int, budget: float, idle: float,
          ids: list[str], extra: list[str]) -> dict[str, object]:
    batch = [new_id("d") for _ in range(n)]
    ids.extend(batch)
    log(f"density: {n} pods at once (budget {budget:.0f} s)")
    ok, bad, secs, per = start_pods(ctd, batch, budget, extra)
    settle(idle)
    mem = pod_memory(ctd.socket, ok)
    alive = int(mem["pods_found"])
    answered, exec_s = exec_all(ctd, ok, budget)
    log(f"density: {len(ok)} of {n} pods up, {answered} answered an exec")
    remove_containers(ctd, ids)
    ids.clear()
    return {"requested": n, "started": len(ok), "failed": len(bad), "budget_s": budget,
            "all_ready_s": secs if not bad else None, "per_pod_s": per,
            "still_running_after_settle": alive, "exec_answered": answered,
            "exec_s": exec_s,
            "kib_per_pod": {k: v / len(ok) for k, v in mem.items()
                            if k in MEMORY_PARTS} if ok else {},
            "command": RUN_CMD}


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--pods", type=int, default=0, help="pods for the burst (default 10)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the burst")
    ap.add_argument("--fast-only", action="store_true",
                    help="only the VM template path (no cold pods), burst only")
    args = ap.parse_args()
    sigterm_as_interrupt()
    pods = args.pods or (3 if args.quick else 10)
    steps = [s for s in (1, 2, 4, 8) if s < pods] + [pods]
    if args.quick:
        steps = [1, 2]
    idle = 3.0 if args.quick else 8.0
    ids: list[str] = []
    ctd = start_containerd("density")
    template: dict[str, object] = {}
    mem: list[dict[str, object]] = []
    b: dict[str, object] = {}
    try:
        if not args.fast_only:
            mem = memory_steps(ctd, steps, args.budget, idle, ids, [])
            b = burst(ctd, pods, args.budget, idle, ids, [])
        log("density: the same from a VM template")
        try:
            built = build_template()
            extra = ["--runtime-config-path", str(template_config())]
            tsteps = [] if args.fast_only else memory_steps(ctd, steps, args.budget, idle, ids,
                                                            extra)
            template = {"memory_steps": tsteps,
                        "burst": burst(ctd, pods, args.budget, idle, ids, extra),
                        "template_build_s": built,
                        "command": RUN_CMD.replace(" IMAGE", " --runtime-config-path "
                                                   "TEMPLATE.toml IMAGE")}
        finally:
            remove_containers(ctd, ids)
            destroy_template()
    finally:
        remove_containers(ctd, ids)
        ctd.stop()
    save("density-fast" if args.fast_only else "density",
         {"memory_steps": mem, "burst": b, "command": RUN_CMD, "settle_s": idle,
          "template": template})
    for m in mem:
        print(m)
    print(b)
    print(template)
    return 0


if __name__ == "__main__":
    run_section(main)
