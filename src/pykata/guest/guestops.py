"""Less frequent guest operations: /etc files, CopyFile, CPU and memory
hotplug, guest details and metrics."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pykata import errors
from pykata.guest import cgroups


def write_etc(resolv_lines: Sequence[str], hosts: str, etc: str = "/etc") -> None:
    if resolv_lines:
        text = "".join(line.rstrip("\n") + "\n" for line in resolv_lines)
        Path(etc, "resolv.conf").write_text(text)
    if hosts:
        Path(etc, "hosts").write_text(hosts if hosts.endswith("\n") else hosts + "\n")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(parts: Sequence[str], dir_mode: int) -> int:
    """An fd of the directory ``/parts[0]/.../parts[-1]``, made (``dir_mode``)
    where missing, walked from / one component at a time without following a
    symlink in any of them (O_NOFOLLOW|O_DIRECTORY on each openat)."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for name in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_mode, dir_fd=fd)
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise errors.InvalidArgument(
                        f"cannot write below {name!r}: not a directory (a symlink is never"
                        " followed)") from None
                raise
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def copy_file(path: str, data: bytes, offset: int, file_size: int, file_mode: int,
              dir_mode: int, uid: int, gid: int) -> None:
    """Write one chunk of a file; the last chunk moves it into place atomically.

    No symlink is followed in any component of ``path`` (the agent policy
    decides CopyFile on the path's text, docs/confidential.md): the directories
    are walked with O_NOFOLLOW from /, the file is written through its
    directory's fd and renamed over whatever the last component is."""
    if not path.startswith("/"):
        raise errors.InvalidArgument(f"copy target {path!r} is not absolute")
    parts = [p for p in path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise errors.InvalidArgument(f"copy target {path!r} is not a file path"
                                     " (no '.' or '..' components)")
    *dirs, name = parts
    tmp = f".{name}.pykata-copy"
    last = offset + len(data) >= file_size
    mode = file_mode & 0o7777 or 0o644
    dfd = -1
    try:
        dfd = _open_parent(dirs, dir_mode or 0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC \
            | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(tmp, flags, mode, dir_fd=dfd)
        try:
            if data:
                os.pwrite(fd, data, offset)
            if last:
                os.fchmod(fd, mode)
                os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
        if last:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as exc:
        if last and dfd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
        raise errors.Internal(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if dfd >= 0:
            os.close(dfd)


def _cpu_ids(text: str) -> list[int]:
    """A kernel CPU list ("0-3,5") as ids."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def online_cpus(sysfs: str = "/sys/devices/system/cpu") -> int:
    try:
        return len(_cpu_ids(Path(sysfs, "online").read_text()))
    except (OSError, ValueError):
        return os.cpu_count() or 1


def online_cpu_mem(nb_cpus: int, cpu_only: bool, sysfs: str = "/sys/devices/system") -> int:
    """Online offline present CPUs (``nb_cpus`` of them, 0: all) and memory blocks."""
    base = Path(sysfs)
    try:
        present = set(_cpu_ids((base / "cpu/present").read_text()))
        online = set(_cpu_ids((base / "cpu/online").read_text()))
    except (OSError, ValueError):
        present = online = set()
    todo = sorted(present - online)
    if nb_cpus:
        todo = todo[:nb_cpus]
    for cpu in todo:
        with contextlib.suppress(OSError):
            (base / f"cpu/cpu{cpu}/online").write_text("1")
    if not cpu_only:
        for state in sorted((base / "memory").glob("memory*/state")):
            with contextlib.suppress(OSError):
                if state.read_text().strip() == "offline":
                    state.write_text("online")
    return online_cpus(str(base / "cpu"))


def mem_block_size(sysfs: str = "/sys/devices/system/memory") -> int:
    try:
        return int(Path(sysfs, "block_size_bytes").read_text().strip(), 16)
    except (OSError, ValueError):
        return 0


def kernel_version() -> str:
    try:
        return Path("/proc/version").read_text().strip()
    except OSError:
        return os.uname().version


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(containers: int) -> str:
    """Prometheus text exposition of the guest's own figures (the host re-reads
    it as untrusted text: pykata.metrics.guesttext)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if not float(value).is_integer()
                         else f"{name}{labels} {int(value)}")

    meminfo = cgroups.parse_meminfo(_read("/proc/meminfo"))
    metric("pykata_guest_meminfo", "gauge",
           "Guest /proc/meminfo, by item: bytes (kB items multiplied out), else as read.",
           [(f'{{item="{_esc(k)}"}}', float(v)) for k, v in sorted(meminfo.items())])
    load = _read("/proc/loadavg").split()
    if len(load) >= 3:
        for i, name in enumerate(("load1", "load5", "load15")):
            metric(f"pykata_guest_{name}", "gauge", f"Guest {name} load average.",
                   [("", float(load[i]))])
    stat = _read("/proc/stat").splitlines()
    fields = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    samples: list[tuple[str, float]] = []
    counts: dict[str, int] = {}
    for line in stat:
        parts = line.split()
        if len(parts) < 2:
            continue
        if parts[0].startswith("cpu"):
            cpu = "total" if parts[0] == "cpu" else _esc(parts[0][3:])
            for name, val in zip(fields, parts[1:], strict=False):
                if val.isdigit():
                    samples.append((f'{{cpu="{cpu}",mode="{name}"}}', int(val) / tick))
        elif parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    metric("pykata_guest_cpu_seconds_total", "counter",
           "Guest CPU time in seconds, by CPU (total: all) and mode.", samples)
    for key, name, kind, help_ in (
            ("ctxt", "pykata_guest_context_switches_total", "counter",
             "Guest context switches."),
            ("processes", "pykata_guest_forks_total", "counter",
             "Processes and threads the guest kernel created."),
            ("procs_running", "pykata_guest_procs_running", "gauge",
             "Guest tasks runnable now."),
            ("procs_blocked", "pykata_guest_procs_blocked", "gauge",
             "Guest tasks blocked on I/O now.")):
        if key in counts:
            metric(name, kind, help_, [("", float(counts[key]))])
    metric("pykata_guest_processes", "gauge", "Processes in the guest (all containers,"
           " the agent and the kernel's threads).", [("", float(_process_count()))])
    uptime = _read("/proc/uptime").split()
    if uptime:
        with contextlib.suppress(ValueError):
            metric("pykata_guest_uptime_seconds", "gauge", "Seconds since the guest booted.",
                   [("", float(uptime[0]))])
    _diskstats(metric)
    _netdev(metric)
    metric("pykata_agent_rss_bytes", "gauge", "Resident memory of the agent, in bytes.",
           [("", float(_rss()))])
    metric("pykata_agent_containers", "gauge", "Containers the agent knows.",
           [("", float(containers))])
    return "\n".join(lines) + "\n"


_Metric = Callable[[str, str, str, list[tuple[str, float]]], None]
_MAX_DEVICES = 64


def _diskstats(metric: _Metric) -> None:
    """/proc/diskstats of whole disks (not partitions, loop or ram devices)."""
    rows: list[tuple[str, list[int]]] = []
    for line in _read("/proc/diskstats").splitlines():
        f = line.split()
        if len(f) < 14 or not all(x.isdigit() for x in f[3:14]):
            continue
        dev = f[2]
        if dev.startswith(("loop", "ram")) or Path("/sys/class/block", dev, "partition").exists():
            continue
        rows.append((dev, [int(x) for x in f[3:14]]))
        if len(rows) >= _MAX_DEVICES:
            break
    # Fields after the name: 0 reads, 2 sectors read, 4 writes, 6 sectors written,
    # 9 ms doing I/O (sectors are 512 bytes whatever the device's block size).
    for idx, scale, name, help_ in (
            (0, 1, "pykata_guest_disk_reads_completed_total", "Guest disk reads completed."),
            (2, 512, "pykata_guest_disk_read_bytes_total", "Bytes read from a guest disk."),
            (4, 1, "pykata_guest_disk_writes_completed_total",
             "Guest disk writes completed."),
            (6, 512, "pykata_guest_disk_written_bytes_total", "Bytes written to a guest disk."),
            (9, 0, "pykata_guest_disk_io_time_seconds_total",
             "Seconds a guest disk was busy with I/O.")):
        metric(name, "counter", help_,
               [(f'{{device="{_esc(dev)}"}}', v[idx] * scale if scale else v[idx] / 1000)
                for dev, v in rows])


def _netdev(metric: _Metric) -> None:
    """/proc/net/dev of the guest's interfaces (the pod's network namespace)."""
    rows: list[tuple[str, list[int]]] = []
    for line in _read("/proc/net/dev").splitlines()[2:]:
        name, sep, rest = line.partition(":")
        f = rest.split()
        if not sep or len(f) < 16 or not all(x.isdigit() for x in f[:16]):
            continue
        rows.append((name.strip(), [int(x) for x in f[:16]]))
        if len(rows) >= _MAX_DEVICES:
            break
    for idx, name, help_ in (
            (0, "pykata_guest_netdev_rx_bytes_total", "Bytes a guest interface received."),
            (1, "pykata_guest_netdev_rx_packets_total", "Packets a guest interface received."),
            (3, "pykata_guest_netdev_rx_dropped_total",
             "Received packets a guest interface dropped."),
            (8, "pykata_guest_netdev_tx_bytes_total", "Bytes a guest interface sent."),
            (9, "pykata_guest_netdev_tx_packets_total", "Packets a guest interface sent."),
            (11, "pykata_guest_netdev_tx_dropped_total",
             "Packets to send a guest interface dropped.")):
        metric(name, "counter", help_,
               [(f'{{interface="{_esc(dev)}"}}', float(v[idx])) for dev, v in rows])


def _process_count() -> int:
    try:
        return sum(1 for e in os.scandir("/proc") if e.name.isdigit())
    except OSError:
        return 0


def _rss() -> int:
    try:
        pages = int(_read("/proc/self/statm").split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (IndexError, ValueError):
        return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
