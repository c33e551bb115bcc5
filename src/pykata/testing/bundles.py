"""Offline OCI bundles with a busybox root filesystem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pykata.errors import NotFound
from pykata.runtime.bundle import DEFAULT_ENV, default_spec

__all__ = ["DEFAULT_ENV", "busybox_rootfs", "default_spec", "make_bundle"]

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def _busybox() -> Path:
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.is_file():
            out = subprocess.run(["file", "-b", str(p)], capture_output=True, text=True,
                                 check=False).stdout if shutil.which("file") else "static"
            if "dynamic" not in out:
                return p
    raise NotFound("a static busybox is needed: apt-get install busybox-static")


def busybox_rootfs(dest: Path) -> Path:
    """A minimal root filesystem: static busybox and its applets (cached in ``dest``)."""
    marker = dest / ".pykata-rootfs"
    if marker.exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
              "var", "run"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    bb = tmp / "bin" / "busybox"
    shutil.copy2(_busybox(), bb)
    applets = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        link = tmp / a
        if not link.exists() and a != "bin/busybox":
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(bb, link.parent))
    (tmp / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (tmp / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    (tmp / "tmp").chmod(0o1777)
    (tmp / ".pykata-rootfs").write_text("busybox\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def make_bundle(bundle: Path, rootfs_source: Path, spec: dict[str, Any]) -> Path:
    """A bundle dir with config.json and rootfs (a bind-free copy via hard links)."""
    bundle.mkdir(parents=True, exist_ok=True)
    rootfs = bundle / "rootfs"
    if not rootfs.exists():
        shutil.copytree(rootfs_source, rootfs, symlinks=True, copy_function=os.link)
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle
