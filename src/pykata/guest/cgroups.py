"""Container statistics from cgroup v2 files and /proc: parsing is pure.

Every reader degrades gracefully: a missing file (a controller not enabled, or
a cgroup v1 host in development) gives zeros, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pykata.protos import agent_pb2 as pb

UINT64_MAX = 2**64 - 1


def parse_keyed(text: str) -> dict[str, int]:
    """Flat keyed files (cpu.stat, memory.stat, memory.events): ``key value`` lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        try:
            out[parts[0]] = int(parts[1])
        except ValueError:
            continue
    return out


def parse_value(text: str) -> int | None:
    """Single value files (memory.max, pids.current): "max" (no limit) -> None."""
    word = text.strip()
    if not word or word == "max":
        return None
    try:
        return int(word)
    except ValueError:
        return None


@dataclass(frozen=True)
class IoDevice:
    major: int
    minor: int
    values: dict[str, int]


def parse_io_stat(text: str) -> list[IoDevice]:
    """io.stat: ``MAJ:MIN rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0`` lines."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        maj, _, mnr = parts[0].partition(":")
        try:
            major, minor = int(maj), int(mnr)
        except ValueError:
            continue
        values: dict[str, int] = {}
        for kv in parts[1:]:
            k, sep, v = kv.partition("=")
            if sep:
                try:
                    values[k] = int(v)
                except ValueError:
                    continue
        out.append(IoDevice(major, minor, values))
    return out


@dataclass(frozen=True)
class NetDev:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


def parse_net_dev(text: str, skip: tuple[str, ...] = ("lo",)) -> list[NetDev]:
    """/proc/net/dev, without the loopback interface."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        name = name.strip()
        if name in skip:
            continue
        f = rest.split()
        if len(f) < 16:
            continue
        n = [int(x) for x in f[:16]]
        out.append(NetDev(name, n[0], n[1], n[2], n[3], n[8], n[9], n[10], n[11]))
    return out


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes (``kB`` values multiplied out)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        f = rest.split()
        if not f:
            continue
        try:
            v = int(f[0])
        except ValueError:
            continue
        if len(f) > 1 and f[1] == "kB":
            v *= 1024
        out[key.strip()] = v
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def mem_total() -> int:
    return parse_meminfo(_read(Path("/proc/meminfo"))).get("MemTotal", 0)


def oom_kill_count(cgroup: Path) -> int:
    return parse_keyed(_read(cgroup / "memory.events")).get("oom_kill", 0)


def procs(cgroup: Path) -> list[int] | None:
    """Pids in the cgroup and its descendants; None if the cgroup is unreadable."""
    try:
        own = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return None
    pids = [int(x) for x in own.split() if x.isdigit()]
    try:
        children = sorted(p for p in cgroup.iterdir() if p.is_dir())
    except OSError:
        children = []
    for child in children:
        pids.extend(procs(child) or [])
    return pids


def cpu_stats(cgroup: Path) -> pb.CpuStats:
    st = parse_keyed(_read(cgroup / "cpu.stat"))
    return pb.CpuStats(
        cpu_usage=pb.CpuUsage(
            total_usage=st.get("usage_usec", 0) * 1000,
            usage_in_usermode=st.get("user_usec", 0) * 1000,
            usage_in_kernelmode=st.get("system_usec", 0) * 1000,
        ),
        throttling_data=pb.ThrottlingData(
            periods=st.get("nr_periods", 0),
            throttled_periods=st.get("nr_throttled", 0),
            throttled_time=st.get("throttled_usec", 0) * 1000,
        ),
    )


def memory_stats(cgroup: Path, total: int) -> pb.MemoryStats:
    """Limits of "max" are reported as ``total`` (the VM's memory)."""
    stat = parse_keyed(_read(cgroup / "memory.stat"))
    events = parse_keyed(_read(cgroup / "memory.events"))
    usage = parse_value(_read(cgroup / "memory.current")) or 0
    peak = parse_value(_read(cgroup / "memory.peak")) or usage
    limit = parse_value(_read(cgroup / "memory.max"))
    swap = parse_value(_read(cgroup / "memory.swap.current")) or 0
    swap_limit = parse_value(_read(cgroup / "memory.swap.max"))
    kernel = stat.get("kernel", stat.get("kernel_stack", 0) + stat.get("slab", 0))
    return pb.MemoryStats(
        cache=stat.get("file", 0),
        usage=pb.MemoryData(usage=usage, max_usage=peak, failcnt=events.get("max", 0),
                            limit=limit if limit is not None else total),
        swap_usage=pb.MemoryData(usage=swap, limit=swap_limit if swap_limit is not None
                                 else UINT64_MAX),
        kernel_usage=pb.MemoryData(usage=kernel),
        use_hierarchy=True,
        stats=stat,
    )


def pids_stats(cgroup: Path) -> pb.PidsStats:
    return pb.PidsStats(
        current=parse_value(_read(cgroup / "pids.current")) or 0,
        limit=parse_value(_read(cgroup / "pids.max")) or 0,
    )


_IO_OPS = (("rbytes", "rios", "Read"), ("wbytes", "wios", "Write"),
           ("dbytes", "dios", "Discard"))


def blkio_stats(cgroup: Path) -> pb.BlkioStats:
    out = pb.BlkioStats()
    for dev in parse_io_stat(_read(cgroup / "io.stat")):
        for nbytes, nios, op in _IO_OPS:
            if nbytes in dev.values:
                out.io_service_bytes_recursive.add(major=dev.major, minor=dev.minor, op=op,
                                                   value=dev.values[nbytes])
            if nios in dev.values:
                out.io_serviced_recursive.add(major=dev.major, minor=dev.minor, op=op,
                                              value=dev.values[nios])
    return out


def cgroup_stats(cgroup: Path, total: int | None = None) -> pb.CgroupStats:
    return pb.CgroupStats(
        cpu_stats=cpu_stats(cgroup),
        memory_stats=memory_stats(cgroup, mem_total() if total is None else total),
        pids_stats=pids_stats(cgroup),
        blkio_stats=blkio_stats(cgroup),
    )


def network_stats(net_dev: Path = Path("/proc/net/dev")) -> list[pb.NetworkStats]:
    return [
        pb.NetworkStats(name=d.name, rx_bytes=d.rx_bytes, rx_packets=d.rx_packets,
                        rx_errors=d.rx_errors, rx_dropped=d.rx_dropped, tx_bytes=d.tx_bytes,
                        tx_packets=d.tx_packets, tx_errors=d.tx_errors, tx_dropped=d.tx_dropped)
        for d in parse_net_dev(_read(net_dev))
    ]
