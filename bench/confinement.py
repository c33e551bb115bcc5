"""What the VMM's confinement costs (issue 12): QEMU under its seccomp filter
(`-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`)
as the unprivileged `pykata-qemu` user, every resource passed as an fd, the
console and QEMU's output drained into capped logs, virtiofsd in its own
namespaces -- against the same sandbox with all of that off (no filter, QEMU
as root). Runs alternate between the two so that drift hits both alike.

Per sandbox: `Sandbox.create` to a running agent, then `Sandbox.stop`; the
QEMU process's PSS once the agent is up; the round trip of 50 agent
`Health/Check` calls.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    Series,
    arg_parser,
    log,
    pss_kib,
    run_section,
    runs,
    save_series,
    sigterm_as_interrupt,
)

from pykata import config
from pykata.runtime.cleanup import cleanup
from pykata.runtime.sandbox import Sandbox

CHECKS = 50


# key -> (label, [hypervisor.qemu] overrides)
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "confined": ("confined (default)", {}),
    "chroot": ("confined, virtiofsd chroot", {"virtio_fs_sandbox": "chroot"}),
    "root": ("seccomp on, QEMU as root", {"run_as_user": ""}),
    "open": ("no seccomp, QEMU as root, virtiofsd chroot",
             {"seccomp_sandbox": "", "run_as_user": "", "virtio_fs_sandbox": "chroot"}),
}


async def one(key: str, out: dict[str, Series]) -> None:
    cfg = config.load()
    for k, v in VARIANTS[key][1].items():
        setattr(cfg.qemu, k, v)
    tag = uuid.uuid4().hex[:6]
    state = Path(f"/run/pykata/bench-conf-{tag}")
    cfg.runtime.state_dir = str(state)
    sb: Sandbox | None = None
    try:
        t0 = time.perf_counter()
        sb = await Sandbox.create(f"conf-{tag}", cfg)
        out[f"{key}-start"].samples.append(time.perf_counter() - t0)
        if sb.vm is not None and sb.vm.pid:
            out[f"{key}-pss"].samples.append(pss_kib(sb.vm.pid) / 1024)
        t0 = time.perf_counter()
        for _ in range(CHECKS):
            await sb.agent.check(timeout=10.0)
        out[f"{key}-rtt"].samples.append((time.perf_counter() - t0) / CHECKS * 1e6)
        t0 = time.perf_counter()
        await sb.stop()
        out[f"{key}-stop"].samples.append(time.perf_counter() - t0)
        sb = None
    except Exception as exc:  # counted; the section goes on
        log(f"{key} run failed: {exc}")
        out[f"{key}-start"].failures += 1
    finally:
        if sb is not None:
            await sb.stop()
        await cleanup(state, f"conf-{tag}", force=True)
        shutil.rmtree(state, ignore_errors=True)


async def measure(n: int) -> list[Series]:
    out: dict[str, Series] = {}
    for key, (what, _) in VARIANTS.items():
        out[f"{key}-start"] = Series(f"sandbox start, {what}", "Sandbox.create", "s")
        out[f"{key}-stop"] = Series(f"sandbox stop, {what}", "Sandbox.stop", "s")
        out[f"{key}-pss"] = Series(f"QEMU PSS, {what}", "/proc/PID/smaps_rollup", "MiB")
        out[f"{key}-rtt"] = Series(f"agent Check round trip, {what}", "Health/Check", "us")
    await one("confined", out)  # warm-up (page cache, accel probe): not kept
    for s in out.values():
        s.samples.clear()
        s.failures = 0
    for i in range(n):
        log(f"run {i + 1}/{n}")
        keys = list(VARIANTS)
        for key in keys if i % 2 == 0 else reversed(keys):
            await one(key, out)
    return list(out.values())


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    sigterm_as_interrupt()
    n = runs(args, 10, 3)
    series = asyncio.run(measure(n))
    save_series("confinement", series, runs=n)
    return 0 if all(s.samples for s in series) else 1


if __name__ == "__main__":
    run_section(main)
