"""cgroup v2 and /proc parsing for container stats (pure, no root)."""

from __future__ import annotations

from pathlib import Path

from pykata.guest import cgroups

CPU_STAT = """usage_usec 123456
user_usec 100000
system_usec 23456
nr_periods 10
nr_throttled 2
throttled_usec 5000
"""

MEMORY_STAT = """anon 1048576
file 2097152
kernel 65536
kernel_stack 16384
slab 32768
pgfault 42
"""

NET_DEV = "\n".join([
    "Inter-|   Receive                                                |  Transmit",
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs"
    " drop fifo colls carrier compressed",
    "    lo:    1000      10    0    0    0     0          0         0     1000      10    0"
    "    0    0     0       0          0",
    "  eth0: 5000       50    1    2    0     0          0         0     7000       70    3"
    "    4    0     0       0          0",
    "",
])


def test_parse_keyed_skips_garbage() -> None:
    assert cgroups.parse_keyed("a 1\nb two\n\nc 3 4\nd 5\n") == {"a": 1, "d": 5}


def test_parse_value() -> None:
    assert cgroups.parse_value("max\n") is None
    assert cgroups.parse_value("") is None
    assert cgroups.parse_value("4096\n") == 4096
    assert cgroups.parse_value("junk") is None


def test_parse_io_stat() -> None:
    devs = cgroups.parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"
                                 "bad line\n253:1 rbytes=5\n")
    assert [(d.major, d.minor) for d in devs] == [(8, 0), (253, 1)]
    assert devs[0].values["wbytes"] == 20
    assert devs[1].values == {"rbytes": 5}


def test_parse_net_dev_skips_lo() -> None:
    (eth0,) = cgroups.parse_net_dev(NET_DEV)
    assert eth0.name == "eth0"
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_dropped) == (5000, 50, 1, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_dropped) == (7000, 70, 3, 4)


def test_parse_meminfo_in_bytes() -> None:
    info = cgroups.parse_meminfo("MemTotal:  1024 kB\nHugePages_Total:  0\n")
    assert info == {"MemTotal": 1024 * 1024, "HugePages_Total": 0}


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cgroup_stats_full(tmp_path: Path) -> None:
    cg = _cgroup(tmp_path, {
        "cpu.stat": CPU_STAT,
        "memory.stat": MEMORY_STAT,
        "memory.current": "4194304\n",
        "memory.peak": "8388608\n",
        "memory.max": "16777216\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "memory.swap.current": "0\n",
        "memory.swap.max": "max\n",
        "pids.current": "4\n",
        "pids.max": "100\n",
        "io.stat": "8:0 rbytes=10 wbytes=20 rios=1 wios=2\n",
    })
    st = cgroups.cgroup_stats(cg, total=1 << 30)
    cpu = st.cpu_stats
    assert cpu.cpu_usage.total_usage == 123456000
    assert cpu.cpu_usage.usage_in_usermode == 100000000
    assert cpu.cpu_usage.usage_in_kernelmode == 23456000
    assert (cpu.throttling_data.periods, cpu.throttling_data.throttled_periods,
            cpu.throttling_data.throttled_time) == (10, 2, 5000000)
    mem = st.memory_stats
    assert mem.usage.usage == 4194304
    assert mem.usage.max_usage == 8388608
    assert mem.usage.limit == 16777216
    assert mem.usage.failcnt == 3
    assert mem.cache == 2097152
    assert mem.stats["anon"] == 1048576
    assert mem.kernel_usage.usage == 65536
    assert mem.swap_usage.limit == cgroups.UINT64_MAX
    assert (st.pids_stats.current, st.pids_stats.limit) == (4, 100)
    read = [e for e in st.blkio_stats.io_service_bytes_recursive if e.op == "Read"]
    assert [(e.major, e.minor, e.value) for e in read] == [(8, 0, 10)]
    ios = {e.op: e.value for e in st.blkio_stats.io_serviced_recursive}
    assert ios == {"Read": 1, "Write": 2}
    assert cgroups.oom_kill_count(cg) == 1


def test_cgroup_stats_unlimited_and_missing(tmp_path: Path) -> None:
    cg = _cgroup(tmp_path, {"memory.max": "max\n", "pids.max": "max\n",
                            "memory.current": "100\n"})
    st = cgroups.cgroup_stats(cg, total=12345)
    assert st.memory_stats.usage.limit == 12345  # "max": the VM's memory
    assert st.memory_stats.usage.max_usage == 100  # no memory.peak: the current usage
    assert st.pids_stats.limit == 0
    assert st.cpu_stats.cpu_usage.total_usage == 0


def test_cgroup_stats_nothing_there(tmp_path: Path) -> None:
    st = cgroups.cgroup_stats(tmp_path / "absent", total=1)
    assert st.cpu_stats.cpu_usage.total_usage == 0
    assert cgroups.oom_kill_count(tmp_path / "absent") == 0
    assert cgroups.procs(tmp_path / "absent") is None


def test_procs_includes_children(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("1\n2\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cgroup.procs").write_text("3\n")
    assert cgroups.procs(tmp_path) == [1, 2, 3]


def test_network_stats(tmp_path: Path) -> None:
    f = tmp_path / "dev"
    f.write_text(NET_DEV)
    (eth0,) = cgroups.network_stats(f)
    assert eth0.name == "eth0" and eth0.tx_dropped == 4
