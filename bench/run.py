"""Run the whole benchmark suite side by side, then write the results:
bench/results/<section>.json, bench/results/results.json (all of them),
docs/benchmarks.png (plots) and docs/benchmarks.md (tables).

    make bench                               # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --quick    # few runs, small sizes (development)
    .venv/bin/python bench/run.py --only exec,rpc
    .venv/bin/python bench/run.py --render   # only re-render from bench/results/*.json

Each section is its own script and process (startup.py, exec_latency.py,
engine.py, agent_start.py, vmcache.py, density.py twice (cold and template
steps; 50 template pods at once), rpc.py, storage.py, network.py,
portforward.py, confinement.py, monitor_scrape.py, checkpoint.py) with a time limit; a section that
fails or times out is reported and the others still run. Every script cleans
up what it created (pods, VMs, netns, loop devices, containerd state), also on
Ctrl-C or on the SIGTERM of its time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "benchmarks.md"
PLOT = HERE.parent / "docs" / "benchmarks.png"
RESULTS = HERE / "results"
CTD_BASE = Path("/run/pykata-bench")

# name -> (script and its arguments, time limit in seconds at default counts, with --quick)
SECTIONS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "startup": (("startup.py",), 900, 300),
    "exec": (("exec_latency.py",), 300, 120),
    "engine": (("engine.py", "--ctr", "--gap", "1"), 900, 300),
    "agent_start": (("agent_start.py",), 900, 300),
    "vmcache": (("vmcache.py",), 1200, 400),
    "density": (("density.py",), 1200, 300),
    "density-fast": (("density.py", "--fast-only", "--pods", "50"), 1500, 600),
    "rpc": (("rpc.py",), 300, 120),
    "storage": (("storage.py",), 600, 180),
    "network": (("network.py",), 600, 240),
    "portforward": (("portforward.py",), 600, 240),
    "confinement": (("confinement.py",), 900, 300),
    "monitor": (("monitor_scrape.py",), 900, 300),
    "checkpoint": (("checkpoint.py",), 2400, 1200),
}

MiB = 1 << 20


# -- running ----------------------------------------------------------------------------


def run_section(name: str, quick: bool, runs: int) -> dict[str, Any]:
    (script, *script_args), limit, qlimit = SECTIONS[name]
    limit = qlimit if quick else limit
    argv = [sys.executable, str(HERE / script), *script_args]
    if quick and name == "density-fast":
        argv[-1] = "10"  # --pods
    if quick:
        argv.append("--quick")
    if runs:
        argv += ["--runs", str(runs)]
    print(f"==> {name}: {' '.join(argv[1:])} (limit {limit} s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv)
    try:
        rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
        print(f"==> {name}: over its {limit} s limit: stopping it (it cleans up)", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = -1
    except KeyboardInterrupt:
        # The child got the same Ctrl-C: let it finish its cleanup.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(180)
        raise
    dt = time.monotonic() - t0
    print(f"==> {name}: exit {rc} after {dt:.0f} s", flush=True)
    return {"exit_code": rc, "seconds": dt, "timed_out": rc == -1}


def ensure_matplotlib() -> bool:
    """matplotlib (the optional 'bench' extra) in this venv, installed on first use."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print("==> installing the optional 'bench' extra (matplotlib) into the venv", flush=True)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "matplotlib>=3.7"], check=False)
    importlib.invalidate_caches()
    return r.returncode == 0 and importlib.util.find_spec("matplotlib") is not None


# -- loading and formatting -----------------------------------------------------------------


def load() -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in SECTIONS:
        p = RESULTS / f"{name}.json"
        if p.exists():
            with contextlib.suppress(ValueError):
                data[name] = json.loads(p.read_text())
    return data


