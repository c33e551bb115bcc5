"""The runtime's own value types (no protobuf here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.Enum):
    """Lifecycle of sandboxes, containers and processes."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ExitStatus:
    code: int  # exit code, or 128+signal
    exited_at_ns: int  # unix time, nanoseconds
    oom_killed: bool = False


@dataclass(frozen=True)
class Storage:
    driver: str
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()
    driver_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    """A device the agent gives a container: ``id`` names it in the guest (the
    virtio-blk serial of a hot-plugged disk), ``container_path`` is the spec's
    ``linux.devices`` entry it fills in with the guest's major/minor."""

    id: str
    type: str  # "blk"
    container_path: str
    vm_path: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CpuStats:
    usage_ns: int = 0
    user_ns: int = 0
    kernel_ns: int = 0
    per_cpu_ns: tuple[int, ...] = ()
    throttled_periods: int = 0
    throttled_time_ns: int = 0
    periods: int = 0


@dataclass(frozen=True)
class MemoryStats:
    usage: int = 0
    max_usage: int = 0
    limit: int = 0
    cache: int = 0
    failcnt: int = 0
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NetStats:
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True)
class ContainerStats:
    cpu: CpuStats = field(default_factory=CpuStats)
    memory: MemoryStats = field(default_factory=MemoryStats)
    pids_current: int = 0
    pids_limit: int = 0
    network: tuple[NetStats, ...] = ()


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    exec_id: str = ""
    command: str = ""


@dataclass(frozen=True)
class GuestDetails:
    kernel_release: str
    kernel_version: str
    online_cpus: int
    mem_total_bytes: int
    mem_block_size_bytes: int
    agent_version: str
