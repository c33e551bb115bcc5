"""Host OCI spec -> the spec the guest agent runs: pure, unit-tested.

How each mount or device of the spec reaches the guest (docs/storage.md):

- the root filesystem and host bind mounts (directories, files) go through the
  sandbox's virtio-fs share: their paths are rewritten to paths below
  GUEST_SHARED_DIR and the host is told which bind mounts to make below the
  shared directory (HostMount); without a shared file system (``shared_fs =
  "none"``) the runtime copies a small regular file to that guest path
  instead, and refuses anything else (runtime/container.py);
- a mount whose source is a host block device (``type: ext4``, ...) becomes a
  hot-plugged disk the agent mounts below GUEST_STORAGE_DIR; the container
  gets a bind of that mount (BlockVolume with a mount point);
- a bind mount of a host block device, and a block device in
  ``linux.devices``, become a hot-plugged disk the container sees as a device
  node; the agent puts the guest's major/minor in (BlockVolume with a
  container path);
- Kubernetes emptyDir volumes (the kubelet's ``kubernetes.io~empty-dir``
  directories) become a directory in the guest shared by the pod's containers,
  or a guest tmpfs of the same size when the host one is a tmpfs (medium:
  Memory); a bind of a host tmpfs on ``/dev/shm`` becomes the pod's guest
  tmpfs of the same size (pod-scoped Storage);
- guest-local mount types (tmpfs, proc, ...) are left to crun in the guest;
  other host devices are not passed into the VM.

What the conversion needs to know about host paths comes from a HostProbe, so
the rules are tested without root, disks or a kubelet.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata.errors import InvalidArgument
from pykata.runtime.types import Storage
from pykata.utils import mounts as host_mounts

# The guest's side of the contract (pykata.wire): where the shared tree is
# mounted (GUEST_SHARED_DIR/<container>/...), per-container mounts of hot-plugged
# disks (GUEST_STORAGE_DIR/<container>/<n>), pod-wide guest volumes
# (GUEST_SANDBOX_DIR: local/<name> emptyDir, ephemeral/<name> memory emptyDir,
# shm the pod's /dev/shm), the option marking a storage the agent mounts once per
# pod and keeps until the sandbox goes (SANDBOX_SCOPE), the namespaces a pod's
# containers share with its sandbox container (POD_SHARED_NAMESPACES) and the
# path that says "the pod sandbox container's" (SANDBOX_NS_MARKER).
from pykata.wire import (
    GUEST_SANDBOX_DIR,
    GUEST_SHARED_DIR,
    GUEST_STORAGE_DIR,
    POD_SHARED_NAMESPACES,
    SANDBOX_NS_MARKER,
    SANDBOX_SCOPE,
)

log = logging.getLogger(__name__)

# ioctl(2) on a namespace file: its CLONE_NEW* type (linux/nsfs.h).
NS_GET_NSTYPE = 0xB703
NS_TYPES = {0x00020000: "mount", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc",
            0x10000000: "user", 0x20000000: "pid", 0x40000000: "network", 0x00000080: "time"}

EMPTY_DIR = re.compile(r"/kubernetes\.io~empty-dir/([^/]+)/*$")
TMPFS_MAGIC = 0x01021994

# Options of a file system mount that also make sense on the container's bind of it.
_BIND_FLAGS = ("nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime")
# Bind-only and propagation options that mean nothing to a file system mount.
_NOT_FS_OPTIONS = {"bind", "rbind", "private", "rprivate", "shared", "rshared", "slave",
                   "rslave", "unbindable", "runbindable", "rro", "rrw"}
_PROPAGATION = ("private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable",
                "runbindable")
# Flags of a host submount its guest bind carries (the guest kernel enforces them).
_SUBMOUNT_FLAGS = ("nosuid", "nodev", "noexec")
# Guest binds made for the submounts of one volume, at most (the rest stay as the
# volume's bind makes them: read-only under a read-only volume).
MAX_SUBMOUNT_BINDS = 64

# Mount types the guest makes itself; everything else with a host source is shared.
GUEST_LOCAL_TYPES = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm"}


# Annotations that say which containers form a pod (CRI and CRI-O).
CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
CRIO_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX = "io.kubernetes.cri-o.SandboxID"



def is_pod_sandbox(spec: dict[str, Any]) -> bool:
    """The spec is a pod's sandbox (infra/pause) container."""
    ann = spec.get("annotations")
    if not isinstance(ann, dict):
        return False
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
    readonly: bool = False  # the top mount (``ro``)
    recursive: bool = True  # with the mounts below the source (``rbind``)
    recursive_ro: bool = False  # every mount read-only (``rro``)
    receive: bool = False  # receives the host's later mounts below it (``rslave``)
    # The spec's mount destination (messages only; "" for the root filesystem).
    destination: str = field(default="", compare=False)


