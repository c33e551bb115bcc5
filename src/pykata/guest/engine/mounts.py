"""Mount entries of the OCI spec -> mount steps, and path resolution inside
the container's root: pure (apart from ``secure_join`` reading links).

A bind mount ignores every flag but ``MS_REC`` until it is remounted, so a
bind with ``ro``, ``nosuid``, ``nodev``, ``noexec``, ... gets a second,
``MS_REMOUNT | MS_BIND`` step. Options the engine does not implement are
refused naming the mount (``mounts[i].options``), never passed on as data.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

from pykata.errors import InvalidArgument
from pykata.guest import sysutil

# Options that need kernel features or copies the engine does not implement.
REFUSED_OPTIONS = {
    "idmap": "idmapped mounts", "ridmap": "idmapped mounts",
    "tmpcopyup": "tmpcopyup", "copy-symlink": "copy-symlink",
    "rro": "recursive read-only (mount_setattr)", "rrw": "recursive mount attributes",
    "rnosuid": "recursive mount attributes", "rsuid": "recursive mount attributes",
    "rnodev": "recursive mount attributes", "rdev": "recursive mount attributes",
    "rnoexec": "recursive mount attributes", "rexec": "recursive mount attributes",
    "rnoatime": "recursive mount attributes", "ratime": "recursive mount attributes",
    "rnodiratime": "recursive mount attributes", "rdiratime": "recursive mount attributes",
    "rrelatime": "recursive mount attributes", "rnorelatime": "recursive mount attributes",
    "rstrictatime": "recursive mount attributes", "rnosymfollow": "recursive mount attributes",
    "rsymfollow": "recursive mount attributes",
}
# Flags a bind mount only takes on a remount.
_REMOUNT_FLAGS = (sysutil.MS_RDONLY | sysutil.MS_NOSUID | sysutil.MS_NODEV | sysutil.MS_NOEXEC
                  | sysutil.MS_NOATIME | sysutil.MS_NODIRATIME | sysutil.MS_RELATIME
                  | sysutil.MS_STRICTATIME | sysutil.MS_NOSYMFOLLOW)
_KNOWN_FIELDS = {"destination", "source", "type", "options"}


@dataclass(frozen=True)
class Mount:
    """One spec mount as the child performs it."""

    destination: str  # absolute, normalised, inside the container
    source: str
    fstype: str  # "" for a bind
    flags: int
    data: str
    propagation: int
    remount_flags: int  # 0: no remount step
    bind: bool
    cgroup: bool  # a cgroup file system: cgroup2 (with a cgroup namespace) or a bind of ours


def parse_options(options: Any, field: str) -> tuple[int, int, str]:
    """Options -> (flags, propagation, data); refused ones raise InvalidArgument."""
    if options is None:
        return 0, 0, ""
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise InvalidArgument(f"invalid OCI spec: {field} must be a list of strings")
    for opt in options:
        what = REFUSED_OPTIONS.get(opt)
        if what is not None:
            raise InvalidArgument(
                f"unsupported OCI spec: {field}: {opt!r} ({what}) is not supported")
    return sysutil.parse_mount_options(options)


def parse_mount(entry: Any, index: int) -> Mount:
    field = f"mounts[{index}]"
    if not isinstance(entry, dict):
        raise InvalidArgument(f"invalid OCI spec: {field} must be an object")
    extra = sorted(set(entry) - _KNOWN_FIELDS)
    if extra:
        raise InvalidArgument(f"unsupported OCI spec: {field}.{extra[0]}")
    dest = entry.get("destination")
    if not isinstance(dest, str) or not dest.startswith("/"):
        raise InvalidArgument(
            f"invalid OCI spec: {field}.destination must be an absolute path, not {dest!r}")
    dest = posixpath.normpath(dest)
    if dest.startswith("//"):
        dest = "/" + dest.lstrip("/")
    fstype = entry.get("type") or ""
    source = entry.get("source") or ""
    if not isinstance(fstype, str) or not isinstance(source, str):
        raise InvalidArgument(f"invalid OCI spec: {field}.type and .source must be strings")
    flags, propagation, data = parse_options(entry.get("options"), f"{field}.options")
    bind = fstype in ("bind", "rbind") or bool(flags & sysutil.MS_BIND)
    if fstype == "rbind":
        flags |= sysutil.MS_REC
    if bind:
        if not source.startswith("/"):
            raise InvalidArgument(
                f"invalid OCI spec: {field}.source must be an absolute guest path for a bind"
                f" mount, not {source!r}")
        flags |= sysutil.MS_BIND
        remount = flags & _REMOUNT_FLAGS
        return Mount(dest, source, "", flags, "", propagation,
                     sysutil.MS_REMOUNT | sysutil.MS_BIND | remount if remount else 0,
                     True, False)
    if not fstype:
        raise InvalidArgument(f"invalid OCI spec: {field}.type is missing")
    if flags & sysutil.MS_REMOUNT:
        raise InvalidArgument(f"unsupported OCI spec: {field}.options: 'remount'")
    cgroup = fstype in ("cgroup", "cgroup2")
    return Mount(dest, source or fstype, "cgroup2" if cgroup else fstype, flags,
                 "" if cgroup else data, propagation, 0, False, cgroup)


def secure_join(root: str, path: str, max_links: int = 255) -> str:
    """``path`` resolved inside ``root`` as if ``root`` were ``/``: symlinks
    (absolute or relative) and ``..`` never lead out of it. Components that do
    not exist are appended as they are."""
    root = os.path.abspath(root)
    todo = [c for c in path.split("/") if c and c != "."]
    done: list[str] = []
    links = 0
    while todo:
        comp = todo.pop(0)
        if comp == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, comp)
        try:
            target = os.readlink(candidate)
        except OSError:  # not a link, or not there: taken as it is
            done.append(comp)
            continue
        links += 1
        if links > max_links:
            raise OSError(40, f"too many levels of symbolic links in {path}")
        parts = [c for c in target.split("/") if c and c != "."]
        if target.startswith("/"):
            done = []
        todo = parts + todo
    return os.path.join(root, *done)
