"""``exec``: a process in a running container, from ``--process`` (an OCI
process JSON) or from the command line over the container's own process
(env, cwd, user), with a stand-in carrying its stdio and exit status."""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2

from pykata import errors
from pykata.cli.rtclient import call
from pykata.cli.runtime.base import CLIError
from pykata.cli.runtime.keeper import make_fifos, spawn_standin
from pykata.cli.runtime.state import existing, load_meta, task_status, write_pid_file
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime.bundle import load_spec_or_empty


def exec_spec(a: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The OCI process of an ``exec`` command line."""
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
    if meta.get("bundle"):
        found = load_spec_or_empty(meta["bundle"]).get("process")
        base = found if isinstance(found, dict) else {}
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
    proc = exec_spec(a, meta)
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