@dataclass(frozen=True)
class BlockVolume:
    """A host block device to hot-plug for the container: mounted by the agent at
    ``mount_point`` (a file system), or the device node at ``container_path``."""

    host_path: Path
    readonly: bool = False
    mount_point: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()
    container_path: str = ""


@dataclass
class GuestPlan:
    """Everything one container needs: the guest spec and what backs its mounts."""

    spec: dict[str, Any]
    host_mounts: list[HostMount] = field(default_factory=list)
    blocks: list[BlockVolume] = field(default_factory=list)
    storages: list[Storage] = field(default_factory=list)  # guest-made, pod-scoped
    ignored: list[str] = field(default_factory=list)  # spec fields dropped with a warning


class HostProbe:
    """What the spec conversion asks about host paths (unit tests use a fake)."""

    def block_rdev(self, path: str) -> int | None:
        """The device number if ``path`` is a block device; None if it is something
        else; FileNotFoundError if it does not exist."""
        st = os.stat(path)
        return st.st_rdev if stat.S_ISBLK(st.st_mode) else None

    def block_device(self, major: int, minor: int) -> Path | None:
        """The host's node for block device major:minor, if there is one."""
        try:
            uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent").read_text()
        except OSError:
            return None
        for line in uevent.splitlines():
            key, _, value = line.partition("=")
            if key == "DEVNAME" and value:
                node = Path("/dev") / value
                with contextlib.suppress(OSError):
                    st = node.stat()
                    if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(major, minor):
                        return node
        return None

    def ns_type(self, path: str) -> str | None:
        """The OCI type of the namespace ``path`` names (``ipc``, ``network``, ...),
        None if it is not a namespace; FileNotFoundError if it does not exist."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            flag = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                return None
            raise
        finally:
            os.close(fd)
        return NS_TYPES.get(flag)

    def is_host_ns(self, path: str, kind: str) -> bool:
        """``path`` is the host's own namespace of ``kind`` (PID 1's, or this
        process's)."""
        name = _PROC_NS.get(kind, kind)
        try:
            st = os.stat(path)
        except OSError:
            return False
        for own in (f"/proc/1/ns/{name}", f"/proc/self/ns/{name}"):
            with contextlib.suppress(OSError):
                o = os.stat(own)
                if (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino):
                    return True
        return False

    def tmpfs_size(self, path: str) -> int | None:
        """Size in bytes of the tmpfs ``path`` is on; None if it is not a tmpfs
        (or does not exist)."""
        try:
            if _statfs_type(path) != TMPFS_MAGIC:
                return None
            st = os.statvfs(path)
        except OSError:
            return None
        return st.f_blocks * st.f_frsize

    def submounts(self, path: str, limit: int) -> list[tuple[str, frozenset[str]]]:
        """The host mounts a recursive bind of the directory ``path`` carries:
        each one's path relative to ``path`` and its per-mount options (``ro``,
        ``nosuid``, ...), parents first, at most ``limit``. ``path`` is resolved
        as the bind resolves it (it is the spec's host path, not a guest's)."""
        try:
            real = os.path.realpath(path, strict=True)
            if not os.path.isdir(real):
                return []
            table = host_mounts.mount_table()
        except OSError:
            return []
        return [(e.point[len(real):].lstrip("/"), e.options)
                for e in host_mounts.visible_submounts(table, real, limit)]


def _statfs_type(path: str) -> int:
    """f_type of statfs(2) (os.statvfs does not have it)."""
    import ctypes

    from pykata.utils.libc import libc

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]

    buf = Statfs()
    if libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(buf.f_type) & 0xFFFFFFFF


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
    _check_types(spec)
    for m in spec.get("mounts", []) or []:
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise InvalidArgument(f"invalid OCI spec: bad mount entry {m!r}")
        if not all(isinstance(m.get(k) or "", str) for k in ("type", "source")) or not \
                isinstance(m.get("options") or [], list):
            raise InvalidArgument(f"invalid OCI spec: bad mount entry {m!r}")
        if not m["destination"].startswith("/"):
            raise InvalidArgument(
                f"invalid OCI spec: mount destination {m['destination']!r:.200} is not absolute"
            )
        _no_dotdot("mount destination", m["destination"])
    for name in ("linux.maskedPaths", "linux.readonlyPaths"):
        for path in _lookup(spec, name) or []:
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidArgument(
                    f"invalid OCI spec: {name} must hold absolute paths, not {path!r:.200}")
            _no_dotdot(name, path)


def _no_dotdot(what: str, path: str) -> None:
    """A container path with a ``..`` component is refused (as Kubernetes refuses
    it in a mountPath): where it lands would depend on how each layer cleans it."""
    if ".." in path.split("/"):
        raise InvalidArgument(f"invalid OCI spec: {what} {path!r:.200} has a '..' component")


