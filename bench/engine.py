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
from pathlib import Path

from common import CACHE, Series, arg_parser, atimed, log, run_section, save_series

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


async def one_engine(engine: str, runs: int, work: Path) -> list[Series]:
    from pykata.runtime.cleanup import cleanup
    from pykata.runtime.sandbox import Sandbox
    from pykata.testing import busybox_rootfs, default_spec, make_bundle

    cfg = copy.deepcopy(config.load())
    tag = uuid.uuid4().hex[:6]
    state = Path(f"/run/pykata/bench-engine-{tag}")
    cfg.runtime.state_dir = str(state)
    cfg.qemu.kernel_params = (f"{cfg.qemu.kernel_params} {wire.AGENT_ENGINE_PARAM}={engine}"
                              f" {wire.AGENT_LOG_PARAM}=debug")
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

        host = await atimed(create_start, runs, warmup=2, budget=120)
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
                          "s", await atimed(exec_true, runs, warmup=2, budget=120)))
        await c.kill(15)
        await asyncio.wait_for(c.wait(), 60)
        await c.delete()
    finally:
        if sb is not None:
            await sb.stop()
        with contextlib.suppress(Exception):
            await cleanup(state, sid)
        shutil.rmtree(state, ignore_errors=True)
    return out


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    runs = args.runs or (5 if args.quick else 20)
    work = Path(tempfile.mkdtemp(prefix="pykata-bench-engine-"))
    series: list[Series] = []
    try:
        for engine in ("native", "crun"):
            log(f"engine: {engine}")
            t0 = time.monotonic()
            series += asyncio.run(one_engine(engine, runs, work))
            log(f"engine: {engine} done in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_series("engine", series)
    return 0


if __name__ == "__main__":
    run_section(main)
