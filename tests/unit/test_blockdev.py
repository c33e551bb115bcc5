"""The per-sandbox registry of hot-plugged block devices (a fake VM, no QEMU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pykata import errors
from pykata.resources.blockdev import BlockDevices


class FakeVM:
    name = "fake"

    def __init__(self, ports: int = 2, unplug_error: errors.PykataError | None = None) -> None:
        self.ports = ports
        self.plugged: dict[str, tuple[Path, bool, str]] = {}
        self.unplug_error = unplug_error
        self.unplugged: list[str] = []

    async def hotplug_block(self, drive_id: str, path: Path, readonly: bool = False,
                            serial: str = "") -> str:
        if len(self.plugged) >= self.ports:
            raise errors.ResourceExhausted(
                f"VM x has no free PCIe root port for {drive_id} ({self.ports} in use)")
        self.plugged[drive_id] = (path, readonly, serial)
        return f"rp{len(self.plugged) - 1}"

    async def unplug_block(self, drive_id: str, timeout: float = 20.0) -> None:
        if self.unplug_error is not None:
            raise self.unplug_error
        del self.plugged[drive_id]
        self.unplugged.append(drive_id)


BLOCK = Path("/dev/loop-test")


@pytest.fixture
def is_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "is_block_device", lambda self: str(self).startswith("/dev/"))


def registry(vm: FakeVM) -> BlockDevices:
    return BlockDevices("sb", vm)  # type: ignore[arg-type]


@pytest.mark.usefixtures("is_block")
def test_counted_by_use_and_unplugged_by_the_last() -> None:
    async def main() -> None:
        vm = FakeVM()
        reg = registry(vm)
        s1 = await reg.attach(BLOCK, readonly=False)
        s2 = await reg.attach(BLOCK, readonly=False)
        assert s1 == s2 == "pkblk0"
        assert vm.plugged == {"pkblk0": (BLOCK, False, "pkblk0")}  # serial = drive id
        await reg.detach(s1)
        assert vm.unplugged == [] and reg.attached() == {"pkblk0": str(BLOCK)}
        await reg.detach(s2)
        assert vm.unplugged == ["pkblk0"] and reg.attached() == {}
        assert await reg.attach(BLOCK, readonly=True) == "pkblk1"  # a fresh serial

    asyncio.run(main())


@pytest.mark.usefixtures("is_block")
def test_read_only_disk_is_not_shared_read_write() -> None:
    async def main() -> None:
        reg = registry(FakeVM())
        await reg.attach(BLOCK, readonly=True)
        with pytest.raises(errors.FailedPrecondition, match="attached read-only"):
            await reg.attach(BLOCK, readonly=False)

    asyncio.run(main())


@pytest.mark.usefixtures("is_block")
def test_no_free_root_port_is_one_clear_line() -> None:
    async def main() -> None:
        reg = registry(FakeVM(ports=1))
        await reg.attach(Path("/dev/loop-a"), readonly=False)
        with pytest.raises(errors.ResourceExhausted) as ei:
            await reg.attach(Path("/dev/loop-b"), readonly=False)
        msg = str(ei.value)
        assert msg.startswith("cannot attach block device /dev/loop-b: VM x has no free PCIe"
                              " root port")
        assert "\n" not in msg and reg.attached() == {"pkblk0": "/dev/loop-a"}

    asyncio.run(main())


def test_not_a_block_device(tmp_path: Path) -> None:
    f = tmp_path / "file.img"
    f.write_bytes(b"")
    with pytest.raises(errors.InvalidArgument, match="is not a block device"):
        asyncio.run(registry(FakeVM()).attach(f, readonly=False))


@pytest.mark.usefixtures("is_block")
def test_unplug_that_fails_is_logged_and_the_disk_kept(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    async def main() -> None:
        vm = FakeVM(unplug_error=errors.DeadlineExceeded("the guest did not release it"))
        reg = registry(vm)
        serial = await reg.attach(BLOCK, readonly=False)
        await reg.detach(serial)  # does not raise
        assert "stays attached until the sandbox stops" in caplog.text
        with pytest.raises(errors.FailedPrecondition, match="still attached"):
            await reg.attach(BLOCK, readonly=False)

    asyncio.run(main())
