"""The monitor's HTTP side: ``/metrics`` scrapes every sandbox on demand,
``/sandboxes`` lists them, ``/sandboxes/<id>/logs`` returns one's console log.

A scrape asks all shims at once, at most ``max_parallel`` at a time, each bounded
by ``scrape_timeout`` seconds from when its turn comes, and the whole scrape by
``budget`` seconds (what is still waiting then counts as failed): a sandbox whose
socket refuses, is absent, or never answers costs its own samples, never the
others'. Each scrape also asks CRI (when there is one) for the pods' names,
at the same time as the shims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from pykata.errors import FailedPrecondition, InvalidArgument, NotFound
from pykata.monitor import sandboxes
from pykata.monitor.cri import CRI_NAMESPACE, CriLookup
from pykata.monitor.scrape import (
    SANDBOX_LABELS,
    Merged,
    NoSocket,
    PodLabels,
    ScrapeError,
    fetch,
    parse,
    pod_labels,
    relabel,
    render,
    sandbox_labels,
)

log = logging.getLogger("pykata.monitor")

DEFAULT_SCRAPE_TIMEOUT = 3.0
DEFAULT_MAX_PARALLEL = 8
# The classic text format (what generate_latest writes), which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Outcome:
    """One sandbox's part of a scrape."""

    ref: sandboxes.SandboxRef
    families: list[Metric] = field(default_factory=list)
    pod: PodLabels = field(default_factory=PodLabels)
    error: str = ""
    absent: bool = False  # no metrics socket: down, but not a scrape error

    @property
    def up(self) -> bool:
        return not self.error and not self.absent


