"""Mount the root filesystem containerd hands the shim (snapshot mounts) on
<bundle>/rootfs, and take it down again, as containerd's runc shim does."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from pykata import errors
from pykata.utils import mounts

log = logging.getLogger(__name__)

_FLAGS = {
    "ro": (mounts.MS_RDONLY, True), "rw": (mounts.MS_RDONLY, False),
    "bind": (mounts.MS_BIND, True), "rbind": (mounts.MS_BIND | mounts.MS_REC, True),
    "nosuid": (0x2, True), "suid": (0x2, False), "nodev": (0x4, True), "dev": (0x4, False),
    "noexec": (0x8, True), "exec": (0x8, False), "sync": (0x10, True),
    "noatime": (0x400, True), "nodiratime": (0x800, True), "relatime": (1 << 21, True),
    "strictatime": (1 << 24, True),
}


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: tuple[str, ...]) -> tuple[int, str]:
    """Mount flags and the data string, like mount(8) splits them."""
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            bit, on = _FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount_rootfs(bundle: Path, items: list[Mount]) -> bool:
    """Mount ``items`` on bundle/rootfs; True if something was mounted."""
    if not items:
        return False
    target = bundle / "rootfs"
    target.mkdir(exist_ok=True)
    done: list[Path] = []
    try:
        for m in items:
            flags, data = parse_options(m.options)
            fstype = "" if flags & mounts.MS_BIND else m.type
            mounts.mount(m.source, target, fstype, flags, data)
            done.append(target)
    except OSError as exc:
        for t in reversed(done):
            with contextlib.suppress(OSError):
                mounts.umount(t, mounts.MNT_DETACH)
        raise errors.Internal(f"cannot mount the container root filesystem: {exc}") from exc
    return True


def unmount_rootfs(bundle: Path) -> None:
    failed = mounts.umount_all(bundle / "rootfs")
    if failed:
        log.error("cannot unmount %s", ", ".join(failed))
