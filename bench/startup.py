"""Cold start side by side: `ctr run --rm IMAGE id true` with pykata, runc,
crun (through the runc shim) and runsc (ptrace, no network), and a bare QEMU
boot of pykata's kernel + initrd to init (idle memory: density.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
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
    timed,
)

from pykata import config
from pykata.hypervisor.qemu.accel import probe
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF


def bare_boot(cfg: config.Config, runs: int) -> Series:
    """QEMU with the same kernel/initrd and machine options, init = /bin/true:
    the kernel panics as soon as init exits and QEMU quits (-no-reboot)."""
    q = cfg.qemu
    accel = probe(q.path, q.accelerator).accel
    argv = [q.path, "-machine", f"{q.machine_type},{q.machine_options}", "-accel",
            accel + (f",tb-size={q.tb_size}" if accel == "tcg" and q.tb_size else ""),
            "-cpu", "max" if accel == "tcg" else "host", "-m", f"{q.default_memory}M",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(cfg.kernel_path()), "-initrd", str(cfg.initrd_path()),
            "-append", f"console=ttyS0 {config.LEAN_KERNEL_PARAMS} rdinit=/bin/true",
            "-serial", "none"]

    def once() -> bool:
        r = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        return r.returncode == 0

    samples, failures = timed(once, runs)
    return Series("bare QEMU boot to init", "qemu ... rdinit=/bin/true (kernel+initrd)", "s",
                  samples, failures, note=f"accel={accel}")


@contextlib.contextmanager
def crun_hybrid_fix() -> Iterator[str]:
    """crun 1.8 refuses cgroups in hybrid mode while a controller (here hugetlb)
    sits on the v2 hierarchy; mounting hugetlb as a v1 hierarchy moves it there
    (ENVIRONMENT.md). Done only if needed, and undone afterwards."""
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    v1 = Path("/sys/fs/cgroup/hugetlb")
    try:
        on_v2 = "hugetlb" in unified.read_text().split()
    except OSError:
        on_v2 = False
    if not on_v2 or v1.is_mount():
        yield ""
        return
    v1.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(v1)],
                       capture_output=True, check=False, timeout=30)
    try:
        yield "hugetlb mounted as a cgroup v1 hierarchy for crun" if r.returncode == 0 else ""
    finally:
        if r.returncode == 0:
            # Remove the (empty) cgroups containerd made, so that the hierarchy goes away
            # with the mount and hugetlb returns to v2.
            for d in sorted((p for p in v1.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            subprocess.run(["umount", str(v1)], capture_output=True, check=False, timeout=30)
        with contextlib.suppress(OSError):
            v1.rmdir()


def runsc_wrapper() -> Path | None:
    import shutil

    CACHE.mkdir(parents=True, exist_ok=True)
    runsc = shutil.which("runsc")
    if not runsc:
        return None
    w = CACHE / "runsc-ptrace"
    w.write_text(f'#!/bin/sh\nexec {runsc} --platform=ptrace --network=none "$@"\n')
    w.chmod(0o755)
    return w


def ctr_series(ctd: PrivateContainerd, name: str, extra: list[str], runs: int,
               note: str = "") -> Series:
    def once() -> bool:
        cid = f"b{uuid.uuid4().hex[:8]}"
        try:
            r = ctd.ctr("run", "--rm", *extra, BUSYBOX_REF, cid, "true", check=False,
                        timeout=180)
        except BaseException:
            remove_containers(ctd, [cid])
            raise
        if r.returncode != 0:
            log(f"  {name}: {r.stderr.decode(errors='replace').strip()[-200:]}")
            remove_containers(ctd, [cid])
        return r.returncode == 0

    samples, failures = timed(once, runs)
    cmd = "ctr run --rm " + " ".join([*extra, "IMAGE", "id", "true"])
    return Series(name, cmd, "s", samples, failures, note)


def main() -> int:
    args = arg_parser(__doc__).parse_args()
    sigterm_as_interrupt()
    n = runs(args, 10, 3)
    cfg = config.load()
    series: list[Series] = []
    ctd = start_containerd("startup")
    try:
        log(f"startup: bare VM boot x{n}")
        series.append(bare_boot(cfg, n))
        for name, extra in (("pykata", ["--runtime", RUNTIME_TYPE]), ("runc", [])):
            log(f"startup: {name} x{n}")
            series.append(ctr_series(ctd, name, extra, n))
        log(f"startup: pykata from a VM template x{n}")
        try:
            built = build_template()
            series.append(ctr_series(
                ctd, "pykata (VM template)", ["--runtime", RUNTIME_TYPE,
                                              "--runtime-config-path", str(template_config())],
                n, note=f"[factory] enable_template; template built once beforehand in "
                        f"{built:.1f} s (pykata factory init)"))
        finally:
            destroy_template()
        log(f"startup: crun x{n}")
        with crun_hybrid_fix() as note:
            series.append(ctr_series(ctd, "crun (runc shim)", ["--runc-binary", "/usr/bin/crun"],
                                     n, note))
        w = runsc_wrapper()
        if w is not None:
            log(f"startup: runsc x{n}")
            series.append(ctr_series(ctd, "runsc (ptrace)", ["--runc-binary", str(w)], n,
                                     note="gVisor, --network=none"))
        else:
            series.append(Series("runsc (ptrace)", "ctr run --rm ...", "s",
                                 note="runsc not installed"))
    finally:
        ctd.stop()
    save_series("startup", series)
    return 0


if __name__ == "__main__":
    run_section(main)
