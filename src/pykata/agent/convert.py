"""Agent protocol messages <-> runtime types. The only place they meet."""

from __future__ import annotations

from collections.abc import Iterable

from pykata.protos import agent_pb2 as pb
from pykata.runtime.types import (
    ContainerStats,
    CpuStats,
    Device,
    ExitStatus,
    GuestDetails,
    MemoryStats,
    NetStats,
    ProcessInfo,
    Storage,
)

# Text from the guest (error messages, names, versions) is untrusted: it is cut
# to this many characters and its control characters escaped before it reaches
# an exception, a log line or containerd.
GUEST_TEXT_MAX = 512


def guest_text(value: str, limit: int = GUEST_TEXT_MAX) -> str:
    """``value`` safe to log: non-printable characters (newlines, ESC, bidi
    controls...) as ``\\xNN``/``\\uNNNN`` escapes, at most ``limit`` characters
    plus a note of how much was cut."""
    head = value[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    if len(head) <= limit and len(value) <= limit:
        return head
    return head[:limit] + f"...({len(value)} chars)"


def storage_to_pb(s: Storage) -> pb.Storage:
    return pb.Storage(
        driver=s.driver, source=s.source, mount_point=s.mount_point, fstype=s.fstype,
        options=list(s.options), driver_options=list(s.driver_options),
    )


def storages_to_pb(items: Iterable[Storage]) -> list[pb.Storage]:
    return [storage_to_pb(s) for s in items]


def device_to_pb(d: Device) -> pb.Device:
    return pb.Device(id=d.id, type=d.type, vm_path=d.vm_path,
                     container_path=d.container_path, options=list(d.options))


def devices_to_pb(items: Iterable[Device]) -> list[pb.Device]:
    return [device_to_pb(d) for d in items]


def exit_status(resp: pb.WaitProcessResponse) -> ExitStatus:
    return ExitStatus(resp.status, resp.exited_at_unix_nano, resp.oom_killed)


def stats(resp: pb.StatsContainerResponse) -> ContainerStats:
    cg = resp.cgroup_stats
    cpu = cg.cpu_stats
    mem = cg.memory_stats
    return ContainerStats(
        cpu=CpuStats(
            usage_ns=cpu.cpu_usage.total_usage,
            user_ns=cpu.cpu_usage.usage_in_usermode,
            kernel_ns=cpu.cpu_usage.usage_in_kernelmode,
            per_cpu_ns=tuple(cpu.cpu_usage.percpu_usage),
            periods=cpu.throttling_data.periods,
            throttled_periods=cpu.throttling_data.throttled_periods,
            throttled_time_ns=cpu.throttling_data.throttled_time,
        ),
        memory=MemoryStats(
            usage=mem.usage.usage, max_usage=mem.usage.max_usage, limit=mem.usage.limit,
            cache=mem.cache, failcnt=mem.usage.failcnt, stats=dict(mem.stats),
        ),
        pids_current=cg.pids_stats.current,
        pids_limit=cg.pids_stats.limit,
        network=tuple(
            NetStats(
                name=n.name, rx_bytes=n.rx_bytes, rx_packets=n.rx_packets,
                rx_errors=n.rx_errors, rx_dropped=n.rx_dropped, tx_bytes=n.tx_bytes,
                tx_packets=n.tx_packets, tx_errors=n.tx_errors, tx_dropped=n.tx_dropped,
            )
            for n in resp.network_stats
        ),
    )


def processes(resp: pb.ListProcessesResponse) -> list[ProcessInfo]:
    return [ProcessInfo(p.pid, guest_text(p.exec_id), guest_text(p.command))
            for p in resp.processes]


def guest_details(resp: pb.GuestDetailsResponse) -> GuestDetails:
    return GuestDetails(
        kernel_release=guest_text(resp.kernel_release),
        kernel_version=guest_text(resp.kernel_version),
        online_cpus=resp.online_cpus, mem_total_bytes=resp.mem_total_bytes,
        mem_block_size_bytes=resp.mem_block_size_bytes,
        agent_version=guest_text(resp.agent_details.version),
    )
