"""Apply layer tars to a root directory, treating every byte as hostile.

Nothing is ever looked up by path from ``/``: the applier holds the root's
fd and walks each entry's parents one component at a time with
``O_NOFOLLOW``. A parent that is a symlink (``lib -> usr/lib``) is resolved
*inside* the root (an absolute target restarts at the root, ``..`` stops at
it, at most 40 links), so nothing can be written outside; the last
component is never followed (an existing symlink or file there is replaced).
``..`` in an entry name is refused; a leading ``/`` is relative to the root.
Hard links are made only to files already inside the root. Devices are
refused unless allowed, setuid/setgid bits are dropped unless kept, and the
number of entries and the bytes written are capped.

Whiteouts (OCI/AUFS): ``dir/.wh.name`` removes ``dir/name`` of the lower
layers, ``dir/.wh..wh..opq`` empties ``dir`` of what the lower layers had.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass

from pykata import errors
from pykata.guest.imagepull import tar

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackOptions:
    max_entries: int = 1_000_000
    max_bytes: int = 8 << 30  # regular file data over all layers
    keep_setuid: bool = False
    allow_devices: bool = False
    same_owner: bool = True  # apply the uid/gid of the tar (as root)


class LayerError(errors.InvalidArgument):
    """A layer entry the applier refuses (escape, bad link, device...)."""


def split(name: str, what: str) -> list[str]:
    """An entry name as components relative to the root; ``..`` is refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what}: path {name!r} has '..' (it could leave the root)")
    return parts


