"""Host mounts, made and undone without following paths a guest could change.

The sandbox's shared tree is fed to the guest through virtio-fs, so every walk
below a sandbox directory goes through file descriptors: ``openat2`` with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV, binds through
``open_tree`` + ``move_mount`` onto an fd (read-only applied before the mount
appears, so the guest never sees it writable), unmounts with UMOUNT_NOFOLLOW on
exact mount points from /proc/self/mountinfo (never ``realpath``), and a tree
removal that refuses to cross a mount point or follow a symlink.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pykata.utils.libc import libc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Syscall numbers (x86_64 and the generic table agree for these).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# What every walk below a sandbox directory uses.
RESOLVE_SAFE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_libc = libc()


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def mount(
    source: str | Path, target: str | Path, fstype: str = "", flags: int = 0, data: str = ""
) -> None:
    rc = _libc.mount(
        os.fsencode(str(source)), os.fsencode(str(target)), fstype.encode() or None,
        ctypes.c_ulong(flags), data.encode() or None,
    )
    _check(rc, f"mount {source} on {target}")


def umount(target: str | Path, flags: int = 0) -> None:
    """Unmount ``target``; never follows a symlink in its last component."""
    rc = _libc.umount2(os.fsencode(str(target)), ctypes.c_int(flags | UMOUNT_NOFOLLOW))
    _check(rc, f"umount {target}")


def bind(source: str | Path, target: str | Path, readonly: bool = False) -> None:
    """A recursive bind by path (for host-only paths: bundles, test fixtures)."""
    mount(source, target, flags=MS_BIND | MS_REC)
    if readonly:
        mount("none", target, flags=MS_BIND | MS_REMOUNT | MS_RDONLY)


CLONE_NEWNS = 0x00020000


def private_mount_namespace() -> None:
    """Move this process into a new mount namespace where nothing propagates back
    (tests that attack mounts run in one)."""
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare(CLONE_NEWNS)")
    mount("none", "/", flags=MS_REC | MS_PRIVATE)


# -- fd-based walks ------------------------------------------------------------------
def openat2(dirfd: int, path: str, flags: int, mode: int = 0,
            resolve: int = RESOLVE_SAFE) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    rc = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(rc, f"open {path!r}")


def open_dir(path: str | Path) -> int:
    """An O_PATH fd of a directory, the last component not followed (for the
    host-made roots: a sandbox directory, its mounts/ tree)."""
    return os.open(str(path), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def make_path(root_fd: int, rel: str, leaf_dir: bool) -> tuple[int, list[str]]:
    """Create ``rel`` below ``root_fd`` (directories 0700; a leaf file 0600, made
    with O_EXCL), never following a symlink or crossing a mount. Returns an O_PATH
    fd of the leaf and the relative paths this call created, parents first."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"bad relative path {rel!r}")
    created: list[str] = []
    fd = os.dup(root_fd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            sub = "/".join(parts[: i + 1])
            if last and not leaf_dir:
                new = openat2(fd, name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW,
                              0o600)
                os.close(new)
                created.append(sub)
                leaf = openat2(fd, name, os.O_PATH | os.O_NOFOLLOW)
            else:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    created.append(sub)
                except FileExistsError:
                    if last:
                        raise
                leaf = openat2(fd, name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            os.close(fd)
            fd = leaf
        return fd, created
    except BaseException:
        os.close(fd)
        raise


def bind_onto(source: str | Path, target_fd: int, readonly: bool = False, *,
              recursive: bool = True, recursive_ro: bool = False,
              receive: bool = False) -> None:
    """Bind ``source`` (a host path the runtime chose) onto the file or directory
    ``target_fd``, as a bind mount of an OCI spec asks:

    - ``recursive`` (``rbind``): with the mounts below ``source``, each keeping
      its own flags; else ``source``'s mount alone (``bind``);
    - ``readonly`` (``ro``): the top mount only, as runc does; ``recursive_ro``
      (``rro``): every mount of the copy;
    - ``receive`` (``rslave``, ``slave``): the copy is a propagation receiver of
      the source (mounts made on the host below ``source`` later appear in it),
      else private. Never a peer: nothing mounted or unmounted in the copy
      reaches the host.

    All of it is set on the detached copy, before it is attached, so no
    propagated copy of it is ever writable or a peer of the host's."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    tree = _check(_libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(os.fsencode(str(source))), ctypes.c_uint(flags)),
        f"open_tree {source}")
    try:
        _setattr(tree, AT_RECURSIVE, _MountAttr(0, 0, MS_SLAVE if receive else MS_PRIVATE, 0),
                 f"set the propagation of {source}")
        if readonly or recursive_ro:
            _setattr(tree, AT_RECURSIVE if recursive_ro else 0,
                     _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0), f"make {source} read-only")
        _check(_libc.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(tree), ctypes.c_char_p(b""),
            ctypes.c_int(target_fd), ctypes.c_char_p(b""),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)),
            f"mount {source}")
    finally:
        os.close(tree)


def _setattr(tree: int, flags: int, attr: _MountAttr, what: str) -> None:
    _check(_libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(tree), ctypes.c_char_p(b""),
        ctypes.c_uint(AT_EMPTY_PATH | flags), ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr))), what)


# -- the mount table -----------------------------------------------------------------
def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\"
    )


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, as the kernel names it."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo: ids, mount point and per-mount options
    (``ro``/``rw``, ``nosuid``, ``nodev``, ``noexec``, atime flags)."""

    mount_id: int
    parent_id: int
    point: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[MountEntry]:
    """/proc/<pid>/mountinfo text -> entries (lines it cannot read are skipped)."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        try:
            out.append(MountEntry(int(f[0]), int(f[1]), _unescape(f[4]),
                                  frozenset(f[5].split(","))))
        except ValueError:
            continue
    return out


def mount_table() -> list[MountEntry]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def _below(path: str, top: str) -> bool:
    """``path`` is strictly below ``top`` (both canonical)."""
    return path.startswith(top.rstrip("/") + "/") and path != top


def _ancestors(path: str) -> list[str]:
    """The directories above the canonical ``path``: "/a/b/c" -> "/", "/a", "/a/b"."""
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]


def visible_submounts(table: list[MountEntry], path: str,
                      limit: int = 1000) -> list[MountEntry]:
    """The mounts strictly below the canonical ``path`` that a walk from it
    reaches (not one hidden by a mount over it or over a directory above it),
    each the top of its stack, parents before children; at most ``limit``."""
    ids = {e.mount_id for e in table}
    kids: dict[int, list[MountEntry]] = {}
    for e in table:
        if e.parent_id != e.mount_id:
            kids.setdefault(e.parent_id, []).append(e)

    def top(e: MountEntry) -> MountEntry:
        for _ in range(len(table)):
            over = [c for c in kids.get(e.mount_id, ()) if c.point == e.point]
            if not over:
                break
            e = over[-1]
        return e

    def visible(m: MountEntry) -> list[MountEntry]:
        last = {c.point: c for c in kids.get(m.mount_id, ()) if c.point != m.point}
        return [top(c) for p, c in sorted(last.items())
                if not any(a in last for a in _ancestors(p))]

    roots = [e for e in table if e.point == "/"
             and (e.parent_id not in ids or e.parent_id == e.mount_id)]
    if not roots or not path.startswith("/"):
        return []
    cur = top(roots[0])
    for _ in range(len(table)):  # down to the mount that holds ``path``
        over = [c for c in kids.get(cur.mount_id, ())
                if c.point != cur.point and (c.point == path or _below(path, c.point))]
        if not over:
            break
        shortest = min(len(c.point) for c in over)
        cur = top([c for c in over if len(c.point) == shortest][-1])
    found: list[MountEntry] = []
    todo = [c for c in reversed(visible(cur)) if _below(c.point, path)]
    while todo and len(found) < limit:
        e = todo.pop()
        found.append(e)
        todo.extend(reversed(visible(e)))
    return found


def _canonical(root: str | Path) -> str:
    p = os.path.normpath(os.path.abspath(str(root)))
    if p == "/":
        raise ValueError("refusing to work on every mount below /")
    return p


def mounts_under(root: str | Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount).
    ``root`` is compared as given (made absolute, never resolved): pass the
    canonical path the mounts were made under."""
    prefix = _canonical(root)
    found = [p for p in mount_points() if p == prefix or p.startswith(prefix + "/")]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def is_mount_point(path: str | Path) -> bool:
    return _canonical(path) in mount_points()


def umount_points(points: list[str]) -> list[str]:
    """Unmount exactly these mount points (those still mounted; lazily if busy);
    what failed."""
    failed = []
    current = set(mount_points())
    for p in sorted(points, key=lambda p: p.count("/"), reverse=True):
        while p in current:
            try:
                umount(p)
            except OSError:
                try:
                    umount(p, MNT_DETACH)
                except OSError:
                    failed.append(p)
                    break
            current = set(mount_points())
    return failed


def umount_all(root: str | Path) -> list[str]:
    """Unmount every mount at or below ``root`` (exact prefix of the mount table,
    no path resolution); what failed."""
    failed: list[str] = []
    for _ in range(3):
        points = mounts_under(root)
        if not points:
            return []
        failed = umount_points(points)
    return failed


def remove_tree(path: str | Path) -> None:
    """Remove ``path`` and everything below it without following a symlink and
    without crossing into a mount: a mount point found below it stops the removal
    with OSError(EBUSY), leaving what is mounted untouched."""
    p = _canonical(path)
    parent, name = os.path.split(p)
    try:
        pfd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        _remove_entry(pfd, name, p)
    finally:
        os.close(pfd)


def _remove_entry(dirfd: int, name: str, shown: str) -> None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise OSError(errno.EBUSY, f"{shown} is a mount point: not removed") from None
            raise
        return
    try:
        fd = openat2(dirfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise OSError(errno.EBUSY, f"{shown} is a mount point: not removed") from None
        raise
    try:
        for entry in os.listdir(fd):
            _remove_entry(fd, entry, f"{shown}/{entry}")
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