# Fields the conversion reads, and the JSON type each must have when present.
_FIELD_TYPES: tuple[tuple[str, type, str], ...] = (
    ("annotations", dict, "an object"), ("mounts", list, "a list"),
    ("linux", dict, "an object"), ("linux.namespaces", list, "a list"),
    ("linux.devices", list, "a list"), ("linux.resources", dict, "an object"),
    ("linux.sysctl", dict, "an object"), ("linux.maskedPaths", list, "a list"),
    ("linux.readonlyPaths", list, "a list"), ("linux.resources.memory", dict, "an object"),
    ("linux.resources.cpu", dict, "an object"), ("linux.resources.pids", dict, "an object"),
    ("process.terminal", bool, "a boolean"), ("process.user", dict, "an object"),
    ("process.rlimits", list, "a list"), ("hostname", str, "a string"),
    ("domainname", str, "a string"), ("linux.resources.cpu.cpus", str, "a string"),
    ("linux.resources.cpu.mems", str, "a string"))
# Integers (a JSON true is not one), each within the range its kernel field takes.
_INT_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("linux.resources.memory.limit", -1, 2**63 - 1),
    ("linux.resources.memory.reservation", -1, 2**63 - 1),
    ("linux.resources.memory.swap", -1, 2**63 - 1),
    ("linux.resources.memory.kernel", -1, 2**63 - 1),
    ("linux.resources.memory.swappiness", 0, 100),
    ("linux.resources.cpu.shares", 0, 2**64 - 1),
    ("linux.resources.cpu.quota", -1, 2**63 - 1),
    ("linux.resources.cpu.period", 0, 2**64 - 1),
    ("linux.resources.pids.limit", -1, 2**63 - 1),
    ("process.user.uid", 0, 2**32 - 2), ("process.user.gid", 0, 2**32 - 2))


