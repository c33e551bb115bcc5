"""Run the benchmarks side by side and rewrite docs/benchmarks.md.

    .venv/bin/python bench/run.py            # run everything, then render
    .venv/bin/python bench/run.py --render   # only render from bench/results/*.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "benchmarks.md"
RESULTS = HERE / "results"


def _fmt(x: float, unit: str) -> str:
    return f"{x:.2f} {unit}" if unit == "s" and x >= 1 else (
        f"{x * 1000:.0f} ms" if unit == "s" else f"{x:.3g} {unit}")


def render() -> str:
    out = ["# Benchmarks", "",
           "Measured on the development machine (2 cores, QEMU 7.2 under **TCG**: this",
           "host's KVM is PVM and cannot run a standard guest kernel). Regenerate with",
           "`.venv/bin/python bench/run.py` (`--runs N`); raw data in `bench/results/`.",
           "Every figure is a median over the stated number of runs, with min-max.", ""]
    img = _image()
    if img:
        out += ["## Guest image", "",
                "| item | value |", "|---|---|",
                f"| kernel | Debian `{img['kernel_package']}` ({img['kernel_release']}) |",
                f"| initrd (newc cpio, uncompressed) | {img['initrd_bytes'] / 2**20:.1f} MiB |",
                f"| vmlinuz / vmlinux | {img['vmlinuz_bytes'] / 2**20:.1f} MiB / uncompressed ELF"
                " booted through PVH |",
                "| build time (Debian packages already downloaded) | "
                f"{img.get('build_seconds', '?')} s "
                "(a rebuild with unchanged inputs only hashes them) |",
                f"| packages | {', '.join(sorted(img['packages']))} |", ""]
    start = RESULTS / "startup.json"
    if start.exists():
        data = json.loads(start.read_text())
        out += ["## Cold start, side by side (one run, " + data.get("when", "") + ")", "",
                "| runtime | command | runs | median | min-max | note |",
                "|---|---|---|---|---|---|"]
        for s in data["series"]:
            if not s["samples"]:
                out.append(f"| {s['name']} | `{s['command']}` | 0 | n/a | n/a | {s['note']} |")
                continue
            out.append(f"| {s['name']} | `{s['command']}` | {len(s['samples'])} | "
                       f"{_fmt(s['median'], s['unit'])} | {_fmt(s['min'], s['unit'])}-"
                       f"{_fmt(s['max'], s['unit'])} | {s['note']} |")
        by = {s["name"]: s for s in data["series"] if s["samples"]}
        if "pykata" in by and "bare QEMU boot to init" in by:
            gap = by["pykata"]["median"] - by["bare QEMU boot to init"]["median"]
            out += ["", f"pykata minus the bare VM boot: **{gap:.2f} s** (target of issue 7:"
                    " <= 0.30 s; see the breakdown below)."]
        for m in data.get("memory", []):
            out += ["", f"## Idle host memory per pod ({m['pods']} pod)", "",
                    "| process | PSS |", "|---|---|",
                    f"| qemu-system-x86_64 | {m['qemu'] / 1024:.0f} MiB |",
                    f"| virtiofsd | {m['virtiofsd'] / 1024:.1f} MiB |",
                    f"| containerd-shim-pykata-v2 | {m['shim'] / 1024:.1f} MiB "
                    f"(RSS {m['shim_rss'] / 1024:.1f} MiB) |",
                    f"| **total** | **{m['total'] / 1024:.0f} MiB** |"]
    extra = HERE / "notes.md"
    if extra.exists():
        out += ["", extra.read_text().rstrip()]
    return "\n".join(out) + "\n"


def _image() -> dict[str, object] | None:
    try:
        data: dict[str, object] = json.loads(Path("/var/lib/pykata/manifest.json").read_text())
        return data
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if not args.render:
        rc = subprocess.call([sys.executable, str(HERE / "startup.py"), "--runs",
                              str(args.runs)])
        if rc != 0:
            return rc
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
