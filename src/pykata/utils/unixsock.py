"""Unix socket paths of any length.

A ``sockaddr_un`` holds at most 107 bytes of path, and a sandbox's directory
(``state_dir`` + a 64-character sandbox id) may already take most of that. A
longer path is reached through a descriptor of its directory instead:
``/proc/self/fd/N/NAME`` resolves to the same inode for bind and connect,
and fits whatever the directory's own path is. The directory is opened with
O_NOFOLLOW, so a symlink put in its place is refused rather than followed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from pykata import errors

# sizeof(sun_path) on Linux, less the terminating NUL.
MAX_PATH = 107


@contextlib.contextmanager
def addressable(path: str | os.PathLike[str]) -> Iterator[str]:
    """A path to ``bind`` or ``connect`` a unix socket at ``path`` by; valid
    until the block ends. ``path`` itself when it fits, else a path through a
    descriptor of its directory (OSError when the directory cannot be opened,
    or the socket's own name is too long for even that)."""
    p = Path(path)
    if len(os.fsencode(p)) <= MAX_PATH:
        yield str(p)
        return
    dfd = os.open(p.parent, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{dfd}/{p.name}"
        if len(os.fsencode(short)) > MAX_PATH:
            raise OSError(f"unix socket name {p.name!r:.60} is too long")
        yield short
    finally:
        os.close(dfd)


def socket_of_ours(path: Path) -> bool:
    """Whether a socket owned by this process's user is at ``path`` (False: nothing
    is); anything else there (a symlink, a file, someone else's socket) is
    refused with FailedPrecondition, never to be replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise errors.FailedPrecondition(
            f"{path} exists and is not a socket of ours: refusing to replace it")
    return True


def bind_private(path: Path, backlog: int = 64, *, umask: bool = True) -> socket.socket:
    """A listening AF_UNIX socket at ``path`` (any length), mode 0600. A stale
    socket of ours at the path is replaced; anything else there (a symlink, a
    file, someone else's socket) is refused with FailedPrecondition. With
    ``umask`` it is bound under umask 0177, so it is never open to others even
    for a moment (the umask is the process's: callers with threads that create
    files pass False and rely on a root-only directory instead); either way it
    is 0600 before it listens."""
    if socket_of_ours(path):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with addressable(path) as where:
            old = os.umask(0o177) if umask else None
            try:
                sock.bind(where)  # bind never follows a symlink: it fails if the name exists
            finally:
                if old is not None:
                    os.umask(old)
            os.chmod(where, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
