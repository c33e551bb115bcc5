"""The guest root as a read-only file system image (erofs or ext4) that QEMU maps
into the guest as an NVDIMM or virtio-pmem device, so that every VM reads and
executes the same host page-cache pages (DAX) instead of unpacking its own
initrd copy into its RAM. The same file also works as a read-only virtio-blk
disk (without DAX).

Layout of ``rootfs.<fs>`` (the whole file is the device)::

    0        4 KiB   zeros
    4 KiB    8 KiB   a PFN info block ("NVDIMM_PFN_INFO", memmap in guest RAM)
    8 KiB    2 MiB   zeros (a hole)
    2 MiB    ...     the file system, then zeros up to a multiple of 2 MiB

Why the info block: a label-less NVDIMM namespace is "raw", and the guest's pmem
driver gives a raw namespace no struct pages, so the file system cannot use DAX
("DAX unsupported by block device"). An info block at 4 KiB makes the kernel
claim the namespace as a PFN device ("fsdax" mode): /dev/pmem0 then starts at
the data offset (2 MiB) and supports DAX. The memmap lives in guest RAM
(``PFN_MODE_RAM``, 64 bytes per 4 KiB page), because the device is read-only.
virtio-pmem reads the same block. For virtio-blk the host skips the first
2 MiB itself (QEMU's raw format ``offset=``).

Sizes: the device and its data start are 2 MiB aligned (the kernel maps
persistent memory in 2 MiB subsections and truncates or refuses a misaligned
namespace; QEMU's memory-backend-file wants ``size`` equal to the file size).
"""

from __future__ import annotations

import os
import shutil
import struct
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pykata import errors, wire
from pykata.image.tools import run, tempdir

FILESYSTEMS = ("erofs", "ext4")
MKFS = {"erofs": "mkfs.erofs", "ext4": "mkfs.ext4"}

PAGE = 4096
ALIGN = 2 << 20  # device size and data offset alignment
DATA_OFFSET = wire.ROOT_IMAGE_DATA_OFFSET  # where the file system starts in the image
PFN_INFO_OFFSET = 4096  # where the kernel looks for the info block
PFN_SIGNATURE = b"NVDIMM_PFN_INFO\0"
PFN_MODE_RAM = 1  # struct pages in guest RAM (the device is read-only)
PFN_VERSION = (1, 4)  # minor 4: page_size and page_struct_size recorded
STRUCT_PAGE_BYTES = 64  # sizeof(struct page) on x86_64


@dataclass(frozen=True)
class RootImage:
    fstype: str  # erofs | ext4
    path: Path
    size_bytes: int  # the whole file (the device): a multiple of ALIGN
    fs_bytes: int  # the file system inside it
    data_offset: int = DATA_OFFSET

    def manifest(self) -> dict[str, object]:
        return {"file": self.path.name, "fstype": self.fstype, "bytes": self.size_bytes,
                "fs_bytes": self.fs_bytes, "data_offset": self.data_offset, "align": ALIGN}


