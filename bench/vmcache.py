"""The VM cache side by side in one run: `ctr run --rm IMAGE id true` with
pykata booting cold, from a VM template, from the VM cache (cold-booted cached
VMs), from the VM cache of template clones; and the memory an idle cached VM
holds (PSS plus RAM-file pages no process maps), per mode.

Each cache round first waits (untimed, bounded) until the server has a VM
idle, then times one `ctr run --rm`; the server boots the replacement at once
(its default), so that boot competes with the rest of the timed run for the
host's cores, as it would in production. A second cache series delays the
refill (`--refill-delay`) to show the start without that contention.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
    TEMPLATE_DIR,
    Series,
    arg_parser,
    build_template,
    destroy_template,
    log,
    remove_containers,
    run_section,
    runs,
    save_series,
    sigterm_as_interrupt,
    start_containerd,
    template_config,
)

from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF

ENDPOINT_DIR = Path("/run/pykata/bench-vmcache")
IDLE_WAIT = 120.0  # seconds a round waits for the cache to have a VM


def cache_config(template: bool) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"vmcache{'-template' if template else ''}.toml"
    text = (f'[factory]\nvm_cache_number = 1\n'
            f'vm_cache_endpoint = "{ENDPOINT_DIR}/vmcache.sock"\n')
    if template:
        text += f'enable_template = true\ntemplate_path = "{TEMPLATE_DIR}/template"\n'
    p.write_text(text)
    return p


def status(cfg: Path) -> dict[str, Any]:
    r = subprocess.run(["pykata", "--config", str(cfg), "factory", "status", "--json"],
                       capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        return {}
    server: dict[str, Any] = json.loads(r.stdout)["vm_cache"]["server"] or {}
    return server


def wait_idle(cfg: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + IDLE_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the VM cache server exited")
        st = status(cfg)
        if st.get("vms"):
            return st
        time.sleep(0.3)
    raise RuntimeError(f"no idle cached VM within {IDLE_WAIT:g}s")


@contextlib.contextmanager
def cache_server(cfg: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    ENDPOINT_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = subprocess.Popen(["pykata", "--config", str(cfg), "factory", "serve", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            ENDPOINT_DIR.rmdir()


def ctr_once(ctd: PrivateContainerd, extra: list[str]) -> bool:
    cid = f"b{uuid.uuid4().hex[:8]}"
    try:
        r = ctd.ctr("run", "--rm", *extra, BUSYBOX_REF, cid, "true", check=False, timeout=180)
    except BaseException:
        remove_containers(ctd, [cid])
        raise
    if r.returncode != 0:
        log(f"  {r.stderr.decode(errors='replace').strip()[-200:]}")
        remove_containers(ctd, [cid])
    return r.returncode == 0


def series(ctd: PrivateContainerd, name: str, extra: list[str], n: int, note: str = "",
           before: Any = None) -> Series:
    """One warm-up, then ``n`` timed runs; ``before`` (untimed) ahead of each."""
    samples: list[float] = []
    failures = 0
    for i in range(n + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        ok = ctr_once(ctd, extra)
        dt = time.perf_counter() - t0
        if i == 0:
            continue
        if ok:
            samples.append(dt)
        else:
            failures += 1
    cmd = "ctr run --rm " + " ".join([*extra, "IMAGE", "id", "true"])
    return Series(name, cmd, "s", samples, failures, note)


def cache_series(ctd: PrivateContainerd, name: str, template: bool, n: int,
                 memory: dict[str, Any], *serve: str) -> Series:
    cfg = cache_config(template)
    extra = ["--runtime", RUNTIME_TYPE, "--runtime-config-path", str(cfg)]
    with cache_server(cfg, *serve) as proc:
        st = wait_idle(cfg, proc)
        vm = st["vms"][0]
        memory[name] = {"boot_seconds": vm["boot_seconds"], **vm["memory"],
                        "server_pss_bytes": st["server_memory"]["pss_bytes"]}
        s = series(ctd, name, extra, n, before=lambda: wait_idle(cfg, proc))
        handed = status(cfg).get("handed", 0)
    s.note = (f"[factory] vm_cache_number = 1{', enable_template' if template else ''}"
              f"{' ' + ' '.join(serve) if serve else ''}; {handed} VMs handed out,"
              f" each round waits (untimed) for an idle VM")
    if handed < len(s.samples):
        s.note += f"; only {handed} handed: some rounds booted cold"
    return s


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    sigterm_as_interrupt()
    n = runs(args, 6, 3)
    out: list[Series] = []
    memory: dict[str, Any] = {}
    ctd = start_containerd("vmcache")
    try:
        log(f"vmcache: pykata cold x{n}")
        out.append(series(ctd, "pykata cold", ["--runtime", RUNTIME_TYPE], n))
        log(f"vmcache: pykata from the VM cache x{n}")
        out.append(cache_series(ctd, "pykata VM cache", False, n, memory))
        log(f"vmcache: pykata from the VM cache, refill delayed x{n}")
        out.append(cache_series(ctd, "pykata VM cache (refill after 8 s)", False, n, memory,
                                "--refill-delay", "8"))
        try:
            built = build_template()
            log(f"vmcache: pykata from a VM template x{n}")
            out.append(series(ctd, "pykata VM template",
                              ["--runtime", RUNTIME_TYPE, "--runtime-config-path",
                               str(template_config())], n,
                              note=f"template built beforehand in {built:.1f} s"))
            log(f"vmcache: pykata from the VM cache of template clones x{n}")
            out.append(cache_series(ctd, "pykata VM cache of template clones", True, n, memory))
        finally:
            destroy_template()
    finally:
        ctd.stop()
    save_series("vmcache", out, idle_cached_vm_memory=memory)
    for name, m in memory.items():
        print(f"{name}: idle cached VM PSS {m['pss_bytes'] / 2**20:.0f} MiB + unmapped RAM file"
              f" {m['ram_file_unmapped_bytes'] / 2**20:.0f} MiB = {m['total_bytes'] / 2**20:.0f}"
              f" MiB; booted in {m['boot_seconds']:.2f} s; server PSS"
              f" {m['server_pss_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    run_section(main)
