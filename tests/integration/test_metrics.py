"""Issue 18 (metrics part): every pod's shim serves Prometheus text on
``<sandbox dir>/metrics.sock``, scraped here with a real HTTP client.

One CRI pod on the test's own containerd and CNI bridge; the only traffic is
an ARP request from the guest for an unused address of the test's subnet."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_cri_pykata import SLEEP, Env, Pod, cri_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from cri_env()


async def get(sock: Path, path: str) -> tuple[int, str, str]:
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as s, s.get(
            f"http://localhost{path}", timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def samples(text: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(found: list[Any], name: str, **labels: str) -> float:
    got = [s.value for s in found
           if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, f"{name} {labels}: {got}"
    return float(got[0])


def test_pod_metrics_socket(env: Env) -> None:
    _, net, _ = env
    pod = Pod(env)
    removed = False
    try:
        sock = Path("/run/pykata/sbs/k8s.io") / pod.id / "metrics.sock"
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0
        cid = pod.container("app", SLEEP)
        # An ARP request from the guest through the tap: an address of the test's
        # subnet that nothing has.
        unused = str(net.subnet.network_address + 250)
        pod.sh(cid, f"ping -c 1 -W 1 {unused}")

        status, ctype, text = asyncio.run(get(sock, "/metrics"))
        assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
        found = samples(text)
        info = [s for s in found if s.name == "pykata_shim_sandbox_info"]
        assert [s.labels for s in info] == [{
            "sandbox_id": pod.id, "namespace": "k8s.io", "pod_name": f"pk-{pod.tag}",
            "pod_namespace": "pykata-test", "pod_uid": pod.tag}]
        assert value(found, "pykata_hypervisor_rss_bytes", process="qemu") > 0
        assert value(found, "pykata_hypervisor_pss_bytes", process="qemu") > 0
        assert value(found, "pykata_hypervisor_threads", process="qemu") > 1
        assert value(found, "pykata_hypervisor_rss_bytes", process="virtiofsd") > 0
        assert value(found, "pykata_shim_fds", process="shim") > 0
        assert value(found, "pykata_hypervisor_cpu_seconds_total", process="qemu",
                     mode="user") > 0
        assert value(found, "pykata_hypervisor_netdev_rx_packets_total",
                     interface="eth0_pk") > 0
        assert value(found, "pykata_hypervisor_netdev_tx_bytes_total",
                     interface="eth0_pk") >= 0
        assert value(found, "pykata_agent_rpc_duration_seconds_count",
                     method="CreateContainer") >= 1
        assert value(found, "pykata_agent_rpc_duration_seconds_bucket",
                     method="CreateSandbox", le="+Inf") == 1
        assert value(found, "pykata_agent_scrape_errors_total") == 0
        assert value(found, "pykata_guest_meminfo", item="MemTotal") > 0
        assert value(found, "pykata_guest_cpu_seconds_total", cpu="total", mode="system") > 0
        assert value(found, "pykata_guest_processes") > 1
        assert value(found, "pykata_guest_netdev_tx_packets_total", interface="eth0") > 0
        assert value(found, "pykata_agent_rss_bytes") > 0
        assert value(found, "pykata_agent_containers") == 2  # the pause container and app

        # The first scrape's GetMetrics is in the second one's timings.
        _, _, text = asyncio.run(get(sock, "/metrics"))
        assert value(samples(text), "pykata_agent_rpc_duration_seconds_count",
                     method="GetMetrics") >= 1
        status, _, _ = asyncio.run(get(sock, "/nothing"))
        assert status == 404

        left = pod.remove()
        removed = True
        assert not left, left
        assert not os.path.lexists(sock)
    finally:
        if not removed:
            pod.remove()