# -- pure parts ------------------------------------------------------------------------
def align_up(n: int, a: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    if a <= 0:
        raise ValueError("alignment must be positive")
    return -(-n // a) * a


def device_size(fs_bytes: int, data_offset: int = DATA_OFFSET) -> int:
    """Size of the image file holding a ``fs_bytes`` file system (at least one
    aligned unit of data)."""
    return data_offset + align_up(max(fs_bytes, 1))


def fletcher64(data: bytes) -> int:
    """The nvdimm info blocks' checksum: Fletcher-64 over little-endian 32-bit words."""
    if len(data) % 4:
        raise ValueError("fletcher64 needs whole 32-bit words")
    lo, hi = 0, 0
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi += lo
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


# struct nd_pfn_sb up to page_struct_size, from offset 48 (after signature, uuid,
# parent_uuid): flags, version major/minor, dataoff, npfns, mode, start_pad,
# end_trunc, align, page_size, page_struct_size. The checksum is the last 8 bytes.
_PFN_FIELDS = struct.Struct("<IHHQQIIIIIH")


def pfn_info_block(size: int, image_uuid: bytes, data_offset: int = DATA_OFFSET,
                   align: int = ALIGN) -> bytes:
    """The 4 KiB PFN info block for a namespace of ``size`` bytes whose data starts
    at ``data_offset``. The parent uuid stays zero: QEMU's NVDIMMs have no labels,
    so the namespace has no uuid of its own."""
    if len(image_uuid) != 16:
        raise ValueError("the info block's uuid is 16 bytes")
    if data_offset < 2 * PAGE or data_offset % align or size % align or size <= data_offset:
        raise ValueError(f"bad pmem layout: size {size}, data offset {data_offset}, "
                         f"align {align}")
    block = bytearray(PAGE)
    block[0:16] = PFN_SIGNATURE
    block[16:32] = image_uuid
    npfns = (size - data_offset) // PAGE
    _PFN_FIELDS.pack_into(block, 48, 0, PFN_VERSION[0], PFN_VERSION[1], data_offset, npfns,
                          PFN_MODE_RAM, 0, 0, align, PAGE, STRUCT_PAGE_BYTES)
    struct.pack_into("<Q", block, PAGE - 8, fletcher64(bytes(block)))
    return bytes(block)


def image_uuid(digest: str, fstype: str) -> uuidlib.UUID:
    """A stable uuid per build and file system (the images are reproducible)."""
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"pykata-rootfs:{digest}:{fstype}")


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, number of inodes) of a tree, symlinks not followed."""
    total, inodes = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        inodes += 1
        total += PAGE
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, n))
            inodes += 1
            total += align_up(st.st_size, PAGE) if st.st_size > 60 else 0
    return total, inodes


def ext4_size(root: Path) -> tuple[int, int]:
    """(file system bytes, inode count) that fit ``root`` in ext4 with room to spare."""
    data, inodes = tree_bytes(root)
    n_inodes = align_up(inodes + 256, 64)
    fs = align_up(data + data // 8 + n_inodes * 256 + (4 << 20), ALIGN)
    return fs, n_inodes


# -- building --------------------------------------------------------------------------
def mkfs_erofs(root: Path, dest: Path, fs_uuid: uuidlib.UUID) -> None:
    # noinline_data: a file whose tail is packed into its inode cannot be
    # DAX-mapped (erofs gives DAX only to "flat plain" files), so no tail packing.
    # Uncompressed for the same reason. -T0 and --all-root: reproducible.
    run(["mkfs.erofs", "--quiet", "-E", "noinline_data", "-T", "0", "--all-root",
         "-U", str(fs_uuid), str(dest), str(root)], "cannot make the erofs root image")


def mkfs_ext4(root: Path, dest: Path, fs_uuid: uuidlib.UUID) -> None:
    # 4 KiB blocks (DAX needs block size == page size), no journal (read-only),
    # no reserved blocks, no resize inode; the tree copied in by mke2fs -d.
    fs, n_inodes = ext4_size(root)
    with open(dest, "wb") as fh:
        fh.truncate(fs)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "E2FSPROGS_FAKE_TIME": "1",
           "MKE2FS_CONFIG": "/dev/null"}
    run(["mkfs.ext4", "-q", "-F", "-b", str(PAGE), "-I", "256", "-N", str(n_inodes), "-m", "0",
         "-O", "^has_journal,^resize_inode,extent,huge_file,flex_bg,dir_nlink,extra_isize,"
               "64bit,sparse_super,filetype",
         "-E", f"root_owner=0:0,hash_seed={fs_uuid},lazy_itable_init=0",
         "-U", str(fs_uuid), "-L", "pykata-root", "-d", str(root), str(dest)],
        "cannot make the ext4 root image", env=env)


def wrap_for_pmem(fs_file: Path, dest: Path, image_uuid_bytes: bytes) -> int:
    """``dest``: the info block, then ``fs_file`` at DATA_OFFSET, padded; its size."""
    fs_bytes = fs_file.stat().st_size
    size = device_size(fs_bytes)
    with open(dest, "wb") as out:
        out.truncate(size)  # holes where there is nothing
        out.seek(PFN_INFO_OFFSET)
        out.write(pfn_info_block(size, image_uuid_bytes))
        out.seek(DATA_OFFSET)
        with open(fs_file, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    return size


def build_root_image(root: Path, out: Path, fstype: str, digest: str,
                     step: Callable[[str], None]) -> RootImage:
    """``out/rootfs.<fstype>`` from the staging tree ``root``."""
    if fstype not in FILESYSTEMS:
        raise errors.InvalidArgument(f"root image file system {fstype!r}: one of "
                                     + ", ".join(FILESYSTEMS))
    u = image_uuid(digest, fstype)
    dest = out / f"rootfs.{fstype}"
    with tempdir(out, f".{fstype}-") as tmp:
        fs_file = tmp / "fs"
        if fstype == "erofs":
            mkfs_erofs(root, fs_file, u)
        else:
            mkfs_ext4(root, fs_file, u)
        fs_bytes = fs_file.stat().st_size
        size = wrap_for_pmem(fs_file, dest, u.bytes)
    step(f"{dest.name} {fs_bytes / 2**20:.1f} MiB (device {size / 2**20:.0f} MiB)")
    return RootImage(fstype=fstype, path=dest, size_bytes=size, fs_bytes=fs_bytes)


def available(fstype: str) -> bool:
    """Whether this host has the mkfs tool for ``fstype``."""
    return shutil.which(MKFS[fstype], path="/usr/sbin:/usr/bin:/sbin:/bin") is not None