def _check_types(spec: dict[str, Any]) -> None:
    """InvalidArgument naming the first field of _FIELD_TYPES of another type, or a
    namespace entry that is not an object with a string type."""
    for name, kind, what in _FIELD_TYPES:
        value = _lookup(spec, name)
        if value is not None and not isinstance(value, kind):
            raise InvalidArgument(f"invalid OCI spec: {name} must be {what}")
    for name, low, high in _INT_FIELDS:
        value = _lookup(spec, name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(f"invalid OCI spec: {name} must be an integer")
        if not low <= value <= high:
            raise InvalidArgument(f"invalid OCI spec: {name} {value} is out of range"
                                  f" ({low} to {high})")
    for i, ns in enumerate(_lookup(spec, "linux.namespaces") or []):
        if not isinstance(ns, dict) or not isinstance(ns.get("type"), str):
            raise InvalidArgument(
                f"invalid OCI spec: linux.namespaces[{i}] must be an object with a type")


def rootfs_path(spec: dict[str, Any], bundle: Path) -> Path:
    p = Path(spec["root"]["path"])
    return p if p.is_absolute() else bundle / p


def _is_bind(m: dict[str, Any]) -> bool:
    opts = m.get("options") or []
    return m.get("type") in ("bind", "none", None, "") and (
        "bind" in opts or "rbind" in opts or m.get("type") == "bind"
    )


def plan(spec: dict[str, Any], container_id: str, bundle: Path, *,
         guest_empty_dir: bool = True, probe: HostProbe | None = None) -> GuestPlan:
    """How each part of ``spec`` reaches the guest (``spec`` is not modified).
    ``guest_empty_dir=False`` ([runtime] disable_guest_empty_dir) shares disk-backed
    emptyDir volumes from the host instead."""
    probe = probe or HostProbe()
    spec_version(spec)
    out = copy.deepcopy(spec)
    # The guest's engines read the spec as 1.0.2 (check_spec refused what they
    # would not see); what the spec does not define is ignored, as it says.
    out["ociVersion"] = GUEST_SPEC_VERSION
    _drop_unknown_fields(out, container_id)
    linux_in = out.get("linux")
    if isinstance(linux_in, dict) and isinstance(linux_in.get("resources"), dict):
        linux_in["resources"], dropped = strip_resources(linux_in["resources"], container_id)
    else:
        dropped = []
    base = f"{GUEST_SHARED_DIR}/{container_id}"
    out["root"]["path"] = f"{base}/rootfs"
    p = GuestPlan(out, [HostMount(rootfs_path(spec, bundle), f"{container_id}/rootfs")],
                  ignored=dropped)
    mounts = []
    for i, m in enumerate(out.get("mounts", []) or []):
        src = m.get("source", "") or ""
        dest = m["destination"]
        opts = _options(m)
        if m.get("type") in GUEST_LOCAL_TYPES:
            mounts.append(m)
            continue
        if not _is_bind(m):
            if src.startswith("/"):
                mounts.append(_block_mount(p, m, container_id, i, probe))
            else:
                mounts.append(m)
            continue
        if not src:
            mounts.append(m)
            continue
        src_path = Path(src) if os.path.isabs(src) else bundle / src
        pod = _pod_volume(p, m, str(src_path), guest_empty_dir, probe)
        if pod is not None:
            mounts.append(pod)
            continue
        rdev = _block_rdev(probe, str(src_path))
        if rdev is not None:
            # A bind of a block device: the container gets the device node.
            readonly = _read_only(opts)[0]
            _add_device(out, dest, os.major(rdev), os.minor(rdev), readonly)
            p.blocks.append(BlockVolume(src_path, readonly, container_path=dest))
            continue
        if src.startswith("/dev/") or src == "/dev":
            # Other host devices are not passed into the VM.
            continue
        if _is_kernel_fs(src):
            # hostPath /proc, /sys (or below): the guest's own, never the host's
            # through virtio-fs (that would hand the guest the host's kernel knobs).
            mounts.append(m)
            continue
        # mounts/<n>/<source's name>: the guest's mountinfo shows a root that
        # ends like the source, as runc's does.
        name = f"{i}/{src_path.name or 'root'}"
        hm = _host_bind(m, src_path, f"{container_id}/mounts/{name}")
        p.host_mounts.append(hm)
        m = dict(m)
        m["source"] = f"{base}/mounts/{name}"
        m["type"] = "bind"
        if "rro" in opts or "rrw" in opts:
            # The guest sees no submounts (it gets binds of them): a plain ro/rw.
            keep = [o for o in opts if o not in ("rro", "rrw")]
            m["options"] = ([o for o in keep if o not in ("ro", "rw")] + ["ro"]
                            if hm.recursive_ro else keep)
        mounts.append(m)
        if hm.recursive:
            mounts.extend(_submount_binds(m, hm, probe))
    out["mounts"] = mounts
    _spec_devices(p, probe)
    # The host runs its hooks; createContainer/startContainer go to the guest.
    from pykata.runtime import hooks  # (no cycle: hooks imports nothing of specconv)

    hooks.to_guest(out, str(bundle), spec_version(spec))
    linux = out.get("linux")
    if isinstance(linux, dict):
        namespaces = linux["namespaces"] = linux.get("namespaces") or []  # null: none
        for ns in namespaces:
            # Host namespace paths mean nothing in the guest. Joining the pod's IPC
            # or UTS namespace (every CRI container does) becomes a marker the agent
            # resolves to the pod sandbox container's namespace.
            if ns.pop("path", None) and ns.get("type") in POD_SHARED_NAMESPACES:
                ns["path"] = SANDBOX_NS_MARKER
        # The guest runs cgroup v2: give the container its own cgroup view, as
        # containerd does on v2 hosts (a v1 host's spec has no cgroup namespace).
        if not any(ns.get("type") == "cgroup" for ns in namespaces):
            namespaces.append({"type": "cgroup"})
    return p


def _is_kernel_fs(src: str) -> bool:
    p = os.path.normpath(src) if src.startswith("/") else ""
    return any(p == k or p.startswith(k + "/") for k in ("/proc", "/sys"))


def _options(m: dict[str, Any]) -> list[str]:
    """A mount's options (the strings among them)."""
    return [o for o in (m.get("options") or []) if isinstance(o, str)]


def _read_only(opts: list[str]) -> tuple[bool, bool]:
    """(read-only, recursively read-only): ``ro``/``rw`` set the top mount,
    ``rro``/``rrw`` every mount below it too; the last of each pair wins."""
    ro = rro = False
    for o in opts:
        if o in ("ro", "rw"):
            ro = o == "ro"
        elif o in ("rro", "rrw"):
            rro = o == "rro"
    return ro or rro, rro


def _host_bind(m: dict[str, Any], source: Path, target: str) -> HostMount:
    """The host side of a bind shared through virtio-fs, as its options ask:
    ``bind``/``rbind``, ``ro``/``rro``, and propagation. The share receives the
    host's later mounts for ``slave``/``rslave`` (Kubernetes HostToContainer);
    ``shared``/``rshared`` (Bidirectional) is refused: a mount made in the
    container is a mount in the guest kernel and can never reach the host."""
    opts = _options(m)
    props = [o for o in opts if o in _PROPAGATION]
    if props and props[-1] in ("shared", "rshared"):
        raise InvalidArgument(
            f"mount {m['destination']} (source {m.get('source')}): {props[-1]} propagation"
            " (Kubernetes mountPropagation Bidirectional) is not supported: a mount made in"
            " the container is made in the VM and cannot reach the host; use HostToContainer"
            " (rslave) or None")
    readonly, rro = _read_only(opts)
    return HostMount(source, target, readonly,
                     recursive="rbind" in opts or m.get("type") == "rbind", recursive_ro=rro,
                     receive=bool(props) and props[-1] in ("slave", "rslave"),
                     destination=str(m["destination"]))


def _submount_binds(m: dict[str, Any], hm: HostMount,
                    probe: HostProbe) -> list[dict[str, Any]]:
    """Guest binds for the host mounts below a volume's source (in the guest the
    whole volume is one virtio-fs mount): each with its own read-only state and
    nosuid/nodev/noexec (read-only for ``rro``), so that, as with runc, a
    writable submount of a ``ro`` volume stays writable and the container's
    mount table shows it."""
    subs = probe.submounts(str(hm.source), MAX_SUBMOUNT_BINDS + 1)
    if len(subs) > MAX_SUBMOUNT_BINDS:
        log.warning("mount %s: %s has more than %d mounts below it: the first %d get a bind"
                    " of their own, the others are seen as the volume's bind makes them",
                    m["destination"], hm.source, MAX_SUBMOUNT_BINDS, MAX_SUBMOUNT_BINDS)
        subs = subs[:MAX_SUBMOUNT_BINDS]
    props = [o for o in _options(m) if o in _PROPAGATION][-1:]
    dest = str(m["destination"]).rstrip("/")
    out = []
    for rel, options in subs:
        ro = hm.recursive_ro or "ro" in options
        out.append({"destination": f"{dest}/{rel}", "type": "bind",
                    "source": f"{m['source']}/{rel}",
                    "options": ["bind", "ro" if ro else "rw",
                                *(o for o in _SUBMOUNT_FLAGS if o in options), *props]})
    return out


def _block_rdev(probe: HostProbe, path: str) -> int | None:
    try:
        return probe.block_rdev(path)
    except OSError:
        return None


def _block_mount(p: GuestPlan, m: dict[str, Any], container_id: str, index: int,
                 probe: HostProbe) -> dict[str, Any]:
    """A file system mount of a host block device: the agent mounts the disk, the
    container gets a bind of it."""
    src, dest, fstype = m["source"], m["destination"], str(m.get("type") or "")
    try:
        rdev = probe.block_rdev(src)
    except FileNotFoundError:
        raise InvalidArgument(
            f"mount source {src} for {dest} does not exist: a mount of type"
            f" {fstype or 'none'} needs a host block device") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot use mount source {src} for {dest}:"
                              f" {exc.strerror or exc}") from None
    if rdev is None:
        raise InvalidArgument(
            f"mount source {src} for {dest} is not a block device: a mount of type"
            f" {fstype or 'none'} needs one (use a bind mount for files and directories)")
    if not fstype or fstype == "none":
        raise InvalidArgument(f"mount of block device {src} on {dest} needs a file system type")
    opts = _options(m)
    readonly = _read_only(opts)[0]
    fs_opts = [o for o in opts if o not in _NOT_FS_OPTIONS]
    if readonly and "ro" not in fs_opts:
        fs_opts.append("ro")
    mount_point = f"{GUEST_STORAGE_DIR}/{container_id}/{index}"
    p.blocks.append(BlockVolume(Path(src), readonly, mount_point=mount_point, fstype=fstype,
                                options=tuple(fs_opts)))
    bind = ["rbind", "ro" if readonly else "rw", *(o for o in opts if o in _BIND_FLAGS)]
    return {"destination": dest, "type": "bind", "source": mount_point, "options": bind}