class Applier:
    """Applies layers in order to one root; counts over all of them."""

    def __init__(self, root: str, options: UnpackOptions | None = None) -> None:
        self.options = options or UnpackOptions()
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.entries = 0
        self.bytes = 0
        self._added: set[tuple[str, ...]] = set()

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- walking ------------------------------------------------------------------------
    def _parent(self, parts: list[str], create: bool, what: str) -> int | None:
        """An fd of the directory holding ``parts[-1]`` (parents resolved in the root);
        None when a parent does not exist and ``create`` is False."""
        stack = [os.dup(self.root_fd)]
        pending = list(parts[:-1])
        hops = 0
        try:
            while pending:
                c = pending.pop(0)
                if c in ("", "."):
                    continue
                if c == "..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                try:
                    fd = os.open(c, _DIR_FLAGS, dir_fd=stack[-1])
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(c, 0o755, dir_fd=stack[-1])
                    fd = os.open(c, _DIR_FLAGS, dir_fd=stack[-1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(c, dir_fd=stack[-1], follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise LayerError(f"{what}: a parent, {c!r}, is not a directory") from None
                    hops += 1
                    if hops > MAX_LINK_HOPS:
                        raise LayerError(f"{what}: too many symlinks in its path") from None
                    target = os.readlink(c, dir_fd=stack[-1])
                    if target.startswith("/"):
                        for fd_ in stack[1:]:
                            os.close(fd_)
                        del stack[1:]
                    pending[:0] = [p for p in target.split("/") if p not in ("", ".")]
                    continue
                stack.append(fd)
            top = stack.pop()
            return top
        finally:
            for fd_ in stack:
                os.close(fd_)

    @staticmethod
    def _remove(dir_fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based on Linux: never follows links
        else:
            os.unlink(name, dir_fd=dir_fd)

    # -- applying -----------------------------------------------------------------------
    def apply(self, reader: tar.Readable, what: str) -> None:
        """Apply one layer's tar stream."""
        self._added = set()
        for entry in tar.TarReader(reader):
            self.entries += 1
            if self.entries > self.options.max_entries:
                raise errors.ResourceExhausted(
                    f"{what}: more than {self.options.max_entries} entries in the image")
            where = f"{what}: {entry.name[:200]!r}"
            try:
                self._entry(entry, where)
            except OSError as e:
                kind = errors.ResourceExhausted if e.errno in (errno.ENOSPC, errno.EDQUOT) \
                    else errors.Internal
                raise kind(f"{where}: {e.strerror or e}") from None

    def _entry(self, e: tar.Entry, what: str) -> None:
        parts = split(e.name, what)
        if not parts:
            if e.type == tar.DIR:  # "./": the root itself
                self._attrs_dir(self.root_fd, e)
                return
            raise LayerError(f"{what}: an entry without a name")
        base = parts[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(parts, what)
            return
        self._added.add(tuple(parts))
        parent = self._parent(parts, True, what)
        assert parent is not None
        try:
            self._make(parent, base, e, what)
        finally:
            os.close(parent)

    def _whiteout(self, parts: list[str], what: str) -> None:
        parent = self._parent(parts, False, what)
        if parent is None:
            return
        try:
            base = parts[-1]
            prefix = tuple(parts[:-1])
            if base == OPAQUE:
                for child in os.listdir(parent):
                    if (*prefix, child) not in self._added:
                        self._remove(parent, child)
            elif base.startswith(WHITEOUT + WHITEOUT):
                return  # other AUFS metadata (.wh..wh.plnk...): nothing to do
            else:
                name = base[len(WHITEOUT):]
                if name in ("", ".", ".."):
                    raise LayerError(f"{what}: bad whiteout")
                if (*prefix, name) not in self._added:
                    self._remove(parent, name)
        finally:
            os.close(parent)

    def _mode(self, e: tar.Entry) -> int:
        mode = e.mode & 0o7777
        if not self.options.keep_setuid:
            mode &= ~(stat.S_ISUID | stat.S_ISGID) if e.type != tar.DIR else ~stat.S_ISUID
        return mode

    def _attrs_dir(self, fd: int, e: tar.Entry) -> None:
        if self.options.same_owner:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, self._mode(e))

    def _make(self, parent: int, base: str, e: tar.Entry, what: str) -> None:
        try:
            st: os.stat_result | None = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if e.type == tar.DIR:
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(base, dir_fd=parent)
                st = None
            if st is None:
                os.mkdir(base, 0o700, dir_fd=parent)
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
            try:
                self._attrs_dir(fd, e)
            finally:
                os.close(fd)
            return
        if st is not None:
            self._remove(parent, base)
        if e.type == tar.REG:
            self._regular(parent, base, e, what)
        elif e.type == tar.SYM:
            os.symlink(e.linkname, base, dir_fd=parent)
            if self.options.same_owner:
                os.chown(base, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
            os.utime(base, (e.mtime, e.mtime), dir_fd=parent, follow_symlinks=False)
        elif e.type == tar.LNK:
            self._hardlink(parent, base, e, what)
        elif e.type == tar.FIFO:
            os.mkfifo(base, 0o600, dir_fd=parent)
            self._attrs_path(parent, base, e)
        else:  # CHR, BLK
            if not self.options.allow_devices:
                raise LayerError(f"{what}: device nodes are not allowed in images")
            kind = stat.S_IFCHR if e.type == tar.CHR else stat.S_IFBLK
            os.mknod(base, 0o600 | kind, os.makedev(e.devmajor, e.devminor), dir_fd=parent)
            self._attrs_path(parent, base, e)

    def _attrs_path(self, parent: int, base: str, e: tar.Entry) -> None:
        # ``base`` was just made by us (a FIFO or device node, never a symlink)
        if self.options.same_owner:
            os.chown(base, e.uid, e.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(base, self._mode(e), dir_fd=parent)

    def _regular(self, parent: int, base: str, e: tar.Entry, what: str) -> None:
        self.bytes += e.size
        if self.bytes > self.options.max_bytes:
            raise errors.ResourceExhausted(
                f"{what}: the image holds more than {self.options.max_bytes} bytes of files")
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            while data := e.read(1 << 20):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if self.options.same_owner:
                os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, self._mode(e))
            os.utime(fd, (e.mtime, e.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, base: str, e: tar.Entry, what: str) -> None:
        tparts = split(e.linkname, f"{what}: hard link target")
        if not tparts:
            raise LayerError(f"{what}: hard link to the root")
        tparent = self._parent(tparts, False, what)
        if tparent is None:
            raise LayerError(f"{what}: hard link to {e.linkname!r}, which is not in the image")
        try:
            try:
                st = os.stat(tparts[-1], dir_fd=tparent, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(
                    f"{what}: hard link to {e.linkname!r}, which is not in the image") from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"{what}: hard link to a directory")
            os.link(tparts[-1], base, src_dir_fd=tparent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(tparent)
