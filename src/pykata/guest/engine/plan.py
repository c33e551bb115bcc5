"""OCI spec -> Plan: everything the forked child will do, decided (and
checked) in the agent before any fork. Pure: no system calls, unit-tested.

What the engine does not implement is refused here with an
``InvalidArgument`` naming the spec field, never ignored: user and time
namespaces, idmapped mounts, host hooks (the host runs prestart, createRuntime,
poststart and poststop; the engine runs createContainer and startContainer),
AppArmor/SELinux labels (the guest has
neither), personality, scheduler, I/O priority, CPU affinity, Intel RDT,
seccomp notify, cgroup v1-only resources, non-namespaced sysctls, and any
field of ``process``/``linux``/``root``/top level the engine does not know.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pykata.errors import InvalidArgument
from pykata.guest import sysutil
from pykata.guest.engine import caps as capsmod
from pykata.guest.engine import cgroup as cgmod
from pykata.guest.engine import devices as devmod
from pykata.guest.engine import mounts as mountmod
from pykata.guest.engine import seccomp as seccompmod
from pykata.wire import HOOK_STATE_ANNOTATION

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# OCI namespace type -> (clone flag, /proc/PID/ns name)
NAMESPACES: dict[str, tuple[int, str]] = {
    "pid": (CLONE_NEWPID, "pid"), "network": (CLONE_NEWNET, "net"),
    "ipc": (CLONE_NEWIPC, "ipc"), "uts": (CLONE_NEWUTS, "uts"),
    "mount": (CLONE_NEWNS, "mnt"), "cgroup": (CLONE_NEWCGROUP, "cgroup"),
}
# Joined in this order; mount last (after it, /proc paths are the container's).
JOIN_ORDER = ("ipc", "uts", "network", "cgroup", "mount")

RLIMITS = {name: i for i, name in enumerate((
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME"))}
RLIM_INFINITY = 2**64 - 1

_TOP_FIELDS = {"ociVersion", "process", "root", "hostname", "domainname", "mounts", "linux",
               "annotations", "hooks"}
_LINUX_FIELDS = {"namespaces", "devices", "cgroupsPath", "resources", "rootfsPropagation",
                 "seccomp", "sysctl", "maskedPaths", "readonlyPaths", "uidMappings",
                 "gidMappings", "mountLabel", "intelRdt", "personality", "timeOffsets"}
_PROCESS_FIELDS = {"terminal", "consoleSize", "user", "args", "env", "cwd", "capabilities",
                   "rlimits", "noNewPrivileges", "apparmorProfile", "oomScoreAdj",
                   "selinuxLabel", "ioPriority", "scheduler", "execCPUAffinity",
                   "commandLine"}
_USER_FIELDS = {"uid", "gid", "umask", "additionalGids", "username"}
_PROPAGATION = {"private": sysutil.MS_PRIVATE, "rprivate": sysutil.MS_PRIVATE | sysutil.MS_REC,
                "slave": sysutil.MS_SLAVE, "rslave": sysutil.MS_SLAVE | sysutil.MS_REC,
                "shared": sysutil.MS_SHARED, "rshared": sysutil.MS_SHARED | sysutil.MS_REC,
                "unbindable": sysutil.MS_UNBINDABLE,
                "runbindable": sysutil.MS_UNBINDABLE | sysutil.MS_REC}
# Sysctls a container may set: the ones its own namespaces scope.
_IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The hooks the engine runs, and the state's status while each runs (runc's).
HOOK_STATUS = {"createContainer": "creating", "startContainer": "created"}
HOOK_TIMEOUT = 120.0  # a hook without a timeout still ends (as on the host)


def refuse(field_name: str, why: str = "") -> InvalidArgument:
    return InvalidArgument(f"unsupported OCI spec: {field_name}"
                           + (f" ({why})" if why else "") + " is not supported by the guest"
                           " container engine")


def _set(value: Any) -> bool:
    return value not in (None, "", [], {}, 0, False)


def _check_fields(obj: dict[str, Any], known: set[str], base: str) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise refuse(f"{base}.{extra[0]}" if base else extra[0])


def _uint(value: Any, field_name: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"invalid OCI spec: {field_name} must be a non-negative integer")
    return value


@dataclass(frozen=True)
class ProcessPlan:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    umask: int = 0o022
    caps: capsmod.CapSets = field(default_factory=capsmod.CapSets)
    no_new_privs: bool = False
    rlimits: tuple[tuple[int, int, int], ...] = ()
    oom_score_adj: int | None = None
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # rows, cols


@dataclass(frozen=True)
class HookPlan:
    """One createContainer or startContainer hook (``hooks.<kind>[i]``)."""

    kind: str
    name: str  # hooks.createContainer[0]
    path: str  # in the container's root filesystem
    args: tuple[str, ...]  # argv, args[0] first (the path if the spec gives none)
    env: tuple[tuple[str, str], ...]
    timeout: float


@dataclass(frozen=True)
class Plan:
    rootfs: str
    process: ProcessPlan
    readonly_root: bool = False
    propagation: int = 0  # rootfsPropagation (0: none given)
    new_ns: int = 0  # clone flags to unshare in the child (never CLONE_NEWPID)
    join_ns: tuple[tuple[str, str], ...] = ()  # (OCI type, path), JOIN_ORDER, no pid
    pid_ns: str | None = None  # "new", a path to join, or None (the agent's)
    ns_types: tuple[str, ...] = ()  # every namespace type the container has of its own
    mounts: tuple[mountmod.Mount, ...] = ()
    nodes: tuple[devmod.Node, ...] = ()
    dev_tmpfs: bool = False  # /dev is a fresh tmpfs: default nodes and links are made
    masked: tuple[str, ...] = ()
    readonly: tuple[str, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    hostname: str | None = None
    domainname: str | None = None
    cgroup_path: str = ""  # linux.cgroupsPath, relative to the cgroup root
    cgroup_writes: tuple[tuple[str, str], ...] = ()
    device_rules: tuple[devmod.Rule, ...] = ()
    seccomp: seccompmod.Profile | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    hooks: tuple[HookPlan, ...] = ()
    # What a hook's state says besides status and pid: ociVersion, id, bundle,
    # annotations (the host's, from HOOK_STATE_ANNOTATION).
    hook_state: dict[str, Any] = field(default_factory=dict)


def process_plan(proc: Any, field_name: str = "process",
                 last_cap: int = capsmod.LAST_KNOWN) -> ProcessPlan:
    if not isinstance(proc, dict):
        raise InvalidArgument(f"invalid OCI spec: '{field_name}' is missing")
    _check_fields(proc, _PROCESS_FIELDS, field_name)
    for name in ("apparmorProfile", "selinuxLabel"):
        if _set(proc.get(name)):
            raise refuse(f"{field_name}.{name}", "the guest kernel has no such LSM enabled")
    for name in ("ioPriority", "scheduler", "execCPUAffinity", "commandLine"):
        if _set(proc.get(name)):
            raise refuse(f"{field_name}.{name}")
    args = proc.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument(
            f"invalid OCI spec: {field_name}.args must be a non-empty list of strings")
    env: dict[str, str] = {}
    for e in proc.get("env") or []:
        if not isinstance(e, str):
            raise InvalidArgument(f"invalid OCI spec: {field_name}.env must be strings")
        k, sep, v = e.partition("=")
        if not sep or not k:
            raise InvalidArgument(
                f"invalid OCI spec: {field_name}.env entry {e!r} is not NAME=VALUE")
        env[k] = v
    cwd = proc.get("cwd") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"invalid OCI spec: {field_name}.cwd must be an absolute path")
    user = proc.get("user") or {}
    if not isinstance(user, dict):
        raise InvalidArgument(f"invalid OCI spec: {field_name}.user must be an object")
    _check_fields(user, _USER_FIELDS, f"{field_name}.user")
    if _set(user.get("username")):
        raise refuse(f"{field_name}.user.username", "Windows only")
    groups = user.get("additionalGids") or []
    if not isinstance(groups, list):
        raise InvalidArgument(f"invalid OCI spec: {field_name}.user.additionalGids")
    umask = user.get("umask")
    rlimits = []
    for i, r in enumerate(proc.get("rlimits") or []):
        f = f"{field_name}.rlimits[{i}]"
        if not isinstance(r, dict) or r.get("type") not in RLIMITS:
            kind = r.get("type") if isinstance(r, dict) else r
            raise refuse(f"{f}.type", f"unknown rlimit {kind!r}")
        soft, hard = _uint(r.get("soft"), f"{f}.soft"), _uint(r.get("hard"), f"{f}.hard")
        if soft > hard:
            raise InvalidArgument(f"invalid OCI spec: {f}: soft {soft} is above hard {hard}")
        rlimits.append((RLIMITS[r["type"]], min(soft, RLIM_INFINITY), min(hard, RLIM_INFINITY)))
    oom = proc.get("oomScoreAdj")
    if oom is not None and (isinstance(oom, bool) or not isinstance(oom, int)
                            or not -1000 <= oom <= 1000):
        raise InvalidArgument(f"invalid OCI spec: {field_name}.oomScoreAdj must be -1000..1000")
    size = proc.get("consoleSize")
    console = None
    if isinstance(size, dict) and (size.get("height") or size.get("width")):
        console = (_uint(size.get("height"), f"{field_name}.consoleSize.height"),
                   _uint(size.get("width"), f"{field_name}.consoleSize.width"))
    terminal = proc.get("terminal", False)
    if not isinstance(terminal, bool):
        raise InvalidArgument(f"invalid OCI spec: {field_name}.terminal must be a boolean")
    return ProcessPlan(
        args=tuple(args), env=env, cwd=posixpath.normpath(cwd),
        uid=_uint(user.get("uid"), f"{field_name}.user.uid"),
        gid=_uint(user.get("gid"), f"{field_name}.user.gid"),
        groups=tuple(_uint(g, f"{field_name}.user.additionalGids") for g in groups),
        umask=0o022 if umask is None else _uint(umask, f"{field_name}.user.umask") & 0o777,
        caps=capsmod.cap_sets(proc.get("capabilities"), f"{field_name}.capabilities", last_cap),
        no_new_privs=bool(proc.get("noNewPrivileges", False)),
        rlimits=tuple(rlimits), oom_score_adj=oom, terminal=terminal, console_size=console)


def _paths(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) and p.startswith("/")
                                              for p in value):
        raise InvalidArgument(f"invalid OCI spec: {field_name} must be absolute paths")
    return tuple(posixpath.normpath(p) for p in value)


def _sysctls(value: Any, ns_types: set[str]) -> tuple[tuple[str, str], ...]:
    if not value:
        return ()
    if not isinstance(value, dict):
        raise InvalidArgument("invalid OCI spec: linux.sysctl must be an object")
    out = []
    for key, v in value.items():
        k = str(key).replace("/", ".")
        f = f"linux.sysctl.{k}"
        if k in _IPC_SYSCTLS or k.startswith("fs.mqueue."):
            if "ipc" not in ns_types:
                raise refuse(f, "needs an ipc namespace of the container's own or the pod's")
        elif k in ("kernel.hostname", "kernel.domainname"):
            if "uts" not in ns_types:
                raise refuse(f, "needs a uts namespace")
        elif k.startswith("net."):
            raise refuse(f, "net.* sysctls are the pod network's and set on the VM")
        else:
            raise refuse(f, "not a namespaced sysctl")
        if ".." in k.split("."):
            raise InvalidArgument(f"invalid OCI spec: {f}")
        out.append((k, str(v)))
    return tuple(out)


def _hooks(value: Any) -> tuple[HookPlan, ...]:
    """createContainer and startContainer; any other kind is the host's."""
    if not value:
        return ()
    if not isinstance(value, dict):
        raise InvalidArgument("invalid OCI spec: hooks must be an object")
    out = []
    for kind, entries in value.items():
        if kind not in HOOK_STATUS:
            if entries:
                raise refuse(f"hooks.{kind}", "the host runs it")
            continue
        if not isinstance(entries, list):
            raise InvalidArgument(f"invalid OCI spec: hooks.{kind} must be a list")
        for i, e in enumerate(entries):
            name = f"hooks.{kind}[{i}]"
            if not isinstance(e, dict):
                raise InvalidArgument(f"invalid OCI spec: {name} must be an object")
            _check_fields(e, {"path", "args", "env", "timeout"}, name)
            path = e.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidArgument(f"invalid OCI spec: {name}.path must be an absolute path")
            args, env = e.get("args") or [], e.get("env") or []
            for f, v in (("args", args), ("env", env)):
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise InvalidArgument(
                        f"invalid OCI spec: {name}.{f} must be a list of strings")
            timeout = e.get("timeout")
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                        or timeout <= 0):
                raise InvalidArgument(f"invalid OCI spec: {name}.timeout must be a positive"
                                      " integer")
            pairs = tuple((k, v) for k, sep, v in (x.partition("=") for x in env) if sep and k)
            out.append(HookPlan(kind, name, posixpath.normpath(path),
                                tuple(args) or (path,), pairs,
                                float(timeout) if timeout else HOOK_TIMEOUT))
    return tuple(out)


