"""The read-only root image for pmem (DAX) and its early initrd: the pure parts
(layout and padding, the PFN info block, module choice, /init, manifest)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from pykata import errors
from pykata.guest.sysutil import parse_modules_dep
from pykata.image import builder, cache, early, rootimage
from pykata.image.cache import find_image

MIB = 1 << 20

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/libnvdimm.ko:
kernel/drivers/acpi/nfit/nfit.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_btt.ko: kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_pmem.ko: kernel/drivers/nvdimm/nd_btt.ko kernel/drivers/nvdimm/libnvdimm.ko
kernel/drivers/nvdimm/nd_virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/nvdimm/virtio_pmem.ko: kernel/drivers/nvdimm/nd_virtio.ko \
kernel/drivers/nvdimm/libnvdimm.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/fs/overlayfs/overlay.ko:
"""


def _deps() -> dict[str, list[str]]:
    return parse_modules_dep(MODULES_DEP.replace("\\\n", ""))


# -- alignment and padding -----------------------------------------------------------
def test_align_up() -> None:
    assert rootimage.align_up(0) == 0
    assert rootimage.align_up(1) == 2 * MIB
    assert rootimage.align_up(2 * MIB) == 2 * MIB
    assert rootimage.align_up(2 * MIB + 1) == 4 * MIB
    assert rootimage.align_up(5, 4) == 8
    with pytest.raises(ValueError):
        rootimage.align_up(5, 0)


def test_device_size_is_data_offset_plus_aligned_fs() -> None:
    assert rootimage.device_size(30_486_528) == 2 * MIB + 30 * MIB
    assert rootimage.device_size(30 * MIB) == 32 * MIB
    assert rootimage.device_size(0) == 4 * MIB  # never an empty data area
    for fs in (1, 4095, 3 * MIB + 7, 100 * MIB):
        size = rootimage.device_size(fs)
        assert size % rootimage.ALIGN == 0
        assert size - rootimage.DATA_OFFSET >= fs


# -- the PFN info block ----------------------------------------------------------------
def test_fletcher64() -> None:
    assert rootimage.fletcher64(b"") == 0
    # words 1, 2: lo = 1 then 3; hi = 1 then 4
    assert rootimage.fletcher64(struct.pack("<II", 1, 2)) == (4 << 32) | 3
    # lo wraps at 32 bits, hi keeps counting
    assert rootimage.fletcher64(struct.pack("<II", 0xFFFFFFFF, 1)) == (0xFFFFFFFF << 32) | 0
    with pytest.raises(ValueError):
        rootimage.fletcher64(b"abc")


def test_pfn_info_block_fields() -> None:
    u = uuid.UUID(int=0x1234).bytes
    size = 32 * MIB
    blk = rootimage.pfn_info_block(size, u)
    assert len(blk) == 4096
    assert blk[:16] == b"NVDIMM_PFN_INFO\0"
    assert blk[16:32] == u
    assert blk[32:48] == bytes(16)  # parent uuid: label-less namespace
    (flags, major, minor, dataoff, npfns, mode, start_pad, end_trunc, align, page_size,
     page_struct) = struct.unpack_from("<IHHQQIIIIIH", blk, 48)
    assert (flags, major, minor) == (0, 1, 4)
    assert dataoff == 2 * MIB and npfns == (size - 2 * MIB) // 4096
    assert mode == rootimage.PFN_MODE_RAM  # the device is read-only: memmap in RAM
    assert (start_pad, end_trunc, align, page_size, page_struct) == (0, 0, 2 * MIB, 4096, 64)
    assert blk[94:4088] == bytes(4088 - 94)
    (checksum,) = struct.unpack_from("<Q", blk, 4088)
    assert checksum == rootimage.fletcher64(blk[:4088] + bytes(8))


@pytest.mark.parametrize("size,offset", [(33 * MIB, 2 * MIB), (32 * MIB, 4096),
                                         (32 * MIB, 3 * MIB), (2 * MIB, 2 * MIB)])
def test_pfn_info_block_refuses_bad_layouts(size: int, offset: int) -> None:
    with pytest.raises(ValueError):
        rootimage.pfn_info_block(size, bytes(16), data_offset=offset)


