"""What /proc says about one host process: CPU seconds, memory (RSS and PSS),
threads, open descriptors, I/O bytes; and the network counters of a namespace.

Every read is bounded (``MAX_READ``), every parse tolerant: a process that
ended between two reads yields None, never an exception. The processes read
are the host's own (QEMU, virtiofsd, the shim), not the guest's."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from pykata.runtime.types import NetStats

MAX_READ = 64 * 1024  # no file read here is near this
MAX_FDS = 1 << 20  # stop counting there (RLIMIT_NOFILE is far below)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcStat:
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    rss_bytes: int = 0
    pss_bytes: int = 0
    threads: int = 0
    fds: int = 0
    read_bytes: int = 0  # from storage (/proc/PID/io read_bytes)
    write_bytes: int = 0
    rchar: int = 0  # through read-like system calls, any file or socket
    wchar: int = 0
    start_ticks: int = 0  # kernel start time (clock ticks since boot): the identity

    def add(self, other: ProcStat) -> None:
        """Sum ``other`` in (a daemon and its child as one); keeps this start time."""
        for name in ("user_seconds", "system_seconds", "rss_bytes", "pss_bytes", "threads",
                     "fds", "read_bytes", "write_bytes", "rchar", "wchar"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def read_text(path: str, limit: int = MAX_READ) -> str | None:
    """Up to ``limit`` bytes of a file as text; None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            b = os.read(fd, min(left, 16384))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def parse_stat(text: str) -> tuple[float, float, int, int, int] | None:
    """/proc/PID/stat: (user seconds, system seconds, threads, start ticks, RSS bytes);
    None if malformed or a zombie. The command name (field 2) may hold anything,
    spaces and parentheses too: the fields are counted after its last ')'."""
    end = text.rfind(")")
    if end < 0:
        return None
    rest = text[end + 1:].split()
    # rest[0] is field 3 (state): utime=14, stime=15, num_threads=20, starttime=22, rss=24.
    if len(rest) < 22 or rest[0] == "Z":
        return None
    try:
        utime, stime = int(rest[11]), int(rest[12])
        threads, start, rss_pages = int(rest[17]), int(rest[19]), int(rest[21])
    except ValueError:
        return None
    return utime / CLK_TCK, stime / CLK_TCK, threads, start, max(rss_pages, 0) * PAGE_SIZE


def parse_kb_fields(text: str, names: tuple[str, ...]) -> dict[str, int]:
    """``Name:  123 kB`` lines (smaps_rollup, status) as bytes, for ``names``."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep or key not in names:
            continue
        f = rest.split()
        if f and f[0].isdigit():
            out[key] = int(f[0]) * (1024 if len(f) > 1 and f[1] == "kB" else 1)
    return out


def parse_io(text: str) -> dict[str, int]:
    """/proc/PID/io: ``name: value`` lines."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        v = rest.strip()
        if sep and v.isdigit():
            out[key.strip()] = int(v)
    return out


def count_fds(pid: int) -> int:
    n = 0
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as it:
        for _ in it:
            n += 1
            if n >= MAX_FDS:
                break
    return n


def read(pid: int, start_ticks: int | None = None) -> ProcStat | None:
    """``pid``'s figures; None if there is no such (live) process, or its start
    time is not ``start_ticks`` (the pid was reused by another process)."""
    text = read_text(f"/proc/{pid}/stat")
    parsed = parse_stat(text) if text is not None else None
    if parsed is None:
        return None
    user, system, threads, start, rss = parsed
    if start_ticks is not None and start != start_ticks:
        return None
    st = ProcStat(user_seconds=user, system_seconds=system, threads=threads, rss_bytes=rss,
                  start_ticks=start)
    rollup = read_text(f"/proc/{pid}/smaps_rollup")
    if rollup is not None:
        mem = parse_kb_fields(rollup, ("Rss", "Pss"))
        st.rss_bytes = mem.get("Rss", st.rss_bytes)
        st.pss_bytes = mem.get("Pss", 0)
    io = read_text(f"/proc/{pid}/io")
    if io is not None:
        fields = parse_io(io)
        st.read_bytes = fields.get("read_bytes", 0)
        st.write_bytes = fields.get("write_bytes", 0)
        st.rchar = fields.get("rchar", 0)
        st.wchar = fields.get("wchar", 0)
    st.fds = count_fds(pid)
    return st


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (through its main thread's ``children``)."""
    text = read_text(f"/proc/{pid}/task/{pid}/children")
    if not text:
        return []
    return [int(p) for p in text.split()[:64] if p.isdigit()]


def read_tree(pid: int, start_ticks: int | None = None) -> ProcStat | None:
    """``pid`` and its direct children summed (virtiofsd with ``sandbox=namespace``
    forks the process that serves; the parent only waits for it)."""
    st = read(pid, start_ticks)
    if st is None:
        return None
    for child in children(pid):
        c = read(child)
        if c is not None:
            st.add(c)
    return st


def parse_net_dev(text: str) -> dict[str, NetStats]:
    """/proc/net/dev by interface name."""
    out: dict[str, NetStats] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        f = rest.split()
        if not sep or len(f) < 16 or not all(x.isdigit() for x in f[:16]):
            continue
        v = [int(x) for x in f[:16]]
        name = name.strip()
        out[name] = NetStats(name, rx_bytes=v[0], rx_packets=v[1], rx_errors=v[2],
                             rx_dropped=v[3], tx_bytes=v[8], tx_packets=v[9],
                             tx_errors=v[10], tx_dropped=v[11])
    return out


def thread_net_dev() -> dict[str, NetStats]:
    """The network counters of the calling thread's network namespace (a thread
    that entered a pod's namespace sees that namespace's devices here)."""
    return parse_net_dev(read_text("/proc/thread-self/net/dev", 1 << 20) or "")
