"""containerd's task API (protobuf) <-> the runtime's own types, in one place.

Rules:
- An exit status goes out as containerd's uint32 takes it: ``uint32(status)``,
  as its runc shim does (``exit_code``); the guest may report -1 or anything an
  int32 holds.
- A guest-reported exit time outside [year 2000, now + a day] is replaced by
  the host's clock (``_exit_ts``): protobuf does not check it, containerd would
  show nonsense.
- Every pid containerd sees is the VM's (the shim's "task pid"); guest pids
  mean nothing on the host.
- Status: a process whose exit is final is STOPPED; otherwise the init reports
  its container's state (CREATING counts as CREATED), an exec its own.
- JSON that containerd sends (exec process spec, resources) that does not parse
  is InvalidArgument.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import any_pb2, timestamp_pb2

from pykata import config, errors
from pykata.config import Config
from pykata.protos import cgroups_v2_metrics_pb2 as m2
from pykata.protos import containerd_events_pb2 as ev
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt
from pykata.protos import runtimeoptions_pb2 as rtopts
from pykata.runtime.container import Container, Process
from pykata.runtime.types import ContainerStats, ExitStatus, ProcessInfo, State, Stdio
from pykata.shim import rootfs
from pykata.shim.events import pack_any

_STATUS = {
    State.CREATING: tt.CREATED, State.CREATED: tt.CREATED, State.RUNNING: tt.RUNNING,
    State.PAUSED: tt.PAUSED, State.STOPPED: tt.STOPPED,
}

# Guest-reported exit times outside [year 2000, now + a day] are replaced by the
# host's clock.
_MIN_EXIT_NS = 946_684_800 * 10**9
_MAX_EXIT_SKEW_NS = 86_400 * 10**9


def exit_code(code: int) -> int:
    """An exit status as containerd's uint32 field takes it: ``uint32(status)``, as
    its runc shim does. The guest may report -1 or anything an int32 holds."""
    return code & 0xFFFFFFFF


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    if ns:
        t.FromNanoseconds(ns)
    return t


def _exit_ts(status: ExitStatus | None) -> timestamp_pb2.Timestamp:
    if status is None:
        return _ts(0)
    ns = status.exited_at_ns
    if ns and not _MIN_EXIT_NS <= ns <= time.time_ns() + _MAX_EXIT_SKEW_NS:
        ns = time.time_ns()
    return _ts(ns)


# -- requests -> runtime ------------------------------------------------------------------


class _StdioRequest(Protocol):
    stdin: str
    stdout: str
    stderr: str
    terminal: bool


def stdio(req: _StdioRequest) -> Stdio:
    """The fifos of a CreateTaskRequest or an ExecProcessRequest."""
    return Stdio(req.stdin, req.stdout, req.stderr, req.terminal)


def rootfs_mounts(mounts: Iterable[Any]) -> list[rootfs.Mount]:
    """containerd.types.Mount entries (the snapshot) as the shim mounts them."""
    return [rootfs.Mount(m.type, m.source, tuple(m.options)) for m in mounts]


def runtime_config(options: any_pb2.Any) -> Config | None:
    """The configuration named by CRI runtime options or ``ctr run
    --runtime-config-path`` (``ConfigPath``, or an inline body); None if none."""
    if not options.type_url.endswith("runtimeoptions.v1.Options"):
        return None
    opts = rtopts.Options.FromString(options.value)
    if opts.config_path:
        return config.load(Path(opts.config_path))
    if opts.config_body:
        return config.parse(opts.config_body.decode(), "runtime options")
    return None


def _json(value: bytes, what: str) -> dict[str, Any]:
    """``what``: "exec spec is", "resources are"."""
    try:
        data = json.loads(value) if value else {}
    except ValueError as exc:
        raise errors.InvalidArgument(f"{what} not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"{what} not a JSON object")
    return data


def exec_spec(req: pb.ExecProcessRequest) -> dict[str, Any]:
    """The OCI process of an Exec, its ``terminal`` as the request says."""
    spec = _json(req.spec.value, "exec spec is")
    spec["terminal"] = req.terminal
    return spec


def resources(req: pb.UpdateTaskRequest) -> dict[str, Any]:
    """The OCI linux.resources of an Update."""
    return _json(req.resources.value, "resources are")


# -- runtime -> responses -----------------------------------------------------------------


def status(c: Container, proc: Process) -> tt.Status:
    if proc.exit is not None:
        return tt.STOPPED
    return _STATUS[proc.state if proc.exec_id else c.state]


def state_response(c: Container, proc: Process, pid: int) -> pb.StateResponse:
    io = proc.stdio
    ex = proc.exit
    return pb.StateResponse(
        id=c.id, bundle=str(c.bundle), pid=pid, status=status(c, proc), stdin=io.stdin,
        stdout=io.stdout, stderr=io.stderr, terminal=io.terminal,
        exit_status=exit_code(ex.code) if ex else 0,
        exited_at=_exit_ts(ex) if ex else None, exec_id=proc.exec_id)


def wait_response(ex: ExitStatus) -> pb.WaitResponse:
    return pb.WaitResponse(exit_status=exit_code(ex.code), exited_at=_exit_ts(ex))


def delete_response(ex: ExitStatus | None, pid: int) -> pb.DeleteResponse:
    """Of an exec: its exit (zero time if it never ran)."""
    return pb.DeleteResponse(pid=pid, exit_status=exit_code(ex.code) if ex else 0,
                             exited_at=_exit_ts(ex))


def _deleted(ex: ExitStatus | None) -> tuple[int, timestamp_pb2.Timestamp]:
    """A deleted task's status and time: its exit, else 0 and now."""
    if ex is None:
        return 0, _ts(time.time_ns())
    return exit_code(ex.code), _exit_ts(ex)