def _hook_state(spec: dict[str, Any], annotations: dict[str, str],
                container_id: str) -> dict[str, Any]:
    """The state's fixed part (the host's bundle and ociVersion when it sent them)."""
    try:
        host = json.loads(annotations.pop(HOOK_STATE_ANNOTATION, "") or "{}")
    except ValueError:
        host = {}
    if not isinstance(host, dict):
        host = {}
    return {"ociVersion": str(host.get("ociVersion") or spec.get("ociVersion") or ""),
            "id": container_id, "bundle": str(host.get("bundle") or ""),
            "annotations": dict(annotations)}


def hook_timeout(p: Plan, kind: str) -> float:
    """How long the ``kind`` hooks may take together."""
    return sum(h.timeout for h in p.hooks if h.kind == kind)


def plan(spec: dict[str, Any], last_cap: int = capsmod.LAST_KNOWN,
         container_id: str = "") -> Plan:
    """The container's plan; InvalidArgument (one line, naming the field) if refused."""
    _check_fields(spec, _TOP_FIELDS, "")
    hooks = _hooks(spec.get("hooks"))
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) \
            or not root["path"].startswith("/"):
        raise InvalidArgument("invalid OCI spec: root.path must be an absolute guest path")
    _check_fields(root, {"path", "readonly"}, "root")
    linux = spec.get("linux") or {}
    if not isinstance(linux, dict):
        raise InvalidArgument("invalid OCI spec: linux must be an object")
    _check_fields(linux, _LINUX_FIELDS, "linux")
    for name in ("uidMappings", "gidMappings"):
        if _set(linux.get(name)):
            raise refuse(f"linux.{name}", "user namespaces")
    for name in ("timeOffsets", "intelRdt", "personality"):
        if _set(linux.get(name)):
            raise refuse(f"linux.{name}")
    if _set(linux.get("mountLabel")):
        raise refuse("linux.mountLabel", "the guest kernel has no SELinux")

    new_ns = 0
    join: dict[str, str] = {}
    pid_ns: str | None = None
    types: list[str] = []
    for i, ns in enumerate(linux.get("namespaces") or []):
        f = f"linux.namespaces[{i}]"
        kind = ns.get("type") if isinstance(ns, dict) else None
        if kind == "user":
            raise refuse(f"{f}.type 'user'", "user namespaces")
        if kind not in NAMESPACES:
            raise refuse(f"{f}.type {kind!r}", "unknown namespace type")
        if kind in types:
            raise InvalidArgument(f"invalid OCI spec: {f}: namespace {kind} given twice")
        _check_fields(ns, {"type", "path"}, f)
        types.append(kind)
        path = ns.get("path") or ""
        if path and not path.startswith("/"):
            raise InvalidArgument(f"invalid OCI spec: {f}.path must be absolute")
        if kind == "pid":
            pid_ns = path or "new"
        elif path:
            join[kind] = path
        else:
            new_ns |= NAMESPACES[kind][0]
    if "mount" not in types:
        raise refuse("linux.namespaces", "a container without its own mount namespace")
    if "mount" in join:
        raise refuse("linux.namespaces mount path", "joining another mount namespace")

    proc = process_plan(spec.get("process"), "process", last_cap)
    mounts = tuple(mountmod.parse_mount(m, i) for i, m in enumerate(spec.get("mounts") or []))
    nodes = devmod.parse_nodes(linux.get("devices"))
    res = linux.get("resources") or {}
    if not isinstance(res, dict):
        raise InvalidArgument("invalid OCI spec: linux.resources must be an object")
    writes = cgmod.resource_writes(res)
    rules = devmod.effective_rules(devmod.parse_rules(res.get("devices")), nodes)
    prop = linux.get("rootfsPropagation") or ""
    if prop and prop not in _PROPAGATION:
        raise InvalidArgument(f"invalid OCI spec: linux.rootfsPropagation {prop!r}")
    cg = linux.get("cgroupsPath") or ""
    if not isinstance(cg, str) or not cg.strip("/") or ":" in cg \
            or any(p in (".", "..") for p in cg.split("/")):
        raise InvalidArgument(f"invalid OCI spec: linux.cgroupsPath {cg!r} (a path under the"
                              " guest's cgroup root is expected)")
    hostname = spec.get("hostname") or None
    domainname = spec.get("domainname") or None
    if (hostname or domainname) and "uts" not in types:
        raise InvalidArgument("invalid OCI spec: hostname needs a uts namespace")
    dev_tmpfs = any(m.destination == "/dev" and not m.bind for m in mounts)
    raw = spec.get("annotations") or {}
    if not isinstance(raw, dict):
        raise InvalidArgument("invalid OCI spec: annotations must be an object")
    annotations = {str(k): str(v) for k, v in raw.items()}
    hook_state = _hook_state(spec, annotations, container_id)
    return Plan(
        rootfs=posixpath.normpath(root["path"]), process=proc,
        readonly_root=bool(root.get("readonly", False)), propagation=_PROPAGATION.get(prop, 0),
        new_ns=new_ns, join_ns=tuple((k, join[k]) for k in JOIN_ORDER if k in join),
        pid_ns=pid_ns, ns_types=tuple(types), mounts=mounts,
        nodes=tuple([*(devmod.DEFAULT_NODES if dev_tmpfs else ()), *nodes]),
        dev_tmpfs=dev_tmpfs,
        masked=_paths(linux.get("maskedPaths"), "linux.maskedPaths"),
        readonly=_paths(linux.get("readonlyPaths"), "linux.readonlyPaths"),
        sysctl=_sysctls(linux.get("sysctl"), set(types)),
        # A joined uts namespace is the pod's: its hostname is already set.
        hostname=hostname if "uts" not in join else None,
        domainname=domainname if "uts" not in join else None,
        cgroup_path=cg.strip("/"), cgroup_writes=tuple(writes), device_rules=tuple(rules),
        seccomp=seccompmod.parse(linux.get("seccomp")),
        annotations=annotations, hooks=hooks, hook_state=hook_state if hooks else {})
