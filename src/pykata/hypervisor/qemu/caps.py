"""What this QEMU binary can do, asked of the binary itself (cached per binary)."""

from __future__ import annotations

import functools
import os
import re
import subprocess

from pykata import errors


@functools.lru_cache(maxsize=16)
def _device_properties(binary: str, mtime_ns: int, device: str) -> frozenset[str]:
    try:
        out = subprocess.run([binary, "-device", f"{device},help"], capture_output=True,
                             text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"^\s+([\w-]+)=", out.stdout, re.MULTILINE))


def device_properties(binary: str, device: str) -> frozenset[str]:
    """The properties QEMU ``binary`` accepts for ``device`` (empty if unknown)."""
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError:
        return frozenset()
    return _device_properties(binary, mtime, device)


def dax_supported(binary: str) -> bool:
    """virtio-fs DAX needs vhost-user-fs-pci's cache-size property (not in upstream
    QEMU releases; the virtio-fs development branch and Kata's QEMU have it)."""
    return "cache-size" in device_properties(binary, "vhost-user-fs-pci")


def check_dax(binary: str, cache_size_mib: int) -> None:
    if cache_size_mib and not dax_supported(binary):
        raise errors.InvalidArgument(
            f"[hypervisor.qemu] virtio_fs_cache_size = {cache_size_mib} asks for a virtio-fs"
            f" DAX window, but {binary} has no vhost-user-fs-pci cache-size property (no DAX"
            " support): set virtio_fs_cache_size = 0 or use a QEMU built with virtio-fs DAX")


_QMP_QUIT = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'


@functools.lru_cache(maxsize=16)
def _seccomp_probe(binary: str, mtime_ns: int, value: str, uid: int, gid: int) -> str:
    argv = [binary, "-sandbox", value, "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", "stdio"]
    try:
        if uid >= 0:
            out = subprocess.run(argv, input=_QMP_QUIT, capture_output=True, timeout=15,
                                 check=False, cwd="/", user=uid, group=gid, extra_groups=[])
        else:
            out = subprocess.run(argv, input=_QMP_QUIT, capture_output=True, timeout=15,
                                 check=False, cwd="/")
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if out.returncode == 0:
        return ""
    lines = out.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else f"exit status {out.returncode}"


def seccomp_probe(binary: str, value: str, uid: int = -1, gid: int = -1) -> str:
    """"" if ``binary`` starts under ``-sandbox value`` (as ``uid``:``gid`` if
    given), else QEMU's complaint. Asked once per binary, value and user."""
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError as exc:
        return f"{binary}: {exc.strerror}"
    return _seccomp_probe(binary, mtime, value, uid, gid)
