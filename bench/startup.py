"""Cold start side by side: `ctr run --rm IMAGE id true` with pykata, runc,
crun (through the runc shim) and runsc (ptrace, no network), and a bare QEMU
boot of pykata's kernel + initrd to init. Then idle per-pod host memory."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Series, pids_matching, pss_kib, rss_kib, save, timed

from pykata import config
from pykata.hypervisor.qemu.accel import probe
from pykata.testing import busybox_rootfs
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF, oci_archive

CACHE = Path("/var/tmp/pykata-bench")


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


def runsc_wrapper() -> Path | None:
    import shutil

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
        r = ctd.ctr("run", "--rm", *extra, BUSYBOX_REF, cid, "true", check=False, timeout=180)
        if r.returncode != 0:
            print(f"  {name}: {r.stderr.decode(errors='replace').strip()[-200:]}",
                  file=sys.stderr)
            ctd.ctr("container", "delete", cid, check=False)
        return r.returncode == 0

    samples, failures = timed(once, runs)
    cmd = "ctr run --rm " + " ".join([*extra, "IMAGE", "id", "true"])
    return Series(name, cmd, "s", samples, failures, note)


def idle_memory(ctd: PrivateContainerd, pods: int) -> dict[str, float]:
    """Average PSS per idle pod (shim + QEMU + virtiofsd), KiB."""
    ids = [f"m{uuid.uuid4().hex[:8]}" for _ in range(pods)]
    try:
        for cid in ids:
            ctd.ctr("run", "-d", "--runtime", RUNTIME_TYPE, BUSYBOX_REF, cid, "sleep", "3600")
        time.sleep(3)
        per = {"qemu": 0, "virtiofsd": 0, "shim": 0}
        for pid in pids_matching("qemu-system-x86_64 -name pykata-m"):
            per["qemu"] += pss_kib(pid)
        for pid in pids_matching("virtiofsd --fd"):
            per["virtiofsd"] += pss_kib(pid)
        shim_rss = []
        for pid in pids_matching("pykata.shim .*-id m"):
            per["shim"] += pss_kib(pid)
            shim_rss.append(rss_kib(pid))
        out = {k: v / pods for k, v in per.items()}
        out["total"] = sum(out.values())
        out["shim_rss"] = max(shim_rss) if shim_rss else 0
        out["pods"] = pods
        return out
    finally:
        for cid in ids:
            ctd.ctr("task", "kill", "-s", "KILL", cid, check=False)
        time.sleep(1)
        for cid in ids:
            ctd.ctr("task", "delete", "-f", cid, check=False)
            ctd.ctr("container", "delete", cid, check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    cfg = config.load()
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    archive = oci_archive(rootfs, CACHE / "busybox.oci.tar")
    ctd = PrivateContainerd(base=Path("/run/pykata-bench"),
                            root=Path("/var/lib/pykata-bench/containerd"), namespace="bench")
    series: list[Series] = []
    ctd.start()
    try:
        ctd.import_image(archive)
        print("bare VM boot ...", file=sys.stderr)
        series.append(bare_boot(cfg, args.runs))
        print("pykata ...", file=sys.stderr)
        series.append(ctr_series(ctd, "pykata", ["--runtime", RUNTIME_TYPE], args.runs))
        print("runc ...", file=sys.stderr)
        series.append(ctr_series(ctd, "runc", [], args.runs))
        print("crun ...", file=sys.stderr)
        series.append(ctr_series(ctd, "crun (runc shim)", ["--runc-binary", "/usr/bin/crun"],
                                 args.runs))
        w = runsc_wrapper()
        if w is not None:
            print("runsc ...", file=sys.stderr)
            series.append(ctr_series(ctd, "runsc (ptrace)", ["--runc-binary", str(w)],
                                     args.runs, note="gVisor, --network=none"))
        else:
            series.append(Series("runsc (ptrace)", "ctr run --rm ...", "s",
                                 note="runsc not installed"))
        print("idle memory ...", file=sys.stderr)
        mem1 = idle_memory(ctd, 1)
    finally:
        ctd.stop()
    save("startup", {"series": [s.to_json() for s in series], "memory": [mem1],
                     "host": os.uname().release, "when": time.strftime("%Y-%m-%d %H:%M")})
    for s in series:
        print(s.row())
    print(mem1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
