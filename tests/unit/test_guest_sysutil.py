"""Pure helpers of pykata.guest.sysutil (no root, no syscalls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pykata.guest import sysutil
from pykata.guest import sysutil as su


def test_parse_mount_options() -> None:
    flags, prop, data = su.parse_mount_options(
        ["ro", "nosuid", "nodev", "mode=755", "size=1m", "rprivate", "", "relatime"])
    assert flags == su.MS_RDONLY | su.MS_NOSUID | su.MS_NODEV | su.MS_RELATIME
    assert prop == su.MS_PRIVATE | su.MS_REC
    assert data == "mode=755,size=1m"


def test_parse_mount_options_later_wins() -> None:
    flags, _, _ = su.parse_mount_options(["ro", "rw", "rbind"])
    assert flags == su.MS_BIND | su.MS_REC
    assert su.parse_mount_options(["defaults"]) == (0, 0, "")


def test_parse_mountinfo() -> None:
    text = ("1 1 0:2 / / rw - rootfs rootfs rw\n"
            "22 1 0:21 / /proc rw,relatime - proc proc rw\n"
            "30 22 0:40 / /mnt/with\\040space rw shared:1 - tmpfs tmpfs rw\n"
            "garbage\n")
    assert su.parse_mountinfo(text) == [("/", "rootfs"), ("/proc", "proc"),
                                        ("/mnt/with space", "tmpfs")]


def test_parse_cmdline() -> None:
    line = ("BOOT_IMAGE=/vmlinuz quiet pykata.agent.log=debug "
            "pykata.agent.channel=serial:agent.channel.0 pykata.flag console=ttyS0\n")
    assert su.parse_cmdline(line) == {
        "pykata.agent.log": "debug",
        "pykata.agent.channel": "serial:agent.channel.0",
        "pykata.flag": "",
    }


def test_parse_module_list() -> None:
    text = ("# load order matters\n"
            "lib/modules/6.1.0/kernel/drivers/virtio/virtio_ring.ko\n\n"
            "/lib/modules/6.1.0/kernel/fs/fuse/virtiofs.ko.xz  # comment\n")
    assert su.parse_module_list(text) == [
        "/lib/modules/6.1.0/kernel/drivers/virtio/virtio_ring.ko",
        "/lib/modules/6.1.0/kernel/fs/fuse/virtiofs.ko.xz",
    ]


def test_modules_dep() -> None:
    text = ("kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko\n"
            "kernel/fs/fuse/fuse.ko:\n"
            "kernel/net/vmw_vsock/vmw-vsock-virtio.ko.xz: kernel/net/vsock.ko\n")
    deps = su.parse_modules_dep(text)
    assert deps["virtiofs"] == ["kernel/fs/fuse/virtiofs.ko", "kernel/fs/fuse/fuse.ko"]
    assert deps["fuse"] == ["kernel/fs/fuse/fuse.ko"]
    assert deps["vmw_vsock_virtio"][0].endswith(".ko.xz")
    assert su.module_name("/x/vmw-vsock-virtio.ko.zst") == "vmw_vsock_virtio"


def test_root_fstype_is_a_string() -> None:
    assert isinstance(su.root_fstype(), str)


def test_module_loader_skips_loaded_modules_and_reports(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sysmod = tmp_path / "sys"
    (sysmod / "virtio_ring").mkdir(parents=True)
    (sysmod / "virtio_ring" / "initstate").write_text("live\n")
    (sysmod / "ext4").mkdir()  # built in: a directory without initstate
    assert sysutil.module_loaded("/lib/modules/x/kernel/virtio_ring.ko", str(sysmod))
    assert not sysutil.module_loaded("/lib/modules/x/kernel/ext4.ko", str(sysmod))
    listing = tmp_path / "modules"
    listing.write_text("lib/a/virtio_ring.ko\nlib/a/virtio-console.ko\n")
    tried: list[str] = []
    real = sysutil.module_loaded
    monkeypatch.setattr(sysutil, "module_loaded", lambda p: real(p, str(sysmod)))

    def fake_load(path: str, params: str = "") -> bool:
        tried.append(path)
        raise OSError(2, f"load module {path}: No such file or directory")

    monkeypatch.setattr(sysutil, "load_module", fake_load)
    loader = sysutil.ModuleLoader(str(listing))
    loader.start()
    assert loader.join(10.0)
    assert tried == ["/lib/a/virtio-console.ko"] and loader.loaded == 0
    assert len(loader.errors) == 1 and "virtio-console.ko" in loader.errors[0]
    assert loader.join(0)  # joining again returns at once
