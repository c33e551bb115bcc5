"""The runtime's own value types (no protobuf here), and the two small
contracts containers and processes are driven through: the guest agent
(``ContainerAgent``) and a process's host-side stdio (``ProcessIO``)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pykata import errors, wire


def quiesced(exc: BaseException) -> bool:
    """Whether ``exc`` is the agent's answer to a blocking call (WaitProcess,
    ReadStdout/ReadStderr, GetOOMEvent) while it is quiesced for a checkpoint:
    call again once the sandbox runs again; never an exit or an end of stream."""
    return isinstance(exc, errors.Unavailable) and exc.message == wire.QUIESCED


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
class GuestPull:
    """The container's image, for the agent to pull and verify itself (issue 19):
    ``image`` as the user asked (name[:tag][@sha256:<hex>]), the registry
    credentials from the CRI request, the registries reached over plain HTTP and
    the cap of the guest storage the layers are unpacked into."""

    image: str
    username: str = ""
    password: str = ""
    auth: str = ""
    identity_token: str = ""
    registry_token: str = ""
    plain_http_registries: tuple[str, ...] = ()
    storage_bytes: int = 0


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


@dataclass(frozen=True)
class Stdio:
    """Where a process's stdio goes on the host ("" = not connected): for the
    shim, the fifo paths containerd gave in Create or Exec."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class ProcessIO(Protocol):
    """Carries one process's stdio between the host and the agent (the shim's
    fifo relay, shim/stdio.py). The process starts it once the process exists in
    the guest and waits for ``drain`` before its exit counts as final."""

    @property
    def stdio(self) -> Stdio: ...

    def start(self) -> None:
        """Begin relaying (called once, by the process)."""

    async def drain(self) -> None:
        """Return once all output reached the host (bounded; never raises)."""

    async def close_stdin(self) -> None:
        """No more input: stop feeding stdin and close it in the guest."""

    async def stop(self) -> None:
        """Stop relaying (the process is being removed)."""


class ContainerAgent(Protocol):
    """What containers and their processes ask of the guest agent.
    ``pykata.agent.AgentClient`` is the real one, ``pykata.testing.fakes.FakeAgent``
    a fake."""

    async def create_container(self, container_id: str, spec: dict[str, Any],
                               storages: Sequence[Storage] = (), sandbox_pidns: bool = False,
                               timeout: float | None = None,
                               devices: Sequence[Device] = (),
                               guest_pull: GuestPull | None = None) -> None: ...

    async def start_container(self, container_id: str) -> int: ...

    async def remove_container(self, container_id: str, timeout_s: int = 10) -> None: ...

    async def exec_process(self, container_id: str, exec_id: str,
                           process: dict[str, Any]) -> int: ...

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all_processes: bool = False) -> None: ...

    async def wait_process(self, container_id: str, exec_id: str = "") -> ExitStatus: ...

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int: ...

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None: ...

    async def read_stdout(self, container_id: str, exec_id: str = "",
                          size: int = 65536) -> bytes: ...

    async def read_stderr(self, container_id: str, exec_id: str = "",
                          size: int = 65536) -> bytes: ...

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, cols: int) -> None: ...

    async def stats(self, container_id: str) -> ContainerStats: ...

    async def pause(self, container_id: str) -> None: ...

    async def resume(self, container_id: str) -> None: ...

    async def update(self, container_id: str, resources: dict[str, Any]) -> None: ...

    async def list_processes(self, container_id: str) -> list[ProcessInfo]: ...

    async def copy_file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0,
                        gid: int = 0, dir_mode: int = 0o755) -> None: ...


class SandboxAgent(ContainerAgent, Protocol):
    """What the sandbox itself asks of the guest agent (on top of its containers'
    calls): health, the sandbox, hot-plugged resources, the pod network."""

    async def check(self, timeout: float = 5.0) -> bool: ...

    async def create_sandbox(self, sandbox_id: str, hostname: str, storages: Sequence[Storage],
                             dns: Sequence[str] = (), hosts: str = "", sandbox_pidns: bool = False,
                             kernel_modules: Sequence[str] = (),
                             random_seed: bytes = b"", debug_console: bool = False,
                             policy: bytes = b"", image_policy: bytes = b"") -> None: ...

    async def set_policy(self, policy: bytes) -> None: ...

    async def destroy_sandbox(self, timeout: float = 10.0) -> None: ...

    async def online_cpu_mem(self, nb_cpus: int = 0,
                             cpu_only: bool = False) -> tuple[int, int]: ...

    async def update_interface(self, name: str, mac: str, mtu: int,
                               addresses: Sequence[tuple[int, str, int]]) -> None: ...

    async def update_routes(self, routes: Sequence[tuple[str, str, str, int]]) -> None: ...

    async def guest_details(self) -> GuestDetails: ...

    async def metrics(self) -> str:
        """The guest's Prometheus text."""

    @property
    def next_stream_id(self) -> int:
        """The ttRPC stream id of the next call (a restore carries on from it)."""

    async def prepare_checkpoint(self) -> None:
        """Hold new calls, have the agent end its blocking calls (wire.QUIESCED),
        return once none is in flight."""

    async def finish_checkpoint(self, time_ns: int = 0, seed: bytes = b"") -> None:
        """The VM runs again: clock, entropy, blocking calls served again."""

    async def close(self) -> None: ...
