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
from collections.abc import Iterator
from pathlib import Path

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
