"""The tree a sandbox shares with its guest through virtio-fs.

    <sandbox>/mounts/   host only: the runtime makes its binds here (a self-bind,
                        shared propagation), through fds, never through a path
                        the guest could change
    <sandbox>/shared/   what virtiofsd exports: a read-only bind of mounts/ that
                        receives its mounts (slave, and shared on to virtiofsd's
                        own mount namespace)

The guest can write inside a container's root filesystem and its writable
volumes (their own mounts), but cannot create, rename or replace anything in
the tree the host walks: every name the host later unmounts or removes is one
it made itself, and each is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from pykata import errors
from pykata.utils import mounts

log = logging.getLogger(__name__)


class SharedTree:
    def __init__(self, sandbox_dir: Path) -> None:
        self.root = sandbox_dir
        self.mounts = sandbox_dir / "mounts"
        self.shared = sandbox_dir / "shared"

    def setup(self) -> None:
        """mounts/ (self-bind, shared) and shared/ (read-only, slave+shared view)."""
        for d in (self.mounts, self.shared):
            os.mkdir(d, 0o700)
        try:
            mounts.mount(self.mounts, self.mounts, flags=mounts.MS_BIND)
            mounts.mount("none", self.mounts, flags=mounts.MS_PRIVATE)
            mounts.mount("none", self.mounts, flags=mounts.MS_SHARED)
            mounts.mount(self.mounts, self.shared, flags=mounts.MS_BIND)
            mounts.mount("none", self.shared, flags=mounts.MS_SLAVE)
            mounts.mount("none", self.shared, flags=mounts.MS_BIND | mounts.MS_REMOUNT
                         | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV)
            mounts.mount("none", self.shared, flags=mounts.MS_SHARED)
        except OSError as exc:
            self.teardown()
            raise errors.Internal(f"cannot set up the shared directory of {self.root}:"
                                  f" {exc.strerror}") from exc

    def share(self, source: Path, rel: str, readonly: bool, *, recursive: bool = True,
              recursive_ro: bool = False, receive: bool = False) -> tuple[str, list[str]]:
        """Bind ``source`` at mounts/``rel``: the mount point made, and the
        entries created for it (relative to mounts/, parents first).
        ``readonly`` makes its top mount read-only, ``recursive_ro`` every mount
        below too; ``recursive`` carries the mounts below ``source``; ``receive``
        makes it receive the mounts the host makes below ``source`` later
        (mounts.bind_onto). The host's flags are what the guest gets: a hostile
        guest never sees more than these allow."""
        try:
            is_dir = source.is_dir()
            exists = is_dir or source.exists()
        except OSError:
            exists = False
        if not exists:
            raise errors.InvalidArgument(f"mount source {source} does not exist")
        root = mounts.open_dir(self.mounts)
        created: list[str] = []
        try:
            leaf, created = mounts.make_path(root, rel, leaf_dir=is_dir)
            try:
                mounts.bind_onto(source, leaf, readonly=readonly, recursive=recursive,
                                 recursive_ro=recursive_ro, receive=receive)
            finally:
                os.close(leaf)
        except (OSError, ValueError) as exc:
            self.remove(created)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise errors.Internal(f"cannot share {source} with the VM: {why}") from exc
        finally:
            os.close(root)
        return str(self.mounts / rel), created

    def unshare(self, points: list[str]) -> list[str]:
        """Unmount the recorded mount points (only those below mounts/); what failed."""
        prefix = str(self.mounts) + "/"
        mine = [p for p in points if p.startswith(prefix)]
        for p in set(points) - set(mine):
            log.error("not unmounting %r: not in %s", p, self.mounts)
        return mounts.umount_points(mine)

    def remove(self, created: list[str]) -> None:
        """Remove entries this tree created (children first); one that is still a
        mount point, or not empty, stays."""
        for rel in reversed(created):
            with contextlib.suppress(FileNotFoundError):
                try:
                    fd = mounts.open_dir(self.mounts)
                except OSError:
                    return
                try:
                    parent, _, name = rel.rpartition("/")
                    pfd = mounts.openat2(fd, parent, os.O_PATH | os.O_DIRECTORY) if parent \
                        else os.dup(fd)
                    try:
                        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            os.rmdir(name, dir_fd=pfd)
                        else:
                            os.unlink(name, dir_fd=pfd)
                    except OSError as exc:
                        log.warning("left %s/%s: %s", self.mounts, rel, exc.strerror)
                    finally:
                        os.close(pfd)
                finally:
                    os.close(fd)

    def clear(self, rel: str) -> list[str]:
        """Unmount everything below mounts/``rel`` and remove it (after a crash,
        when nothing was recorded); what could not be unmounted."""
        failed = mounts.umount_all(self.mounts / rel)
        if not failed:
            try:
                mounts.remove_tree(self.mounts / rel)
            except OSError as exc:
                failed.append(f"{self.mounts / rel} ({exc.strerror})")
        return failed

    def teardown(self) -> list[str]:
        """Unmount the whole tree (everything the sandbox shared); what failed."""
        failed = mounts.umount_all(self.shared)
        failed += mounts.umount_all(self.mounts)
        return failed
