"""The staging tree packed as the initrd: a newc cpio, uncompressed (QEMU keeps
its own copy of the initrd, and a compressed one does not boot faster here),
names sorted and owners 0:0 so the archive depends only on the tree."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from pykata import errors


def write_cpio(root: Path, dest: Path, step: Callable[[str], None]) -> int:
    """newc cpio of ``root`` into ``dest``; its size in bytes."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            names.append(n if rel == "." else f"{rel}/{n}")
    data = ("\n".join(sorted(names)) + "\n").encode()
    with open(dest, "wb") as fh:
        try:
            p = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible",
                                "--owner", "0:0"], cwd=root, input=data, stdout=fh,
                               stderr=subprocess.PIPE, check=False)
        except FileNotFoundError as exc:
            raise errors.FailedPrecondition("cpio is not installed (apt-get install cpio)") \
                from exc
    if p.returncode != 0:
        raise errors.Internal(f"cpio failed: {p.stderr.decode(errors='replace').strip()}")
    size = dest.stat().st_size
    step(f"initrd {size / 2**20:.1f} MiB")
    return size
