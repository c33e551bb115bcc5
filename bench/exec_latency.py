"""Exec latency: `ctr task exec --exec-id X CID true` on a running container
(`sleep` started with `ctr run -d`), pykata vs runc."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    Series,
    arg_parser,
    log,
    new_id,
    remove_containers,
    run_section,
    runs,
    save_series,
    sigterm_as_interrupt,
    start_containerd,
    timed,
)

from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF


def exec_series(ctd: PrivateContainerd, name: str, extra: list[str], n: int,
                ids: list[str]) -> Series:
    cid = new_id("x")
    ids.append(cid)
    cmd = "ctr task exec --exec-id X CID true"
    r = ctd.ctr("run", "-d", *extra, BUSYBOX_REF, cid, "sleep", "3600", check=False,
                timeout=180)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()[-200:]
        return Series(name, cmd, "s", failures=1, note=f"container did not start: {err}")
    count = 0

    def once() -> bool:
        nonlocal count
        count += 1
        r = ctd.ctr("task", "exec", "--exec-id", f"e{count}", cid, "true", check=False,
                    timeout=60)
        if r.returncode != 0:
            log(f"  {name}: {r.stderr.decode(errors='replace').strip()[-200:]}")
        return r.returncode == 0

    samples, failures = timed(once, n, warmup=2, budget=120)
    remove_containers(ctd, [cid])
    ids.remove(cid)
    return Series(name, cmd, "s", samples, failures,
                  note=f"container started with ctr run -d {' '.join(extra)}".rstrip())


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    sigterm_as_interrupt()
    n = runs(args, 20, 5)
    ids: list[str] = []
    series: list[Series] = []
    ctd = start_containerd("exec")
    try:
        for name, extra in (("pykata", ["--runtime", RUNTIME_TYPE]), ("runc", [])):
            log(f"exec: {name} x{n}")
            series.append(exec_series(ctd, name, extra, n, ids))
    finally:
        remove_containers(ctd, ids)
        ctd.stop()
    save_series("exec", series)
    return 0


if __name__ == "__main__":
    run_section(main)
