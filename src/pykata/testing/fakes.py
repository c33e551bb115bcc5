"""Test doubles that let the runtime and the shim run without QEMU or a guest.

    FakeAgent           an in-memory guest agent: containers, processes, their
                        output and exits, driven by the test (``exit``, ``output``)
    FakeHypervisor      the Hypervisor contract (hypervisor/base.py) with no VMM;
                        its checkpoint (save_to/load) writes and reads ``vmstate``
    FakeDriver          the Driver contract: its VMs are FakeHypervisors
    FakeTree            the sandbox's shared tree, recording instead of mounting
    fake_parts          runtime.parts.Parts from the fakes above (and FakeAgent)
    FakeSandbox         the real runtime.sandbox.Sandbox built from fake_parts,
                        counting persists and resource fits
    FakeSandboxFactory  stands in for ``Sandbox.create`` in the shim's TaskService
    FakeIO              a process's host-side stdio (runtime.types.ProcessIO)
                        whose drain the test holds back (``hold_drain``)
    FakePublisher       the shim's event publisher, as a list of (topic, event)

Unit tests drive the real ``Sandbox``, ``Container`` and the shim's Task
service; only the VM, the agent and the mounts are fakes. Sandbox state goes
to the ``state_dir`` a test gives (its tmp_path), never /run/pykata.

Every fake records the calls it got (``calls``: (method, args) in order) and can
be told to fail a call (``fail``), so tests check both the happy path and the
rollback.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from pykata import errors, wire
from pykata.config import Config
from pykata.hypervisor.base import AgentChannel, Driver, Hypervisor, VMSpec
from pykata.runtime.parts import Parts
from pykata.runtime.sandbox import Sandbox
from pykata.runtime.state import DEFAULT_NAMESPACE
from pykata.runtime.types import (
    ContainerStats,
    Device,
    ExitStatus,
    GuestDetails,
    GuestPull,
    ProcessInfo,
    Stdio,
    Storage,
)

T = TypeVar("T")


class _Recorder:
    """Records calls; raises what a test asked a call to raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._failures: dict[str, list[BaseException]] = {}

    def fail(self, method: str, exc: BaseException, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` raise ``exc``."""
        self._failures.setdefault(method, []).extend([exc] * times)

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def called(self, method: str) -> list[tuple[Any, ...]]:
        """The arguments of each call of ``method``."""
        return [args for name, args in self.calls if name == method]


# -- the agent --------------------------------------------------------------------------


@dataclass
class FakeProcess:
    """One process as the fake agent keeps it."""

    container_id: str
    exec_id: str
    spec: dict[str, Any]
    pid: int = 0
    started: bool = False
    exit: asyncio.Future[ExitStatus] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    stdout: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stderr: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    signals: list[int] = field(default_factory=list)
    tty: tuple[int, int] | None = None

    @property
    def running(self) -> bool:
        return self.started and not self.exit.done()


async def _read(q: asyncio.Queue[bytes]) -> bytes:
    data = await q.get()
    if not data:
        q.put_nowait(b"")  # end of stream stays the end
    return data


class FakeAgent(_Recorder):
    """An in-memory guest agent (the methods of ``pykata.agent.AgentClient`` the
    runtime uses), as strict as the real one: unknown containers and processes
    are NotFound, a finished process cannot be signalled.

    ``prepare_checkpoint`` quiesces it as the real client and agent do together:
    pending blocking calls (wait_process, read_stdout, read_stderr) end with
    Unavailable(wire.QUIESCED), new ones wait until ``finish_checkpoint``.

    A process ends when the test calls ``exit``, or on a signal in
    ``fatal_signals`` (status 128+signal), or when its container is removed
    (137). Its stdout/stderr end (b"") when it ends."""

    def __init__(self, *, fatal_signals: Sequence[int] = (signal.SIGTERM, signal.SIGKILL,
                                                          signal.SIGINT)) -> None:
        super().__init__()
        self.fatal_signals = set(fatal_signals)
        self.containers: dict[str, dict[str, Any]] = {}  # id -> the spec it got
        self.procs: dict[tuple[str, str], FakeProcess] = {}
        self.paused: set[str] = set()
        self.resources: dict[str, list[dict[str, Any]]] = {}  # updates, per container
        self.stats_result = ContainerStats()
        self.sandbox: dict[str, Any] | None = None
        self.online = (1, 512 << 20)  # (CPUs, memory bytes) online_cpu_mem reports
        self.vm: FakeHypervisor | None = None  # if set, online is what this VM has
        self.closed = False
        self.files: dict[str, tuple[bytes, int, int, int]] = {}  # copy_file: data, mode, ids
        self.metrics_text = "# fake guest metrics\n"
        self._pids = itertools.count(100)
        self.quiesced = False
        self.next_stream_id = 1
        self._quiesce = asyncio.Event()  # set: end the pending blocking calls
        self._open = asyncio.Event()  # cleared while quiesced: new calls wait
        self._open.set()

    # -- what tests drive ------------------------------------------------------------
    def process(self, container_id: str, exec_id: str = "") -> FakeProcess:
        try:
            return self.procs[container_id, exec_id]
        except KeyError:
            what = f"exec {exec_id} of " if exec_id else ""
            raise errors.NotFound(f"{what}container {container_id} not found") from None

    def output(self, container_id: str, exec_id: str, data: bytes,
               stream: str = "stdout") -> None:
        """The process writes ``data`` to ``stream``."""
        p = self.process(container_id, exec_id)
        (p.stdout if stream == "stdout" else p.stderr).put_nowait(data)

    def exit(self, container_id: str, exec_id: str = "", code: int = 0, *,
             oom_killed: bool = False, exited_at_ns: int | None = None) -> None:
        """The process ends with ``code``; its output streams end first."""
        p = self.process(container_id, exec_id)
        if p.exit.done():
            return
        p.stdout.put_nowait(b"")
        p.stderr.put_nowait(b"")
        p.exit.set_result(ExitStatus(code, time.time_ns() if exited_at_ns is None
                                     else exited_at_ns, oom_killed))

    # -- sandbox ---------------------------------------------------------------------
    async def check(self, timeout: float = 5.0) -> bool:
        self._call("check")
        return True

    async def create_sandbox(self, sandbox_id: str, hostname: str, storages: Sequence[Storage],
                             dns: Sequence[str] = (), hosts: str = "", sandbox_pidns: bool = False,
                             kernel_modules: Sequence[str] = (), random_seed: bytes = b"",
                             debug_console: bool = False, policy: bytes = b"",
                             image_policy: bytes = b"") -> None:
        self._call("create_sandbox", sandbox_id, hostname)
        self.sandbox = {"id": sandbox_id, "hostname": hostname, "storages": list(storages),
                        "dns": list(dns), "hosts": hosts, "policy": policy,
                        "image_policy": image_policy}

    async def set_policy(self, policy: bytes) -> None:
        self._call("set_policy", len(policy))

    async def destroy_sandbox(self, timeout: float = 10.0) -> None:
        self._call("destroy_sandbox")
        for p in self.procs.values():
            if not p.exit.done():
                self.exit(p.container_id, p.exec_id, 137)
        self.sandbox = None

    async def online_cpu_mem(self, nb_cpus: int = 0, cpu_only: bool = False) -> tuple[int, int]:
        self._call("online_cpu_mem", nb_cpus, cpu_only)
        if self.vm is not None:
            spec = self.vm.spec
            return spec.vcpus, (spec.memory_mib + self.vm.memory_added_mib) << 20
        return self.online

    async def update_interface(self, name: str, mac: str, mtu: int,
                               addresses: Sequence[tuple[int, str, int]]) -> None:
        self._call("update_interface", name, mac, mtu, list(addresses))

    async def update_routes(self, routes: Sequence[tuple[str, str, str, int]]) -> None:
        self._call("update_routes", list(routes))

    async def guest_details(self) -> GuestDetails:
        self._call("guest_details")
        cpus, mem = await self.online_cpu_mem()
        return GuestDetails(kernel_release="6.1.0-fake", kernel_version="#1 fake",
                            online_cpus=cpus, mem_total_bytes=mem,
                            mem_block_size_bytes=128 << 20, agent_version="fake")

    async def metrics(self) -> str:
        self._call("metrics")
        return self.metrics_text

    async def close(self) -> None:
        self._call("close")
        self.closed = True
        self._open.set()

    async def prepare_checkpoint(self) -> None:
        self._call("prepare_checkpoint")
        self.quiesced = True
        self._open.clear()
        self._quiesce.set()
        await asyncio.sleep(0)  # the ended calls see it

    async def finish_checkpoint(self, time_ns: int = 0, seed: bytes = b"") -> None:
        self._call("finish_checkpoint", time_ns, len(seed))
        self.quiesced = False
        self._quiesce.clear()
        self._open.set()

    async def _blocking(self, call: Awaitable[T]) -> T:
        """One blocking call: held while quiesced, ended by prepare_checkpoint."""
        await self._open.wait()
        task = asyncio.ensure_future(call)
        ending = asyncio.ensure_future(self._quiesce.wait())
        try:
            await asyncio.wait({task, ending}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise errors.Unavailable(wire.QUIESCED)
        finally:
            ending.cancel()
            task.cancel()

    # -- containers ------------------------------------------------------------------
    async def create_container(self, container_id: str, spec: dict[str, Any],
                               storages: Sequence[Storage] = (), sandbox_pidns: bool = False,
                               timeout: float | None = None,
                               devices: Sequence[Device] = (),
                               guest_pull: GuestPull | None = None) -> None:
        self._call("create_container", container_id)
        if container_id in self.containers:
            raise errors.AlreadyExists(f"container {container_id} already exists")
        self.containers[container_id] = spec
        self.procs[container_id, ""] = FakeProcess(container_id, "", spec.get("process") or {})

    async def copy_file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0,
                        gid: int = 0, dir_mode: int = 0o755) -> None:
        self._call("copy_file", path, len(data))
        self.files[path] = (data, mode, uid, gid)

    async def start_container(self, container_id: str) -> int:
        self._call("start_container", container_id)
        p = self.process(container_id)
        if p.started:
            raise errors.FailedPrecondition(f"container {container_id} was already started")
        p.pid, p.started = next(self._pids), True
        return p.pid

    async def remove_container(self, container_id: str, timeout_s: int = 10) -> None:
        self._call("remove_container", container_id)
        if container_id not in self.containers:
            raise errors.NotFound(f"container {container_id} not found")
        for cid, eid in list(self.procs):
            if cid == container_id:
                self.exit(cid, eid, 137)
                del self.procs[cid, eid]
        del self.containers[container_id]
        self.paused.discard(container_id)

    async def exec_process(self, container_id: str, exec_id: str,
                           process: dict[str, Any]) -> int:
        self._call("exec_process", container_id, exec_id)
        if not self.process(container_id).running:
            raise errors.FailedPrecondition(f"container {container_id} is not running")
        if (container_id, exec_id) in self.procs:
            raise errors.AlreadyExists(f"exec {exec_id} already exists")
        p = FakeProcess(container_id, exec_id, process, pid=next(self._pids), started=True)
        self.procs[container_id, exec_id] = p
        return p.pid

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all_processes: bool = False) -> None:
        self._call("signal_process", container_id, exec_id, signal, all_processes)
        p = self.process(container_id, exec_id)
        if p.exit.done():
            raise errors.NotFound(f"process {container_id}/{exec_id} already finished")
        targets = [p]
        if all_processes and not exec_id:
            targets += [q for (cid, eid), q in self.procs.items() if cid == container_id and eid]
        for q in targets:
            q.signals.append(signal)
            if signal in self.fatal_signals and q.running:
                self.exit(q.container_id, q.exec_id, 128 + signal)

    async def wait_process(self, container_id: str, exec_id: str = "") -> ExitStatus:
        self._call("wait_process", container_id, exec_id)
        return await self._blocking(asyncio.shield(self.process(container_id, exec_id).exit))

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self._call("write_stdin", container_id, exec_id, data)
        p = self.process(container_id, exec_id)
        if p.stdin_closed:
            raise errors.FailedPrecondition("stdin is closed")
        p.stdin += data
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self._call("close_stdin", container_id, exec_id)
        self.process(container_id, exec_id).stdin_closed = True

    async def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        return await self._blocking(_read(self.process(container_id, exec_id).stdout))

    async def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        return await self._blocking(_read(self.process(container_id, exec_id).stderr))

    async def resize_tty(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        self._call("resize_tty", container_id, exec_id, rows, cols)
        self.process(container_id, exec_id).tty = (rows, cols)

    async def stats(self, container_id: str) -> ContainerStats:
        self._call("stats", container_id)
        self.process(container_id)
        return self.stats_result

    async def pause(self, container_id: str) -> None:
        self._call("pause", container_id)
        self.process(container_id)
        self.paused.add(container_id)

    async def resume(self, container_id: str) -> None:
        self._call("resume", container_id)
        self.paused.discard(container_id)

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        self._call("update", container_id, resources)
        self.process(container_id)
        self.resources.setdefault(container_id, []).append(resources)

    async def list_processes(self, container_id: str) -> list[ProcessInfo]:
        self._call("list_processes", container_id)
        self.process(container_id)
        return [ProcessInfo(p.pid, eid) for (cid, eid), p in self.procs.items()
                if cid == container_id and p.running]


# -- the hypervisor ---------------------------------------------------------------------


class FakeChannel(AgentChannel):
    async def connect(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise errors.Unavailable("the fake hypervisor has no agent channel (use FakeAgent)")


class FakeHypervisor(Hypervisor):
    """A VM that is only bookkeeping: start/stop/wait, pause, hotplug."""

    name = "fake"

    def __init__(self, spec: VMSpec | None = None, *, pid: int = 4242) -> None:
        super().__init__(spec or VMSpec(id="fake", run_dir=Path("/nonexistent/fake-vm"),
                                        kernel=Path("/nonexistent/vmlinux"), vcpus=1,
                                        max_vcpus=4, memory_mib=512, max_memory_mib=2048))
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.running = False
        self.paused = False
        self.exit_code = 0
        self._pid = pid
        self._exited = asyncio.Event()
        self.blocks: dict[str, Path] = {}
        self.memory_added_mib = 0
        self.saveable_reason: str | None = None  # None: as saveable() works it out
        self.vmstate = b"fake VM state\n"  # what save_to writes
        self.loaded = b""  # what load read
        self.failures: dict[str, list[BaseException]] = {}  # method -> what it raises next

    @property
    def pid(self) -> int | None:
        return self._pid if self.running else None

    async def start(self) -> None:
        self.calls.append(("start", ()))
        if self.running:
            raise errors.FailedPrecondition("fake VM already running")
        self.running = True

    async def stop(self, timeout: float = 5.0) -> None:
        self.calls.append(("stop", (timeout,)))
        self.running = False
        self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        return self.exit_code

    def die(self, code: int = -9) -> None:
        """The VMM ends by itself (killed, or its guest went down): ``wait``
        returns ``code`` (negative: the signal)."""
        self.calls.append(("die", (code,)))
        self.running = False
        self.exit_code = code
        self._exited.set()

    def agent_channel(self) -> AgentChannel:
        return FakeChannel()

    async def pause(self) -> None:
        self.calls.append(("pause", ()))
        self.paused = True

    async def resume(self) -> None:
        self.calls.append(("resume", ()))
        self.paused = False

    # -- checkpoint: as QEMU 7.2 answers (no virtio-fs, RAM in a file) ---------------
    def saveable(self) -> str:
        if self.saveable_reason is not None:
            return self.saveable_reason
        if self.spec.shared_fs_socket is not None:
            return ("its VM has a virtio-fs device (QEMU 7.2 cannot save vhost-user-fs);"
                    " use shared_fs = \"none\" with guest-pulled images")
        if self.spec.memory_file is None:
            return "its VM's RAM is not in a file"
        return ""

    async def save_to(self, fd: int) -> None:
        self.calls.append(("save_to", ()))
        self._fail("save_to")
        self.paused = True
        os.write(fd, self.vmstate)

    async def load(self, fd: int) -> None:
        self.calls.append(("load", ()))
        self._fail("load")
        self.loaded = os.pread(fd, 1 << 20, 0)
        self.paused = True

    async def checkpoint_info(self) -> dict[str, Any]:
        self.calls.append(("checkpoint_info", ()))
        return {"vmm": "fake", "plugged": []}

    def _fail(self, method: str) -> None:
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)

    async def hotplug_vcpus(self, total: int) -> int:
        self.calls.append(("hotplug_vcpus", (total,)))
        self.spec.vcpus = min(total, self.spec.max_vcpus)
        return self.spec.vcpus

    async def hotplug_memory(self, size_mib: int) -> int:
        self.calls.append(("hotplug_memory", (size_mib,)))
        self.memory_added_mib += size_mib
        return size_mib

    async def hotplug_block(self, drive_id: str, path: Path, readonly: bool = False,
                            serial: str = "") -> str:
        self.calls.append(("hotplug_block", (drive_id, path, readonly, serial)))
        self.blocks[drive_id] = path
        return f"fake-pci/{len(self.blocks)}"

    async def unplug_block(self, drive_id: str, timeout: float = 20.0) -> None:
        self.calls.append(("unplug_block", (drive_id,)))
        self.blocks.pop(drive_id, None)


# -- the sandbox ------------------------------------------------------------------------


class FakeTree(_Recorder):
    """The shared tree, without mounts: records what is shared and unshared."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.mounts = root / "mounts"
        self.shared: dict[str, tuple[Path, bool]] = {}  # mount point -> (source, readonly)

    def share(self, source: Path, rel: str, readonly: bool, *, recursive: bool = True,
              recursive_ro: bool = False, receive: bool = False) -> tuple[str, list[str]]:
        self._call("share", source, rel, readonly)
        if not source.exists():
            raise errors.InvalidArgument(f"mount source {source} does not exist")
        point = str(self.mounts / rel)
        self.shared[point] = (source, readonly)
        return point, [rel]

    def unshare(self, points: list[str]) -> list[str]:
        self._call("unshare", list(points))
        for p in points:
            self.shared.pop(p, None)
        return []

    def clear(self, rel: str) -> list[str]:
        self._call("clear", rel)
        prefix = str(self.mounts / rel) + "/"
        for p in [p for p in self.shared if p.startswith(prefix)]:
            del self.shared[p]
        return []

    def setup(self) -> None:
        self._call("setup")

    def teardown(self) -> list[str]:
        self._call("teardown")
        self.shared.clear()
        return []


class FakeDriver(Driver):
    """A hypervisor driver whose VMs are FakeHypervisors (``made``, in order)."""

    name = "fake"
    accel = "fake"

    def __init__(self) -> None:
        self.made: list[FakeHypervisor] = []

    def vm(self, spec: VMSpec) -> Hypervisor:
        vm = FakeHypervisor(spec, pid=4242)
        self.made.append(vm)
        return vm


def fake_parts(agent: FakeAgent, driver: FakeDriver | None = None) -> Parts:
    """What a real ``Sandbox`` is built from, faked: VMs from a FakeDriver, the
    agent ``agent`` (whatever VM dials it), a FakeTree, no virtiofsd."""

    async def connect(vm: Hypervisor, timeout: float, call_timeout: float) -> FakeAgent:
        await agent.check(timeout=timeout)
        if isinstance(vm, FakeHypervisor):
            agent.vm = vm  # the guest sees what is plugged into this VM
        return agent

    return Parts(driver=driver or FakeDriver(), connect=connect, tree=FakeTree,
                 virtiofsd=False)


def fake_config(state_dir: Path, config: Config | None = None, *,
                in_place: bool = False) -> Config:
    """``config`` (default: the built-in one) with its state under ``state_dir``
    and no pod network: a copy, or ``config`` itself changed if ``in_place``."""
    cfg = Config() if config is None else config if in_place else copy.deepcopy(config)
    cfg.runtime.state_dir = str(state_dir)
    cfg.runtime.internetworking_model = "none"
    return cfg


class FakeSandbox(Sandbox):
    """The real ``Sandbox`` built from fakes (``fake_parts``), counting its
    persists and resource fits; ``fake_agent`` and ``fake_vm`` are its fakes."""

    def __init__(self, sandbox_id: str, config: Config, namespace: str = DEFAULT_NAMESPACE,
                 parts: Parts | None = None) -> None:
        super().__init__(sandbox_id, config, namespace, parts)
        self.persisted = 0
        self.fitted = 0
        self.booted: list[tuple[str, tuple[Any, ...]]] = []  # the agent calls of create()

    @classmethod
    async def running(cls, sandbox_id: str = "sb", *, state_dir: Path,
                      agent: FakeAgent | None = None, config: Config | None = None,
                      namespace: str = DEFAULT_NAMESPACE, hostname: str = "",
                      netns: str = "", in_place: bool = False,
                      annotations: Mapping[str, str] | None = None) -> FakeSandbox:
        """``Sandbox.create`` over fakes, state under ``state_dir`` (``config``
        copied, or changed itself if ``in_place``). The calls that brought it up
        are cleared from the fakes' records."""
        sb = await cls.create(sandbox_id, fake_config(state_dir, config, in_place=in_place),
                              hostname=hostname, netns=netns, namespace=namespace,
                              parts=fake_parts(agent or FakeAgent()), annotations=annotations)
        assert isinstance(sb, FakeSandbox)
        sb.booted = list(sb.fake_agent.calls)
        sb.fake_agent.calls.clear()
        sb.fake_vm.calls.clear()
        sb.fake_tree.calls.clear()
        return sb

    @property
    def fake_agent(self) -> FakeAgent:
        assert isinstance(self._agent, FakeAgent)
        return self._agent

    @property
    def fake_tree(self) -> FakeTree:
        assert isinstance(self.tree, FakeTree)
        return self.tree

    @property
    def fake_vm(self) -> FakeHypervisor:
        assert isinstance(self.vm, FakeHypervisor)
        return self.vm

    def persist(self) -> None:
        self.persisted += 1
        super().persist()

    async def fit_resources(self) -> None:
        self.fitted += 1
        await super().fit_resources()


class FakeSandboxFactory(_Recorder):
    """``Sandbox.create`` for the shim: each call makes a real Sandbox over fakes
    (a FakeSandbox; all share ``agent``), its state under ``state_dir``;
    ``fail("create", exc)`` makes the next one fail to boot."""

    def __init__(self, state_dir: Path, agent: FakeAgent | None = None) -> None:
        super().__init__()
        self.state_dir = state_dir
        self.agent = agent or FakeAgent()
        self.made: list[FakeSandbox] = []

    async def __call__(self, sandbox_id: str, config: Config, *, hostname: str = "",
                       netns: str = "", namespace: str = DEFAULT_NAMESPACE,
                       annotations: Mapping[str, str] | None = None) -> FakeSandbox:
        self._call("create", sandbox_id, {"hostname": hostname, "netns": netns,
                                          "namespace": namespace})
        sb = await FakeSandbox.running(sandbox_id, state_dir=self.state_dir, agent=self.agent,
                                       config=config, namespace=namespace, hostname=hostname,
                                       netns=netns, in_place=True, annotations=annotations)
        self.made.append(sb)
        return sb


    async def restore(self, sandbox_id: str, config: Config, ckpt: Path, *, netns: str = "",
                      namespace: str = DEFAULT_NAMESPACE) -> FakeSandbox:
        """``Sandbox.restore`` over fakes (sharing ``agent``), state under ``state_dir``."""
        self._call("restore", sandbox_id, {"checkpoint": str(ckpt), "netns": netns,
                                           "namespace": namespace})
        sb = await FakeSandbox.restore(sandbox_id, fake_config(self.state_dir, config,
                                                               in_place=True),
                                       ckpt, netns=netns, namespace=namespace,
                                       parts=fake_parts(self.agent))
        assert isinstance(sb, FakeSandbox)
        self.made.append(sb)
        return sb


class FakeIO:
    """A process's stdio relay (runtime.types.ProcessIO) that only records. With
    ``hold_drain`` its drain waits until ``release()``: a test sees the exit is
    not final before the output is delivered."""

    def __init__(self, stdio: Stdio | None = None, *, hold_drain: bool = False) -> None:
        self._stdio = stdio or Stdio()
        self.events: list[str] = []  # "start", "drain", "close_stdin", "stop"
        self._released = asyncio.Event()
        if not hold_drain:
            self._released.set()

    @property
    def stdio(self) -> Stdio:
        return self._stdio

    def release(self) -> None:
        self._released.set()

    def start(self) -> None:
        self.events.append("start")

    async def drain(self) -> None:
        await self._released.wait()
        self.events.append("drain")

    async def close_stdin(self) -> None:
        self.events.append("close_stdin")

    async def stop(self) -> None:
        self.events.append("stop")


class FakePublisher:
    """The shim's event publisher (shim/events.py): events in the order published."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []

    def publish(self, topic: str, event: Message) -> None:
        event.SerializeToString()  # what the real one does on the wire
        self.events.append((topic, event))

    @property
    def topics(self) -> list[str]:
        return [t for t, _ in self.events]

    def last(self, topic: str) -> Message:
        for t, e in reversed(self.events):
            if t == topic:
                return e
        raise AssertionError(f"no {topic} event in {self.topics}")