def test_wrap_for_pmem_layout(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.write_bytes(b"F" * (3 * MIB + 5))
    dest = tmp_path / "rootfs.test"
    size = rootimage.wrap_for_pmem(fs, dest, bytes(range(16)))
    assert size == dest.stat().st_size == 2 * MIB + 4 * MIB
    data = dest.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[4096:4096 + 16] == rootimage.PFN_SIGNATURE
    assert data[8192:2 * MIB] == bytes(2 * MIB - 8192)
    assert data[2 * MIB:2 * MIB + 3 * MIB + 5] == b"F" * (3 * MIB + 5)
    assert data[2 * MIB + 3 * MIB + 5:] == bytes(size - 5 * MIB - 5)


def test_image_uuid_is_stable_per_build_and_fs() -> None:
    a = rootimage.image_uuid("d1", "erofs")
    assert a == rootimage.image_uuid("d1", "erofs")
    assert a != rootimage.image_uuid("d1", "ext4")
    assert a != rootimage.image_uuid("d2", "erofs")


def test_ext4_size_leaves_room(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/big").write_bytes(b"x" * (5 * MIB))
    (tmp_path / "small").write_bytes(b"y" * 10)
    (tmp_path / "link").symlink_to("small")
    fs, inodes = rootimage.ext4_size(tmp_path)
    assert fs % rootimage.ALIGN == 0 and fs > 5 * MIB + 4 * MIB
    assert inodes >= 5 + 256 and inodes % 64 == 0


def test_build_root_image_refuses_unknown_fs(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument):
        rootimage.build_root_image(tmp_path, tmp_path, "xfs", "d", lambda _t: None)


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")
def test_erofs_image_of_a_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "init").write_bytes(b"#!/bin/sh\n" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    img = rootimage.build_root_image(root, out, "erofs", "digest", lambda _t: None)
    assert img.path == out / "rootfs.erofs" and img.size_bytes % rootimage.ALIGN == 0
    data = img.path.read_bytes()
    # erofs' superblock magic sits 1 KiB into the file system
    assert struct.unpack_from("<I", data, rootimage.DATA_OFFSET + 1024)[0] == 0xE0F5E1E2
    assert img.manifest()["data_offset"] == rootimage.DATA_OFFSET
    assert not list(out.glob(".*"))  # its temporary directory is gone


# -- the early initrd ------------------------------------------------------------------
def test_early_modules_reach_every_root_device() -> None:
    order = early.early_module_order(_deps(), builtin={"ext4"})
    names = [Path(p).name.removesuffix(".ko") for p in order]
    pos = {n: i for i, n in enumerate(names)}
    for need in ("nfit", "nd_pmem", "virtio_pmem", "virtio_blk", "erofs"):
        assert need in pos
    assert pos["libnvdimm"] < pos["nfit"] < pos["nd_pmem"]
    assert pos["nd_btt"] < pos["nd_pmem"]
    assert pos["nd_virtio"] < pos["virtio_pmem"]
    assert pos["virtio_ring"] < pos["virtio"] < pos["virtio_pci"] < pos["virtio_blk"]
    assert pos["libcrc32c"] < pos["erofs"]
    assert "ext4" not in pos and "overlay" not in pos  # built in / not needed
    assert len(names) == len(set(names))


def test_early_file_names_sort_in_load_order() -> None:
    rels = ["kernel/a/zz.ko.xz", "kernel/b/aa.ko"]
    names = [early.early_file_name(i, r) for i, r in enumerate(rels, 1)]
    assert names == ["01-zz.ko", "02-aa.ko"] == sorted(names)


def test_early_module_groups_per_device() -> None:
    deps = _deps()
    order = early.early_module_order(deps, builtin={"ext4"})
    groups = early.module_groups(order, deps, builtin={"ext4"})
    names = {g: [Path(p).name.removesuffix(".ko") for p in rels] for g, rels in groups.items()}
    assert set(groups) == {"nvdimm", "virtio-pmem", "virtio-blk", "erofs", "ext4"}
    # an NVDIMM needs no virtio at all; each list keeps the load order
    assert "nfit" in names["nvdimm"] and not any(n.startswith("virtio") for n in names["nvdimm"])
    assert "virtio_blk" in names["virtio-blk"] and "libnvdimm" not in names["virtio-blk"]
    assert {"virtio_pmem", "nd_pmem", "virtio_pci"} <= set(names["virtio-pmem"])
    assert "nfit" not in names["virtio-pmem"]
    assert "libcrc32c" in names["erofs"] and names["ext4"] == []  # built in
    for rels in groups.values():
        assert rels == [r for r in order if r in rels]


def test_init_script_loads_what_the_device_needs() -> None:
    groups = {"nvdimm": ["02-b.ko"], "virtio-pmem": ["01-a.ko", "02-b.ko"],
              "virtio-blk": ["01-a.ko"], "erofs": ["03-c.ko"], "ext4": []}
    text = early.init_script(["01-a.ko", "02-b.ko", "03-c.ko"], groups=groups)
    assert 'M_NVDIMM="02-b.ko"' in text and 'ALL="01-a.ko 02-b.ko 03-c.ko"' in text
    assert "/sys/firmware/acpi/tables/NFIT" in text and "/dev/vd*)" in text
    assert "sort -u" in text and "sort" in early.APPLETS
    # without groups: everything, as before
    assert 'mods="$ALL"' in early.init_script(["01-a.ko"])


def test_init_script() -> None:
    text = early.init_script(["01-a.ko", "02-b.ko"], wait_s=3)
    assert text.startswith("#!/bin/sh\n")
    assert 'ALL="01-a.ko 02-b.ko"' in text and "for m in $mods; do" in text
    assert "t_start=$up" in text and "t_root=$up" in text
    assert "mount -o move /sys /newroot/sys" in text and "mount -o move /proc /newroot/proc" in text
    assert "wait=300" in text
    for needle in ("root=*)", "rootfstype=*)", "rootflags=*)", "mount -o move /dev /newroot/dev",
                   "exec switch_root /newroot /init", "/newroot/etc", "/newroot/var/tmp"):
        assert needle in text
    # retried without the flags (e.g. dax on a device without DAX)
    assert 'mount -t "$fstype" -o ro "$root" /newroot' in text
    # the switch is the last thing it does
    assert text.rstrip().splitlines()[-1] == "exec switch_root /newroot /init"


@pytest.mark.skipif(shutil.which("busybox") is None and not Path("/bin/busybox").exists(),
                    reason="no busybox to check the script's syntax")
def test_init_script_parses(tmp_path: Path) -> None:
    bb = shutil.which("busybox") or "/bin/busybox"
    script = tmp_path / "init"
    script.write_text(early.init_script(["01-a.ko"], groups={
        "nvdimm": ["01-a.ko"], "virtio-pmem": [], "virtio-blk": [], "erofs": [], "ext4": []}))
    r = subprocess.run([bb, "sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


# -- the choice of images, manifest and layout -------------------------------------------
def test_root_image_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootimage, "available", lambda fs: fs == "ext4")
    assert builder.root_image_choice(None) == ()  # no mkfs.erofs: initrd only, a warning
    assert builder.root_image_choice(()) == ()
    assert builder.root_image_choice(["ext4", "ext4"]) == ("ext4",)
    with pytest.raises(errors.FailedPrecondition, match="erofs-utils"):
        builder.root_image_choice(["erofs"])
    with pytest.raises(errors.InvalidArgument):
        builder.root_image_choice(["xfs"])
    monkeypatch.setattr(rootimage, "available", lambda fs: True)
    assert builder.root_image_choice(None) == ("erofs",)


def _fake_build(tmp_path: Path, digest: str, images: dict[str, int]) -> Path:
    out = tmp_path / f".new-{digest}"
    out.mkdir()
    for n in ("vmlinuz", "initrd.img"):
        (out / n).write_bytes(b"x")
    manifest: dict[str, object] = {"kernel_release": "6.1.0-1-cloud-amd64", "digest": digest,
                                   "initrd_bytes": 1, "root_images": {}}
    for fs, size in images.items():
        (out / f"rootfs.{fs}").write_bytes(bytes(size))
        img = rootimage.RootImage(fs, out / f"rootfs.{fs}", size, size // 2)
        manifest["root_images"][fs] = img.manifest()  # type: ignore[index]
    if images:
        (out / cache.EARLY_INITRD).write_bytes(b"e")
    (out / cache.MANIFEST).write_text(json.dumps(manifest))
    return out


def test_find_image_reports_root_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    cache.install(tmp_path, _fake_build(tmp_path, "d1", {"erofs": 4096}), "d1")
    art = find_image(tmp_path)
    assert art is not None
    assert art.root_images == {"erofs": tmp_path / "rootfs.erofs"}
    assert art.early_initrd == tmp_path / cache.EARLY_INITRD
    assert art.root_data_offset == rootimage.DATA_OFFSET
    # a build without them drops the stable links, and find_image reports none
    cache.install(tmp_path, _fake_build(tmp_path, "d2", {}), "d2")
    art = find_image(tmp_path)
    assert art is not None and art.digest == "d2"
    assert art.root_images == {} and art.early_initrd is None
    assert not (tmp_path / "rootfs.erofs").is_symlink()
    assert not (tmp_path / cache.EARLY_INITRD).is_symlink()


def test_an_older_manifest_has_no_root_images(tmp_path: Path) -> None:
    for n in ("vmlinuz", "initrd.img"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / cache.MANIFEST).write_text(json.dumps(
        {"kernel_release": "r", "digest": "d", "initrd_bytes": 1}))
    art = find_image(tmp_path)
    assert art is not None and art.root_images == {} and art.early_initrd is None


def test_build_reuses_only_a_build_with_the_images_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images").mkdir()
    cache.install(tmp_path, _fake_build(tmp_path, "d1", {}), "d1")
    monkeypatch.setattr(builder, "image_digest", lambda _o: ("d1", "k", {}))
    monkeypatch.setattr(rootimage, "available", lambda fs: True)
    built: list[tuple[str, ...]] = []

    def fake(output_dir: Path, digest: str, kpkg: str, versions: dict[str, str],
             progress: bool, work_dir: Path | None, wanted: tuple[str, ...] = ()) -> object:
        built.append(tuple(wanted))
        return find_image(output_dir)

    monkeypatch.setattr(builder, "_build", fake)
    builder.build_image(tmp_path, root_images=())
    assert built == []  # same digest, nothing more asked for
    builder.build_image(tmp_path, root_images=("erofs",))
    assert built == [("erofs",)]  # the current build has no erofs image
