"""pykata-monitor's scrape cost: the wall time of one ``GET /metrics`` (the
monitor asks every shim at once, each shim reads /proc and asks its agent for
the guest's figures, and CRI for the pod names) with 0, 1 and 10 idle CRI
pods, and the monitor's own memory.

The pods are cheap: VM template clones (``[factory] enable_template``, the
template built once for this run) through a private containerd with the CRI
plugin, each only its pause container, in a private state directory that the
monitor serves. Before each measurement every pod must answer
(pykata_monitor_sandbox_up 1), so what is timed is a scrape of live shims.

``--dashboard PNG`` also runs a real Prometheus (Debian's) against the monitor,
keeps three of the ten pods busy (CPU, guest memory, execs) for ``--hold``
seconds, and then draws deploy/grafana/pykata-dashboard.json from its API with
scripts/render_dashboard.py.

    .venv/bin/python bench/monitor_scrape.py [--quick] [--dashboard docs/dashboard.png]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
    Series,
    arg_parser,
    log,
    rss_kib,
    run_section,
    runs,
    save_series,
    shim_pids,
    sigterm_as_interrupt,
)

from pykata import config
from pykata.protos import cri_api_pb2 as cri
from pykata.testing import leftovers
from pykata.testing.cri import (
    BUSYBOX_REF,
    CRIClient,
    CRIError,
    container_config,
    cri_containerd,
    pod_config,
)

HERE = Path(__file__).parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
LABEL = {"pykata.bench": "monitor"}
HANDLER = "pykata"
STEPS = (0, 1, 10)
# Three busy pods for the dashboard: guest memory held in /dev/shm (MiB), then
# random bytes hashed in a loop (MB per round), different for each.
WORK = "head -c {mib}m /dev/zero > /dev/shm/fill; " \
       "while true; do head -c {mb}000000 /dev/urandom | md5sum >/dev/null; sleep 3; done"
BUSY = ((12, 2), (30, 4), (55, 8))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (0 for one that is gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def answering(text: str) -> int:
    return sum(1 for ln in text.splitlines()
               if ln.startswith("pykata_monitor_sandbox_up{") and ln.endswith(" 1.0"))


def wait_answering(url: str, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if answering(get(url).decode()) >= n:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"monitor: {n} sandboxes not all answering after {timeout:g} s")
        time.sleep(1)


Pod = tuple[str, cri.PodSandboxConfig]


def start_pods(client: CRIClient, base: Path, n: int, first: int) -> list[Pod]:
    pods = []
    for i in range(first, first + n):
        name = f"bench-pod-{i:02d}"
        cfg = pod_config(name, "bench", uid=uuid.uuid4().hex, labels=LABEL,
                         log_directory=base / "pods" / name, hostname=name)
        pods.append((client.run_pod_sandbox(cfg, runtime_handler=HANDLER), cfg))
    return pods


def busy(client: CRIClient, pods: list[Pod], hold: float) -> None:
    """Containers that use guest memory and CPU in the first pods, and execs into
    them every few seconds, for ``hold`` seconds."""
    cids = []
    for (pod_id, cfg), (mib, mb) in zip(pods, BUSY, strict=False):
        cid = client.create_container(pod_id, container_config(
            "work", BUSYBOX_REF, ["/bin/sh", "-c"], [WORK.format(mib=mib, mb=mb)],
            log_path="work.log"), cfg)
        client.start_container(cid)
        cids.append(cid)
    log(f"monitor: {len(cids)} pods busy; holding {hold:g} s for Prometheus")
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for cid in cids:
            try:
                client.exec_sync(cid, ["cat", "/proc/loadavg"], timeout=30)
            except CRIError as exc:
                log(f"monitor: exec in {cid[:12]}: {exc}")
        time.sleep(5)


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--dashboard", type=Path, help="also render the dashboard to this PNG")
    ap.add_argument("--hold", type=float, default=420.0,
                    help="seconds of busy pods before rendering (--dashboard)")
    args = ap.parse_args()
    sigterm_as_interrupt()
    n_runs = runs(args, 20, 5)
    tag = uuid.uuid4().hex[:6]
    state = Path(f"/run/pykata/bench-monitor-{tag}")
    template = Path(f"/dev/shm/pykata-bench-monitor-{tag}")
    work = Path(tempfile.mkdtemp(prefix="pykata-bench-monitor-"))
    cfg = config.load()
    cfg.runtime.state_dir = str(state)
    cfg.factory.enable_template = True
    cfg.factory.template_path = str(template / "template")
    cfg_file = work / "pykata.toml"
    cfg_file.write_text(config.to_toml(cfg))
    series: list[Series] = []
    extra: dict[str, object] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        log("monitor: building the VM template")
        t0 = time.monotonic()
        subprocess.run([str(BIN / "pykata"), "--config", str(cfg_file), "factory", "init"],
                       check=True, capture_output=True, timeout=600)
        extra["template_build_s"] = round(time.monotonic() - t0, 1)
        base = Path(f"/run/pykata-bench-monitor-{tag}")
        with cri_containerd(base, CACHE / f"monitor-ctd-{tag}", LABEL,
                            pykata_config=config.to_toml(cfg)) as (ctd, _net, client):
            port = free_port()
            url = f"http://127.0.0.1:{port}/metrics"
            with open(work / "monitor.log", "wb") as mon_log:
                procs.append(subprocess.Popen(
                    [str(BIN / "pykata-monitor"), "--listen", f"127.0.0.1:{port}",
                     "--state-dir", str(state), "--cri-endpoint", str(ctd.socket),
                     "--scrape-timeout", "5"], stdout=mon_log, stderr=subprocess.STDOUT))
            monitor = procs[-1]
            prom = ""
            if args.dashboard:
                pport = free_port()
                prom = f"http://127.0.0.1:{pport}"
                (work / "prometheus.yml").write_text(
                    "global:\n  scrape_interval: 5s\n  scrape_timeout: 5s\n"
                    "scrape_configs:\n  - job_name: pykata\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{port}']\n")
                procs.append(subprocess.Popen(
                    ["prometheus", f"--config.file={work / 'prometheus.yml'}",
                     f"--storage.tsdb.path={work / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            pods: list[Pod] = []
            for n in STEPS:
                if n > len(pods):
                    log(f"monitor: starting {n - len(pods)} pod(s)")
                    t0 = time.monotonic()
                    pods += start_pods(client, base, n - len(pods), len(pods))
                    log(f"monitor: {n} pods up in {time.monotonic() - t0:.1f} s")
                wait_answering(url, n)
                s = Series(f"scrape, {n} pod{'s' if n != 1 else ''}", "GET /metrics", "s")
                size = 0
                shims = list(shim_pids(ctd.socket).values())
                cpu0 = (0.0, 0.0)
                for i in range(n_runs + 2):
                    if i == 2:
                        cpu0 = (cpu_seconds([monitor.pid]), cpu_seconds(shims))
                    t0 = time.perf_counter()
                    text = get(url).decode()
                    dt = time.perf_counter() - t0
                    if i < 2:
                        continue  # warm-up
                    if answering(text) == n:
                        s.samples.append(dt)
                        size = len(text)
                    else:
                        s.failures += 1
                s.note = f"{size} bytes, {sum(1 for ln in text.splitlines() if ln[:1] != '#')}" \
                         " samples per scrape"
                timed = len(s.samples) + s.failures
                mon_ms = (cpu_seconds([monitor.pid]) - cpu0[0]) / timed * 1000
                shims_ms = (cpu_seconds(shims) - cpu0[1]) / timed * 1000
                s.note += (f"; CPU per scrape: monitor {mon_ms:.0f} ms, the {len(shims)} shims"
                           f" {shims_ms:.0f} ms")
                extra[f"monitor_cpu_ms_per_scrape_{n}"] = round(mon_ms, 1)
                extra[f"shims_cpu_ms_per_scrape_{n}"] = round(shims_ms, 1)
                series.append(s)
                log(s.line() + f" ({s.note})")
                extra[f"monitor_rss_kib_{n}"] = rss_kib(monitor.pid)
            if args.dashboard:
                busy(client, pods, 60.0 if args.quick else args.hold)
                r = subprocess.run(
                    [sys.executable, str(REPO / "scripts" / "render_dashboard.py"),
                     "--prometheus", prom, "--minutes",
                     str(round((60.0 if args.quick else args.hold) / 60 + 3)),
                     "--note", "bench/monitor_scrape.py --dashboard: 10 CRI pods from a VM"
                     " template (TCG, 2 shared cores), 3 of them busy; Prometheus 2.42"
                     " scraping pykata-monitor every 5 s",
                     "--out", str(args.dashboard)], capture_output=True, text=True,
                    timeout=300)
                log((r.stdout + r.stderr).strip())
                extra["dashboard"] = str(args.dashboard) if r.returncode == 0 else ""
                up = json.loads(get(f"{prom}/api/v1/query?query=up"))["data"]["result"]
                extra["prometheus_up"] = [u["value"][1] for u in up]
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run([str(BIN / "pykata"), "--config", str(cfg_file), "factory", "destroy"],
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(template, ignore_errors=True)
        shutil.rmtree(CACHE / f"monitor-ctd-{tag}", ignore_errors=True)
        left = leftovers(state) if state.exists() else []
        if left:
            log(f"monitor: left behind (for `pykata cleanup`): {left}")
        else:
            shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    save_series("monitor", series, **extra)
    return 0 if all(s.samples for s in series) else 1


if __name__ == "__main__":
    run_section(main)
