"""Guest storages: the drivers' checks (no root) and who owns what (Storages,
with mounting faked)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from pykata import errors, wire
from pykata.guest import storage
from pykata.protos import agent_pb2 as pb


def test_storage_local_and_unknown(tmp_path: Path) -> None:
    d = tmp_path / "vol"
    assert storage.mount_storage("local", "", str(d), "", ["mode=0750"]) is False
    assert d.is_dir() and d.stat().st_mode & 0o777 == 0o750
    with pytest.raises(errors.InvalidArgument, match="unknown storage driver"):
        storage.mount_storage("nfs", "x", str(tmp_path / "n"), "", [])
    with pytest.raises(errors.InvalidArgument, match="not absolute"):
        storage.mount_storage("local", "", "rel", "", [])
    with pytest.raises(errors.InvalidArgument, match="guest device path"):
        storage.mount_storage("blk", "0000:00:05.0", str(tmp_path / "b"), "ext4", [])


class FakeMounts:
    """mount_storage/unmount replaced: records calls, fails on a chosen mount point."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str = "") -> None:
        self.mounted: list[str] = []
        self.unmounted: list[str] = []
        self.fail = fail
        monkeypatch.setattr(storage, "mount_storage", self.mount)
        monkeypatch.setattr(storage, "unmount", self.unmount)

    def mount(self, driver: str, source: str, mount_point: str, fstype: str,
              options: Sequence[str], wait_device: float = 5.0) -> bool:
        if mount_point == self.fail:
            raise errors.Internal(f"cannot mount {mount_point}")
        self.mounted.append(mount_point)
        return driver != "local"

    def unmount(self, mount_point: str) -> None:
        self.unmounted.append(mount_point)


def st(mount_point: str, driver: str = "tmpfs", pod: bool = False) -> pb.Storage:
    return pb.Storage(driver=driver, source="x", mount_point=mount_point,
                      driver_options=[wire.SANDBOX_SCOPE] if pod else [])


def test_sandbox_storages_all_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMounts(monkeypatch, fail="/c")
    s = storage.Storages()
    with pytest.raises(errors.Internal):
        s.mount_sandbox([st("/a"), st("/b"), st("/c")])
    assert fake.unmounted == ["/b", "/a"] and s.sandbox == []
    fake.fail = ""
    s.mount_sandbox([st("/a"), st("/l", driver="local"), st("/b")])
    assert s.sandbox == ["/a", "/b"]  # a local directory is nothing to unmount


def test_pod_scoped_storages_are_mounted_once_and_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMounts(monkeypatch)
    s = storage.Storages()
    s.mount_sandbox([st("/shared", driver="virtiofs")])
    mine: list[str] = []
    disks: list[str] = []
    asyncio.run(s.mount_container("c1", {}, [st("/shm", pod=True), st("/own")], [], mine,
                                  disks))
    assert mine == ["/own"] and s.sandbox == ["/shared", "/shm"]
    theirs: list[str] = []
    asyncio.run(s.mount_container("c2", {}, [st("/shm", pod=True)], [], theirs, disks))
    assert theirs == [] and fake.mounted.count("/shm") == 1
    asyncio.run(s.release_container("c1", mine, disks))
    assert fake.unmounted == ["/own"]
    assert s.release_sandbox() == []
    assert fake.unmounted == ["/own", "/shm", "/shared"]
    assert s.sandbox == [] and not s.pod_scoped


def test_container_storages_report_what_was_done_before_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    FakeMounts(monkeypatch, fail="/bad")
    s = storage.Storages()
    mine: list[str] = []
    with pytest.raises(errors.Internal):
        asyncio.run(s.mount_container("c1", {}, [st("/a"), st("/bad")], [], mine, []))
    assert mine == ["/a"]


def test_unknown_device_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeMounts(monkeypatch)
    dev = pb.Device(id="x", type="c", container_path="/dev/x")
    with pytest.raises(errors.InvalidArgument, match="unsupported type"):
        asyncio.run(storage.Storages().mount_container("c1", {}, [], [dev], [], []))


def test_release_sandbox_reports_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeMounts(monkeypatch)
    s = storage.Storages()
    s.mount_sandbox([st("/a"), st("/b")])

    def busy(mount_point: str) -> None:
        raise errors.Internal(f"cannot unmount {mount_point}: busy")

    monkeypatch.setattr(storage, "unmount", busy)
    assert s.release_sandbox() == ["cannot unmount /b: busy", "cannot unmount /a: busy"]
    assert s.sandbox == []