def _pod_volume(p: GuestPlan, m: dict[str, Any], src: str, guest_empty_dir: bool,
                probe: HostProbe) -> dict[str, Any] | None:
    """emptyDir and the pod's /dev/shm, made in the guest; None for other mounts."""
    dest = m["destination"]
    opts = _options(m)
    keep = [o for o in opts if o in ("ro", "rw", *_BIND_FLAGS)]
    if _read_only(opts)[1]:
        keep.append("ro")  # rro: nothing is mounted below a guest volume
    match = EMPTY_DIR.search(src)
    if dest == "/dev/shm" and match is None:
        size = probe.tmpfs_size(src)
        if size is None:
            return None
        target = f"{GUEST_SANDBOX_DIR}/shm"
        _pod_storage(p, Storage("tmpfs", "shm", target, "tmpfs",
                                ("nosuid", "nodev", "noexec", "mode=1777", f"size={size}"),
                                (SANDBOX_SCOPE,)))
        return {"destination": dest, "type": "bind", "source": target,
                "options": ["rbind", *keep]}
    if match is None:
        return None
    name = _safe_name(match.group(1))
    size = probe.tmpfs_size(src)
    if size is not None:
        # medium: Memory -- the kubelet mounted a tmpfs; the guest gets its own.
        target = f"{GUEST_SANDBOX_DIR}/ephemeral/{name}"
        _pod_storage(p, Storage("tmpfs", "tmpfs", target, "tmpfs",
                                ("nosuid", "nodev", "mode=0777", f"size={size}"),
                                (SANDBOX_SCOPE,)))
    elif guest_empty_dir:
        target = f"{GUEST_SANDBOX_DIR}/local/{name}"
        _pod_storage(p, Storage("local", "local", target, "", ("mode=0777",),
                                (SANDBOX_SCOPE,)))
    else:
        return None
    return {"destination": dest, "type": "bind", "source": target, "options": ["rbind", *keep]}


