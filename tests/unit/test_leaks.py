"""pykata.testing.leaks: a leak check scoped to one containerd does not count
another containerd's healthy pods, and still counts an orphaned VMM."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.testing.leaks import host_leftovers

# A stand-in "shim" (its argv carries the marks a real one has) with a child
# whose argv looks like QEMU's; and an orphan-looking "virtiofsd".
SHIM = ("import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)',"
        " 'qemu-system-x86_64', '-name', 'pykata-leaktest'])\n"
        "time.sleep(60)\n")


@pytest.fixture
def fake_pod(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    other = str(tmp_path / "other.sock")
    shim = subprocess.Popen([sys.executable, "-c", SHIM, "pykata.shim", "-namespace", "x",
                             "-address", other, "-id", "leaktest"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _mine(host_leftovers(tmp_path), "qemu"):
            time.sleep(0.05)
        yield other, shim
    finally:
        subprocess.run(["pkill", "-f", "pykata-leaktest"], check=False)
        shim.kill()
        shim.wait()


def _mine(left: list[str], what: str, shim_pid: int = 0) -> list[str]:
    """The fake pod's entries: its VMM by name, its shim by pid (a listed command
    line is cut short)."""
    if what == "shim":
        return [x for x in left if x.startswith(f"process {shim_pid}:")]
    return [x for x in left if "leaktest" in x and what in x]


def test_another_containerds_pod_is_not_ours(
        tmp_path: Path, fake_pod: tuple[str, subprocess.Popen[bytes]]) -> None:
    other, shim = fake_pod
    # Unscoped: the whole host counts, the shim and its VMM included.
    everything = host_leftovers(tmp_path)
    assert _mine(everything, "shim", shim.pid) and _mine(everything, "qemu"), everything
    # Scoped to another containerd: neither counts.
    mine = host_leftovers(tmp_path, address=str(tmp_path / "mine.sock"))
    assert not _mine(mine, "shim", shim.pid) and not _mine(mine, "qemu"), mine
    # Scoped to the fake pod's own containerd: both count.
    theirs = host_leftovers(tmp_path, address=other)
    assert _mine(theirs, "shim", shim.pid) and _mine(theirs, "qemu"), theirs


def test_an_orphaned_vmm_counts_whoever_asks(
        tmp_path: Path, fake_pod: tuple[str, subprocess.Popen[bytes]]) -> None:
    _, shim = fake_pod
    shim.kill()  # the "QEMU" child is orphaned: no shim owns it any more
    shim.wait()
    left = host_leftovers(tmp_path, address=str(tmp_path / "mine.sock"))
    assert _mine(left, "qemu") and not _mine(left, "shim", shim.pid), left
