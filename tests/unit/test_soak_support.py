"""The soak tests' counters (tests/integration/soak_support.py) over a fake /proc,
/sys and state directories: they count what belongs to one containerd and
nothing else."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pykata.shim.main import socket_path
from tests.integration.soak_support import (
    MEMORY_TOLERANCE_KIB,
    Scope,
    Snapshot,
    baseline_cycle,
    count_changes,
    cycles,
    memory_growth,
    memory_kib,
)

ADDR = "/run/pykata-soak-x/containerd.sock"


def _proc(root: Path, pid: int, ppid: int, argv: list[str], fds: int = 0,
          rss: int = 0, pss: int = 0) -> Path:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "stat").write_text(f"{pid} ({argv[0][:15]} x) S {ppid} 1 1 0 -1\n")
    for i in range(fds):
        (d / "fd" / str(i)).write_text("")
    (d / "smaps_rollup").write_text(f"00400000-ff [rollup]\nRss: {rss} kB\nPss: {pss} kB\n")
    (d / "status").write_text(f"Name:\tx\nThreads:\t{max(1, fds // 4)}\n")
    return d


def _shim(pod: str, address: str = ADDR) -> list[str]:
    return ["/usr/bin/python3", "-m", "pykata.shim", "-namespace", "soak", "-address",
            address, "-publish-binary", "/usr/bin/containerd", "-id", pod]


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    _proc(root, 1, 0, ["/sbin/init"])
    _proc(root, 100, 1, ["containerd", "--config", "/run/pykata-soak-x/config.toml"], fds=7)
    _proc(root, 101, 100, ["containerd-shim-pykata-v2", "-id", "pod1", "start"])
    _proc(root, 200, 1, _shim("pod1"), fds=12, rss=50000, pss=30000)
    _proc(root, 201, 200, ["qemu-system-x86_64", "-name", "pod1"], fds=40)
    _proc(root, 202, 200, ["/usr/lib/qemu/virtiofsd", "--fd=3"], fds=5)
    _proc(root, 203, 202, ["/usr/lib/qemu/virtiofsd", "--fd=3"], fds=6)
    # Another containerd's shim (a socket path that starts the same) and its VM.
    _proc(root, 300, 1, _shim("pod2", ADDR + "2"), fds=99)
    _proc(root, 301, 300, ["qemu-system-x86_64", "-name", "pod2"], fds=99)
    # A process of nobody in particular mentioning the address.
    _proc(root, 400, 1, ["sh", "-c", f"echo {ADDR}"], fds=3)
    (root / "self").mkdir()
    return root


def _scope(proc: Path, tmp_path: Path, **kw: object) -> Scope:
    dirs = (tmp_path / "state", tmp_path / "base")
    for d in dirs:
        d.mkdir(exist_ok=True)
    (proc / "self" / "mountinfo").write_text("")
    return Scope(address=Path(ADDR), containerd_pid=100, dirs=dirs, namespace="soak",
                 proc=proc, sys_net=tmp_path / "net", cgroup_root=tmp_path / "cg",
                 socket_dir=tmp_path / "s", **kw)  # type: ignore[arg-type]


def test_processes_are_containerd_its_shims_and_below(proc: Path, tmp_path: Path) -> None:
    s = _scope(proc, tmp_path)
    assert s.shims() == {"pod1": 200}
    assert sorted(s.processes()) == [100, 101, 200, 201, 202, 203]
    snap = s.snapshot(anchor="pod1")
    assert snap.counts["processes"] == 6 and snap.counts["shims"] == 1
    assert snap.counts["fds containerd"] == 7
    assert snap.counts["fds shims"] == 12
    assert snap.counts["fds shim children"] == 40 + 5 + 6
    assert snap.memory == {"anchor shim rss KiB": 50000, "anchor shim pss KiB": 30000,
                           "anchor shim fds": 12, "anchor shim threads": 3}
    assert s.snapshot(anchor="pod9").memory == {}


def test_mounts_and_files_stay_below_the_state_dirs(proc: Path, tmp_path: Path) -> None:
    s = _scope(proc, tmp_path)
    state, base = s.dirs
    (state / "sbs" / "soak" / "pod1" / "shared").mkdir(parents=True)
    (state / "sbs" / "soak" / "pod1" / "state.json").write_text("{}")
    (base / "log").write_text("x")
    mounted = state / "sbs" / "soak" / "pod1" / "mounts" / "c 1"
    mounted.mkdir(parents=True)
    for i in range(5):  # inside a mount: not counted as files
        (mounted / f"f{i}").write_text("")
    esc = str(mounted).replace(" ", "\\040")
    (proc / "self" / "mountinfo").write_text(
        f"36 25 0:32 / {esc} rw - overlay overlay rw\n"
        f"37 25 0:33 / {tmp_path}/elsewhere rw - tmpfs tmpfs rw\n"
        f"38 25 0:34 / {state}x/sub rw - tmpfs tmpfs rw\n")
    assert s.mounts() == [str(mounted)]
    # sbs, soak, pod1, shared, state.json, mounts, log (the mount point not entered)
    assert len(s.files(s.mounts())) == 7
    snap = s.snapshot()
    assert snap.counts["mounts"] == 1 and snap.counts["files"] == 7


def test_sockets_netns_veths_cgroups(proc: Path, tmp_path: Path) -> None:
    s = _scope(proc, tmp_path, bridge="pkbr0")
    s.ids.update({"pod1", "pod2"})
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / socket_path(ADDR, "soak", "pod1").name).write_text("")
    (tmp_path / "s" / socket_path(ADDR, "other", "pod2").name).write_text("")  # not ours
    assert len(s.sockets()) == 1
    brif = tmp_path / "net" / "pkbr0" / "brif"
    brif.mkdir(parents=True)
    (brif / "veth1").write_text("")
    assert s.veths() == 1
    (tmp_path / "cg" / "memory" / "k8s.io" / "pod2").mkdir(parents=True)
    (tmp_path / "cg" / "cpu" / "k8s.io" / "someone-else").mkdir(parents=True)
    assert s.cgroups() == [str(tmp_path / "cg" / "memory" / "k8s.io" / "pod2")]
    ns = tmp_path / "netns-gone"
    s.netns.add(str(ns))
    assert s.live_netns() == []


def test_count_changes_have_no_tolerance() -> None:
    a = Snapshot({"processes": 3, "mounts": 0}, {}, {1: "containerd"}, [])
    assert count_changes(a, Snapshot(dict(a.counts), {}, {2: "containerd"}, [])) == []
    b = Snapshot({"processes": 4, "mounts": 1}, {}, {1: "containerd", 9: "qemu -name x"},
                 ["/run/x/rootfs"])
    out = count_changes(a, b)
    assert "mounts: 0 -> 1" in out and "processes: 3 -> 4" in out
    assert "new process: qemu -name x" in out and "new mount: /run/x/rootfs" in out


def test_memory_growth_tolerance_and_fds() -> None:
    mem = {"anchor shim rss KiB": 50000, "anchor shim pss KiB": 30000, "anchor shim fds": 12}
    a = Snapshot({}, mem)
    ok = dict(mem, **{"anchor shim rss KiB": 50000 + MEMORY_TOLERANCE_KIB})
    assert memory_growth(a, Snapshot({}, ok)) == []
    assert memory_growth(a, Snapshot({}, dict(mem, **{"anchor shim pss KiB": 1}))) == []
    grown = dict(mem, **{"anchor shim pss KiB": 30001 + MEMORY_TOLERANCE_KIB})
    assert memory_growth(a, Snapshot({}, grown))[0].startswith("anchor shim pss KiB")
    assert memory_growth(a, Snapshot({}, dict(mem, **{"anchor shim fds": 13}))) == [
        "anchor shim fds: 12 -> 13"]
    b = Snapshot({}, dict(mem, **{"anchor shim threads": 3}))
    assert memory_growth(b, Snapshot({}, dict(mem, **{"anchor shim threads": 4}))) == [
        "anchor shim threads: 3 -> 4"]
    assert memory_growth(a, Snapshot({}, {}))[0].endswith("gone")


def test_wait_shims_gone_measures_and_is_bounded(proc: Path, tmp_path: Path) -> None:
    import shutil

    s = _scope(proc, tmp_path)
    timer = threading.Timer(0.3, lambda: shutil.rmtree(proc / "200"))
    timer.start()
    try:
        linger = s.wait_shims_gone(["pod1"], bound=10)
    finally:
        timer.join()
    assert 0.2 < linger["pod1"] < 10
    _proc(proc, 200, 1, _shim("pod1"))
    assert s.wait_shims_gone(["pod1"], bound=0.3)["pod1"] >= 0.3
    assert s.wait_shims_gone(["pod9"], bound=5)["pod9"] < 1


def test_memory_kib_of_a_missing_process(tmp_path: Path) -> None:
    assert memory_kib(12345678, tmp_path) == (0, 0)


def test_cycles_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("X_CYCLES", raising=False)
    assert cycles("X_CYCLES", 20) == 20
    monkeypatch.setenv("X_CYCLES", "500")
    assert cycles("X_CYCLES", 20) == 500
    for bad in ("many", "0"):
        monkeypatch.setenv("X_CYCLES", bad)
        with pytest.raises(ValueError, match="X_CYCLES"):
            cycles("X_CYCLES", 20)
    assert [baseline_cycle(n) for n in (1, 4, 20, 500)] == [1, 2, 10, 10]