def fmt(x: float | None, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if unit == "s":
        if x >= 1:
            return f"{x:.2f} s"
        if x >= 1e-3:
            return f"{x * 1e3:.3g} ms"
        return f"{x * 1e6:.3g} us"
    if unit in ("MiB/s", "calls/s"):
        return f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"
    return f"{x:.3g} {unit}"


def series_table(series: list[dict[str, Any]], first: str = "what") -> list[str]:
    out = [f"| {first} | command | runs | median | min-max | note |",
           "|---|---|---|---|---|---|"]
    for s in series:
        u = s["unit"]
        fails = f"{s['failures']} failed. " if s.get("failures") else ""
        if not s["samples"]:
            out.append(f"| {s['name']} | `{s['command']}` | 0 | n/a | n/a | "
                       f"{fails}{s.get('note') or 'no sample'} |")
            continue
        out.append(f"| {s['name']} | `{s['command']}` | {len(s['samples'])} | "
                   f"**{fmt(s['median'], u)}** | {fmt(s['min'], u)} - {fmt(s['max'], u)} | "
                   f"{fails}{s.get('note', '')} |")
    return out


def by_name(section: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    if not section:
        return {}
    return {s["name"]: s for s in section.get("series", []) if s.get("samples")}


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


# -- targets of issue 7 -----------------------------------------------------------------------


def targets(d: dict[str, Any]) -> list[str]:
    out = ["| target (issue 7) | measured (this run) | verdict |", "|---|---|---|"]
    st = by_name(d.get("startup"))
    if "pykata" in st and "bare QEMU boot to init" in st:
        gap = st["pykata"]["median"] - st["bare QEMU boot to init"]["median"]
        v = ("met" if gap <= 0.30 else
             f"missed by {gap - 0.30:.2f} s (the gap is {gap / 0.30:.0f}x the target)")
        out.append(f"| cold start minus bare VM boot <= 300 ms | {st['pykata']['median']:.2f} s"
                   f" - {st['bare QEMU boot to init']['median']:.2f} s = **{gap:.2f} s** | {v} |")
    else:
        out.append("| cold start minus bare VM boot <= 300 ms | not measured | - |")
    if "pykata (VM template)" in st and "bare QEMU boot to init" in st:
        t = st["pykata (VM template)"]["median"]
        gap = t - st["bare QEMU boot to init"]["median"]
        v = "met" if gap <= 0.30 else f"missed by {gap - 0.30:.2f} s"
        out.append(f"| the same, sandboxes from a VM template (`[factory] enable_template`) | "
                   f"{t:.2f} s - {st['bare QEMU boot to init']['median']:.2f} s = "
                   f"**{gap:.2f} s** | {v} |")
    ex = by_name(d.get("exec"))
    if "pykata" in ex and "runc" in ex:
        ratio = ex["pykata"]["median"] / ex["runc"]["median"]
        over = ex["pykata"]["median"] - 3 * ex["runc"]["median"]
        v = "met" if ratio <= 3 else f"missed: {ratio:.1f}x, by {fmt(over, 's')}"
        out.append(f"| exec latency <= 3x runc's | {fmt(ex['pykata']['median'], 's')} vs "
                   f"{fmt(ex['runc']['median'], 's')} = **{ratio:.1f}x** | {v} |")
    else:
        out.append("| exec latency <= 3x runc's | not measured | - |")
    steps = (d.get("density") or {}).get("memory_steps") or []
    if steps:
        rss = steps[0]["shim_rss_max_kib"] / 1024
        v = "met" if rss <= 30 else f"missed by {rss - 30:.1f} MiB"
        out.append(f"| idle shim RSS <= 30 MiB | **{rss:.1f} MiB** (1 idle pod) | {v} |")
    else:
        out.append("| idle shim RSS <= 30 MiB | not measured | - |")
    agent = (d.get("rpc") or {}).get("agent") or {}
    a = agent.get("agent_rss_one_container_bytes") or agent.get("agent_rss_idle_bytes")
    if a:
        v = "met" if a / MiB <= 20 else f"missed by {a / MiB - 20:.1f} MiB"
        out.append(f"| guest agent RSS <= 20 MiB | **{a / MiB:.1f} MiB** (one idle container; "
                   f"{(agent.get('agent_rss_idle_bytes') or 0) / MiB:.1f} MiB with none) | "
                   f"{v} |")
    else:
        out.append("| guest agent RSS <= 20 MiB | not measured | - |")
    b = (d.get("density") or {}).get("burst")
    if b:
        ok = b["started"] >= 10 and not b["failed"]
        if b["requested"] < 10:
            v = f"not checked: only {b['requested']} pods in this (quick) run"
        else:
            v = "met" if ok else f"missed: {b['failed']} of {b['requested']} failed"
        ready = fmt(b["all_ready_s"], "s") if b.get("all_ready_s") else "n/a"
        out.append(f"| 10 idle pods at once, no failure | {b['started']} of {b['requested']} "
                   f"started in parallel, {b['failed']} failed, all running after {ready} | "
                   f"{v} |")
    else:
        out.append("| 10 idle pods at once, no failure | not measured | - |")
    return out


# -- targets of issues 14 (start-up, memory), 15 (the guest engine), 22 (port-forward) ----------


def _verdict(ok: bool, how: str) -> str:
    return "met" if ok else f"missed: {how}"


def targets_next(d: dict[str, Any]) -> list[str]:
    out = ["| target | measured (this run) | verdict |", "|---|---|---|"]
    st = by_name(d.get("startup"))
    bare = st.get("bare QEMU boot to init")
    if "pykata" in st and bare:
        gap = st["pykata"]["median"] - bare["median"]
        out.append(f"| 14: cold `ctr run --rm true` <= bare boot to init + 0.3 s | "
                   f"{st['pykata']['median']:.2f} s - {bare['median']:.2f} s = **{gap:.2f} s**"
                   f" | {_verdict(gap <= 0.30, f'by {gap - 0.30:.2f} s (docs/boot.md)')} |")
    runsc = st.get("runsc (ptrace)")
    fast = {k: v for k, v in {**st, **by_name(d.get("vmcache"))}.items()
            if k in ("pykata (VM template)", "pykata VM cache", "pykata VM cache of template"
                     " clones")}
    if runsc and fast:
        name, best = min(fast.items(), key=lambda kv: kv[1]["median"])
        ratio = best["median"] / runsc["median"]
        out.append(f"| 14/15: fast path `ctr run --rm true` <= 1.3 x runsc | {name} "
                   f"{fmt(best['median'], 's')} vs runsc {fmt(runsc['median'], 's')} = "
                   f"**{ratio:.1f}x** | {_verdict(ratio <= 1.3, f'{ratio:.1f}x')} |")
    for label, sect, limit in (("cold", d.get("density"), 150),
                               ("fast path (VM template)", (d.get("density") or {}).get(
                                   "template"), 60)):
        steps = (sect or {}).get("memory_steps") or []
        if steps:
            last = steps[-1]
            per = (last.get("kib_per_pod") or {}).get("total", 0) / 1024
            out.append(f"| 14: idle pod PSS, {label}, <= {limit} MiB | **{per:.0f} MiB** per pod"
                       f" at {last['pods']} pods (RAM file included) | "
                       f"{_verdict(per <= limit, f'by {per - limit:.0f} MiB (docs/memory.md)')} |")
    b = (d.get("density-fast") or {}).get("template", {}).get("burst")
    if b:
        ok = b["requested"] >= 50 and b["started"] >= 50 and not b["failed"] and \
            b.get("exec_answered", 0) >= 50
        out.append(f"| 14: 50 idle pods (fast path), each answering an exec, 0 failed | "
                   f"{b['started']} of {b['requested']} running, {b['failed']} failed, "
                   f"{b.get('exec_answered', '?')} answered an exec | "
                   f"{_verdict(ok, 'see the density section')} |")
    en = by_name(d.get("engine"))
    ex = en.get("ctr task exec of `true`: pykata (native engine)")
    rc = en.get("ctr task exec of `true`: runc")
    if ex and rc:
        ratio = ex["median"] / rc["median"]
        out.append(f"| 15: `ctr task exec true` <= 3 x runc | {fmt(ex['median'], 's')} vs "
                   f"{fmt(rc['median'], 's')} = **{ratio:.1f}x** | "
                   f"{_verdict(ratio <= 3, f'{ratio:.1f}x (docs/engine.md)')} |")
    cs = en.get("native: create+start in the guest")
    if cs:
        crun = en.get("crun: create+start in the guest")
        beside = f" (crun engine: {fmt(crun['median'], 's')})" if crun else ""
        out.append(f"| 15: create + start in the guest <= 50 ms (agent log) | "
                   f"**{fmt(cs['median'], 's')}**{beside} | "
                   f"{_verdict(cs['median'] <= 0.05, 'docs/engine.md has the profile')} |")
    pf = by_name(d.get("portforward"))
    for what in ("CRI port-forward request", "pod-netns connect+request", "pod-netns download"):
        p, r = pf.get(f"pykata {what}"), pf.get(f"runc {what}")
        if p and r:
            out.append(f"| 22: port-forward {what} (measured, no target) | pykata "
                       f"{fmt(p['median'], p['unit'])} vs runc {fmt(r['median'], r['unit'])} "
                       f"| - |")
    if len(out) == 2:
        out.append("| (none measured in this run) | - | - |")
    return out


# -- the document ---------------------------------------------------------------------------


def render(d: dict[str, Any], suite: dict[str, Any]) -> str:
    mode = suite.get("mode", "?")
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in suite.get("sections", {}).items())
    out = ["# Benchmarks", "",
           "Measured on the development machine (2 cores, QEMU 7.2 under **TCG**: this",
           "host's KVM is PVM and cannot run a standard guest kernel; other engineers' VMs",
           "may have run at the same time, so treat spreads as noise bounds).",
           "", "**One command:** `make bench` (= `.venv/bin/python bench/run.py`; `--quick` for",
           "development, `--only SECTION,...`, `--render`). It runs every section below in",
           "one run, writes `bench/results/<section>.json` and `bench/results/results.json`,",
           "draws `docs/benchmarks.png` and rewrites this file. The analysis at the end comes",
           "from `bench/notes.md`. Every figure states its command, its number of runs, the",
           "median and min-max.", "",
           f"This run: **{mode}** counts, {suite.get('when', '?')}, suite wall time "
           f"{suite.get('seconds', 0) / 60:.1f} min ({times})."]
    failed = [k for k, v in suite.get("sections", {}).items() if v.get("exit_code") != 0]
    if failed:
        out.append(f"Sections that failed or timed out in this run: {', '.join(failed)} "
                   "(their tables below are from an earlier run, if any).")
    out += ["", "![benchmarks](benchmarks.png)", "", "## Targets (issue 7)", "", *targets(d),
            "", "## Targets (issues 14, 15, 22)", "", *targets_next(d)]
    img = _image()
    if img:
        out += ["", "## Guest image", "",
                "| item | value |", "|---|---|",
                f"| kernel | Debian `{img['kernel_package']}` ({img['kernel_release']}) |",
                f"| initrd (newc cpio, uncompressed) | {img['initrd_bytes'] / MiB:.1f} MiB |",
                f"| vmlinuz / vmlinux | {img['vmlinuz_bytes'] / MiB:.1f} MiB / uncompressed ELF"
                " booted through PVH |",
                f"| packages | {', '.join(sorted(img['packages']))} |"]
    st = d.get("startup")
    if st:
        out += ["", f"## Cold start, side by side ({st.get('when', '')})", "",
                *series_table(st["series"], "runtime")]
        bs = by_name(st)
        if "pykata" in bs and "bare QEMU boot to init" in bs:
            gap = bs["pykata"]["median"] - bs["bare QEMU boot to init"]["median"]
            out += ["", f"pykata minus the bare VM boot: **{gap:.2f} s** (target <= 0.30 s; "
                    "see where the time goes below)."]
    ex = d.get("exec")
    if ex:
        out += ["", f"## Exec latency ({ex.get('when', '')})", "",
                "`ctr task exec` of `true` in a running `sleep` container (2 warm-up execs "
                "not counted).", "", *series_table(ex["series"], "runtime")]
    en = d.get("engine")
    if en:
        out += ["", f"## The guest's container engine: native vs crun ({en.get('when', '')})",
                "", "`[agent] container_engine`: the agent's own engine (with its fork server; "
                "`native-nofs` without it) against crun in the same guest, one sandbox each; "
                "inside the guest from the agent's log, from the host through the runtime, "
                "and `ctr task exec` beside runc. See [engine.md](engine.md).", "",
                *series_table(en["series"])]
    ag = d.get("agent_start")
    if ag:
        out += ["", f"## Agent start against the boot floor ({ag.get('when', '')})", "",
                "The same kernel booted three ways in one run: to a trivial init (`floor`), "
                "with the agent from the initrd, and with the agent from the read-only DAX "
                "image; host clock from QEMU's start, guest uptime from the guest. See "
                "[boot.md](boot.md).", "",
                *series_table([x for x in ag["series"]
                               if any(k in x["name"] for k in (
                                   "floor: host", "host check", "host serving",
                                   "guest kernel_init", "guest early_check",
                                   "guest serving"))])]
    vc = d.get("vmcache")
    if vc:
        out += ["", f"## VM cache and templates ({vc.get('when', '')})", "",
                "`ctr run --rm IMAGE id true` cold, from a VM template, from the VM cache "
                "(`pykata factory serve`, refilled at once or after a pause) and from a cache "
                "of template clones. See [vmcache.md](vmcache.md).", "",
                *series_table(vc["series"], "path")]
        mem = vc.get("idle_cached_vm_memory") or {}
        if mem:
            out += ["", "| idle cached VM | PSS | unmapped RAM file | total |", "|---|---|---|---|"]
            out += [f"| {k} | {mib(v['pss_bytes'] / 1024)} | "
                    f"{mib(v['ram_file_unmapped_bytes'] / 1024)} | "
                    f"**{mib(v['total_bytes'] / 1024)}** |" for k, v in mem.items()]
    pf = d.get("portforward")
    if pf:
        out += ["", f"## Port-forward, pykata vs runc ({pf.get('when', '')})", "",
                "Through containerd's CRI PortForward and streaming server (websocket), and "
                "the dial containerd makes in the pod's network namespace; the server is "
                "busybox httpd in the pod. See [conformance.md](conformance.md).", "",
                *series_table(pf["series"])]
    de = d.get("density")
    if de:
        out += _density(de)
        if de.get("template"):
            tp = dict(de["template"])
            tp.setdefault("when", de.get("when", ""))
            tp.setdefault("settle_s", de.get("settle_s", "?"))
            out += _density(tp, f" from a VM template (built once in "
                                f"{tp.get('template_build_s', 0):.1f} s)")
    fa = (d.get("density-fast") or {}).get("template")
    if fa and fa.get("burst"):
        fa = dict(fa)
        fa.setdefault("when", d["density-fast"].get("when", ""))
        fa.setdefault("settle_s", d["density-fast"].get("settle_s", "?"))
        out += _density(fa, f", {fa['burst']['requested']} template pods at once")
    rp = d.get("rpc")
    if rp:
        ag = rp.get("agent", {})
        out += ["", f"## ttRPC and the agent channel ({rp.get('when', '')})", "",
                "pykata.ttrpc client and server in two processes over a unix socket; then the "
                f"guest agent over the VM channel ({ag.get('channel', '?')}, accel "
                f"{ag.get('accel', '?')}) of a sandbox made in-process by `Sandbox.create` "
                f"(which took {ag.get('sandbox_create_s', 0):.2f} s).", "",
                *series_table(rp["series"])]
        if ag.get("agent_rss_idle_bytes"):
            out += ["", f"Guest agent RSS (`pykata_agent_rss_bytes` from GetMetrics, 1 run): "
                    f"**{ag['agent_rss_idle_bytes'] / MiB:.1f} MiB** in an idle sandbox, "
                    f"**{(ag.get('agent_rss_one_container_bytes') or 0) / MiB:.1f} MiB** "
                    "with one idle container."]
    ne = d.get("network")
    if ne:
        info = ne.get("info", {})
        out += ["", f"## Network: pod <-> peer, pykata (tcfilter) vs runc ({ne.get('when', '')})",
                "", "Pods made through CRI (private containerd, bridge CNI on "
                f"{info.get('subnet', '?')}); the peer is a network namespace made by the "
                f"benchmark on the same bridge ({info.get('peer', '?')}) running "
                "`bench/netpeer.py`. No traffic leaves those namespaces.", "",
                *series_table(ne["series"])]
    so = d.get("storage")
    if so:
        out += ["", f"## Storage: sequential dd, host vs virtio-fs vs virtio-blk "
                f"({so.get('when', '')})", "",
                f"{so.get('info', {}).get('mib', '?')} MiB per run, 1 MiB blocks; writes end "
                "with fsync; caches dropped before reads (guest: drop_caches; host: the "
                "file's or the loop device's). Guest times are busybox `time` (10 ms). "
                f"virtio-blk path: {so.get('info', {}).get('virtio-blk-path', '?')}.", "",
                *series_table(so["series"])]
    co = d.get("confinement")
    if co:
        out += ["", f"## What the VMM's confinement costs ({co.get('when', '')})", "",
                "One in-process `Sandbox.create` + `stop` per run, the variants alternating "
                f"({co.get('runs', '?')} runs each after one warm-up): the default (QEMU "
                "under `-sandbox` as `pykata-qemu`, virtiofsd in its namespaces) against "
                "each part turned off. QEMU's PSS is taken once the agent answers; the "
                "round trip is the mean of 50 `Health/Check` calls. See "
                "[security.md](security.md).", "", *series_table(co["series"])]
    mo = d.get("monitor")
    if mo:
        out += ["", f"## pykata-monitor scrape cost ({mo.get('when', '')})", "",
                "One `GET /metrics` of pykata-monitor (it asks every shim at once; each shim "
                "reads /proc and asks its agent for the guest's figures), with 0, 1 and 10 "
                "idle CRI pods from a VM template; the notes give the CPU one scrape costs "
                "the monitor and the shims.", "", *series_table(mo["series"])]
    ck = d.get("checkpoint")
    if ck:
        out += _checkpoint(ck)
    extra = HERE / "notes.md"
    if extra.exists():
        out += ["", extra.read_text().rstrip()]
    return "\n".join(out) + "\n"


def _density(de: dict[str, Any], how: str = "") -> list[str]:
    out = ["", f"## Per-pod host memory and density{how} ({de.get('when', '')})"]
    if not de.get("memory_steps"):
        return out + _burst(de.get("burst"))
    out += ["", f"Idle pods: `{de.get('command', '')}`, started in parallel batches; PSS of each "
           "pod's shim + QEMU + virtiofsd read from /proc/PID/smaps_rollup "
           f"{de.get('settle_s', '?')} s after the batch is up (1 sample per step). A VM "
           "cloned from a template keeps its RAM in a tmpfs file: the part of that file "
           "QEMU has not mapped again yet is invisible to PSS but costs host memory, so it "
           "is added as *RAM file*.", "",
           "| pods | batch (in parallel) | batch start time | failed | QEMU / pod | "
           "virtiofsd / pod | shim / pod | RAM file / pod | **total / pod** | total, all pods |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for m in de.get("memory_steps", []):
        p = m.get("kib_per_pod") or {}
        t = m.get("kib_total") or {}
        out.append(f"| {m['pods']} | +{m['added']} | {fmt(m['batch_seconds'], 's')} | "
                   f"{m['failed']} | {mib(p.get('qemu', 0))} | {mib(p.get('virtiofsd', 0))} | "
                   f"{mib(p.get('shim', 0))} | {mib(p.get('ram_file', 0))} | "
                   f"**{mib(p.get('total', 0))}** | "
                   f"{mib(t.get('total', 0))} |")
    steps = de.get("memory_steps") or []
    if steps:
        out += ["", f"Largest idle shim RSS: {steps[0]['shim_rss_max_kib'] / 1024:.1f} MiB "
                f"(1 pod), {steps[-1]['shim_rss_max_kib'] / 1024:.1f} MiB "
                f"({steps[-1]['pods']} pods)."]
    return out + _burst(de.get("burst"))


def _checkpoint(ck: dict[str, Any]) -> list[str]:
    """The checkpoint section: one row per runtime and workload, one column per
    figure (median, min-max), then what failed and pykata's own phases."""
    info = ck.get("info") or {}
    series = {s["name"]: s for s in ck.get("series", [])}
    cols = (("checkpoint", "checkpoint"), ("shim", "of which in pykata's shim"),
            ("size", "size"), ("restore", "restore to running"),
            ("answer", "restore to first answer"), ("pss", "restored PSS"),
            ("rss", "restored VMM RSS"))
    la0 = ", ".join(f"{x:.1f}" for x in info.get("loadavg_start", []))
    la1 = ", ".join(f"{x:.1f}" for x in info.get("loadavg_end", []))
    out = ["", f"## Checkpoint and restore ({ck.get('when', '')})", "",
           f"`bench/checkpoint.py`: each container is checkpointed and restored "
           f"{info.get('runs', '?')} times in a row (each cycle checkpoints what the "
           "previous one restored), idle and after `dd if=/dev/urandom bs=1M count="
           f"{info.get('fill_mib', '?')}` into memory (pykata: the container's writable "
           "layer, a guest tmpfs; runc and runsc: a tmpfs at /tmp; bare QEMU: its "
           "initramfs). pykata: `ctr c checkpoint --task CID REF`, kill and remove, `ctr c "
           "restore --live CID REF`, a pod with `shared_fs = \"none\"`, `[runtime] "
           f"checkpointable`, {info.get('memory_mib', '?')} MiB of guest RAM and its image "
           "pulled in the guest from a registry in a namespace the benchmark made; runc: "
           "the same ctr commands (criu); runsc: `runsc checkpoint` / `runsc restore` on "
           "a bundle (ptrace, `--network=none`); bare QEMU: the same kernel, initrd and "
           "memory size with a shell as init, QMP `stop` + `migrate` to a file fd, then a "
           "new QEMU with `-incoming defer`, `migrate-incoming`, `cont`. Size: containerd's "
           "content-store blob (criu tar media type), runsc's image directory, QEMU's "
           "state file. First answer: `ctr t exec CID true` / `runsc exec CID true` "
           "succeeds (bare QEMU: its shell prints its next line). PSS: the shim (or "
           "runsc's processes) and every child, QEMU's unmapped RAM file included; RSS: "
           "QEMU's (runsc: its sandbox's). `ctr c checkpoint` includes containerd's "
           "pause, its tar of the checkpoint directory into the content store and its "
           "resume; *of which in pykata's shim* is the shim's own log line (quiesce, save, "
           "pack the RAM, run again). pykata's state directory, and so the pod's RAM file, "
           "is on tmpfs (/dev/shm), as /run is on a usual host (here /run is on the disk).",
           "",
           f"**Shared host:** the 2 cores are shared with a soak test and other "
           f"engineers' VM tests (load average {la0 or '?'} at the start of this run, "
           f"{la1 or '?'} at its end; each part's own in bench/results/checkpoint.json): "
           "read the times as upper bounds and the spreads as noise.", "",
           "| runtime, workload | runs | " + " | ".join(c for _, c in cols) +
           " | load average (1 min), start - end |",
           "|---|---|" + "---|" * len(cols) + "---|"]
    notes = []
    for r in ck.get("rows", []):
        label = f"{r['runtime']}, {r['workload']}"
        d = (ck.get("details") or {}).get(f"{label}: details") or {}
        load = (f"{d['loadavg_start'][0]:.1f} - {d['loadavg_end'][0]:.1f}"
                if d.get("loadavg_start") and d.get("loadavg_end") else "?")
        cells = []
        n = 0
        for key, _ in cols:
            s = series.get(f"{label}: {key}")
            if not s or not s.get("samples"):
                cells.append("-")
                continue
            n = max(n, len(s["samples"]))
            u = s["unit"]
            spread = f" ({fmt(s['min'], u)} - {fmt(s['max'], u)})" if len(s["samples"]) > 1 \
                else ""
            cells.append(f"**{fmt(s['median'], u)}**{spread}")
        if not n and r.get("note"):
            cells[0] = "failed (below)"
        out.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {load} |")
        if r.get("note"):
            notes.append(f"- {label}: {r['note']}")
    if notes:
        out += ["", *notes]
    def median_of(runtime: str, workload: str, key: str) -> float:
        s = series.get(f"{runtime}, {workload}: {key}")
        return float(s["median"]) if s and s.get("samples") else 0.0

    for workload in dict.fromkeys(r["workload"] for r in ck.get("rows", [])):
        parts = []
        for other in ("bare QEMU", "runsc"):
            cmp = []
            for k, what in (("checkpoint", "checkpoint"), ("size", "size"),
                            ("answer", "restore to first answer"), ("pss", "restored PSS")):
                ours, theirs = median_of("pykata", workload, k), median_of(other, workload, k)
                if ours and theirs:
                    cmp.append(f"{what} {ours / theirs:.1f}x")
            if cmp:
                parts.append(f"against {other}: " + ", ".join(cmp))
        if parts:
            out += ["", f"pykata, {workload} (medians; only as fair as the rows' load "
                    "averages are alike): " + "; ".join(parts) + "."]
    details = ck.get("details") or {}
    for r in ck.get("rows", []):
        if r["runtime"] != "pykata":
            continue
        d = details.get(f"{r['runtime']}, {r['workload']}: details") or {}
        phases = d.get("phases") or []
        files = d.get("files") or []
        if not phases:
            continue
        names = list(phases[0])
        med = {k: sorted(p.get(k, 0.0) for p in phases)[len(phases) // 2] for k in names}
        mem = sorted(f.get("memory.pkram", 0) for f in files)
        vms = sorted(f.get("vmstate", 0) for f in files)
        out += ["", f"pykata, {r['workload']}: the shim's phases (the checkpoint's dump.log, "
                "median): " + ", ".join(f"{k} {fmt(v, 's')}" for k, v in med.items())
                + (f"; packed RAM (memory.pkram) {fmt(mem[len(mem) // 2] / MiB, 'MiB')}, "
                   f"device state (vmstate) {fmt(vms[len(vms) // 2] / MiB, 'MiB')}"
                   if mem else "") + "."]
    return out


def _burst(b: dict[str, Any] | None) -> list[str]:
    out: list[str] = []
    if b:
        per = sorted(b.get("per_pod_s") or [])
        spread = (f"per-pod `ctr run -d` time median {fmt(per[len(per) // 2], 's')}, "
                  f"min-max {fmt(per[0], 's')} - {fmt(per[-1], 's')} (n={len(per)})"
                  if per else "no pod started")
        kp = b.get("kib_per_pod") or {}
        ready = fmt(b['all_ready_s'], 's') if b.get('all_ready_s') else 'n/a (failures)'
        out += ["", f"**Density:** {b['requested']} pods started all at once (budget "
                f"{b['budget_s']:.0f} s each): **{b['started']} running, {b['failed']} failed**, "
                f"all running after **{ready}** (1 run); {spread}; "
                f"{b.get('still_running_after_settle', '?')} still running after the settle "
                f"time; PSS {mib(kp.get('total', 0))} per pod"
                + (f"; {b['exec_answered']} answered a `ctr task exec`" if "exec_answered" in b
                   else "") + "."]
    return out


def _image() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(Path("/var/lib/pykata/manifest.json").read_text())
        return data
    except (OSError, ValueError):
        return None


# -- the plot ---------------------------------------------------------------------------------


def plot(d: dict[str, Any], path: Path) -> bool:
    if not ensure_matplotlib():
        print("==> no matplotlib: docs/benchmarks.png not drawn", flush=True)
        return False
    # matplotlib is an optional extra: `make test` type-checks bench/ without it.
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    ax = axes.flat

    def bars(a: Any, series: list[dict[str, Any]], title: str, unit: str, scale: float = 1.0,
             log: bool = False, names: dict[str, str] | None = None) -> None:
        ss = [s for s in series if s.get("samples")]
        if not ss:
            a.set_title(title + " (not measured)")
            a.axis("off")
            return
        labels = [(names or {}).get(s["name"], s["name"]) for s in ss]
        med = [s["median"] * scale for s in ss]
        lo = [max(0.0, (s["median"] - s["min"]) * scale) for s in ss]
        hi = [max(0.0, (s["max"] - s["median"]) * scale) for s in ss]
        pos = list(range(len(ss)))
        a.bar(pos, med, yerr=[lo, hi], capsize=4,
              color=["#d62728" if "pykata" in s["name"] or "agent" in s["name"]
                     or "virtio" in s["name"] else "#1f77b4" for s in ss])
        a.set_xticks(pos, labels, rotation=30, ha="right", fontsize=8)
        a.set_ylabel(unit)
        a.set_title(title)
        if log:
            a.set_yscale("log")
        for x, y in zip(pos, med, strict=True):
            a.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7)

    st = d.get("startup", {}).get("series", [])
    bars(next(ax), st, "Cold start: ctr run --rm ... true (median, min-max)", "s", log=True,
         names={"bare QEMU boot to init": "bare VM boot", "crun (runc shim)": "crun",
                "runsc (ptrace)": "runsc"})
    bars(next(ax), d.get("exec", {}).get("series", []), "Exec latency: ctr task exec true",
         "ms", scale=1e3)
    a = next(ax)
    steps = d.get("density", {}).get("memory_steps", [])
    if steps:
        pods = [m["pods"] for m in steps]
        bottom = [0.0] * len(steps)
        for k, color in (("qemu", "#d62728"), ("virtiofsd", "#2ca02c"), ("shim", "#9467bd")):
            vals = [(m.get("kib_per_pod") or {}).get(k, 0) / 1024 for m in steps]
            a.bar([str(p) for p in pods], vals, bottom=bottom, label=k, color=color)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        tsteps = (d.get("density", {}).get("template") or {}).get("memory_steps") or []
        tot = {m["pods"]: (m.get("kib_per_pod") or {}).get("total", 0) / 1024 for m in tsteps}
        if tot:
            a.plot([str(p) for p in pods if p in tot], [tot[p] for p in pods if p in tot],
                   "ko-", label="total, VM template")
        a.set_xlabel("idle pods running")
        a.set_ylabel("PSS per pod (MiB)")
        a.legend(fontsize=8)
        a.set_title("Host memory per idle pod as pods are added")
    else:
        a.axis("off")
    a = next(ax)
    b = d.get("density", {}).get("burst")
    if b and b.get("per_pod_s"):
        per = sorted(b["per_pod_s"])
        a.bar([str(i) for i in range(1, len(per) + 1)], per, color="#d62728")
        a.set_xlabel("pod (sorted by start time)")
        a.set_ylabel("s until running")
        a.set_title(f"Density: {b['requested']} pods at once: {b['started']} ok, "
                    f"{b['failed']} failed")
    else:
        a.axis("off")
    rp = d.get("rpc", {}).get("series", [])
    lat = [s for s in rp if s["unit"] == "s"]
    bars(next(ax), lat, "ttRPC (unix socket) and agent (VM channel) round trips", "us",
         scale=1e6, log=True, names={s["name"]: s["name"].replace(" round trip", "")
                                     for s in lat})
    ne = d.get("network", {}).get("series", [])
    bars(next(ax), [s for s in ne if s["unit"] == "MiB/s"],
         "Network throughput pod<->peer", "MiB/s", log=True)
    bars(next(ax), [s for s in ne if s["unit"] == "s"], "Network latency pod<->peer", "us",
         scale=1e6, log=True)
    bars(next(ax), d.get("storage", {}).get("series", []), "Storage: sequential dd", "MiB/s",
         log=True)
    fig.suptitle("pykata vs runc / crun / runsc / bare VM (QEMU TCG, 2 cores): "
                 "medians, error bars min-max", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--render", action="store_true", help="only render from bench/results")
    ap.add_argument("--quick", action="store_true", help="few runs, small sizes")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {list(SECTIONS)}")
    ap.add_argument("--runs", type=int, default=0, help="override every section's run count")
    args = ap.parse_args()
    if os.geteuid() != 0 and not args.render:
        print("bench: needs root (VMs, containerd, netns, loop devices)", file=sys.stderr)
        return 1
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    suite_file = RESULTS / "suite.json"
    if args.render:
        suite = json.loads(suite_file.read_text()) if suite_file.exists() else {}
    else:
        t0 = time.monotonic()
        suite = {"mode": "quick" if args.quick else "default", "sections": {},
                 "when": time.strftime("%Y-%m-%d %H:%M")}
        for name in only:
            suite["sections"][name] = run_section(name, args.quick, args.runs)
        suite["seconds"] = time.monotonic() - t0
        RESULTS.mkdir(exist_ok=True)
        suite_file.write_text(json.dumps(suite, indent=1) + "\n")
        if all(v["exit_code"] == 0 for v in suite["sections"].values()):
            shutil.rmtree(CTD_BASE, ignore_errors=True)  # containerd logs of the sections
    data = load()
    (RESULTS / "results.json").write_text(json.dumps({"suite": suite, **data}, indent=1,
                                                     default=str) + "\n")
    plot(data, PLOT)
    DOC.write_text(render(data, suite))
    print(f"wrote {DOC}, {PLOT}, {RESULTS / 'results.json'}")
    failed = [k for k, v in suite.get("sections", {}).items() if v.get("exit_code") != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
