"""Issue 18: pykata-monitor scraped by a real Prometheus (Debian's ``prometheus``).

A CRI pod runs through a private containerd with the CRI plugin (its pykata
shims keep their state in a private state directory); pykata-monitor serves
that state directory on a free loopback port, asking that containerd's CRI for
pod names; Prometheus scrapes it from a temporary config and TSDB. A PromQL
query then returns the guest memory of the pod labelled with its pod name,
namespace and uid. The monitor's other endpoints are checked against the same
pod, and a second monitor without CRI still names the pod (from the shim's
annotations). Everything (Prometheus, monitors, the pod) is gone afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.soak_support import cri_env

pytestmark = pytest.mark.timeout(600)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
MONITOR = Path(sys.executable).parent / "pykata-monitor"
WAIT = 240.0  # seconds for a first scrape to show up (a TCG guest under load is slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


def wait_for(what: str, fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            got = fn()
        except OSError as exc:
            got, last = None, exc
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what}: nothing after {timeout:g} s (last error: {last})")


@contextlib.contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def monitor(state: Path, port: int, cri: str, log: Path) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    return process([str(MONITOR), "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                    "--cri-endpoint", cri, "--scrape-timeout", "4"], log)


def query(prom: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    data = json.loads(get(url))
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def test_prometheus_gets_a_cri_pods_guest_memory_by_pod_name() -> None:
    assert os.access(PROMETHEUS, os.X_OK), "prometheus is not installed (scripts/setup.sh)"
    work = Path(tempfile.mkdtemp(prefix="pykata-monitor-test-"))
    try:
        with cri_env("monitor") as env:
            pod_id, cfg, _ = env.pod("mon")
            meta = cfg.metadata
            mport, pport = free_port(), free_port()
            base = f"http://127.0.0.1:{mport}"
            prom = f"http://127.0.0.1:{pport}"
            (work / "prometheus.yml").write_text(
                "global:\n  scrape_interval: 5s\n  scrape_timeout: 5s\n"
                "scrape_configs:\n  - job_name: pykata\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{mport}']\n")
            with monitor(env.state, mport, str(env.ctd.socket), work / "monitor.log") as mon, \
                    process([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{pport}",
                             "--log.level=warn"], work / "prometheus.log"):
                # /sandboxes: the pod, named through CRI
                items = wait_for("monitor /sandboxes", lambda: json.loads(
                    get(f"{base}/sandboxes")))
                (item,) = [i for i in items if i["id"] == pod_id]
                assert (item["namespace"], item["pod_name"], item["pod_namespace"],
                        item["pod_uid"]) == ("k8s.io", meta.name, meta.namespace, meta.uid)
                assert item["state"] == "running" and item["metrics_socket"] is True

                # Prometheus: the guest's memory of the pod, by pod name
                promql = 'pykata_guest_meminfo{item="MemTotal"}'
                result = wait_for(f"Prometheus query {promql}", lambda: query(prom, promql))
                (series,) = result
                labels, (_, value) = series["metric"], series["value"]
                assert labels["pod_name"] == meta.name, labels
                assert (labels["sandbox_id"], labels["namespace"], labels["pod_namespace"],
                        labels["pod_uid"], labels["job"]) == (
                    pod_id, "k8s.io", meta.namespace, meta.uid, "pykata"), labels
                assert float(value) > 0
                print(f"PromQL {promql} -> {labels} {value}")  # shown with pytest -s
                by_name = query(prom, f'pykata_guest_meminfo{{item="MemTotal",'
                                      f'pod_name="{meta.name}"}}')
                assert [s["metric"]["sandbox_id"] for s in by_name] == [pod_id]
                (up,) = query(prom, 'up{job="pykata"}')
                assert up["value"][1] == "1"
                (sb_up,) = query(prom, f'pykata_monitor_sandbox_up{{sandbox_id="{pod_id}"}}')
                assert sb_up["value"][1] == "1" and sb_up["metric"]["pod_name"] == meta.name
                qemu = query(prom, f'pykata_hypervisor_rss_bytes{{process="qemu",'
                                   f'pod_name="{meta.name}"}}')
                assert qemu and float(qemu[0]["value"][1]) > 0

                # the console log: the guest kernel's and the agent's lines
                logs = get(f"{base}/sandboxes/{pod_id}/logs?lines=5000").decode()
                assert logs.startswith("==> console.log <==\n")
                assert "pykata-agent" in logs, logs[-2000:]
                with pytest.raises(urllib.error.HTTPError) as e:
                    get(f"{base}/sandboxes/no-such-sandbox/logs")
                assert e.value.code == 404

            assert mon.returncode == 0, (work / "monitor.log").read_text()[-2000:]

            # without CRI, the pod is still named, from the shim's annotations
            port2 = free_port()
            with monitor(env.state, port2, "", work / "monitor2.log") as mon2:
                text = wait_for("monitor /metrics without CRI", lambda: get(
                    f"http://127.0.0.1:{port2}/metrics").decode())
                lines = [ln for ln in text.splitlines()
                         if ln.startswith("pykata_guest_meminfo{") and 'item="MemTotal"' in ln]
                assert len(lines) == 1 and f'pod_name="{meta.name}"' in lines[0], lines
            assert mon2.returncode == 0, (work / "monitor2.log").read_text()[-2000:]
            env.remove_pod(pod_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