def _pod_storage(p: GuestPlan, st: Storage) -> None:
    if all(s.mount_point != st.mount_point for s in p.storages):
        p.storages.append(st)


def _safe_name(name: str) -> str:
    """A volume name as one path component."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return cleaned[:128] or "volume"


def _add_device(spec: dict[str, Any], path: str, major: int, minor: int,
                readonly: bool) -> None:
    """A block device node at ``path`` in the container, and the cgroup rule to use it."""
    linux = spec.setdefault("linux", {})
    devices = [d for d in linux.get("devices") or [] if d.get("path") != path]
    devices.append({"path": path, "type": "b", "major": major, "minor": minor,
                    "fileMode": 0o660, "uid": 0, "gid": 0})
    linux["devices"] = devices
    resources = linux.setdefault("resources", {})
    rules = resources.setdefault("devices", [])
    rules.append({"allow": True, "type": "b", "major": major, "minor": minor,
                  "access": "r" if readonly else "rw"})


def _spec_devices(p: GuestPlan, probe: HostProbe) -> None:
    """Block devices in ``linux.devices`` that are host disks are hot-plugged;
    other entries (character devices, block numbers the host has no disk for)
    stay as they are: the guest engine makes the node as given."""
    linux = p.spec.get("linux") or {}
    known = {b.container_path for b in p.blocks if b.container_path}
    for d in linux.get("devices") or []:
        if not isinstance(d, dict) or d.get("type") != "b" or d.get("path") in known:
            continue
        path, major, minor = d.get("path"), d.get("major"), d.get("minor")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument(f"invalid OCI spec: bad linux.devices entry {d!r}")
        if not isinstance(major, int) or not isinstance(minor, int):
            raise InvalidArgument(
                f"invalid OCI spec: linux.devices entry {path} needs a major and a minor")
        host = probe.block_device(major, minor)
        if host is None:
            # Not a host disk: the node is made in the container as given (type,
            # major, minor, mode, uid, gid), as runc does; nothing is passed in.
            log.info("%s: block device %d:%d is not a host disk: created as given",
                     path, major, minor)
            continue
        readonly = _device_readonly(linux.get("resources") or {}, major, minor)
        p.blocks.append(BlockVolume(host, readonly, container_path=path))


def _device_readonly(resources: dict[str, Any], major: int, minor: int) -> bool:
    """The container may read but not write block device major:minor (its device
    cgroup rules allow it without 'w'): the disk is attached read-only."""
    allowed = ""
    for rule in resources.get("devices") or []:
        if not isinstance(rule, dict) or rule.get("type", "a") not in ("a", "b"):
            continue
        if rule.get("major") not in (None, -1, major) or rule.get("minor") not in (None, -1,
                                                                                   minor):
            continue
        access = str(rule.get("access") or "rwm")
        if rule.get("allow"):
            allowed += access
        else:
            allowed = "".join(c for c in allowed if c not in access)
    return "r" in allowed and "w" not in allowed


# -- spec versions -----------------------------------------------------------------------
# The OCI runtime spec versions pykata accepts (any patch of these minors; a
# pre-release of one is accepted too), and the one it stamps on the spec it sends
# to the guest: the guest's crun 1.8.1 refuses anything but 1.0.x ("unknown
# version specified") and the native engine does not read ociVersion. Fields
# added after 1.0.2 are checked on the host (check_spec) so that the stamp never
# makes the guest silently skip one.
SPEC_VERSION_MIN = "1.0.0"
SPEC_VERSION_MAX = "1.3.0"
GUEST_SPEC_VERSION = "1.0.2"
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.+-]*)?$")

# Every field of the spec (up to 1.3.0) at the levels pykata reads; the OCI
# spec says a runtime MUST ignore properties it does not know, so others are
# dropped before the guest (whose native engine refuses what it does not know).
_SPEC_FIELDS: dict[str, set[str]] = {
    "": {"ociVersion", "process", "root", "hostname", "domainname", "mounts", "hooks",
         "annotations", "linux", "solaris", "windows", "vm", "zos", "freebsd"},
    "process": {"terminal", "consoleSize", "cwd", "env", "args", "commandLine", "rlimits",
                "apparmorProfile", "capabilities", "noNewPrivileges", "oomScoreAdj",
                "scheduler", "selinuxLabel", "ioPriority", "execCPUAffinity", "user"},
    "process.user": {"uid", "gid", "umask", "additionalGids", "username"},
    "root": {"path", "readonly"},
    "linux": {"namespaces", "uidMappings", "gidMappings", "timeOffsets", "devices",
              "netDevices", "cgroupsPath", "rootfsPropagation", "resources", "seccomp",
              "sysctl", "maskedPaths", "readonlyPaths", "mountLabel", "intelRdt",
              "personality", "memoryPolicy"},
}
# Fields newer than the guest's crun 1.8.1 implements: with [agent]
# container_engine = crun they would be skipped silently, so they are refused.
CRUN_UNKNOWN_FIELDS = ("process.ioPriority", "process.scheduler", "process.execCPUAffinity",
                       "linux.netDevices", "linux.memoryPolicy",
                       "linux.resources.memory.checkBeforeUpdate",
                       "linux.intelRdt.schemata", "linux.intelRdt.enableMonitoring")


def spec_version(spec: dict[str, Any]) -> str:
    """The spec's ``ociVersion`` if pykata supports it (InvalidArgument naming it
    otherwise); a spec without one is taken as the oldest."""
    value = spec.get("ociVersion")
    if value is None or value == "":
        return SPEC_VERSION_MIN
    m = _VERSION_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidArgument(f"invalid OCI spec: ociVersion {value!r} is not a version"
                              " (MAJOR.MINOR.PATCH)")
    major, minor = int(m.group(1)), int(m.group(2))
    top = tuple(int(x) for x in SPEC_VERSION_MAX.split(".")[:2])
    if major != 1 or (major, minor) > top:
        raise InvalidArgument(
            f"unsupported OCI spec version {value} (ociVersion): pykata supports"
            f" {SPEC_VERSION_MIN} to {SPEC_VERSION_MAX[:-1]}x")
    return str(value)


def _lookup(spec: dict[str, Any], dotted: str) -> Any:
    obj: Any = spec
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def check_spec(spec: dict[str, Any], engine: str = "native") -> None:
    """What can be refused before a VM boots: the version, fields the guest's
    engine would skip, hooks the guest cannot run, host namespaces asked for by
    leaving them out (see check_namespaces for the ones given by path)."""
    spec_version(spec)
    if engine == "crun":
        for name in CRUN_UNKNOWN_FIELDS:
            if _lookup(spec, name) not in (None, "", [], {}):
                raise InvalidArgument(f"unsupported OCI spec: {name} is not supported by the"
                                      " guest's crun (use [agent] container_engine = native)")
    from pykata.runtime import hooks  # (no cycle: hooks imports nothing of specconv)

    hooks.parse(spec)
    missing_host_namespaces(spec)


def _drop_unknown_fields(spec: dict[str, Any], container_id: str) -> None:
    for base, known in _SPEC_FIELDS.items():
        obj = _lookup(spec, base) if base else spec
        if not isinstance(obj, dict):
            continue
        for name in sorted(set(obj) - known):
            log.warning("container %s: %s%s is not an OCI spec field: ignored", container_id,
                        f"{base}." if base else "", name)
            del obj[name]


# -- resources the guest kernel cannot apply ---------------------------------------------
# The guest runs cgroup v2. These v1-only (or, in a VM, meaningless) fields are
# ignored with a warning, as runc does on a cgroup v2 host, never a failed create.
UNAPPLIABLE_RESOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "memory": (("kernel", "kernelTCP", "swappiness", "disableOOMKiller"),
               "cgroup v1 only"),
    "cpu": (("realtimeRuntime", "realtimePeriod"), "cgroup v2 has no real-time CPU control"),
    "blockIO": (("leafWeight", "leafWeightDevice", "weightDevice"),
                "cgroup v1 only (no per-device weight in the guest)"),
}
UNAPPLIABLE_SECTIONS = {"network": "net_cls/net_prio are cgroup v1 only",
                        "rdma": "the VM has no RDMA devices"}


def strip_resources(res: Any, container_id: str,
                    base: str = "linux.resources") -> tuple[dict[str, Any], list[str]]:
    """``res`` without what the guest kernel cannot apply, and the names of the
    fields dropped (each one logged as a warning)."""
    if not isinstance(res, dict):
        return res, []
    out = dict(res)
    dropped: list[str] = []

    def drop(name: str, why: str) -> None:
        dropped.append(name)
        log.warning("container %s: %s ignored: %s", container_id, name, why)

    for section, why in UNAPPLIABLE_SECTIONS.items():
        if out.get(section) not in (None, {}, []):
            drop(f"{base}.{section}", why)
        out.pop(section, None)
    for section, (names, why) in UNAPPLIABLE_RESOURCES.items():
        part = out.get(section)
        if not isinstance(part, dict):
            continue
        part = dict(part)
        for name in names:
            if name in part:
                if part[name] not in (None, 0, False, [], {}):
                    drop(f"{base}.{section}.{name}", why)
                del part[name]
        if section == "memory" and part.get("useHierarchy") is not None:
            if part["useHierarchy"] is False:
                drop(f"{base}.memory.useHierarchy", "cgroup v2 is always hierarchical")
            del part["useHierarchy"]
        out[section] = part
    return out, dropped


# -- namespaces --------------------------------------------------------------------------
# Namespaces a spec must not leave out: per the OCI spec a missing one is the
# runtime's own (the host's), which a VM cannot share. containerd's CRI leaves
# them out of a pod sandbox for hostNetwork, hostIPC and hostPID.
HOST_NAMESPACE_FIELDS = {"network": "hostNetwork", "ipc": "hostIPC", "pid": "hostPID"}
_WHY_VM = "a pod in a VM has its own kernel, which cannot share the host's"


def missing_host_namespaces(spec: dict[str, Any]) -> None:
    """InvalidArgument if ``linux.namespaces`` leaves out network, ipc or pid."""
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    if not isinstance(namespaces, list):
        # No namespace list at all (hand-written specs): the container gets the
        # VM's own namespaces; a list that leaves one out is what CRI writes for
        # hostNetwork/hostIPC/hostPID, and is refused.
        return
    have = {ns.get("type") for ns in namespaces if isinstance(ns, dict)}
    for kind, cri in HOST_NAMESPACE_FIELDS.items():
        if kind not in have:
            pod = " (the pod's " + cri + ": true)" if is_pod_sandbox(spec) else ""
            raise InvalidArgument(
                f"the host's {kind} namespace is not supported{pod}: linux.namespaces has no"
                f" {kind} entry, which asks for the host's {kind} namespace, and {_WHY_VM}")


@dataclass(frozen=True)
class PodNamespaces:
    """What a container's namespace paths may name: the pod's VM process (CRI gives
    /proc/<sandbox task pid>/ns/*, and the task pid is the VM's) and the network
    namespace the VM is connected to ("" until the pod's first container)."""

    vm_pid: int = 0
    netns: str = ""
    first: bool = True  # this container makes the pod (its netns becomes the pod's)


def _is_cri(spec: dict[str, Any]) -> bool:
    ann = spec.get("annotations") or {}
    return isinstance(ann, dict) and any(k in ann for k in (CRI_TYPE, CRIO_TYPE))


def check_namespaces(spec: dict[str, Any], pod: PodNamespaces,
                     probe: HostProbe | None = None) -> None:
    """Every ``linux.namespaces[].path`` is a namespace of its type, and one the
    pod maps onto its own namespaces in the guest:

    - network: the namespace the VM is connected to (the first container's path
      makes it so), or /proc/<VM pid>/ns/net;
    - ipc, uts, pid: /proc/<VM pid>/ns/<type> (containerd's CRI: the pod's
      sandbox), or any path in a CRI/CRI-O pod's spec (CRI-O pins them);
    - nothing else: cgroup, mount, user, time or a host process's namespace
      cannot be joined by a VM (InvalidArgument naming the field).
    """
    probe = probe or HostProbe()
    linux = spec.get("linux")
    if not isinstance(linux, dict):
        return
    if not isinstance(linux.get("namespaces") or [], list):
        raise InvalidArgument("invalid OCI spec: linux.namespaces must be a list")
    for i, ns in enumerate(linux.get("namespaces") or []):
        if not isinstance(ns, dict):
            raise InvalidArgument(f"invalid OCI spec: linux.namespaces[{i}] must be an object")
        kind, path = ns.get("type"), ns.get("path")
        f = f"linux.namespaces[{i}].path"
        if not path:
            continue
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument(f"invalid OCI spec: {f} must be an absolute path")
        try:
            actual = probe.ns_type(path)
        except FileNotFoundError:
            raise InvalidArgument(f"{f} {path} ({kind} namespace) does not exist") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot open {f} {path}: {exc.strerror or exc}") from None
        if actual is None:
            raise InvalidArgument(f"{f} {path} is not a namespace (the {kind} namespace is"
                                  " expected)")
        if actual != kind:
            raise InvalidArgument(f"{f} {path} is a {actual} namespace, not {kind}")
        if _pod_path(spec, kind, os.path.normpath(path), pod, probe):
            continue
        raise InvalidArgument(
            f"joining a host namespace is not supported: {f} {path} ({kind}): each"
            f" container runs in a VM with its own kernel, which cannot enter the host's"
            f" namespaces")


def _pod_path(spec: dict[str, Any], kind: str, path: str, pod: PodNamespaces,
              probe: HostProbe) -> bool:
    if pod.vm_pid and path == f"/proc/{pod.vm_pid}/ns/{_PROC_NS.get(kind, kind)}" \
            and kind in ("network", "ipc", "uts", "pid"):
        return True
    if kind == "network":
        if probe.is_host_ns(path, kind):
            return False  # the host's own network: never handed to a VM
        return pod.first or (bool(pod.netns) and os.path.normpath(pod.netns) == path) \
            or _is_cri(spec)
    return kind in ("ipc", "uts", "pid") and _is_cri(spec)


_PROC_NS = {"network": "net", "mount": "mnt"}