def task_delete_response(ex: ExitStatus | None, pid: int) -> pb.DeleteResponse:
    code, at = _deleted(ex)
    return pb.DeleteResponse(pid=pid, exit_status=code, exited_at=at)


def pids_response(procs: Sequence[ProcessInfo]) -> pb.PidsResponse:
    out = []
    for p in procs:
        info = pack_any(runcopts.ProcessDetails(exec_id=p.exec_id)) if p.exec_id else None
        out.append(tt.ProcessInfo(pid=p.pid, info=info))
    return pb.PidsResponse(processes=out)


def stats_response(s: ContainerStats) -> pb.StatsResponse:
    return pb.StatsResponse(stats=pack_any(metrics_v2(s)))


def metrics_v2(s: ContainerStats) -> m2.Metrics:
    mem = s.memory
    return m2.Metrics(
        pids=m2.PidsStat(current=s.pids_current, limit=s.pids_limit),
        cpu=m2.CPUStat(usage_usec=s.cpu.usage_ns // 1000, user_usec=s.cpu.user_ns // 1000,
                       system_usec=s.cpu.kernel_ns // 1000, nr_periods=s.cpu.periods,
                       nr_throttled=s.cpu.throttled_periods,
                       throttled_usec=s.cpu.throttled_time_ns // 1000),
        memory=m2.MemoryStat(
            usage=mem.usage, usage_limit=mem.limit, max_usage=mem.max_usage,
            file=mem.stats.get("file", mem.cache), anon=mem.stats.get("anon", 0),
            kernel_stack=mem.stats.get("kernel_stack", 0), slab=mem.stats.get("slab", 0),
            sock=mem.stats.get("sock", 0), shmem=mem.stats.get("shmem", 0),
            file_mapped=mem.stats.get("file_mapped", 0), file_dirty=mem.stats.get("file_dirty", 0),
            pgfault=mem.stats.get("pgfault", 0), pgmajfault=mem.stats.get("pgmajfault", 0),
            inactive_anon=mem.stats.get("inactive_anon", 0),
            active_anon=mem.stats.get("active_anon", 0),
            inactive_file=mem.stats.get("inactive_file", 0),
            active_file=mem.stats.get("active_file", 0),
        ),
    )


# -- events -------------------------------------------------------------------------------


def create_event(req: pb.CreateTaskRequest, pid: int) -> ev.TaskCreate:
    return ev.TaskCreate(
        container_id=req.id, bundle=req.bundle, rootfs=list(req.rootfs),
        io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr,
                     terminal=req.terminal),
        checkpoint=req.checkpoint, pid=pid)


def exit_event(proc: Process, pid: int) -> ev.TaskExit:
    """A process's final exit (``proc.exit`` is set)."""
    assert proc.exit is not None
    cid = proc.container.id
    return ev.TaskExit(container_id=cid, id=proc.exec_id or cid, pid=pid,
                       exit_status=exit_code(proc.exit.code), exited_at=_exit_ts(proc.exit))


def delete_event(c: Container, ex: ExitStatus | None, pid: int) -> ev.TaskDelete:
    code, at = _deleted(ex)
    return ev.TaskDelete(container_id=c.id, pid=pid, exit_status=code, exited_at=at, id=c.id)
