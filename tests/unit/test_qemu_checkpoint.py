"""The QEMU driver's checkpoint side without a VM: what makes a VM unsaveable,
what checkpoint_info reports (hot-plugged vCPUs and NICs in order, the PCI
tree flattened), a restored VM knowing its restored devices, and the
version probe (``qemu --version``, no VM started)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pykata import errors
from pykata.hypervisor.base import PluggedDevice, VMSpec
from pykata.hypervisor.qemu import setup
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.hypervisor.qemu.driver import QemuHypervisor, _pci_buses

CPU_SLOTS = [
    {"type": "max-x86_64-cpu", "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]",
     "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}},
    {"type": "max-x86_64-cpu", "vcpus-count": 1,
     "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}},
    {"type": "max-x86_64-cpu", "vcpus-count": 1,
     "props": {"socket-id": 2, "core-id": 0, "thread-id": 0, "node-id": 0}},
]
PCI = [{"bus": 0, "devices": [
    {"bus": 0, "slot": 1, "function": 0, "qdev_id": "vser0",
     "id": {"vendor": 6900, "device": 4099}},
    {"bus": 0, "slot": 2, "function": 0, "qdev_id": "rp0",
     "id": {"vendor": 6966, "device": 12}, "pci_bridge": {
         "bus": {"number": 1, "secondary": 1, "subordinate": 1},
         "devices": [{"bus": 1, "slot": 0, "function": 0, "qdev_id": "dev-net0",
                      "id": {"vendor": 6900, "device": 4161}}]}}]}]


class FakeQMP:
    """Answers the QMP commands the checkpoint code sends; records them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def __call__(self, cmd: str, args: dict[str, Any] | None = None,
                       timeout: float = 10.0) -> Any:
        self.sent.append((cmd, args))
        answers: dict[str, Any] = {
            "query-hotpluggable-cpus": CPU_SLOTS, "query-pci": PCI,
            "query-version": {"qemu": {"major": 7, "minor": 2, "micro": 22},
                              "package": " (Debian 1:7.2+dfsg-7+deb12u18)"},
            "qom-get": "pc-q35-7.2-machine",
        }
        return answers.get(cmd, {})


def vm(tmp_path: Path, **kw: Any) -> QemuHypervisor:
    base: dict[str, Any] = dict(id="sb", run_dir=tmp_path / "run", kernel=Path("/k"),
                                memory_file=tmp_path / "sb.mem", max_vcpus=3)
    base.update(kw)
    h = QemuHypervisor(VMSpec(**base), "/nonexistent/qemu", QemuOptions(pcie_root_ports=3))
    qmp = FakeQMP()
    h._qmp_cmd = qmp  # type: ignore[method-assign]
    h._qmp = object()  # type: ignore[assignment]  # "running"
    h._send_fd = lambda fd: None  # type: ignore[method-assign]
    return h


def test_saveable_reasons(tmp_path: Path) -> None:
    assert vm(tmp_path).saveable() == ""
    assert "virtio-fs" in vm(tmp_path, shared_fs_socket=tmp_path / "vfs.sock").saveable()
    h = vm(tmp_path)
    h._ports["vfs"] = "rp0"  # a clone's hot-plugged virtio-fs
    assert "virtio-fs" in h.saveable()
    assert "not in a file" in vm(tmp_path, memory_file=None).saveable()
    assert "vsock" in vm(tmp_path, agent_channel="vsock").saveable()
    h = vm(tmp_path)
    h._shared_dimms = 1
    assert "hot-plugged shared memory" in h.saveable()
    h = vm(tmp_path)
    h._fdsets["d1"] = 3
    assert "block devices" in h.saveable()
    h = vm(tmp_path)
    h._qmp = None
    assert "not running" in h.saveable()


