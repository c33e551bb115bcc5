"""The commands that change a container: create, start, run, kill, delete,
pause, resume, update. Each is a call to the container's keeper; create and
delete also start and tear down the keeper and the stand-in."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from pykata import config, errors
from pykata.cli.rtclient import call
from pykata.cli.runtime import hookrun
from pykata.cli.runtime.args import parse_signal
from pykata.cli.runtime.base import CREATE_TIMEOUT, LOG, CLIError, now_rfc3339
from pykata.cli.runtime.keeper import destroy, make_fifos, spawn_keeper, spawn_standin
from pykata.cli.runtime.state import (
    STANDIN,
    existing,
    load_meta,
    ref_of,
    save_meta,
    save_ref,
    state_dir,
    task_status,
    write_pid_file,
)
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import specconv
from pykata.runtime.bundle import load_spec


def read_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's spec, checked before any VM starts: it has a command and a
    root filesystem that exists."""
    spec = load_spec(bundle)
    proc = spec.get("process")
    if not isinstance(proc, dict) or not proc.get("args"):
        raise CLIError(f"bundle {bundle}: config.json has no process.args")
    root = spec.get("root")
    if not isinstance(root, dict) or not root.get("path") or not isinstance(root["path"], str):
        raise CLIError(f"bundle {bundle}: config.json has no root.path")
    rootfs = Path(root["path"])
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    if not rootfs.is_dir():
        raise CLIError(f"bundle {bundle}: root filesystem {rootfs} does not exist")
    # A malformed spec, the version, hooks, host namespaces: refused before any
    # process starts (the keeper checks again, with the configured guest engine).
    specconv.validate(spec, bundle)
    specconv.check_spec(spec)
    return spec


def do_create(a: argparse.Namespace) -> int:
    create(a)
    return 0


def create(a: argparse.Namespace, checkpoint: Path | None = None,
           timeout: float = CREATE_TIMEOUT) -> None:
    """``create``; with ``checkpoint``, the container of that checkpoint
    directory (``restore``): its keeper restores the VM, paused, instead of
    booting one. Either way the host hooks prestart and createRuntime run at
    the end (runc's restore runs them too), and nothing is left on error."""
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
        netns = hookrun.make_netns(d) if hookrun.wants_new_netns(spec) else None
        keeper = spawn_keeper(d, a.id, a.debug, netns)
        fdir = d / "io"
        make_fifos(fdir)
        standin = spawn_standin(d, a.id, "", fdir, terminal, a.console_socket, netns)
        standin_ref = ref_of(standin.pid)
        save_ref(d, STANDIN, standin_ref)
        LOG.debug(f"create {a.id}: keeper {keeper.pid}, stand-in {standin.pid}")
        req = pb.CreateTaskRequest(id=a.id, bundle=str(bundle), terminal=terminal,
                                   stdin=str(fdir / "stdin"), stdout=str(fdir / "stdout"),
                                   stderr="" if terminal else str(fdir / "stderr"),
                                   checkpoint=str(checkpoint or ""))
        call(d, "Create", req, pb.CreateTaskResponse, timeout=timeout)
        root = Path(spec["root"]["path"])
        meta = {**hookrun.create_meta(a.id, bundle, spec), "pid": standin.pid,
                "standin": standin_ref.to_json(), "keeper": keeper.to_json(),
                "rootfs": str(root if root.is_absolute() else bundle / root),
                "created": now_rfc3339(), "terminal": terminal,
                # The keeper's configuration: podman calls delete without it.
                "config": os.environ.get(config.ENV_VAR, "")}
        save_meta(d, meta)
        # The container exists (in the VM, its network namespace here): runc runs
        # these now too; a failure fails create and everything goes.
        hookrun.run(meta, ("prestart", "createRuntime"), standin.pid, fail=True)
        write_pid_file(a.pid_file, standin.pid)
    except BaseException:
        if standin is not None:
            with contextlib.suppress(ProcessLookupError):
                standin.kill()
            with contextlib.suppress(Exception):
                standin.wait(5)
        destroy(d, a.id)
        raise


def do_start(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    status = task_status(d, a.id)
    if status != "created":
        # runc's words for each state.
        raise CLIError({"stopped": "cannot start a container that has stopped",
                        "paused": "cannot start a container in the paused state"}.get(
                            status, f"cannot start an already {status} container"))
    call(d, "Start", pb.StartRequest(id=a.id), pb.StartResponse, timeout=60)
    meta = load_meta(d)
    hookrun.run(meta, ("poststart",), int(meta.get("pid", 0)), fail=False)
    return 0


def remove(d: Path, cid: str) -> None:
    """Tear the container down, then its poststop hooks (failures logged)."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(CLIError):
        meta = load_meta(d)
    destroy(d, cid)
    if meta.get("hooks"):
        hookrun.run(meta, ("poststop",), 0, fail=False)


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
    return wait_in_foreground(d, a.id, keep=a.keep)


def wait_in_foreground(d: Path, cid: str, *, keep: bool = False) -> int:
    """runc's run/restore without ``--detach``: the container's exit status (a
    signal as 128 + its number), then it is removed unless ``keep``."""
    pid = int(load_meta(d)["pid"])
    code = 255
    with contextlib.suppress(ChildProcessError):
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code
    if not keep:
        remove(d, cid)
    return code


def do_kill(a: argparse.Namespace) -> int:
    """As the runtime spec says (and runc does): a signal to a container that is
    neither created nor running (nor paused) is an error; ``--all`` on a stopped
    one signals nobody and succeeds."""
    sig = parse_signal(a.signal)
    d = existing(a.root, a.id)
    status = task_status(d, a.id)
    if status == "stopped":
        if a.all:
            return 0
        raise CLIError("container not running")
    try:
        call(d, "Kill", pb.KillRequest(id=a.id, signal=sig, all=a.all), empty_pb2.Empty,
             timeout=30)
    except (errors.NotFound, errors.Unavailable):
        # It stopped between the state and the signal.
        if not a.all:
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
    remove(d, a.id)
    return 0


def do_pause(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    if task_status(d, a.id) != "running":
        raise CLIError("container not running")
    call(d, "Pause", pb.PauseRequest(id=a.id), empty_pb2.Empty, timeout=30)
    return 0


def do_resume(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    if task_status(d, a.id) != "paused":
        raise CLIError("container not paused")
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
