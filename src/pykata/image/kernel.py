"""The guest kernel: Debian's cloud kernel (``vmlinuz``), the uncompressed
``vmlinux`` ELF taken out of it for PVH boot, and the kernel modules the guest
loads at boot (with their dependencies, in load order, uncompressed).

modules.dep is read with the guest agent's own parser
(:func:`pykata.guest.sysutil.parse_modules_dep`), so the image and the agent
agree on module names and dependency lists.
"""

from __future__ import annotations

import logging
import lzma
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pykata import errors
from pykata.guest.sysutil import module_name, parse_modules_dep
from pykata.image.elf import elf_complete
from pykata.image.tools import run

log = logging.getLogger(__name__)

KERNEL_META = "linux-image-cloud-amd64"

# Kernel modules the guest loads at boot; the builder adds their dependencies
# (from modules.dep) and skips the ones built into the kernel.
GUEST_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "fuse", "virtiofs", "overlay",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "crc16", "mbcache", "jbd2", "ext4", "virtio_balloon",
)


# -- vmlinuz and vmlinux -------------------------------------------------------------
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def find_lz4_vmlinux(bzimage: bytes, start: int = 0) -> int:
    """Offset of the next LZ4 (legacy frame) magic at or after ``start``, or -1."""
    return bzimage.find(LZ4_LEGACY_MAGIC, start)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed vmlinux ELF inside an LZ4-compressed bzImage, or None."""
    off = find_lz4_vmlinux(bzimage)
    while off >= 0:
        try:
            # lz4 complains about the bytes after the stream; the output is what counts.
            raw = subprocess.run(["lz4", "-dc"], input=bzimage[off:], capture_output=True,
                                 check=False).stdout
        except FileNotFoundError:
            log.warning("lz4 is not installed: no uncompressed vmlinux (apt-get install lz4)")
            return None
        if elf_complete(raw):
            return raw
        off = find_lz4_vmlinux(bzimage, off + 1)
    return None


def install_kernel(kroot: Path, out: Path, step: Callable[[str], None]) -> str:
    """``out/vmlinuz`` (and ``out/vmlinux`` when it can be extracted) from the
    unpacked kernel package in ``kroot``; the kernel release."""
    vmlinuz = next(iter(sorted((kroot / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        raise errors.Internal(f"no /boot/vmlinuz-* in the kernel package ({kroot})")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    raw = extract_vmlinux(vmlinuz.read_bytes())
    if raw is not None:
        (out / "vmlinux").write_bytes(raw)
    else:
        log.warning("no uncompressed vmlinux in %s: the guest boots from the bzImage", vmlinuz)
    step(f"kernel {release}" + (" + vmlinux" if raw is not None else ""))
    return release


# -- modules -------------------------------------------------------------------------
def module_load_order(wanted: Iterable[str], deps: Mapping[str, Sequence[str]],
                      builtin: set[str]) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first.
    ``deps`` is :func:`pykata.guest.sysutil.parse_modules_dep` output (name ->
    [its path, then its dependencies' paths]). Built-in and unknown modules are
    skipped."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            return
        path, *requires = deps[name]
        for dep in reversed(requires):  # modules.dep lists the closest dependency first
            visit(module_name(dep))
        order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


def decompressed(rel: str) -> str:
    """A module's file name once decompressed (foo.ko.xz -> foo.ko)."""
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(suffix):
            return rel.removesuffix(suffix)
    return rel


def install_module(src: Path, dst: Path) -> None:
    """Copy a module, decompressed (the agent calls finit_module without flags)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".xz"):
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.name.endswith(".gz"):
        import gzip

        dst.write_bytes(gzip.decompress(src.read_bytes()))
    elif src.name.endswith(".zst"):
        with open(dst, "wb") as fh:
            subprocess.run(["zstd", "-dc", str(src)], stdout=fh, check=True)
    else:
        shutil.copyfile(src, dst)


def module_index(kroot: Path, release: str) -> tuple[dict[str, list[str]], set[str]]:
    """(modules.dep as parsed by the guest, names built into the kernel) of the
    unpacked kernel package in ``kroot``; runs depmod when the .deb has no index."""
    mdir = kroot / "lib/modules" / release
    if not (mdir / "modules.dep").exists():  # depmod runs at install time, not in the .deb
        run(["depmod", "-b", str(kroot), release], f"cannot index the modules of {release}")
    deps = parse_modules_dep((mdir / "modules.dep").read_text())
    builtin_file = mdir / "modules.builtin"
    builtin = ({module_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    return deps, builtin


def install_modules(kroot: Path, root: Path, release: str,
                    step: Callable[[str], None]) -> list[str]:
    """Copy the closure of GUEST_MODULES; write /etc/pykata/modules (load order,
    paths relative to /) and a modules.dep of the shipped modules."""
    mdir = kroot / "lib/modules" / release
    deps, builtin = module_index(kroot, release)
    builtin_file = mdir / "modules.builtin"
    order = module_load_order(GUEST_MODULES, deps, builtin)
    absent = [m for m in GUEST_MODULES if m.replace("-", "_") not in deps
              and m.replace("-", "_") not in builtin]
    if absent:
        log.warning("kernel %s has neither module nor built-in: %s", release, " ".join(absent))
    base = Path("lib/modules") / release
    load_list: list[str] = []
    dep_lines: list[str] = []
    for rel in order:
        install_module(mdir / rel, root / "usr" / base / decompressed(rel))
        load_list.append(str(base / decompressed(rel)))
        own_deps = deps[module_name(rel)][1:]
        dep_lines.append(f"{decompressed(rel)}: " + " ".join(decompressed(d) for d in own_deps))
    if builtin_file.exists():  # lets the agent tell "built in" from "missing"
        shutil.copyfile(builtin_file, root / "usr" / base / "modules.builtin")
    (root / "usr" / base / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    (root / "etc/pykata").mkdir(parents=True, exist_ok=True)
    (root / "etc/pykata/modules").write_text("\n".join(load_list) + "\n")
    step(f"{len(load_list)} kernel modules")
    return load_list
