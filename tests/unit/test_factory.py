"""VM templating helpers that need no VM: the template key and the sparse copy."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from pykata import config, errors
from pykata.hypervisor.base import NicSpec, VMSpec
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.hypervisor.qemu.setup import QemuDriver
from pykata.runtime import factory


@pytest.fixture
def spec(tmp_path: Path) -> VMSpec:
    (tmp_path / "vmlinux").write_bytes(b"k" * 100)
    (tmp_path / "initrd").write_bytes(b"i" * 100)
    return VMSpec(id="a", run_dir=tmp_path / "a", kernel=tmp_path / "vmlinux",
                  initrd=tmp_path / "initrd", agent_channel="serial")


def test_key_ignores_per_sandbox_parts_but_not_the_shape(spec: VMSpec, tmp_path: Path) -> None:
    qemu = str(tmp_path / "initrd")  # any existing file stands in for the binary
    driver = QemuDriver(qemu, QemuOptions(pcie_root_ports=6))
    key = factory.template_key(spec, driver.identity())
    other = dataclasses.replace(spec, id="b", run_dir=tmp_path / "b", nics=[NicSpec([3])],
                                shared_fs_socket=tmp_path / "vfs.sock")
    assert factory.template_key(other, driver.identity()) == key
    assert factory.template_key(dataclasses.replace(spec, memory_mib=1024),
                                driver.identity()) != key
    fewer_ports = QemuDriver(qemu, QemuOptions(pcie_root_ports=2))
    assert factory.template_key(spec, fewer_ports.identity()) != key
    # A rebuilt initrd (new size or mtime) makes a new template.
    (tmp_path / "initrd").write_bytes(b"i" * 101)
    assert factory.template_key(spec, driver.identity()) != key


def test_eligible(spec: VMSpec) -> None:
    assert factory.eligible(spec) == ""
    assert "serial" in factory.eligible(dataclasses.replace(spec, agent_channel="vsock"))
    assert "initrd" in factory.eligible(dataclasses.replace(spec, initrd=None))
    pmem = dataclasses.replace(spec, image=spec.initrd, image_device="nvdimm")
    assert factory.eligible(pmem) == ""
    assert "virtio-blk" in factory.eligible(dataclasses.replace(pmem, image_device="virtio-blk"))


def test_key_follows_the_root_image(spec: VMSpec, tmp_path: Path) -> None:
    driver = QemuDriver(str(tmp_path / "initrd"), QemuOptions())
    (tmp_path / "rootfs.erofs").write_bytes(b"e" * 100)
    image = dataclasses.replace(spec, image=tmp_path / "rootfs.erofs", image_device="nvdimm")
    key = factory.template_key(image, driver.identity())
    assert key != factory.template_key(spec, driver.identity())
    assert key != factory.template_key(dataclasses.replace(image, image_device="virtio-pmem"),
                                       driver.identity())
    (tmp_path / "rootfs.erofs").write_bytes(b"e" * 101)
    assert factory.template_key(image, driver.identity()) != key


def test_sparse_copy_copies_data_and_keeps_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"a" * 4096)
        f.seek(6 << 20)
        f.write(b"b" * 8192)
    copied = factory.sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_size == 8 << 20
    # Only the data extents were copied (filesystem block granularity).
    assert copied < 2 << 20
    assert os.stat(dst).st_blocks * 512 < 2 << 20


def test_clone_memory_files_are_per_state_dir(tmp_path: Path) -> None:
    x, y = tmp_path / "x", tmp_path / "y"
    mine = factory.clone_memory_path(x, "sb1")
    theirs = factory.clone_memory_path(y, "sb1")
    assert mine.parent == x / "vm"
    mine.touch()
    theirs.touch()
    assert factory.clone_memory_files(x) == [mine]
    assert factory.clone_memory_files(x, "sb2") == []
    assert factory.clone_memory_files(y, "sb1") == [theirs]
    assert factory.clone_memory_files(tmp_path / "none") == []


def test_private_dir_is_made_0700_and_checked(tmp_path: Path) -> None:
    d = factory.private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(d.parent).st_mode) & 0o022 == 0
    assert factory.private_dir(d) == d  # reused as it is
    os.chmod(d, 0o755)
    with pytest.raises(errors.FailedPrecondition, match="mode 755"):
        factory.private_dir(d)
    link = tmp_path / "link"
    link.symlink_to(d)
    os.chmod(d, 0o700)
    with pytest.raises(errors.FailedPrecondition, match="not a directory"):
        factory.private_dir(link)


def test_private_dir_refuses_a_parent_others_can_change(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(errors.FailedPrecondition, match="writable by others"):
        factory.private_dir(shared / "vm")
    assert not (shared / "vm").exists()
    os.chmod(shared, 0o1777)  # sticky, like /dev/shm: nobody can swap our entry
    assert factory.private_dir(shared / "vm").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_private_dir_refuses_another_owner(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(errors.FailedPrecondition, match="owned by uid 65534"):
        factory.private_dir(d)
    with pytest.raises(errors.FailedPrecondition, match="owned by uid 65534"):
        factory.private_dir(d / "sub", create=False)


def test_sparse_copy_makes_a_private_file_and_never_follows_a_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"x" * 4096)
    factory.sparse_copy(src, dst)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    factory.sparse_copy(src, dst)  # a stale copy of ours is replaced
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    dst.unlink()
    dst.symlink_to(victim)
    factory.sparse_copy(src, dst)  # the link is replaced, not written through
    assert victim.read_bytes() == b"keep"
    assert not dst.is_symlink() and dst.read_bytes() == b"x" * 4096


def test_template_dir_layout_and_refusal(tmp_path: Path) -> None:
    cfg = config.Config()
    cfg.factory.template_path = str(tmp_path / "tpl")
    f = factory.Factory(cfg)
    assert f.current() is None and not (tmp_path / "tpl").exists()
    assert f.destroy() is False
    (tmp_path / "tpl").mkdir(mode=0o755)
    with pytest.raises(errors.FailedPrecondition, match="tpl has mode 755"):
        f.current()