def test_checkpoint_info_lists_what_was_hot_plugged(tmp_path: Path) -> None:
    h = vm(tmp_path)

    async def go() -> dict[str, Any]:
        assert await h.hotplug_vcpus(3) == 3
        r, w = os.pipe()
        try:
            assert await h.hotplug_nic("net0", [r], "02:00:00:00:00:01") == "rp0"
            assert await h.hotplug_nic("net1", [r, w], "02:00:00:00:00:02") == "rp1"
        finally:
            os.close(r)
            os.close(w)
        return await h.checkpoint_info()

    info = asyncio.run(go())
    assert info["qemu"] == "7.2.22" and info["package"] == "(Debian 1:7.2+dfsg-7+deb12u18)"
    assert info["machine"] == "pc-q35-7.2-machine"
    assert info["ports"] == {"net0": "rp0", "net1": "rp1"}
    assert [(d["bus"], d["slot"], d["id"]) for d in info["pci"]] == [
        (0, 1, "vser0"), (0, 2, "rp0"), (1, 0, "dev-net0")]
    assert info["plugged"] == [
        {"kind": "vcpu", "id": "cpu-1", "bus": "", "driver": "max-x86_64-cpu",
         "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}, "mac": "", "queues": 1},
        {"kind": "vcpu", "id": "cpu-2", "bus": "", "driver": "max-x86_64-cpu",
         "props": {"socket-id": 2, "core-id": 0, "thread-id": 0}, "mac": "", "queues": 1},
        {"kind": "nic", "id": "net0", "bus": "rp0", "driver": "", "props": {},
         "mac": "02:00:00:00:00:01", "queues": 1},
        {"kind": "nic", "id": "net1", "bus": "rp1", "driver": "", "props": {},
         "mac": "02:00:00:00:00:02", "queues": 2},
    ]


def test_a_restored_vm_knows_its_restored_devices(tmp_path: Path) -> None:
    devices = [PluggedDevice("vcpu", "cpu-1", driver="max-x86_64-cpu",
                             props={"socket-id": 1}),
               PluggedDevice("nic", "net0", bus="rp0", mac="02:00:00:00:00:01", fds=[7])]
    h = vm(tmp_path, incoming=True, restore_devices=devices)
    assert h._vcpus == 2
    assert h._ports == {"net0": "rp0"}
    assert all(d.fds == [] for d in h._plugged)  # not the host's fds of the day
    assert devices[1].fds == [7]

    async def go() -> dict[str, Any]:
        r, w = os.pipe()
        try:
            assert await h.hotplug_nic("net1", [r], "") == "rp1"  # rp0 stays net0's
        finally:
            os.close(r)
            os.close(w)
        return await h.checkpoint_info()

    info = asyncio.run(go())
    assert [d["id"] for d in info["plugged"]] == ["cpu-1", "net0", "net1"]


def test_load_needs_an_incoming_vm_and_save_to_a_saveable_one(tmp_path: Path) -> None:
    with pytest.raises(errors.FailedPrecondition, match="not started to restore"):
        asyncio.run(vm(tmp_path).load(0))
    h = vm(tmp_path, memory_file=None)
    with pytest.raises(errors.FailedPrecondition, match="not in a file"):
        asyncio.run(h.save_to(0))
    assert h._qmp_cmd.sent == []  # type: ignore[attr-defined]  # never stopped


def test_pci_buses_ignores_garbage() -> None:
    assert _pci_buses(None) == []
    assert _pci_buses([1, {"bus": 0, "devices": [{"pci_bridge": "x"}]}]) == [
        {"bus": 0, "devices": [{"pci_bridge": "x"}]}]


def test_qemu_version_from_the_binary() -> None:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    v = asyncio.run(setup._qemu_version(binary))
    assert v["driver"] == "qemu"
    assert v["version"].count(".") == 2 and v["version"][0].isdigit()
    with pytest.raises(errors.PykataError):
        asyncio.run(setup._qemu_version("/bin/true"))  # prints nothing
    with pytest.raises(errors.NotFound):
        asyncio.run(setup._qemu_version("/nonexistent/qemu"))


class ListenQMP:
    """qemu.qmp's listen(): delivers ``events`` to the listener once it listens."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def listen(self, listener: Any) -> Any:
        import contextlib

        async def deliver() -> None:
            for e in self.events:
                await listener.put(e)

        self.task = asyncio.ensure_future(deliver())
        return contextlib.nullcontext()


def migrating_vm(tmp_path: Path, events: list[dict[str, Any]], exit_after: float | None) -> Any:
    h = vm(tmp_path)
    h._qmp = ListenQMP(events)  # type: ignore[assignment]

    async def query(cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        return {"status": "active"} if cmd == "query-migrate" else {}

    async def wait() -> int:
        if exit_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(exit_after or 0)
        return 1

    h._qmp_cmd = query  # type: ignore[method-assign]
    h.wait = wait  # type: ignore[method-assign]
    h.spec.run_dir.mkdir(parents=True, exist_ok=True)
    h.log_path.write_text("qemu-system-x86_64: load of migration failed: Invalid argument\n")
    return h


def test_a_qemu_exiting_during_a_watched_migration_ends_the_wait(tmp_path: Path) -> None:
    h = migrating_vm(tmp_path, [], exit_after=0.01)
    with pytest.raises(errors.Unavailable) as exc:
        asyncio.run(asyncio.wait_for(h._await_migration(60.0, watch_exit=True), 10))
    assert str(exc.value) == ("QEMU of VM sb exited (status 1) during the migration:"
                              " qemu-system-x86_64: load of migration failed: Invalid argument")


def test_a_watched_migration_that_completes_is_not_an_error(tmp_path: Path) -> None:
    done = [{"event": "MIGRATION", "data": {"status": "completed"}}]
    h = migrating_vm(tmp_path, done, exit_after=None)
    asyncio.run(asyncio.wait_for(h._await_migration(60.0, watch_exit=True), 10))
    h = migrating_vm(tmp_path, done, exit_after=None)
    asyncio.run(asyncio.wait_for(h._await_migration(60.0), 10))  # the templating wait


def test_load_reports_a_lost_qemu_on_one_line(tmp_path: Path) -> None:
    h = vm(tmp_path, incoming=True)

    async def lost(cmd: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        raise errors.Unavailable("QEMU of VM sb exited (status 1) during query-migrate:"
                                 " line one\nline two")

    h._qmp_cmd = lost  # type: ignore[method-assign]
    r, w = os.pipe()
    try:
        with pytest.raises(errors.Unavailable) as exc:
            asyncio.run(h.load(r))
    finally:
        os.close(r)
        os.close(w)
    assert str(exc.value) == ("QEMU of VM sb exited (status 1) during query-migrate:"
                              " line one line two")


def test_checkpointable_vms_get_private_memory_that_a_checkpoint_carries(
        tmp_path: Path) -> None:
    h = vm(tmp_path, memory_slots=2, memory_mib=256, max_memory_mib=1024, checkpointable=True)
    assert asyncio.run(h.hotplug_memory(128)) == 128
    sent = h._qmp_cmd.sent  # type: ignore[attr-defined]
    assert ("object-add", {"qom-type": "memory-backend-ram", "id": "mem-dimm0",
                           "size": 128 << 20}) in sent
    assert h.saveable() == ""
    assert [d.to_json() for d in h._plugged] == [
        {"kind": "dimm", "id": "dimm0", "bus": "", "driver": "", "props": {"size-mib": 128},
         "mac": "", "queues": 1}]
    # Without the opt-in (or with virtio-fs): shared as before, and refused.
    for kw in ({}, {"checkpointable": True, "shared_fs_socket": tmp_path / "vfs.sock"}):
        h = vm(tmp_path, memory_slots=2, memory_mib=256, max_memory_mib=1024, **kw)
        asyncio.run(h.hotplug_memory(128))
        assert ("object-add", {"qom-type": "memory-backend-memfd", "id": "mem-dimm0",
                               "size": 128 << 20, "share": True}) in h._qmp_cmd.sent  # type: ignore[attr-defined]
        assert h._plugged == []
        assert "hot-plugged shared memory" in h.saveable() or "virtio-fs" in h.saveable()


def test_a_restored_vm_counts_its_restored_memory(tmp_path: Path) -> None:
    h = vm(tmp_path, memory_slots=2, incoming=True, checkpointable=True, restore_devices=[
        PluggedDevice("dimm", "dimm0", props={"size-mib": 128})])
    assert h._dimms == 1 and h.saveable() == ""
    asyncio.run(h.hotplug_memory(64))
    assert [d.id for d in h._plugged] == ["dimm0", "dimm1"]
    with pytest.raises(errors.ResourceExhausted):
        asyncio.run(h.hotplug_memory(64))
