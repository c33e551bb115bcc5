"""The host's OCI spec -> the spec crun runs in the guest: pure, unit-tested.

The host already rewrote ``root.path`` and bind-mount sources to guest paths.
Here the agent drops what means nothing inside the VM (namespace paths of the
host, the network namespace, host hooks), puts the container in its own guest
cgroup, and joins the sandbox's pid namespace when asked.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from pykata import wire
from pykata.errors import FailedPrecondition, InvalidArgument

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """Container and exec ids name files and cgroups: a safe charset only."""
    if not _ID_RE.match(value):
        raise InvalidArgument(
            f"invalid {kind} id {value!r}: use letters, digits, '_', '.', '+', '-'"
            " (at most 128, not starting with a symbol)")
    return value


def load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"invalid {what}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"invalid {what}: a JSON object is expected")
    return obj


def validate_process(proc: Any, what: str = "process") -> dict[str, Any]:
    if not isinstance(proc, dict):
        raise InvalidArgument(f"invalid OCI spec: '{what}' is missing")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(f"invalid OCI spec: {what}.args must be a non-empty list of strings")
    cwd = proc.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"invalid OCI spec: {what}.cwd must be an absolute path")
    env = proc.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) for e in env):
        raise InvalidArgument(f"invalid OCI spec: {what}.env must be a list of strings")
    if not isinstance(proc.get("terminal", False), bool):
        raise InvalidArgument(f"invalid OCI spec: {what}.terminal must be a boolean")
    return proc


def validate(spec: dict[str, Any]) -> None:
    """Reject what crun would reject, with one line saying what is wrong."""
    validate_process(spec.get("process"))
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise InvalidArgument("invalid OCI spec: root.path is missing")
    if not root["path"].startswith("/"):
        raise InvalidArgument(
            f"invalid OCI spec: root.path {root['path']!r} must be an absolute guest path")
    mounts = spec.get("mounts", []) or []
    if not isinstance(mounts, list):
        raise InvalidArgument("invalid OCI spec: mounts must be a list")
    for m in mounts:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise InvalidArgument(f"invalid OCI spec: bad mount entry {m!r}")
    linux = spec.get("linux", {})
    if linux is not None and not isinstance(linux, dict):
        raise InvalidArgument("invalid OCI spec: linux must be an object")
    namespaces = (linux or {}).get("namespaces") or []
    if not isinstance(namespaces, list):
        raise InvalidArgument("invalid OCI spec: linux.namespaces must be a list")
    for ns in namespaces:
        if not isinstance(ns, dict) or not isinstance(ns.get("type"), str) or not isinstance(
                ns.get("path", ""), str):
            raise InvalidArgument(f"invalid OCI spec: bad linux.namespaces entry {ns!r:.200}")


def terminal(proc: dict[str, Any]) -> bool:
    return bool(proc.get("terminal", False))


# The host's marker for "the pod sandbox container's namespace" (pykata.wire).
SANDBOX_NS_MARKER = wire.SANDBOX_NS_MARKER


def guest_spec(
    spec: dict[str, Any],
    container_id: str,
    cgroup_parent: str,
    pidns_path: str | None = None,
    sandbox_ns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The spec to write into the guest bundle (``spec`` is not modified).

    ``sandbox_ns`` maps a namespace type (ipc, uts) to the pod sandbox
    container's namespace, for entries the host marked SANDBOX_NS_MARKER."""
    out = copy.deepcopy(spec)
    # Host hooks ran (or will run) on the host; the container engine runs these two.
    hooks = out.pop("hooks", None)
    guest = ("createContainer", "startContainer")
    if isinstance(hooks, dict) and any(hooks.get(k) for k in guest):
        out["hooks"] = {k: v for k, v in hooks.items() if k in guest}
    linux = out.get("linux")
    if not isinstance(linux, dict):
        linux = {}
        out["linux"] = linux
    namespaces = []
    for ns in linux.get("namespaces", []) or []:
        if not isinstance(ns, dict):
            continue
        kind = ns.get("type")
        if kind == "network":
            # Containers share the VM's network namespace: it is the pod network.
            continue
        entry = {"type": kind}
        if kind == "pid" and pidns_path:
            entry["path"] = pidns_path
        elif ns.get("path") == SANDBOX_NS_MARKER:
            if kind not in (sandbox_ns or {}):
                raise FailedPrecondition(
                    f"container {container_id} joins the pod's {kind} namespace, but the"
                    " pod has no running sandbox container")
            entry["path"] = (sandbox_ns or {})[kind]
        # Any other path is a host path: meaningless here, the container gets its own.
        namespaces.append(entry)
    if pidns_path and not any(ns["type"] == "pid" for ns in namespaces):
        namespaces.append({"type": "pid", "path": pidns_path})
    linux["namespaces"] = namespaces
    sysctl = linux.get("sysctl")
    if isinstance(sysctl, dict) and any(k.startswith("net.") for k in sysctl):
        # Without its own network namespace crun refuses net.* sysctls; they are
        # the pod network's, which the agent sets on the VM (network_sysctls).
        linux["sysctl"] = {k: v for k, v in sysctl.items() if not k.startswith("net.")}
    parent = "/" + cgroup_parent.strip("/") if cgroup_parent.strip("/") else ""
    linux["cgroupsPath"] = f"{parent}/{container_id}"
    return out


def network_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """The spec's net.* sysctls: they apply to the pod network, i.e. the VM's."""
    sysctl = (spec.get("linux") or {}).get("sysctl") or {}
    if not isinstance(sysctl, dict):
        return {}
    return {str(k): str(v) for k, v in sysctl.items() if str(k).startswith("net.")}
