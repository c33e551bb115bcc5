"""The metrics of one sandbox, as a prometheus_client collector.

``gather()`` (async, on the shim's loop) takes one look: the host processes
(QEMU, virtiofsd, the shim) and the pod's taps from /proc in a worker thread,
the agent's own figures over its connection with a short deadline, the agent
call timings and the start-up phases; ``collect()`` then yields them as metric
families. Nothing the guest sends is written out as it came: its text is
parsed by ``guesttext`` and its values put into families made here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from pykata.agent import rpcstats
from pykata.metrics import guesttext, procstat
from pykata.resources import network
from pykata.runtime.types import NetStats
from pykata.utils.process import ProcRef

log = logging.getLogger(__name__)

GUEST_TIMEOUT = 2.0  # seconds the agent has to answer GetMetrics on a scrape
MAX_LABEL = 253  # an identity label's characters (a Kubernetes name's limit)
MAX_PHASES = 64

# The spec annotations of a CRI pod (containerd's CRI plugin sets them).
POD_NAME = "io.kubernetes.cri.sandbox-name"
POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
POD_UID = "io.kubernetes.cri.sandbox-uid"


@dataclass
class Figures:
    """One look at a sandbox."""

    processes: dict[str, procstat.ProcStat] = field(default_factory=dict)
    netdev: dict[str, NetStats] = field(default_factory=dict)
    phases: list[tuple[str, float]] = field(default_factory=list)
    rpc: dict[str, rpcstats.MethodStats] = field(default_factory=dict)
    guest: guesttext.Parsed | None = None


def _label(value: Any) -> str:
    s = value if isinstance(value, str) else ""
    return "".join(c for c in s if c.isprintable())[:MAX_LABEL]


class SandboxCollector(Collector):
    """One sandbox's metrics. ``sandbox`` is the shim's runtime sandbox
    (pykata.runtime.sandbox.Sandbox); ``spec`` the OCI spec of its first
    container, for the pod's identity."""

    def __init__(self, sandbox: Any, spec: dict[str, Any], *,
                 rpc: rpcstats.RpcStats | None = None,
                 guest_timeout: float = GUEST_TIMEOUT) -> None:
        self.sandbox = sandbox
        ann = spec.get("annotations") if isinstance(spec.get("annotations"), dict) else {}
        assert isinstance(ann, dict)
        self.identity = {
            "sandbox_id": _label(getattr(sandbox, "id", "")),
            "namespace": _label(getattr(sandbox, "namespace", "")),
            "pod_name": _label(ann.get(POD_NAME)),
            "pod_namespace": _label(ann.get(POD_NAMESPACE)),
            "pod_uid": _label(ann.get(POD_UID)),
        }
        self.rpc = rpc or rpcstats.STATS
        self.guest_timeout = guest_timeout
        vm = getattr(sandbox, "vm", None)
        pid = getattr(vm, "pid", None) if vm is not None else None
        # QEMU by pid and start time: a pid reused after it ended is not QEMU.
        self.qemu = ProcRef.of(pid) if isinstance(pid, int) and pid > 0 else None
        self.scrape_errors = 0
        self.dropped_lines = 0
        self.scrape_seconds = 0.0
        self.figures = Figures()

    # -- gathering -------------------------------------------------------------------
    async def gather(self) -> None:
        """Take one look (never raises for a part that cannot be read: it is left out)."""
        taps: list[str] = []
        netns = ""
        net = getattr(self.sandbox, "network", None)
        if net is not None:
            netns = str(getattr(net, "netns", "") or "")
            taps = [ep.tap for ep in getattr(net, "endpoints", []) if getattr(ep, "tap", "")]
        vfs = getattr(self.sandbox, "virtiofsd", None)
        vfs_ref = vfs.ref if vfs is not None else None
        host = asyncio.to_thread(self._host, self.qemu, vfs_ref, netns, taps)
        guest = self._guest()
        (processes, netdev), parsed = await asyncio.gather(host, guest)
        phases = getattr(self.sandbox, "phases", None)
        items = phases.items() if phases is not None and hasattr(phases, "items") else []
        self.figures = Figures(processes=processes, netdev=netdev,
                               phases=list(items)[:MAX_PHASES], rpc=self.rpc.snapshot(),
                               guest=parsed)

    @staticmethod
    def _host(qemu: ProcRef | None, vfs: ProcRef | None, netns: str, taps: list[str]
              ) -> tuple[dict[str, procstat.ProcStat], dict[str, NetStats]]:
        """In a worker thread: /proc of the processes, the taps' counters."""
        procs: dict[str, procstat.ProcStat] = {}
        if qemu is not None:
            st = procstat.read(qemu.pid, qemu.start_time)
            if st is not None:
                procs["qemu"] = st
        if vfs is not None:
            st = procstat.read_tree(vfs.pid, vfs.start_time)
            if st is not None:
                procs["virtiofsd"] = st
        me = procstat.read(os.getpid())
        if me is not None:
            procs["shim"] = me
        netdev: dict[str, NetStats] = {}
        if netns and taps:
            # QEMU runs in the shim's namespace and holds the taps by fd: their
            # counters are in the pod's namespace, read by a thread that entered it.
            try:
                every = network.in_netns(netns, procstat.thread_net_dev)
            except Exception as exc:  # the namespace went with the pod
                log.debug("tap counters of %s: %s", netns, exc)
            else:
                netdev = {t: every[t] for t in taps if t in every}
        return procs, netdev

    async def _guest(self) -> guesttext.Parsed | None:
        started = time.monotonic()
        try:
            agent = self.sandbox.agent
            text = await asyncio.wait_for(agent.metrics(), self.guest_timeout)
            if not isinstance(text, str):
                raise guesttext.GuestTextError("not text")
            parsed = guesttext.parse(text)
        except Exception as exc:
            self.scrape_errors += 1
            log.debug("sandbox %s: guest metrics: %s", self.identity["sandbox_id"],
                      exc or type(exc).__name__)
            return None
        finally:
            self.scrape_seconds = time.monotonic() - started
        self.dropped_lines += parsed.dropped
        return parsed

    # -- families --------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        f = self.figures
        info = GaugeMetricFamily(
            "pykata_shim_sandbox_info",
            "The sandbox this shim runs, and its pod's identity (value 1).",
            labels=list(self.identity))
        info.add_metric(list(self.identity.values()), 1)
        yield info
        yield from self._process_families(f.processes)
        yield from self._netdev_families(f.netdev)
        phase = GaugeMetricFamily(
            "pykata_shim_startup_phase_seconds",
            "Duration of each phase of this sandbox's start-up, in seconds.", labels=["phase"])
        for name, seconds in f.phases:
            phase.add_metric([_label(name)], float(seconds))
        yield phase
        yield from self._rpc_families(f.rpc)
        yield CounterMetricFamily(
            "pykata_agent_scrape_errors",
            "Scrapes that got no figures from the guest agent (timeout, error, refused text).",
            value=self.scrape_errors)
        yield CounterMetricFamily(
            "pykata_agent_scrape_dropped_lines",
            "Lines of the guest agent's metrics text refused as malformed or not allowed.",
            value=self.dropped_lines)
        yield GaugeMetricFamily(
            "pykata_agent_scrape_duration_seconds",
            "How long the last fetch of the guest agent's metrics took, in seconds.",
            value=self.scrape_seconds)
        if f.guest is not None:
            yield from self._guest_families(f.guest)

    def _process_families(self, procs: dict[str, procstat.ProcStat]) -> Iterator[Metric]:
        for prefix, names in (("pykata_hypervisor", ("qemu", "virtiofsd")),
                              ("pykata_shim", ("shim",))):
            mine = [(n, procs[n]) for n in names if n in procs]
            what = "the hypervisor's processes (QEMU; virtiofsd with its child)" \
                if prefix == "pykata_hypervisor" else "the shim"
            cpu = CounterMetricFamily(f"{prefix}_cpu_seconds",
                                      f"CPU time of {what}, in seconds, by mode.",
                                      labels=["process", "mode"])
            gauges = {
                "rss_bytes": GaugeMetricFamily(f"{prefix}_rss_bytes",
                                               f"Resident memory of {what}, in bytes.",
                                               labels=["process"]),
                "pss_bytes": GaugeMetricFamily(
                    f"{prefix}_pss_bytes",
                    f"Proportional set size of {what} (shared pages divided among"
                    " their users), in bytes.", labels=["process"]),
                "threads": GaugeMetricFamily(f"{prefix}_threads", f"Threads of {what}.",
                                             labels=["process"]),
                "fds": GaugeMetricFamily(f"{prefix}_fds", f"Open file descriptors of {what}.",
                                         labels=["process"]),
            }
            counters = {
                "read_bytes": CounterMetricFamily(
                    f"{prefix}_io_read_bytes", f"Bytes {what} caused to be read from"
                    " storage.", labels=["process"]),
                "write_bytes": CounterMetricFamily(
                    f"{prefix}_io_write_bytes", f"Bytes {what} caused to be written to"
                    " storage.", labels=["process"]),
                "rchar": CounterMetricFamily(
                    f"{prefix}_io_syscall_read_bytes", f"Bytes {what} read through read"
                    " system calls (any file, pipe or socket).", labels=["process"]),
                "wchar": CounterMetricFamily(
                    f"{prefix}_io_syscall_write_bytes", f"Bytes {what} wrote through write"
                    " system calls (any file, pipe or socket).", labels=["process"]),
            }
            for name, st in mine:
                cpu.add_metric([name, "user"], st.user_seconds)
                cpu.add_metric([name, "system"], st.system_seconds)
                for key, fam in gauges.items():
                    fam.add_metric([name], float(getattr(st, key)))
                for key, cfam in counters.items():
                    cfam.add_metric([name], float(getattr(st, key)))
            yield cpu
            yield from gauges.values()
            yield from counters.values()

    @staticmethod
    def _netdev_families(netdev: dict[str, NetStats]) -> Iterator[Metric]:
        for field_name, what in (("rx_bytes", "Bytes received on"),
                                 ("rx_packets", "Packets received on"),
                                 ("rx_errors", "Receive errors on"),
                                 ("rx_dropped", "Received packets dropped on"),
                                 ("tx_bytes", "Bytes sent on"),
                                 ("tx_packets", "Packets sent on"),
                                 ("tx_errors", "Send errors on"),
                                 ("tx_dropped", "Packets to send dropped on")):
            fam = CounterMetricFamily(
                f"pykata_hypervisor_netdev_{field_name}",
                f"{what} the pod NIC's tap or macvtap (host side: received is from the guest).",
                labels=["interface"])
            for iface, dev in sorted(netdev.items()):
                fam.add_metric([iface], float(getattr(dev, field_name)))
            yield fam

    @staticmethod
    def _rpc_families(rpc: dict[str, rpcstats.MethodStats]) -> Iterator[Metric]:
        hist = HistogramMetricFamily(
            "pykata_agent_rpc_duration_seconds",
            "Duration of the shim's calls to the guest agent that have a deadline, in"
            " seconds, by method.", labels=["method"])
        errs = CounterMetricFamily("pykata_agent_rpc_errors",
                                   "Calls to the guest agent that failed, by method.",
                                   labels=["method"])
        for method, m in sorted(rpc.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip([*rpcstats.BUCKETS, float("inf")], m.buckets, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                float(cumulative)))
            hist.add_metric([_label(method)], buckets, m.total_seconds)
            errs.add_metric([_label(method)], float(m.errors))
        yield hist
        yield errs

    @staticmethod
    def _guest_families(parsed: guesttext.Parsed) -> Iterator[Metric]:
        for fam in parsed.families.values():
            help_ = fam.help or "Reported by the guest agent."
            # Metric itself, not the *MetricFamily helpers: those rename.
            out = Metric(fam.name, help_, "unknown" if fam.kind == "untyped" else fam.kind)
            sample = fam.name + "_total" if fam.kind == "counter" else fam.name
            for labels, value in fam.samples:
                out.add_sample(sample, labels, value)
            yield out

    def exposition(self) -> bytes:
        """The text of the last ``gather``."""
        return generate_latest(self)


async def scrape(collector: SandboxCollector) -> bytes:
    await collector.gather()
    return await asyncio.to_thread(collector.exposition)
