"""Shared helpers for benchmarks: timing, statistics, PSS, result files."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Series:
    name: str
    command: str
    unit: str
    samples: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def row(self) -> str:
        if not self.samples:
            return f"| {self.name} | `{self.command}` | 0 | n/a | n/a | {self.note or 'failed'} |"
        return (f"| {self.name} | `{self.command}` | {len(self.samples)} | "
                f"{self.median:.3g} {self.unit} | {self.lo:.3g}-{self.hi:.3g} | {self.note} |")

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.update(median=self.median, min=self.lo, max=self.hi)
        return d


def timed(fn: Callable[[], bool], runs: int, warmup: int = 1) -> tuple[list[float], int]:
    """Run ``fn`` warmup+runs times; wall seconds of the successful timed runs."""
    samples: list[float] = []
    failures = 0
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        ok = fn()
        dt = time.perf_counter() - t0
        if i < warmup:
            continue
        if ok:
            samples.append(dt)
        else:
            failures += 1
    return samples, failures


def pss_kib(pid: int) -> int:
    """Proportional set size of one process, KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pids_matching(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                         check=False).stdout.split()
    return [int(p) for p in out]


def save(name: str, data: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(data, indent=1, default=str))
    return p
