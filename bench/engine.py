"""The guest container engines side by side: the agent's own (native) and crun.

For each engine, one VM (the engine chosen with the kernel parameter
``pykata.agent.engine``, debug logging on), then in it:

- create + start inside the guest: from the agent's log (guest uptime stamps on
  the console), ``CreateContainer`` received -> ``container X created``, plus
  ``StartContainer`` received -> ``container X started``; container ``true``;
- the same seen from the host: ``create_container`` + ``start`` wall time;
- exec latency: ``Container.exec`` of ``true`` in a running container until its
  exit status is known, host wall time (the runtime API; ``ctr task exec``
  adds the shim and containerd on top, see exec_latency.py).

Run as root: ``.venv/bin/python bench/engine.py [--quick] [--runs N]``; results in
``bench/results/engine.json``. PYKATA_CONFIG chooses the image as for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import (
    CACHE,
    Series,
    arg_parser,
    atimed,
    log,
    remove_containers,
    run_section,
    save_series,
)

from pykata import config, wire

_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\]\s+pykata-agent\s+\w+\s+(.*)$")


def guest_events(console: str) -> list[tuple[float, str]]:
    out = []
    for line in console.splitlines():
        m = _STAMP.match(line.strip())
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def in_guest_ms(events: list[tuple[float, str]], cid: str) -> float | None:
    """(CreateContainer -> created) + (StartContainer -> started) for ``cid``, in ms."""
    marks: dict[str, float] = {}
    for t, text in events:
        if f"container={cid} " not in text and not text.endswith(f"container={cid}"):
            continue
        if f"CreateContainer {cid}" in text:
            marks["create"] = t
        elif f"container {cid} created" in text:
            marks["created"] = t
        elif f"StartContainer {cid}" in text:
            marks["start"] = t
        elif f"container {cid} started" in text:
            marks["started"] = t
    if len(marks) < 4:
        return None
    return ((marks["created"] - marks["create"]) + (marks["started"] - marks["start"])) * 1000


_STEPS = re.compile(r"container \S+ (create|start|exec \S+) steps \(ms\): (.*)$")


def step_medians(events: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """Debug stamps of the native engine's child (``... steps (ms): a 1.0, b 2.0``):
    median per step, for create, start and exec."""
    import statistics

    found: dict[str, dict[str, list[float]]] = {}
    for _, text in events:
        m = _STEPS.search(text.split(" [", 1)[0] if " [" in text else text)
        if not m:
            continue
        kind = m.group(1).split()[0]
        for part in m.group(2).split(", "):
            label, _, value = part.rpartition(" ")
            with contextlib.suppress(ValueError):
                found.setdefault(kind, {}).setdefault(label, []).append(float(value))
    return {k: {label: round(statistics.median(v), 1) for label, v in d.items()}
            for k, d in found.items()}


async def timed_gap(fn: Callable[[], Awaitable[object]], runs: int, warmup: int,
                    gap: float) -> list[float]:
    """atimed with an idle ``gap`` (not timed) before each call: creates and execs
    spaced as a real pod's are, so the fork server's background work (a spare
    process, a prefaulted worker) is ready. gap 0: back to back."""
    if not gap:
        return await atimed(fn, runs, warmup=warmup, budget=120)
    samples = []
    for i in range(warmup + runs):
        await asyncio.sleep(gap)
        t0 = time.perf_counter()
        await fn()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return samples


async def one_engine(engine: str, runs: int, work: Path, gap: float = 0.0) -> list[Series]:
    from pykata.runtime.cleanup import cleanup
    from pykata.runtime.sandbox import Sandbox
    from pykata.testing import busybox_rootfs, default_spec, make_bundle

    cfg = copy.deepcopy(config.load())
    tag = uuid.uuid4().hex[:6]
    state = Path(cfg.runtime.state_dir) / f"bench-engine-{tag}"
    cfg.runtime.state_dir = str(state)
    name, extra = VARIANTS[engine]
    cfg.qemu.kernel_params = (f"{cfg.qemu.kernel_params} {wire.AGENT_ENGINE_PARAM}={name}"
                              f" {wire.AGENT_LOG_PARAM}=debug {extra}").strip()
    sid = f"engine-{engine}-{tag}"
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    sb: Sandbox | None = None
    out: list[Series] = []
    try:
        sb = await Sandbox.create(sid, cfg)
        ids: list[str] = []

        async def create_start() -> None:
            cid = f"cs-{uuid.uuid4().hex[:8]}"
            ids.append(cid)
            c = await sb.create_container(cid, make_bundle(work / cid, rootfs,
                                                           default_spec(["true"])))
            await c.start()
            await asyncio.wait_for(c.wait(), 60)
            await c.delete()

        host = await timed_gap(create_start, runs, 2, gap)
        await asyncio.sleep(0.5)
        events = guest_events((sb.dir / "console.log").read_text(errors="replace"))
        guest = [v / 1000 for v in (in_guest_ms(events, cid) for cid in ids[2:])
                 if v is not None]
        out.append(Series(f"{engine}: create+start in the guest",
                          "agent log: CreateContainer->created + StartContainer->started",
                          "s", guest))
        out.append(Series(f"{engine}: create+start+wait+delete from the host",
                          "Sandbox.create_container + start + wait + delete of `true`", "s",
                          host))
        c = await sb.create_container("long", make_bundle(
            work / "long", rootfs, default_spec(["sh", "-c", "trap 'exit 0' TERM; sleep 600 &"
                                                             " wait"])))
        await c.start()
        seq = iter(range(10**6))

        async def exec_true() -> None:
            p = await c.exec(f"e{next(seq)}", {"args": ["true"], "cwd": "/"})
            await asyncio.wait_for(p.wait(), 60)
            await c.remove_exec(p.exec_id)

        out.append(Series(f"{engine}: exec of `true` until its exit", "Container.exec + wait",
                          "s", await timed_gap(exec_true, runs, 2, gap)))
        await c.kill(15)
        await asyncio.wait_for(c.wait(), 60)
        await c.delete()
        await asyncio.sleep(0.5)
        console = (sb.dir / "console.log").read_text(errors="replace")
        kept = Path(tempfile.gettempdir()) / f"pykata-bench-engine-{engine}-console.log"
        kept.write_text(console)
        events = guest_events(console)
        steps = step_medians(events)
        log(f"{engine}: guest console kept in {kept}")
        for kind, d in steps.items():
            log(f"{engine}: {kind} steps, median ms: "
                + ", ".join(f"{k} {v}" for k, v in d.items()))
    finally:
        if sb is not None:
            await sb.stop()
        with contextlib.suppress(Exception):
            await cleanup(state, sid)
        shutil.rmtree(state, ignore_errors=True)
    return out


# variant -> (engine, extra kernel parameters)
VARIANTS = {"native": ("native", ""),
            "native-nospare": ("native", "pykata.agent.forkserver=nospare"),
            "native-nofs": ("native", "pykata.agent.forkserver=0"),  # the agent forks itself
            "crun": ("crun", "")}


def ctr_exec(runs: int) -> list[Series]:
    """``ctr task exec`` of ``true`` in a running container: pykata (this
    configuration's engine, fork server on) and runc, same containerd, same run.
    A private containerd of this bench's own (root under the image directory)."""
    from exec_latency import exec_series

    from pykata.testing import busybox_rootfs
    from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
    from pykata.testing.images import oci_archive

    cfg = config.load()
    root = Path(cfg.image.output_dir) / "bench-engine-containerd"
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    archive = oci_archive(rootfs, CACHE / "busybox.oci.tar")
    ctd = PrivateContainerd(base=Path(cfg.runtime.state_dir) / "bench-engine-ctd", root=root,
                            namespace="bench-engine")
    ctd.start()
    ids: list[str] = []
    out: list[Series] = []
    try:
        ctd.import_image(archive)
        for name, extra in (("pykata (native engine)", ["--runtime", RUNTIME_TYPE]),
                            ("runc", [])):
            log(f"ctr task exec: {name} x{runs}")
            out.append(exec_series(ctd, f"ctr task exec of `true`: {name}", extra, runs, ids))
    finally:
        remove_containers(ctd, ids)
        ctd.stop()
    return out


def merge(rounds: list[list[Series]]) -> list[Series]:
    """Series of the same name from several rounds as one (samples joined)."""
    out: dict[str, Series] = {}
    for part in rounds:
        for s in part:
            if s.name in out:
                out[s.name].samples += s.samples
                out[s.name].failures += s.failures
            else:
                out[s.name] = s
    return list(out.values())


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--gap", type=float, default=0.0,
                    help="idle seconds before each timed create/exec (0: back to back)")
    ap.add_argument("--engines", default="native,native-nofs,crun",
                    help="comma-separated: native (fork server + spare), native-nospare,"
                         " native-nofs (the agent forks itself), crun")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engine list this many times, interleaved (noisy hosts)")
    ap.add_argument("--ctr", action="store_true",
                    help="also `ctr task exec` of `true`, pykata vs runc (private containerd)")
    args = ap.parse_args()
    runs = args.runs or (5 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="pykata-bench-engine-"))
    series: list[Series] = []
    try:
        rounds: list[list[Series]] = []
        for engine in [e for _ in range(args.rounds) for e in args.engines.split(",")]:
            log(f"engine: {engine}")
            t0 = time.monotonic()
            part = asyncio.run(one_engine(engine, runs, work, args.gap))
            for s in part:
                s.note = (f"gap {args.gap:g} s" if args.gap else "back to back") + \
                    (f", {args.rounds} interleaved rounds" if args.rounds > 1 else "")
            rounds.append(part)
            log(f"engine: {engine} done in {time.monotonic() - t0:.0f} s")
        series += merge(rounds)
        if args.ctr:
            series += ctr_exec(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_series("engine", series)
    return 0


if __name__ == "__main__":
    run_section(main)
