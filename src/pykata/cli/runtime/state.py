"""A container's state directory ``<root>/<id>/``: ``meta.json`` (what
``state`` reports), the keeper's and stand-in's process refs (pid + start
time, so a recycled pid is never signalled), and the OCI state, asked of the
keeper."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.cli.rtclient import call
from pykata.cli.runtime.base import OCI_VERSION, CLIError
from pykata.protos import containerd_shim_pb2 as pb
from pykata.protos import containerd_task_types_pb2 as tt
from pykata.utils.process import ProcRef

STATUS_NAMES = {tt.CREATED: "created", tt.RUNNING: "running", tt.STOPPED: "stopped",
                tt.PAUSED: "paused"}
META = "meta.json"
KEEPER = "keeper.pid"
STANDIN = "standin.pid"


def state_dir(root: str, cid: str) -> Path:
    if not cid or "/" in cid or cid in (".", ".."):
        raise CLIError(f"invalid container id {cid!r}")
    return Path(root) / cid


def existing(root: str, cid: str) -> Path:
    d = state_dir(root, cid)
    if not (d / META).exists():
        raise CLIError(f"container \"{cid}\" does not exist")
    return d


def load_meta(d: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((d / META).read_text())
        return data
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read state of {d.name}: {exc}") from exc


def save_meta(d: Path, meta: dict[str, Any]) -> None:
    tmp = d / f"{META}.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.rename(d / META)


# -- process refs --------------------------------------------------------------------
def ref_of(pid: int) -> ProcRef:
    """A ref to the running ``pid``; one that is never alive if it is gone already."""
    return ProcRef.of(pid) or ProcRef(pid, -1)


def ref_from(value: object) -> ProcRef | None:
    """A ref as saved ({"pid", "start_time"}); a bare pid (state written by an
    older pykata-runtime) is taken as whatever runs with that pid now."""
    if isinstance(value, dict):
        try:
            return ProcRef.from_json(value)
        except (KeyError, TypeError, ValueError):
            return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return ProcRef.of(value)
    return None


def save_ref(d: Path, name: str, ref: ProcRef) -> None:
    (d / name).write_text(json.dumps(ref.to_json()))


def load_ref(d: Path, name: str) -> ProcRef | None:
    try:
        return ref_from(json.loads((d / name).read_text()))
    except (OSError, ValueError):
        return None


def standin_ref(d: Path, meta: dict[str, Any]) -> ProcRef | None:
    """The stand-in (the pid ``state`` reports), from meta.json or its own file."""
    return ref_from(meta.get("standin")) or ref_from(meta.get("pid")) or load_ref(d, STANDIN)


# -- OCI state -----------------------------------------------------------------------
def task_status(d: Path, cid: str) -> str:
    try:
        resp = call(d, "State", pb.StateRequest(id=cid), pb.StateResponse, timeout=10)
    except errors.PykataError:
        return "stopped"
    return STATUS_NAMES.get(resp.status, "stopped")


def oci_state(d: Path, meta: dict[str, Any]) -> dict[str, Any]:
    status = task_status(d, meta["id"])
    standin = standin_ref(d, meta)
    alive = standin is not None and standin.alive()
    pid = int(meta.get("pid", 0)) if alive else 0
    if status != "stopped" and not alive:
        status = "stopped"
    if status == "stopped":
        pid = 0
    return {"ociVersion": OCI_VERSION, "id": meta["id"], "pid": pid, "status": status,
            "bundle": meta.get("bundle", ""), "rootfs": meta.get("rootfs", ""),
            "created": meta.get("created", ""), "owner": "",
            "annotations": meta.get("annotations") or {}}


def write_pid_file(path: str, pid: int) -> None:
    if not path:
        return
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(str(pid))
    tmp.rename(p)