class Monitor:
    def __init__(self, state_dir: str | Path, *, cri: CriLookup | None = None,
                 scrape_timeout: float = DEFAULT_SCRAPE_TIMEOUT,
                 max_parallel: int = DEFAULT_MAX_PARALLEL, budget: float | None = None,
                 serve_logs: bool = True) -> None:
        if scrape_timeout <= 0 or max_parallel < 1:
            raise InvalidArgument("scrape timeout must be positive and max parallel >= 1")
        self.state_dir = Path(state_dir)
        self.cri = cri
        self.scrape_timeout = scrape_timeout
        self.max_parallel = max_parallel
        self.budget = budget if budget is not None else 3 * scrape_timeout
        self.serve_logs = serve_logs
        self.pods: dict[tuple[str, str], PodLabels] = {}  # last known, for /sandboxes
        self.registry = CollectorRegistry(auto_describe=True)
        self.m_duration = Histogram(
            "pykata_monitor_scrape_duration_seconds",
            "Time one scrape of every sandbox took (discovery, shims, CRI), seconds",
            buckets=SCRAPE_BUCKETS, registry=self.registry)
        self.m_errors = Counter(
            "pykata_monitor_scrape_errors",
            "Scrapes of a sandbox's shim that failed (refused, timed out, malformed)",
            ["sandbox_id"], registry=self.registry)
        self.m_sandboxes = Gauge(
            "pykata_monitor_sandboxes", "Sandboxes found under the state directory",
            registry=self.registry)
        self.m_up = Gauge("pykata_monitor_up", "1 while the monitor answers",
                          registry=self.registry)
        self.m_up.set(1)
        self._errored: set[str] = set()

    # -- scraping ---------------------------------------------------------------------

    async def _scrape_one(self, ref: sandboxes.SandboxRef, slots: asyncio.Semaphore
                          ) -> Outcome:
        out = Outcome(ref)
        async with slots:
            try:
                async with asyncio.timeout(self.scrape_timeout):
                    text = await fetch(ref.metrics_socket)
                out.families = parse(text)
            except NoSocket:
                out.absent = True
            except ScrapeError as exc:
                out.error = str(exc)
            except TimeoutError:
                out.error = f"no answer in {self.scrape_timeout:g} s"
        out.pod = pod_labels(out.families)
        return out

    async def scrape(self) -> list[Outcome]:
        """Every sandbox's outcome, in discovery order; the monitor's own metrics
        updated."""
        started = time.monotonic()
        refs = await asyncio.to_thread(sandboxes.discover, self.state_dir)
        slots = asyncio.Semaphore(self.max_parallel)
        tasks = [asyncio.ensure_future(self._scrape_one(r, slots)) for r in refs]
        cri_task = asyncio.ensure_future(self.cri.pods()) if self.cri is not None else None
        if tasks:
            await asyncio.wait(tasks, timeout=self.budget)
        outcomes = []
        for ref, task in zip(refs, tasks, strict=True):
            if task.done():
                outcomes.append(task.result())
            else:
                task.cancel()
                outcomes.append(Outcome(ref, error=f"not scraped within {self.budget:g} s"))
        cri_pods = None
        if cri_task is not None:
            cri_pods = await cri_task
        for o in outcomes:
            if cri_pods and o.ref.namespace == CRI_NAMESPACE and o.ref.id in cri_pods:
                o.pod = cri_pods[o.ref.id]
            relabel(o.families, sandbox_labels(o.ref.id, o.ref.namespace, o.pod))
        self._account(outcomes)
        self.m_duration.observe(time.monotonic() - started)
        return outcomes

    def _account(self, outcomes: list[Outcome]) -> None:
        self.m_sandboxes.set(len(outcomes))
        present = {o.ref.id for o in outcomes}
        for o in outcomes:
            if o.error:
                self.m_errors.labels(o.ref.id).inc()
                self._errored.add(o.ref.id)
                log.debug("sandbox %s/%s: %s", o.ref.namespace, o.ref.id, o.error)
        for gone in self._errored - present:  # no series kept for sandboxes long gone
            with contextlib.suppress(KeyError):
                self.m_errors.remove(gone)
        self._errored &= present
        self.pods = {(o.ref.namespace, o.ref.id): o.pod for o in outcomes}

    async def exposition(self) -> bytes:
        """What /metrics serves: every sandbox's samples, labelled, then the
        monitor's own metrics."""
        outcomes = await self.scrape()
        merged = Merged()
        up = GaugeMetricFamily("pykata_monitor_sandbox_up",
                               "1 if the sandbox's shim answered this scrape, else 0",
                               labels=list(SANDBOX_LABELS))
        for o in outcomes:
            merged.add(o.families)
            labels = sandbox_labels(o.ref.id, o.ref.namespace, o.pod)
            up.add_metric([labels[k] for k in SANDBOX_LABELS], 1.0 if o.up else 0.0)
        merged.add([up])
        return render(merged.collect()) + generate_latest(self.registry)

    # -- HTTP -------------------------------------------------------------------------

    async def h_metrics(self, request: web.Request) -> web.Response:
        body = await self.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def h_sandboxes(self, request: web.Request) -> web.Response:
        refs = await asyncio.to_thread(sandboxes.discover, self.state_dir)
        cri_pods = await self.cri.pods() if self.cri is not None else None
        items = []
        for ref in refs:
            pod = self.pods.get((ref.namespace, ref.id), PodLabels())
            if cri_pods and ref.namespace == CRI_NAMESPACE and ref.id in cri_pods:
                pod = cri_pods[ref.id]
            items.append({
                "id": ref.id, "namespace": ref.namespace,
                "state": sandboxes.recorded_state(ref),
                "metrics_socket": ref.metrics_socket.is_socket(),
                "pod_name": pod.name, "pod_namespace": pod.namespace, "pod_uid": pod.uid,
            })
        return web.json_response(items)

    async def h_logs(self, request: web.Request) -> web.Response:
        if not self.serve_logs:
            raise web.HTTPForbidden(text="logs are not served (--no-logs)\n")
        q = request.query
        try:
            lines = int(q.get("lines", "500"))
            max_bytes = int(q.get("bytes", str(256 * 1024)))
            ref = await asyncio.to_thread(sandboxes.find, self.state_dir,
                                          request.match_info["id"], q.get("namespace"))
            text = await asyncio.to_thread(sandboxes.logs, ref, lines, max_bytes)
        except (InvalidArgument, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        except NotFound as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        except FailedPrecondition as exc:
            raise web.HTTPConflict(text=f"{exc}\n") from None
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def h_index(self, request: web.Request) -> web.Response:
        return web.Response(text="pykata-monitor: /metrics /sandboxes /sandboxes/<id>/logs\n",
                            content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.router.add_get("/", self.h_index)
        app.router.add_get("/metrics", self.h_metrics)
        app.router.add_get("/sandboxes", self.h_sandboxes)
        app.router.add_get("/sandboxes/{id}/logs", self.h_logs)
        return app
