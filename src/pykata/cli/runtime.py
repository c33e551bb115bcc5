"""`pykata-runtime`: a runc-compatible OCI runtime command line.

Each container has a state directory ``<root>/<id>/`` and a keeper: the pykata
shim serving containerd.task.v2.Task on ``<root>/<id>/task.sock``, which owns
the VM, so the container outlives every CLI call. A host "stand-in" process
(:mod:`pykata.cli.standin`) carries the container's stdio and exit status; its
pid is what ``--pid-file`` and ``state`` report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import any_pb2, empty_pb2

from pykata import errors
from pykata.cli.rtclient import call, socket_of
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt

PROG = "pykata-runtime"
DEFAULT_ROOT = "/run/pykata-runtime"
NAMESPACE = "pykata-runtime"
OCI_VERSION = "1.0.2"
CREATE_TIMEOUT = 180.0
STATUS_NAMES = {tt.CREATED: "created", tt.RUNNING: "running", tt.STOPPED: "stopped",
                tt.PAUSED: "paused"}


class CLIError(Exception):
    """A user-facing error: one line on stderr, exit 1."""


# -- logging ------------------------------------------------------------------------------
class Log:
    def __init__(self, path: str = "", fmt: str = "text", debug: bool = False) -> None:
        self.path, self.fmt, self.debug_on = path, fmt, debug

    def write(self, level: str, msg: str) -> None:
        if not self.path:
            return
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now})
        else:
            line = f'time="{now}" level={level} msg={json.dumps(msg)}'
        with contextlib.suppress(OSError), open(self.path, "a") as f:
            f.write(line + "\n")

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self.write("debug", msg)


LOG = Log()


# -- signals ------------------------------------------------------------------------------
def parse_signal(text: str) -> int:
    """`TERM`, `SIGTERM`, `sigterm`, `15` -> 15."""
    t = text.strip()
    if t.isdigit():
        n = int(t)
        if 0 < n < 65:
            return n
        raise CLIError(f"invalid signal: {text}")
    name = t.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CLIError(f"unknown signal \"{text}\"") from None


# -- argument parsing --------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def _global_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    d: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--root", "-root", default=d if suppress else DEFAULT_ROOT)
    p.add_argument("--log", "-log", default=d if suppress else "")
    p.add_argument("--log-format", "-log-format", dest="log_format",
                   choices=("text", "json"), default=d if suppress else "text")
    p.add_argument("--debug", "-debug", action="store_true",
                   default=argparse.SUPPRESS if suppress else False)
    p.add_argument("--systemd-cgroup", "-systemd-cgroup", dest="systemd_cgroup",
                   action="store_true", default=argparse.SUPPRESS if suppress else False)
    p.add_argument("--rootless", default=d if suppress else "")
    p.add_argument("--criu", default=d if suppress else "")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=True)
    _global_flags(p, suppress=False)
    p.add_argument("--version", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def cmd(name: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name)
        _global_flags(sp, suppress=True)
        return sp

    def create_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", "-b", default="")
        sp.add_argument("--pid-file", dest="pid_file", default="")
        sp.add_argument("--console-socket", dest="console_socket", default="")
        sp.add_argument("--no-pivot", dest="no_pivot", action="store_true")
        sp.add_argument("--no-new-keyring", dest="no_new_keyring", action="store_true")
        sp.add_argument("--preserve-fds", dest="preserve_fds", type=int, default=0)
        sp.add_argument("id")

    create_flags(cmd("create"))
    sp = cmd("run")
    sp.add_argument("--detach", "-d", action="store_true")
    sp.add_argument("--keep", action="store_true")
    create_flags(sp)
    for name in ("start", "pause", "resume"):
        cmd(name).add_argument("id")
    sp = cmd("state")
    sp.add_argument("id")
    sp = cmd("kill")
    sp.add_argument("--all", "-a", action="store_true")
    sp.add_argument("id")
    sp.add_argument("signal", nargs="?", default="TERM")
    sp = cmd("delete")
    sp.add_argument("--force", "-f", action="store_true")
    sp.add_argument("id")
    sp = cmd("exec")
    sp.add_argument("--process", "-p", default="")
    sp.add_argument("--tty", "-t", action="store_true")
    sp.add_argument("--detach", "-d", action="store_true")
    sp.add_argument("--pid-file", dest="pid_file", default="")
    sp.add_argument("--console-socket", dest="console_socket", default="")
    sp.add_argument("--cwd", default="")
    sp.add_argument("--env", "-e", action="append", default=[])
    sp.add_argument("--user", "-u", default="")
    sp.add_argument("--additional-gids", "-g", dest="additional_gids", action="append",
                    default=[])
    sp.add_argument("--process-label", dest="process_label", default="")
    sp.add_argument("--apparmor", default="")
    sp.add_argument("--no-new-privs", dest="no_new_privs", action="store_true")
    sp.add_argument("--cap", "-c", action="append", default=[])
    sp.add_argument("--preserve-fds", dest="preserve_fds", type=int, default=0)
    sp.add_argument("--ignore-paused", dest="ignore_paused", action="store_true")
    sp.add_argument("id")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = cmd("ps")
    sp.add_argument("--format", "-f", choices=("table", "json"), default="table")
    sp.add_argument("id")
    sp.add_argument("ps_args", nargs=argparse.REMAINDER)
    sp = cmd("list")
    sp.add_argument("--format", "-f", choices=("table", "json"), default="table")
    sp.add_argument("--quiet", "-q", action="store_true")
    sp = cmd("update")
    sp.add_argument("--resources", "-r", default="")
    sp.add_argument("id")
    sp = cmd("events")
    sp.add_argument("--stats", action="store_true")
    sp.add_argument("--interval", default="5s")
    sp.add_argument("id")
    sp = cmd("spec")
    sp.add_argument("--bundle", "-b", default="")
    cmd("features")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# -- state -----------------------------------------------------------------------------------
def state_dir(root: str, cid: str) -> Path:
    if not cid or "/" in cid or cid in (".", ".."):
        raise CLIError(f"invalid container id {cid!r}")
    return Path(root) / cid


def existing(root: str, cid: str) -> Path:
    d = state_dir(root, cid)
    if not (d / "meta.json").exists():
        raise CLIError(f"container \"{cid}\" does not exist")
    return d


def load_meta(d: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((d / "meta.json").read_text())
        return data
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read state of {d.name}: {exc}") from exc


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def task_status(d: Path, cid: str) -> str:
    try:
        resp = call(d, "State", pb.StateRequest(id=cid), pb.StateResponse, timeout=10)
    except errors.PykataError:
        return "stopped"
    return STATUS_NAMES.get(resp.status, "stopped")


def oci_state(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    status = task_status(d, meta["id"])
    pid = int(meta.get("pid", 0))
    if status == "stopped" or not pid_alive(pid):
        pid = 0
        if status != "stopped" and not pid_alive(int(meta.get("pid", 0))):
            status = "stopped"
    return {"ociVersion": OCI_VERSION, "id": meta["id"], "pid": pid, "status": status,
            "bundle": meta.get("bundle", ""), "rootfs": meta.get("rootfs", ""),
            "created": meta.get("created", ""), "owner": "",
            "annotations": meta.get("annotations") or {}}


# -- bundle validation (before any VM starts) -------------------------------------------
def read_bundle(bundle: Path) -> dict[str, Any]:
    cfg = bundle / "config.json"
    try:
        spec = json.loads(cfg.read_text())
    except FileNotFoundError:
        raise CLIError(f"bundle {bundle}: config.json not found") from None
    except (OSError, ValueError) as exc:
        raise CLIError(f"bundle {bundle}: invalid config.json: {exc}") from exc
    if not isinstance(spec, dict):
        raise CLIError(f"bundle {bundle}: invalid config.json: not a JSON object")
    proc = spec.get("process")
    if not isinstance(proc, dict) or not proc.get("args"):
        raise CLIError(f"bundle {bundle}: config.json has no process.args")
    root = spec.get("root")
    if not isinstance(root, dict) or not root.get("path"):
        raise CLIError(f"bundle {bundle}: config.json has no root.path")
    rootfs = Path(root["path"])
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    if not rootfs.is_dir():
        raise CLIError(f"bundle {bundle}: root filesystem {rootfs} does not exist")
    return spec


# -- processes -----------------------------------------------------------------------------
def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _terminate(pid: int, grace: float = 5.0) -> None:
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)


def spawn_keeper(d: Path, cid: str, debug: bool) -> int:
    from pykata.shim.main import spawn_server

    (d / "log").touch()
    env = dict(os.environ)
    env.pop("TTRPC_ADDRESS", None)  # no containerd to publish events to
    try:
        pid = spawn_server(socket_of(d), cwd=d, namespace=NAMESPACE, address=str(d),
                           publish_binary="", shim_id=cid, debug=debug, env=env)
    except OSError as exc:
        raise CLIError(f"cannot bind {socket_of(d)}: {exc}") from exc
    (d / "keeper.pid").write_text(str(pid))
    return pid


def make_fifos(fdir: Path) -> None:
    fdir.mkdir(parents=True, exist_ok=True)
    for name in ("stdin", "stdout", "stderr"):
        os.mkfifo(fdir / name, 0o600)


def spawn_standin(d: Path, cid: str, exec_id: str, fdir: Path, terminal: bool,
                  console_socket: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "pykata.cli.standin", str(d), cid, exec_id, str(fdir),
            "1" if terminal else "0"]
    if console_socket:
        argv.append(console_socket)
    return subprocess.Popen(argv, close_fds=True)


def write_pid_file(path: str, pid: int) -> None:
    if not path:
        return
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(str(pid))
    tmp.rename(p)


def destroy(d: Path, cid: str) -> None:
    """Tear down everything of a container: task, VM, keeper, stand-in, state."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(CLIError):
        meta = load_meta(d)
    with contextlib.suppress(errors.PykataError):
        call(d, "Shutdown", pb.ShutdownRequest(id=cid, now=True), empty_pb2.Empty, timeout=60)
    keeper = 0
    with contextlib.suppress(OSError, ValueError):
        keeper = int((d / "keeper.pid").read_text())
    if keeper and not _wait_gone(keeper, 30.0):
        _terminate(keeper)
    standin = int(meta.get("pid", 0) or 0)
    with contextlib.suppress(OSError, ValueError):
        standin = standin or int((d / "standin.pid").read_text())
    if standin and pid_alive(standin) and not _wait_gone(standin, 2.0):
        _terminate(standin, 1.0)
    # Whatever the keeper could not stop (it was killed): VMM, virtiofsd, mounts.
    import asyncio

    from pykata import config
    from pykata.runtime.sandbox import cleanup

    with contextlib.suppress(Exception):
        asyncio.run(cleanup(config.load().runtime.state_dir, cid, NAMESPACE, force=True))
    with contextlib.suppress(FileNotFoundError):
        socket_of(d).unlink()
    shutil.rmtree(d, ignore_errors=True)


