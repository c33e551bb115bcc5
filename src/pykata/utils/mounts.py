"""Host mounts through libc, and listing/unmounting everything below a path."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pykata.utils.libc import libc

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = libc()


def mount(
    source: str | Path, target: str | Path, fstype: str = "", flags: int = 0, data: str = ""
) -> None:
    rc = _libc.mount(
        os.fsencode(str(source)), os.fsencode(str(target)), fstype.encode() or None,
        ctypes.c_ulong(flags), data.encode() or None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def umount(target: str | Path, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(str(target)), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def bind(source: str | Path, target: str | Path, readonly: bool = False) -> None:
    mount(source, target, flags=MS_BIND | MS_REC)
    if readonly:
        mount("none", target, flags=MS_BIND | MS_REMOUNT | MS_RDONLY)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\"
    )


def mounts_under(root: str | Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount)."""
    prefix = os.path.realpath(root)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def umount_all(root: str | Path) -> list[str]:
    """Unmount everything at or below ``root`` (lazily if busy); what failed."""
    failed: list[str] = []
    for _ in range(3):
        points = mounts_under(root)
        if not points:
            return []
        failed = []
        for p in points:
            try:
                umount(p)
            except OSError:
                try:
                    umount(p, MNT_DETACH)
                except OSError:
                    failed.append(p)
    return failed
