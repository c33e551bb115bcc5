"""VM templating helpers that need no VM: the template key and the sparse copy."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pykata.hypervisor.base import NicSpec, VMSpec
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.runtime import factory


@pytest.fixture
def spec(tmp_path: Path) -> VMSpec:
    (tmp_path / "vmlinux").write_bytes(b"k" * 100)
    (tmp_path / "initrd").write_bytes(b"i" * 100)
    return VMSpec(id="a", run_dir=tmp_path / "a", kernel=tmp_path / "vmlinux",
                  initrd=tmp_path / "initrd", agent_channel="serial")


def test_key_ignores_per_sandbox_parts_but_not_the_shape(spec: VMSpec, tmp_path: Path) -> None:
    qemu = str(tmp_path / "initrd")  # any existing file stands in for the binary
    opts = QemuOptions(pcie_root_ports=6)
    key = factory.template_key(spec, qemu, opts)
    other = dataclasses.replace(spec, id="b", run_dir=tmp_path / "b", nics=[NicSpec([3])],
                                shared_fs_socket=tmp_path / "vfs.sock")
    assert factory.template_key(other, qemu, opts) == key
    assert factory.template_key(dataclasses.replace(spec, memory_mib=1024), qemu, opts) != key
    assert factory.template_key(spec, qemu, QemuOptions(pcie_root_ports=2)) != key
    # A rebuilt initrd (new size or mtime) makes a new template.
    (tmp_path / "initrd").write_bytes(b"i" * 101)
    assert factory.template_key(spec, qemu, opts) != key


def test_eligible(spec: VMSpec) -> None:
    assert factory.eligible(spec) == ""
    assert "serial" in factory.eligible(dataclasses.replace(spec, agent_channel="vsock"))
    assert "initrd" in factory.eligible(dataclasses.replace(spec, initrd=None))


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


def test_clone_memory_files_are_per_state_dir(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "CLONE_MEMORY_DIR", tmp_path)
    mine = factory.clone_memory_path("/run/pykata/x", "sb1")
    theirs = factory.clone_memory_path("/run/pykata/y", "sb1")
    mine.touch()
    theirs.touch()
    assert factory.clone_memory_files("/run/pykata/x") == [mine]
    assert factory.clone_memory_files("/run/pykata/x", "sb2") == []
    assert factory.clone_memory_files("/run/pykata/y", "sb1") == [theirs]
