"""Pure parts of the guest image builder (no network, no root)."""

from __future__ import annotations

from pathlib import Path

from pykata.image.builder import (
    compute_digest,
    find_lz4_vmlinux,
    module_load_order,
    parse_modules_dep,
)

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
"""


def test_parse_modules_dep_names_and_deps() -> None:
    deps = parse_modules_dep(MODULES_DEP.replace("\\\n", ""))
    assert deps["virtiofs"][0] == "kernel/fs/fuse/virtiofs.ko"
    assert deps["ext4"][0] == "kernel/fs/ext4/ext4.ko.xz"
    assert "kernel/fs/fuse/fuse.ko" in deps["virtiofs"][1]


def test_load_order_puts_dependencies_first() -> None:
    deps = parse_modules_dep(MODULES_DEP.replace("\\\n", ""))
    order = module_load_order(["virtiofs", "virtio_pci", "ext4"], deps, builtin=set())
    pos = {Path(p).name.split(".ko")[0]: i for i, p in enumerate(order)}
    assert pos["virtio_ring"] < pos["virtio"] < pos["virtiofs"]
    assert pos["fuse"] < pos["virtiofs"]
    assert pos["virtio_pci_modern_dev"] < pos["virtio_pci"]
    assert pos["jbd2"] < pos["ext4"] and pos["mbcache"] < pos["ext4"]
    assert len(order) == len(set(order)) == 9


def test_builtin_and_unknown_modules_are_skipped() -> None:
    deps = parse_modules_dep(MODULES_DEP.replace("\\\n", ""))
    order = module_load_order(["fuse", "no_such_module"], deps, builtin={"fuse"})
    assert order == []


def test_lz4_magic_search() -> None:
    blob = b"\x00" * 100 + b"\x02\x21\x4c\x18" + b"payload"
    assert find_lz4_vmlinux(blob) == 100
    assert find_lz4_vmlinux(b"no magic here") == -1


def test_digest_changes_with_each_input(tmp_path: Path) -> None:
    import pykata

    root = Path(pykata.__file__).parent
    src = [root / "errors.py"]
    base = compute_digest({"crun": "1.8.1-1"}, src, "7.0")
    assert base == compute_digest({"crun": "1.8.1-1"}, src, "7.0")
    assert base != compute_digest({"crun": "1.8.1-2"}, src, "7.0")
    assert base != compute_digest({"crun": "1.8.1-1"}, src, "7.1")
    assert base != compute_digest({"crun": "1.8.1-1"}, [*src, root / "config.py"], "7.0")
