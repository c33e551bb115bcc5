"""Offline OCI bundles with a busybox root filesystem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pykata.errors import NotFound

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]


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


def default_spec(args: list[str], *, hostname: str = "pykata", terminal: bool = False,
                 env: list[str] | None = None, cwd: str = "/",
                 memory_limit: int | None = None) -> dict[str, Any]:
    """An OCI runtime spec shaped like `runc spec` output."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_SETUID",
            "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETPCAP",
            "CAP_MKNOD", "CAP_NET_RAW", "CAP_SYS_CHROOT"]
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": env if env is not None else list(DEFAULT_ENV), "cwd": cwd,
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount",
                                                                    "cgroup")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if memory_limit is not None:
        spec["linux"]["resources"]["memory"] = {"limit": memory_limit, "swap": memory_limit}
    return spec


def make_bundle(bundle: Path, rootfs_source: Path, spec: dict[str, Any]) -> Path:
    """A bundle dir with config.json and rootfs (a bind-free copy via hard links)."""
    bundle.mkdir(parents=True, exist_ok=True)
    rootfs = bundle / "rootfs"
    if not rootfs.exists():
        shutil.copytree(rootfs_source, rootfs, symlinks=True, copy_function=os.link)
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle
