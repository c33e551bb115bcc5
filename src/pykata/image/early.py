"""The early initrd of the image root: busybox, the kernel modules that reach the
root device, and a short ``/init`` (busybox sh) that mounts the read-only root
image (with DAX where the device allows it), puts tmpfs where the agent writes,
and switches root to the image's own ``/init`` (the agent, as in the initrd).

Kernel command line read by ``/init`` (standard names, so the kernel's own
meaning and ours agree):

``root=/dev/pmem0`` (NVDIMM or virtio-pmem) or ``root=/dev/vda`` (virtio-blk),
``rootfstype=erofs|ext4``, ``rootflags=dax`` (or ``dax=always``; on failure the
mount is retried without it), optional ``pykata.root.wait=<seconds>`` (default 5).
Only the modules of the device at hand are loaded, chosen at boot: ``/dev/vd*``
is virtio-blk, ``/dev/pmem*`` an NVDIMM when the firmware has an ACPI NFIT (QEMU's
``nvdimm=on``) and virtio-pmem otherwise; plus the root file system's module.
Anything else loads them all. The agent loads the rest (virtio, the channel...)
in its own thread, skipping what is loaded already.

Writable in the new root: ``/etc`` (a tmpfs holding a copy of the image's
``/etc``: the agent writes resolv.conf and hosts there), ``/var/tmp``. ``/run``,
``/tmp``, ``/dev``'s submounts and cgroups are mounted by the agent itself, as in
the initrd; ``/dev`` (devtmpfs), ``/proc`` and ``/sys`` are moved over (mounted
with the agent's own options, so it leaves them as they are). The console lines
``pykata-early: start t_start=<uptime>`` and ``... mounted t_root=<uptime>`` time it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pykata.guest.sysutil import module_name
from pykata.image.initrd import write_cpio
from pykata.image.kernel import decompressed, install_module, module_load_order

# What reaches the root device: NVDIMM (ACPI NFIT + libnvdimm + pmem, with the
# PFN info block handled by nd_pmem's claim code, btt is its dependency),
# virtio-pmem (virtio over PCI), virtio-blk (the fallback) and the file systems
# (ext4 is built into Debian's cloud kernel; erofs is a module).
# Per root device, and per file system, what /init loads (dependencies added
# from modules.dep at build time); the early initrd ships the union.
DEVICE_MODULES: dict[str, tuple[str, ...]] = {
    "nvdimm": ("libnvdimm", "nfit", "nd_btt", "nd_pmem"),
    "virtio-pmem": ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                    "virtio_pci", "libnvdimm", "nd_btt", "nd_pmem", "nd_virtio", "virtio_pmem"),
    "virtio-blk": ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                   "virtio_pci", "virtio_blk"),
}
FS_MODULES: dict[str, tuple[str, ...]] = {"erofs": ("erofs",), "ext4": ("ext4",)}
EARLY_MODULES = tuple(dict.fromkeys(
    m for group in (*DEVICE_MODULES.values(), *FS_MODULES.values()) for m in group))

# busybox applets /init uses (links made at build time: no --install at boot).
APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "cp", "cat", "usleep", "switch_root",
           "echo", "test", "[", "sort")

NEW_ROOT = "/newroot"
MODULE_DIR = "/lib/modules"
DEFAULT_WAIT_S = 5


def early_module_order(deps: Mapping[str, Sequence[str]], builtin: set[str],
                       wanted: Iterable[str] = EARLY_MODULES) -> list[str]:
    """modules.dep paths of ``wanted`` and their dependencies, dependencies first;
    built-in and unknown modules left out."""
    return module_load_order(wanted, deps, builtin)


def module_groups(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                  builtin: set[str]) -> dict[str, list[str]]:
    """Group name (a DEVICE_MODULES or FS_MODULES key) -> the paths of ``order``
    (the shipped modules, in load order) that group needs."""
    out: dict[str, list[str]] = {}
    for name, wanted in (*DEVICE_MODULES.items(), *FS_MODULES.items()):
        need = set(module_load_order(wanted, deps, builtin))
        out[name] = [rel for rel in order if rel in need]
    return out


def _var(group: str) -> str:
    return "M_" + group.upper().replace("-", "_")


def early_file_name(index: int, rel: str) -> str:
    """The flat file name of the index-th module in the early initrd."""
    return f"{index:02d}-{Path(decompressed(rel)).name}"


def init_script(module_files: Sequence[str], wait_s: int = DEFAULT_WAIT_S,
                groups: Mapping[str, Sequence[str]] | None = None) -> str:
    """/init of the early initrd: of ``module_files`` (in MODULE_DIR, names that
    sort in load order), the ``groups`` of the root device and file system
    (group -> file names; without groups, or for a device it does not know, all)."""
    mods = " ".join(module_files)
    groups = groups or {}
    lists = "\n".join(f'{_var(g)}="{" ".join(files)}"' for g, files in sorted(groups.items()))
    fs_cases = "".join(f'  {g}) mods="$mods ${_var(g)}" ;;\n' for g in sorted(FS_MODULES)
                       if g in groups)
    loops = wait_s * 100
    if {"nvdimm", "virtio-pmem", "virtio-blk"} <= set(groups):
        choose = f"""mods=
case "$root" in
  /dev/vd*) mods="${_var("virtio-blk")}" ;;
  /dev/pmem*)
    if [ -e /sys/firmware/acpi/tables/NFIT ]; then mods="${_var("nvdimm")}"
    else mods="${_var("virtio-pmem")}"; fi ;;
  *) mods="$ALL" ;;
esac
case "$fstype" in
{fs_cases}  *) mods="$ALL" ;;
esac
mods=$(for m in $mods; do echo "$m"; done | sort -u)"""
    else:
        choose = 'mods="$ALL"'
    return f"""#!/bin/sh
# pykata early init: mount the read-only root image, hand over to its /init.
export PATH=/bin
say() {{ echo "pykata-early: $*"; }}
die() {{ say "$*"; exit 1; }}
mount -t proc -o nosuid,nodev,noexec proc /proc
read up _ < /proc/uptime
say "start t_start=$up"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
ALL="{mods}"
{lists}
root= fstype=erofs flags= wait={loops}
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${{arg#root=}}" ;;
    rootfstype=*) fstype="${{arg#rootfstype=}}" ;;
    rootflags=*) flags="${{arg#rootflags=}}" ;;
    pykata.root.wait=*) wait=$((${{arg#pykata.root.wait=}} * 100)) ;;
  esac
done
[ -n "$root" ] || die "no root= on the kernel command line"
{choose}
for m in $mods; do
  insmod {MODULE_DIR}/$m 2>/dev/null || say "cannot load $m"
done
i=0
while [ ! -b "$root" ]; do
  [ $i -lt $wait ] || die "no root device $root"
  usleep 10000
  i=$((i + 1))
done
opts=ro
[ -z "$flags" ] || opts="ro,$flags"
if ! mount -t "$fstype" -o "$opts" "$root" {NEW_ROOT} 2>/dev/null; then
  [ -n "$flags" ] || die "cannot mount $root ($fstype)"
  say "cannot mount $root with $flags; mounting it without"
  mount -t "$fstype" -o ro "$root" {NEW_ROOT} || die "cannot mount $root ($fstype)"
fi
[ -x {NEW_ROOT}/init ] || die "no /init in $root"
cp -a {NEW_ROOT}/etc /etc.image || die "cannot copy /etc"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs {NEW_ROOT}/etc || die "cannot mount /etc"
cp -a /etc.image/. {NEW_ROOT}/etc/ || die "cannot fill /etc"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {NEW_ROOT}/var/tmp
mount -o move /dev {NEW_ROOT}/dev
mount -o move /sys {NEW_ROOT}/sys || umount /sys
read up _ < /proc/uptime
say "root $root ($fstype, $opts) mounted t_root=$up"
mount -o move /proc {NEW_ROOT}/proc || umount /proc
exec switch_root {NEW_ROOT} /init
"""


def build_early_initrd(busybox: Path, module_src: Path, order: Sequence[str], dest: Path,
                       work: Path, step: Callable[[str], None],
                       groups: Mapping[str, Sequence[str]] | None = None) -> int:
    """The early initrd at ``dest``: ``busybox`` (static), the modules ``order``
    (paths relative to ``module_src``, in load order), /init loading the
    ``groups`` (name -> paths of ``order``) the root needs. Its size."""
    root = work / "early"
    for d in ("bin", "dev", "proc", "sys", "etc", NEW_ROOT.strip("/"), MODULE_DIR.strip("/")):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    files = []
    by_rel: dict[str, str] = {}
    for i, rel in enumerate(order, 1):
        name = early_file_name(i, rel)
        install_module(module_src / rel, root / MODULE_DIR.strip("/") / name)
        files.append(name)
        by_rel[rel] = name
    named = {g: [by_rel[r] for r in rels if r in by_rel] for g, rels in (groups or {}).items()}
    (root / "init").write_text(init_script(files, groups=named))
    (root / "init").chmod(0o755)
    # The kernel opens /dev/console for init before anything is mounted.
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    size = write_cpio(root, dest, lambda _text: None)
    shutil.rmtree(root)
    step(f"early initrd {size / 2**20:.1f} MiB, {len(files)} modules: "
         + " ".join(module_name(f) for f in order))
    return size
