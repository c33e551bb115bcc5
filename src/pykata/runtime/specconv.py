"""Host OCI spec -> the spec the guest agent runs: pure, unit-tested.

The container's root filesystem and every host bind mount are reached in the
guest through the sandbox's virtio-fs share, so their paths are rewritten to
paths below GUEST_SHARED_DIR, and the host side is told which bind mounts to
make below the shared directory.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata.errors import InvalidArgument
from pykata.resources.sharedfs import GUEST_SHARED_DIR

# Mount types the guest makes itself; everything else with a host source is shared.
GUEST_LOCAL_TYPES = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm"}


# Annotations that say which containers form a pod (CRI and CRI-O).
CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
CRIO_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX = "io.kubernetes.cri-o.SandboxID"


def is_pod_sandbox(spec: dict[str, Any]) -> bool:
    """The spec is a pod's sandbox (infra/pause) container."""
    ann = spec.get("annotations") or {}
    return ann.get(CRI_TYPE) == "sandbox" or ann.get(CRIO_TYPE) == "sandbox"


def joins_pid_namespace(spec: dict[str, Any]) -> bool:
    """The spec joins an existing pid namespace (a pod with a shared pid namespace)."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return any(ns.get("type") == "pid" and ns.get("path") for ns in namespaces)


@dataclass(frozen=True)
class HostMount:
    """A bind mount the host makes below the sandbox's shared directory."""

    source: Path  # host path
    target: str  # relative to the shared directory
    readonly: bool = False


def validate(spec: Any, bundle: Path) -> None:
    """Reject specs the guest could not run, with a line saying what is wrong."""
    if not isinstance(spec, dict):
        raise InvalidArgument("invalid OCI spec: config.json must hold a JSON object")
    if not isinstance(spec.get("ociVersion", ""), str):
        raise InvalidArgument("invalid OCI spec: ociVersion must be a string")
    proc = spec.get("process")
    if not isinstance(proc, dict):
        raise InvalidArgument("invalid OCI spec: 'process' is missing")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("invalid OCI spec: process.args must be a non-empty list of strings")
    if not isinstance(proc.get("cwd", "/"), str) or not proc.get("cwd", "/").startswith("/"):
        raise InvalidArgument("invalid OCI spec: process.cwd must be an absolute path")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise InvalidArgument("invalid OCI spec: root.path is missing")
    rootfs = rootfs_path(spec, bundle)
    if not rootfs.is_dir():
        raise InvalidArgument(f"container root filesystem {rootfs} does not exist")
    for m in spec.get("mounts", []) or []:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise InvalidArgument(f"invalid OCI spec: bad mount entry {m!r}")
        if not m["destination"].startswith("/"):
            raise InvalidArgument(
                f"invalid OCI spec: mount destination {m['destination']!r} is not absolute"
            )


def rootfs_path(spec: dict[str, Any], bundle: Path) -> Path:
    p = Path(spec["root"]["path"])
    return p if p.is_absolute() else bundle / p


def _is_bind(m: dict[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") in ("bind", "none", None, "") and (
        "bind" in opts or "rbind" in opts or m.get("type") == "bind"
    )


def guest_spec(spec: dict[str, Any], container_id: str,
               bundle: Path) -> tuple[dict[str, Any], list[HostMount]]:
    """The spec for the agent, and the host bind mounts it relies on."""
    out = copy.deepcopy(spec)
    base = f"{GUEST_SHARED_DIR}/{container_id}"
    out["root"]["path"] = f"{base}/rootfs"
    host: list[HostMount] = [HostMount(rootfs_path(spec, bundle), f"{container_id}/rootfs")]
    mounts = []
    for i, m in enumerate(out.get("mounts", []) or []):
        src = m.get("source", "")
        if m.get("type") in GUEST_LOCAL_TYPES or not _is_bind(m) or not src:
            mounts.append(m)
            continue
        if src.startswith("/dev/") or src == "/dev":
            # Host devices are not passed into the VM.
            continue
        src_path = Path(src) if os.path.isabs(src) else bundle / src
        name = f"{i}-{src_path.name or 'root'}"
        readonly = "ro" in (m.get("options") or [])
        host.append(HostMount(src_path, f"{container_id}/mounts/{name}", readonly))
        m = dict(m)
        m["source"] = f"{base}/mounts/{name}"
        m["type"] = "bind"
        mounts.append(m)
    out["mounts"] = mounts
    # Hooks run on the host, never in the guest.
    out.pop("hooks", None)
    linux = out.get("linux")
    if isinstance(linux, dict):
        namespaces = linux.setdefault("namespaces", [])
        for ns in namespaces:
            ns.pop("path", None)
        # The guest runs cgroup v2: give the container its own cgroup view, as
        # containerd does on v2 hosts (a v1 host's spec has no cgroup namespace).
        if not any(ns.get("type") == "cgroup" for ns in namespaces):
            namespaces.append({"type": "cgroup"})
    return out, host