# -- commands -----------------------------------------------------------------------------
def do_create(a: argparse.Namespace) -> int:
    bundle = Path(a.bundle or os.getcwd()).resolve()
    spec = read_bundle(bundle)
    d = state_dir(a.root, a.id)
    if d.exists():
        raise CLIError(f"container with id exists: {a.id}")
    terminal = bool(spec["process"].get("terminal"))
    if terminal and not a.console_socket:
        raise CLIError("cannot allocate tty if runc will detach without setting console socket")
    Path(a.root).mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        d.mkdir(mode=0o711)
    except FileExistsError:
        raise CLIError(f"container with id exists: {a.id}") from None
    standin: subprocess.Popen[bytes] | None = None
    try:
        keeper = spawn_keeper(d, a.id, a.debug)
        fdir = d / "io"
        make_fifos(fdir)
        standin = spawn_standin(d, a.id, "", fdir, terminal, a.console_socket)
        (d / "standin.pid").write_text(str(standin.pid))
        LOG.debug(f"create {a.id}: keeper {keeper}, stand-in {standin.pid}")
        req = pb.CreateTaskRequest(id=a.id, bundle=str(bundle), terminal=terminal,
                                   stdin=str(fdir / "stdin"), stdout=str(fdir / "stdout"),
                                   stderr="" if terminal else str(fdir / "stderr"))
        call(d, "Create", req, pb.CreateTaskResponse, timeout=CREATE_TIMEOUT)
        root = Path(spec["root"]["path"])
        meta = {"id": a.id, "bundle": str(bundle), "pid": standin.pid, "keeper": keeper,
                "rootfs": str(root if root.is_absolute() else bundle / root),
                "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "annotations": spec.get("annotations") or {}, "terminal": terminal}
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.rename(d / "meta.json")
        write_pid_file(a.pid_file, standin.pid)
    except BaseException:
        if standin is not None:
            with contextlib.suppress(ProcessLookupError):
                standin.kill()
            with contextlib.suppress(Exception):
                standin.wait(5)
        destroy(d, a.id)
        raise
    return 0


def do_start(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    status = task_status(d, a.id)
    if status != "created":
        raise CLIError(f"cannot start a container that has {status}" if status == "stopped"
                       else f"cannot start an already {status} container")
    call(d, "Start", pb.StartRequest(id=a.id), pb.StartResponse, timeout=60)
    return 0


def do_run(a: argparse.Namespace) -> int:
    do_create(a)
    d = state_dir(a.root, a.id)
    try:
        do_start(a)
    except BaseException:
        destroy(d, a.id)
        raise
    if a.detach:
        return 0
    pid = int(load_meta(d)["pid"])
    code = 255
    with contextlib.suppress(ChildProcessError):
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
    if not a.keep:
        destroy(d, a.id)
    return code


def do_state(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    print(json.dumps(oci_state(d, load_meta(d)), indent=2))
    return 0


def do_kill(a: argparse.Namespace) -> int:
    sig = parse_signal(a.signal)
    d = existing(a.root, a.id)
    status = task_status(d, a.id)
    if status == "stopped" and not a.all and sig != signal.SIGKILL:
        raise CLIError("container not running")
    try:
        call(d, "Kill", pb.KillRequest(id=a.id, signal=sig, all=a.all), empty_pb2.Empty,
             timeout=30)
    except errors.NotFound as exc:
        if sig != signal.SIGKILL:
            raise CLIError(f"container not running: {exc}") from exc
    except errors.Unavailable:
        if sig != signal.SIGKILL:
            raise CLIError("container not running") from None
    return 0


def do_delete(a: argparse.Namespace) -> int:
    d = state_dir(a.root, a.id)
    if not d.exists():
        if a.force:
            return 0
        raise CLIError(f"container \"{a.id}\" does not exist")
    status = task_status(d, a.id)
    if status in ("running", "paused") and not a.force:
        raise CLIError(f"cannot delete container {a.id} that is not stopped: {status}")
    if status in ("running", "paused"):
        with contextlib.suppress(errors.PykataError):
            call(d, "Kill", pb.KillRequest(id=a.id, signal=signal.SIGKILL, all=True),
                 empty_pb2.Empty, timeout=30)
        deadline = time.monotonic() + 20
        while task_status(d, a.id) != "stopped" and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(errors.PykataError):
        call(d, "Delete", pb.DeleteRequest(id=a.id), pb.DeleteResponse, timeout=60)
    destroy(d, a.id)
    return 0


def _exec_spec(a: argparse.Namespace, d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if a.process:
        try:
            text = sys.stdin.read() if a.process == "-" else Path(a.process).read_text()
            proc: dict[str, Any] = json.loads(text)
        except (OSError, ValueError) as exc:
            raise CLIError(f"invalid --process {a.process}: {exc}") from exc
        if a.tty:
            proc["terminal"] = True
        return proc
    args = list(a.args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise CLIError("exec: no command given (args or --process)")
    base: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError):
        base = json.loads((Path(meta["bundle"]) / "config.json").read_text())["process"]
    proc = {"terminal": a.tty, "args": args, "env": list(base.get("env") or []),
            "cwd": a.cwd or base.get("cwd") or "/",
            "user": dict(base.get("user") or {"uid": 0, "gid": 0})}
    for kv in a.env:
        key = kv.split("=", 1)[0]
        proc["env"] = [e for e in proc["env"] if e.split("=", 1)[0] != key] + [kv]
    if a.user:
        uid, _, gid = a.user.partition(":")
        try:
            proc["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise CLIError(f"invalid --user {a.user}: want uid[:gid]") from None
    if a.additional_gids:
        proc["user"]["additionalGids"] = [int(g) for g in a.additional_gids]
    return proc


def do_exec(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    meta = load_meta(d)
    proc = _exec_spec(a, d, meta)
    if a.cwd:
        proc["cwd"] = a.cwd
    terminal = bool(proc.get("terminal"))
    if terminal and a.detach and not a.console_socket:
        raise CLIError("cannot allocate tty if runc will detach without setting console socket")
    status = task_status(d, a.id)
    if status != "running":
        raise CLIError(f"cannot exec in a container that is {status}")
    exec_id = "exec-" + secrets.token_hex(6)
    fdir = d / exec_id
    make_fifos(fdir)
    standin = spawn_standin(d, a.id, exec_id, fdir, terminal, a.console_socket)
    try:
        req = pb.ExecProcessRequest(
            id=a.id, exec_id=exec_id, terminal=terminal, stdin=str(fdir / "stdin"),
            stdout=str(fdir / "stdout"), stderr="" if terminal else str(fdir / "stderr"),
            spec=any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                             value=json.dumps(proc).encode()))
        call(d, "Exec", req, empty_pb2.Empty, timeout=30)
        try:
            call(d, "Start", pb.StartRequest(id=a.id, exec_id=exec_id), pb.StartResponse,
                 timeout=60)
        except BaseException:
            with contextlib.suppress(errors.PykataError):
                call(d, "Delete", pb.DeleteRequest(id=a.id, exec_id=exec_id),
                     pb.DeleteResponse, timeout=10)
            raise
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            standin.kill()
        standin.wait(5)
        shutil.rmtree(fdir, ignore_errors=True)
        raise
    write_pid_file(a.pid_file, standin.pid)
    if a.detach:
        return 0
    code = standin.wait()
    shutil.rmtree(fdir, ignore_errors=True)
    return 128 - code if code < 0 else code


def do_ps(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    resp = call(d, "Pids", pb.PidsRequest(id=a.id), pb.PidsResponse, timeout=30)
    pids = [p.pid for p in resp.processes]
    if a.format == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for p in pids:
            print(p)
    return 0


def do_list(a: argparse.Namespace) -> int:
    root = Path(a.root)
    items = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "meta.json").exists():
                with contextlib.suppress(CLIError):
                    items.append(oci_state(d, load_meta(d)))
    if a.quiet:
        for s in items:
            print(s["id"])
    elif a.format == "json":
        print(json.dumps(items))
    else:
        print(f"{'ID':<24}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}{'CREATED':<32}OWNER")
        for s in items:
            print(f"{s['id']:<24}{s['pid']:<10}{s['status']:<10}{s['bundle']:<40}"
                  f"{s['created']:<32}root")
    return 0


def do_pause(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    call(d, "Pause", pb.PauseRequest(id=a.id), empty_pb2.Empty, timeout=30)
    return 0


def do_resume(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    call(d, "Resume", pb.ResumeRequest(id=a.id), empty_pb2.Empty, timeout=30)
    return 0


def do_update(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    if not a.resources:
        raise CLIError("update: --resources FILE|- is required")
    try:
        text = sys.stdin.read() if a.resources == "-" else Path(a.resources).read_text()
        json.loads(text)
    except (OSError, ValueError) as exc:
        raise CLIError(f"invalid resources {a.resources}: {exc}") from exc
    req = pb.UpdateTaskRequest(id=a.id, resources=any_pb2.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=text.encode()))
    call(d, "Update", req, empty_pb2.Empty, timeout=30)
    return 0


def _duration(text: str) -> float:
    t = text.strip()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix) and t[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(t[:-len(suffix)]) * mult
    try:
        return float(t)
    except ValueError:
        raise CLIError(f"invalid interval {text}") from None


def do_events(a: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from pykata.protos import cgroups_v2_metrics_pb2 as m2

    d = existing(a.root, a.id)
    interval = max(0.05, _duration(a.interval))
    while task_status(d, a.id) != "stopped":
        if a.stats:
            try:
                resp = call(d, "Stats", pb.StatsRequest(id=a.id), pb.StatsResponse, timeout=30)
            except errors.PykataError:
                break
            metrics = m2.Metrics()
            resp.stats.Unpack(metrics)
            data = json_format.MessageToDict(metrics, preserving_proto_field_name=True)
            print(json.dumps({"type": "stats", "id": a.id, "data": data}), flush=True)
            if not getattr(a, "_loop", True):
                break
        time.sleep(interval)
    return 0


def do_spec(a: argparse.Namespace) -> int:
    from pykata.testing.bundles import default_spec

    path = Path(a.bundle or ".") / "config.json"
    if path.exists():
        raise CLIError(f"File {path} exists. Remove it first")
    spec = default_spec(["sh"], hostname="pykata", terminal=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return 0


def do_features(_a: argparse.Namespace) -> int:
    from pykata import __version__

    print(json.dumps({
        "ociVersionMin": "1.0.0", "ociVersionMax": OCI_VERSION,
        "hooks": [], "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
        "linux": {"namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
                  "cgroup": {"v1": True, "v2": True, "systemd": False},
                  "seccomp": {"enabled": False}},
        "annotations": {"io.github.pykata.version": __version__,
                        "io.github.pykata.isolation": "vm"},
    }, indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": do_create, "start": do_start, "run": do_run, "state": do_state,
    "kill": do_kill, "delete": do_delete, "exec": do_exec, "ps": do_ps, "list": do_list,
    "pause": do_pause, "resume": do_resume, "update": do_update, "events": do_events,
    "spec": do_spec, "features": do_features,
}


def _fail(msg: str) -> int:
    line = " ".join(msg.split()) or "unknown error"
    print(f"{PROG}: {line}", file=sys.stderr)
    LOG.write("error", line)
    return 1


def _prescan_log(args: list[str]) -> None:
    """--log and --log-format even when the command line does not parse."""
    for i, arg in enumerate(args):
        for flag in ("log", "log-format"):
            for prefix in (f"--{flag}", f"-{flag}"):
                value = ""
                if arg == prefix and i + 1 < len(args):
                    value = args[i + 1]
                elif arg.startswith(prefix + "="):
                    value = arg.split("=", 1)[1]
                if value and flag == "log":
                    LOG.path = value
                elif value:
                    LOG.fmt = value


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(args)
    except CLIError as exc:
        _prescan_log(args)
        return _fail(str(exc).replace("invalid choice", "unknown command"))
    LOG.path, LOG.fmt, LOG.debug_on = a.log, a.log_format, a.debug
    if a.version:
        from pykata import __version__

        print(f"{PROG} version {__version__}\nspec: {OCI_VERSION}")
        return 0
    if not a.command:
        return _fail("no command given (see --help)")
    LOG.debug(f"{a.command}: {' '.join(args)}")
    try:
        return COMMANDS[a.command](a)
    except CLIError as exc:
        return _fail(str(exc))
    except errors.PykataError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
