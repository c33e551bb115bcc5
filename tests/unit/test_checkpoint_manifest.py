"""runtime/checkpoint.py without a VM: the packed RAM format (holes stay holes,
a damaged pack is refused), the strict manifest reader, the compatibility
refusals (one line each, naming the field and both values), eligibility and
save() over a fake VM (what it writes, and what it leaves on failure)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pykata import errors
from pykata.hypervisor.base import AgentChannel, Hypervisor, NicSpec, PluggedDevice, VMSpec
from pykata.runtime import checkpoint as ck
from pykata.runtime.checkpoint import (
    GuestImage,
    Manifest,
    MemoryInfo,
    check_compatible,
    check_files,
    pack_memory,
    read_manifest,
    unpack_memory,
)

MiB = 1 << 20
PAGE = 4096


def sparse_file(path: Path, size: int = 16 * MiB) -> dict[int, bytes]:
    """A file of ``size`` with data at a few offsets and holes elsewhere."""
    chunks = {0: b"A" * PAGE, 3 * MiB: os.urandom(2 * PAGE), 7 * MiB + 5 * PAGE: b"B" * PAGE,
              size - PAGE: b"Z" * PAGE}
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, data in chunks.items():
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    return chunks


def test_pack_unpack_round_trip_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    chunks = sparse_file(src)
    if os.stat(src).st_blocks * 512 >= 16 * MiB:
        pytest.skip("this file system does not keep holes")
    data = sum(len(c) for c in chunks.values())
    info = pack_memory(src, tmp_path / "memory.pkram")
    assert (info.size, info.extents, info.data_bytes) == (16 * MiB, 4, data)
    # header + table + only the data: the holes are not stored
    assert info.pack_bytes == os.stat(tmp_path / "memory.pkram").st_size == 20 + 4 * 16 + data
    dst = tmp_path / "restored"
    back = unpack_memory(tmp_path / "memory.pkram", dst, info)
    assert back == info
    assert dst.read_bytes() == src.read_bytes()
    st = os.stat(dst)
    assert st.st_size == 16 * MiB
    assert st.st_blocks * 512 <= os.stat(src).st_blocks * 512  # holes stayed holes
    assert st.st_blocks * 512 < 1 * MiB
    assert st.st_mode & 0o777 == 0o600


def test_pack_of_an_empty_ram_file(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MiB)
    os.close(fd)
    info = pack_memory(src, tmp_path / "p")
    assert (info.extents, info.data_bytes, info.pack_bytes) == (0, 0, 20)
    unpack_memory(tmp_path / "p", tmp_path / "d", info)
    assert os.stat(tmp_path / "d").st_size == 8 * MiB
    assert os.stat(tmp_path / "d").st_blocks == 0


def packed(tmp_path: Path) -> tuple[Path, MemoryInfo]:
    src = tmp_path / "ram"
    sparse_file(src)
    info = pack_memory(src, tmp_path / "memory.pkram")
    return tmp_path / "memory.pkram", info


def refused_unpack(pack: Path, dst: Path, expect: MemoryInfo | None = None) -> str:
    with pytest.raises(errors.FailedPrecondition) as exc:
        unpack_memory(pack, dst, expect)
    assert not dst.exists(), "a refused unpack left its output"
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_truncated_pack_is_refused(tmp_path: Path) -> None:
    pack, info = packed(tmp_path)
    os.truncate(pack, info.pack_bytes - 1)
    assert "truncated" in refused_unpack(pack, tmp_path / "d")
    os.truncate(pack, 30)  # inside the table
    assert "extent table" in refused_unpack(pack, tmp_path / "d")
    os.truncate(pack, 5)  # inside the header
    assert "header" in refused_unpack(pack, tmp_path / "d")


def test_padded_or_forged_packs_are_refused(tmp_path: Path) -> None:
    pack, info = packed(tmp_path)
    with open(pack, "ab") as f:
        f.write(b"x")
    assert "padded" in refused_unpack(pack, tmp_path / "d")
    raw = bytearray(pack.read_bytes()[:-1])

    def forged(mutate: Any) -> Path:
        b = bytearray(raw)
        mutate(b)
        p = tmp_path / f"forged{len(list(tmp_path.iterdir()))}"
        p.write_bytes(bytes(b))
        return p

    assert "no PYKRAM1" in refused_unpack(forged(lambda b: b.__setitem__(0, 0x41)),
                                          tmp_path / "d")
    # the second extent starts inside the first
    assert "overlaps" in refused_unpack(forged(lambda b: struct.pack_into("<Q", b, 20 + 16, 0)),
                                        tmp_path / "d")
    # an extent past the RAM size
    assert "past" in refused_unpack(
        forged(lambda b: struct.pack_into("<Q", b, 20 + 3 * 16, 1 << 30)), tmp_path / "d")
    # an absurd extent count
    assert "extents for" in refused_unpack(
        forged(lambda b: struct.pack_into("<I", b, 16, 0xFFFFFFFF)), tmp_path / "d")
    # the manifest's figures disagree with the pack's own
    good = forged(lambda b: None)
    msg = refused_unpack(good, tmp_path / "d", dataclasses.replace(info, data_bytes=1))
    assert "the manifest says" in msg


def test_pack_never_follows_or_replaces(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    sparse_file(src)
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        pack_memory(src, tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep"
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(FileExistsError):
        pack_memory(src, tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()
    os.symlink(src, tmp_path / "ramlink")
    with pytest.raises(OSError):
        pack_memory(tmp_path / "ramlink", tmp_path / "p2")
    assert not (tmp_path / "p2").exists()


# -- the manifest --------------------------------------------------------------------------
KERNEL_BYTES = b"k" * 100


def host_spec(tmp_path: Path, **kw: Any) -> VMSpec:
    kernel = tmp_path / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(KERNEL_BYTES)
    base: dict[str, Any] = dict(id="sb", run_dir=tmp_path / "run", kernel=kernel,
                                vcpus=1, max_vcpus=2, memory_mib=256, max_memory_mib=512)
    base.update(kw)
    return VMSpec(**base)


IMAGE = GuestImage("9adf748aa75a1311", "6.1.0-57-cloud-amd64")
VMM = {"driver": "qemu", "version": "7.2.22", "package": "Debian 1:7.2+dfsg-7+deb12u18"}
IDENTITY: dict[str, Any] = {"driver": "qemu", "accel": "tcg", "machine": "q35",
                            "qemu": ["/usr/bin/qemu-system-x86_64", 1, 2]}


def manifest(tmp_path: Path, **kw: Any) -> Manifest:
    shape = ck.vm_shape(host_spec(tmp_path))
    base: dict[str, Any] = dict(
        format=1, created="2026-12-07T18:00:00+00:00", pykata_version="0.1.0",
        sandbox_id="sb", namespace="default", guest_image=IMAGE, vmm=dict(VMM),
        vmm_info={"machine": "pc-q35-7.2-machine"}, driver_identity=dict(IDENTITY),
        vm_shape=shape, vm_shape_digest=ck.shape_digest(shape),
        cold_nics=["02:00:00:00:00:01"],
        plugged=[PluggedDevice("vcpu", "cpu-1", driver="max-x86_64-cpu",
                               props={"socket-id": 1, "core-id": 0, "thread-id": 0}),
                 PluggedDevice("nic", "net1", bus="rp0", mac="02:00:00:00:00:02")],
        memory=MemoryInfo(256 * MiB, 2, 8192, 20 + 32 + 8192), vmstate_bytes=1000,
        containers=[ck.ContainerEntry("c1", "c1", "ab" * 32, "running", ["e1"])],
        network=ck.NetworkInfo("/var/run/netns/x",
                               [ck.Interface("eth0", "02:00:00:00:00:01", ["10.0.0.2/24"])]),
        agent_next_stream_id=41, extra={"shim": {"any": ["json", 1]}})
    base.update(kw)
    return Manifest(**base)


def write_manifest(d: Path, doc: Any) -> Path:
    d.mkdir(exist_ok=True)
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (d / ck.MANIFEST).write_bytes(data)
    return d


def refused_read(d: Path) -> str:
    with pytest.raises(errors.FailedPrecondition) as exc:
        read_manifest(d)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    d = write_manifest(tmp_path / "ck", m.to_json())
    back = read_manifest(d)
    assert back == m
    assert back.plugged[0].props == {"socket-id": 1, "core-id": 0, "thread-id": 0}


def test_manifest_bad_json_types_and_size(tmp_path: Path) -> None:
    good = manifest(tmp_path).to_json()
    d = tmp_path / "ck"
    assert "not valid JSON" in refused_read(write_manifest(d, b"{not json"))
    assert "not valid JSON" in refused_read(write_manifest(d, b"\xff\xfe"))
    assert "not valid JSON" in refused_read(write_manifest(d, b"[" * 200000 + b"]" * 200000))
    assert "not a JSON object" in refused_read(write_manifest(d, [1]))
    assert "not valid JSON" in refused_read(
        write_manifest(d, json.dumps(good).replace('"vmstate_bytes": 1000',
                                                   '"vmstate_bytes": NaN').encode()))
    dup = json.dumps(good)[:-1] + ', "format": 1}'
    assert "duplicate key" in refused_read(write_manifest(d, dup.encode()))
    assert "larger than" in refused_read(write_manifest(d, b" " * (ck.MANIFEST_MAX + 1)))
    for change, words in (
            ({"vmstate_bytes": "1000"}, "manifest.vmstate_bytes: is \"1000\", not an integer"),
            ({"vmstate_bytes": True}, "vmstate_bytes: is true, not an integer"),
            ({"sandbox_id": 7}, "sandbox_id: is 7, not a string"),
            ({"cold_nics": "02:00:00:00:00:01"}, "cold_nics: is"),
            ({"memory": {"size": 1}}, "memory: lacks the field 'extents'"),
            ({"surprise": 1}, "unknown field \"surprise\""),
            ({"containers": [{"id": "c", "guest_id": "c", "spec_digest": "", "state": "",
                              "exec_ids": [1]}]}, "containers[0].exec_ids[0]: is 1"),
            ({"format": "1"}, "format: is \"1\", not an integer"),
    ):
        doc = dict(good) | change
        assert words in refused_read(write_manifest(d, doc)), change
    doc = dict(good)
    del doc["vm_shape"]
    assert "lacks the field 'vm_shape'" in refused_read(write_manifest(d, doc))


def test_manifest_newer_format_is_refused(tmp_path: Path) -> None:
    d = write_manifest(tmp_path / "ck", manifest(tmp_path).to_json() | {"format": 2})
    assert "format 2 is newer than this pykata knows (1)" in refused_read(d)
    d = write_manifest(tmp_path / "ck", {"format": 0})
    assert "0 is not a checkpoint format" in refused_read(d)


def test_manifest_values_that_reach_a_command_line_are_checked(tmp_path: Path) -> None:
    good = manifest(tmp_path).to_json()
    d = tmp_path / "ck"
    for plugged, words in (
            ({"id": "net1,romfile=/etc/shadow"}, "plugged[1].id"),
            ({"bus": "pcie.0"}, "plugged[1].bus"),
            ({"mac": "02:00:00:00:00:02,x=y"}, "plugged[1].mac"),
            ({"queues": 0}, "plugged[1].queues"),
            ({"kind": "disk"}, "plugged[1].kind"),
            ({"kind": "dimm", "props": {}}, "plugged[1].props"),
            ({"kind": "dimm", "props": {"size-mib": 0}}, "plugged[1].props"),
            ({"kind": "dimm", "props": {"size-mib": 64, "addr": 1}}, "plugged[1].props"),
    ):
        doc = json.loads(json.dumps(good))
        doc["plugged"][1].update(plugged)
        assert words in refused_read(write_manifest(d, doc)), plugged
    doc = json.loads(json.dumps(good))
    doc["plugged"][0]["driver"] = "max-x86_64-cpu,x=1"
    assert "plugged[0].driver" in refused_read(write_manifest(d, doc))
    doc = json.loads(json.dumps(good))
    doc["vm_shape"]["vcpus"] = -1
    assert "vm_shape.vcpus" in refused_read(write_manifest(d, doc))
    doc = json.loads(json.dumps(good))
    doc["memory"]["size"] = 4097
    assert "memory.size" in refused_read(write_manifest(d, doc))


def test_symlinks_in_the_checkpoint_dir_are_refused(tmp_path: Path) -> None:
    real = write_manifest(tmp_path / "real", manifest(tmp_path).to_json())
    link = tmp_path / "linkdir"
    os.symlink(real, link)
    assert "not a directory" in refused_read(link)
    d = tmp_path / "ck"
    d.mkdir()
    os.symlink(real / ck.MANIFEST, d / ck.MANIFEST)
    assert "is a symlink" in refused_read(d)
    (d / ck.MANIFEST).unlink()
    os.mkfifo(d / ck.MANIFEST)
    assert "not a regular file" in refused_read(d)
    (d / ck.MANIFEST).unlink()
    assert "holds no pykata checkpoint" in refused_read(d)


def test_check_files_compares_sizes_with_the_manifest(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    d = tmp_path / "ck"
    d.mkdir()
    (d / ck.VMSTATE).write_bytes(b"s" * m.vmstate_bytes)
    (d / ck.MEMORY).write_bytes(b"m" * m.memory.pack_bytes)
    check_files(d, m)
    (d / ck.VMSTATE).write_bytes(b"s" * (m.vmstate_bytes - 1))
    with pytest.raises(errors.FailedPrecondition, match="vmstate has 999 bytes, the manifest"
                                                        " says 1000"):
        check_files(d, m)
    (d / ck.VMSTATE).unlink()
    os.symlink(d / ck.MEMORY, d / ck.VMSTATE)
    with pytest.raises(errors.FailedPrecondition, match="is a symlink"):
        check_files(d, m)


# -- compatibility -------------------------------------------------------------------------
def refused_compat(m: Manifest, tmp_path: Path, *, image: GuestImage = IMAGE,
                   vmm: dict[str, str] | None = None, identity: dict[str, Any] | None = None,
                   spec: VMSpec | None = None) -> str:
    with pytest.raises(errors.FailedPrecondition) as exc:
        check_compatible(m, image=image, vmm=vmm or VMM, identity=identity or IDENTITY,
                         spec=spec or ck.restore_spec(m, host_spec(tmp_path)))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_compatible_host_passes(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    check_compatible(m, image=IMAGE, vmm=VMM, identity=IDENTITY,
                     spec=ck.restore_spec(m, host_spec(tmp_path)))


def test_each_refusal_names_the_field_and_both_values(tmp_path: Path) -> None:
    m = manifest(tmp_path)
    msg = refused_compat(m, tmp_path, image=GuestImage("0123456789abcdef", "x"))
    assert ('guest_image.digest is "9adf748aa75a1311" in the checkpoint, "0123456789abcdef"'
            ' on this host') in msg
    assert "pykata image build" in msg
    msg = refused_compat(m, tmp_path, vmm=VMM | {"version": "8.2.0"})
    assert 'vmm.version is "7.2.22" in the checkpoint, "8.2.0" on this host' in msg
    msg = refused_compat(m, tmp_path, vmm=VMM | {"package": "Debian 1:7.2+dfsg-7+deb12u19"})
    assert "vmm.package is" in msg and "deb12u18" in msg and "deb12u19" in msg
    msg = refused_compat(m, tmp_path, identity=IDENTITY | {"machine": "pc"})
    assert 'driver_identity.machine is "q35" in the checkpoint, "pc" on this host' in msg
    msg = refused_compat(m, tmp_path, spec=ck.restore_spec(
        m, host_spec(tmp_path, kernel_params="quiet")))
    assert 'vm_shape.params is "" in the checkpoint, "quiet" on this host' in msg
    (tmp_path / "vmlinux").write_bytes(KERNEL_BYTES + b"more")
    msg = refused_compat(m, tmp_path)
    assert "vm_shape.kernel is" in msg and ", 100]" in msg and ", 104]" in msg
    (tmp_path / "vmlinux").write_bytes(KERNEL_BYTES)
    msg = refused_compat(dataclasses.replace(m, format=2), tmp_path)
    assert "format is 2 in the checkpoint, 1 on this host" in msg
    msg = refused_compat(dataclasses.replace(m, vm_shape_digest="0" * 16), tmp_path)
    assert "vm_shape.digest" in msg
    # values from the checkpoint are quoted, never printed raw
    msg = refused_compat(dataclasses.replace(m, guest_image=GuestImage("a\nb", "")), tmp_path)
    assert '"a\\nb"' in msg


def test_restore_spec_takes_size_and_devices_from_the_checkpoint_paths_from_the_host(
        tmp_path: Path) -> None:
    m = manifest(tmp_path, vm_shape=ck.vm_shape(host_spec(tmp_path, vcpus=2, max_vcpus=4,
                                                          memory_mib=1024,
                                                          max_memory_mib=2048)))
    host = host_spec(tmp_path, shared_fs_socket=tmp_path / "vfs.sock")
    spec = ck.restore_spec(m, host)
    assert (spec.vcpus, spec.max_vcpus, spec.memory_mib, spec.max_memory_mib) == (2, 4, 1024,
                                                                                  2048)
    assert spec.kernel == host.kernel and spec.run_dir == host.run_dir
    assert spec.incoming and spec.shared_fs_socket is None and spec.nics == []
    assert [d.id for d in spec.restore_devices] == ["cpu-1", "net1"]
    assert spec.restore_devices is not m.plugged


# -- eligibility and save() over a fake VM ----------------------------------------------------
class SaveVM(Hypervisor):
    name = "fake"

    def __init__(self, spec: VMSpec, why: str = "", fail: BaseException | None = None) -> None:
        super().__init__(spec)
        self.why = why
        self.fail = fail
        self.calls: list[str] = []

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    async def wait(self) -> int:
        return 0

    @property
    def pid(self) -> int | None:
        return 1

    def agent_channel(self) -> AgentChannel:
        raise NotImplementedError

    def saveable(self) -> str:
        return self.why

    async def checkpoint_info(self) -> dict[str, Any]:
        self.calls.append("info")
        return {"machine": "fake", "plugged": [PluggedDevice("vcpu", "cpu-1", driver="c",
                                                             props={"core-id": 1}).to_json()]}

    async def save_to(self, fd: int) -> None:
        self.calls.append("save_to")
        if self.fail is not None:
            raise self.fail
        os.write(fd, b"device state")

    async def resume(self) -> None:
        self.calls.append("resume")


class Driverish:
    name = "fake"

    def identity(self) -> dict[str, Any]:
        return {"driver": "fake"}

    async def version(self) -> dict[str, str]:
        return {"driver": "fake", "version": "1"}


def fake_sb(tmp_path: Path, vm: SaveVM | None, **kw: Any) -> Any:
    config = SimpleNamespace(image=SimpleNamespace(output_dir=str(tmp_path / "img")))
    base: dict[str, Any] = dict(id="sb", namespace="default", vm=vm, virtiofsd=None,
                                failure="", config=config,
                                parts=SimpleNamespace(driver=Driverish()))
    base.update(kw)
    return SimpleNamespace(**base)


def test_eligible_reasons(tmp_path: Path) -> None:
    vm = SaveVM(host_spec(tmp_path))
    assert ck.eligible(fake_sb(tmp_path, vm)) == ""
    assert "virtio-fs" in ck.eligible(fake_sb(tmp_path, vm, virtiofsd=object()))
    assert ck.eligible(fake_sb(tmp_path, None)) == "it has no VM"
    assert ck.eligible(fake_sb(tmp_path, vm, failure="QEMU died")) == "it failed: QEMU died"
    assert ck.eligible(fake_sb(tmp_path, SaveVM(host_spec(tmp_path), "hot memory"))) == \
        "hot memory"


def ram_vm(tmp_path: Path, **kw: Any) -> SaveVM:
    mem = tmp_path / "sb.mem"
    sparse_file(mem, 8 * MiB)
    return SaveVM(host_spec(tmp_path, memory_file=mem,
                            nics=[NicSpec([], "02:00:00:00:00:01")]), **kw)


def test_save_writes_a_checkpoint_read_manifest_accepts(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "manifest.json").write_text(json.dumps(
        {"digest": "abcd", "kernel_release": "6.1"}))
    vm = ram_vm(tmp_path)
    dest = tmp_path / "ck"
    m = asyncio.run(ck.save(fake_sb(tmp_path, vm), dest, next_stream_id=9,
                            containers=[ck.ContainerEntry("c1")], extra={"k": [1]}))
    assert vm.calls == ["info", "save_to"]  # stopped, not resumed: the caller decides
    assert sorted(os.listdir(dest)) == sorted(ck.FILES)
    for name in ck.FILES:
        assert os.stat(dest / name).st_mode & 0o777 == 0o600
    assert (dest / ck.INVENTORY).read_bytes() == ck.INVENTORY_TEXT
    assert "vmstate" in (dest / ck.DUMP_LOG).read_text()
    back = read_manifest(dest)
    assert back == m
    assert back.guest_image == GuestImage("abcd", "6.1")
    assert back.vmm == {"driver": "fake", "version": "1"}
    assert back.cold_nics == ["02:00:00:00:00:01"]
    assert [d.id for d in back.plugged] == ["cpu-1"] and "plugged" not in back.vmm_info
    assert back.memory.extents == 4 and back.memory.size == 8 * MiB
    assert back.vmstate_bytes == len(b"device state")
    assert back.agent_next_stream_id == 9 and back.extra == {"k": [1]}
    check_files(dest, back)
    unpack_memory(dest / ck.MEMORY, tmp_path / "again", back.memory)
    assert (tmp_path / "again").read_bytes() == (tmp_path / "sb.mem").read_bytes()


def test_save_refuses_before_touching_the_vm(tmp_path: Path) -> None:
    vm = ram_vm(tmp_path, why="its VM has a virtio-fs device")
    with pytest.raises(errors.FailedPrecondition,
                       match="^cannot checkpoint sandbox sb: its VM has a virtio-fs device$"):
        asyncio.run(ck.save(fake_sb(tmp_path, vm), tmp_path / "ck"))
    assert vm.calls == []
    assert not (tmp_path / "ck").exists()


def test_failed_save_removes_its_files_and_resumes(tmp_path: Path) -> None:
    vm = ram_vm(tmp_path, fail=errors.Internal("QMP migrate failed: boom"))
    dest = tmp_path / "ck"
    dest.mkdir()
    (dest / "podman-owned").write_text("x")
    with pytest.raises(errors.Internal, match="boom"):
        asyncio.run(ck.save(fake_sb(tmp_path, vm), dest))
    assert vm.calls == ["info", "save_to", "resume"]
    assert os.listdir(dest) == ["podman-owned"]


def test_save_will_not_overwrite_or_follow(tmp_path: Path) -> None:
    vm = ram_vm(tmp_path)
    dest = tmp_path / "ck"
    dest.mkdir()
    os.symlink(tmp_path / "target", dest / ck.VMSTATE)
    with pytest.raises(errors.FailedPrecondition, match="cannot create the checkpoint file"):
        asyncio.run(ck.save(fake_sb(tmp_path, vm), dest))
    assert not (tmp_path / "target").exists()
    assert os.listdir(dest) == [ck.VMSTATE]  # theirs, left alone
    assert vm.calls == ["info"]  # refused before the VM was stopped
    os.symlink(tmp_path / "elsewhere", tmp_path / "ck2")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(errors.FailedPrecondition, match="not a directory"):
        asyncio.run(ck.save(fake_sb(tmp_path, vm), tmp_path / "ck2"))
    assert os.listdir(tmp_path / "elsewhere") == []


def test_the_manifest_keeps_the_pod_network_as_the_guest_has_it(tmp_path: Path) -> None:
    ep = SimpleNamespace(name="eth0", mac="02:00:00:00:00:01",
                         addresses=[(4, "10.231.77.1", 24), (6, "fd00::1", 64)])
    sb = fake_sb(tmp_path, ram_vm(tmp_path), netns="/var/run/netns/p",
                 network=SimpleNamespace(netns="/var/run/netns/p", endpoints=[ep]))
    m = asyncio.run(ck.save(sb, tmp_path / "ck"))
    assert read_manifest(tmp_path / "ck").network == ck.NetworkInfo(
        "/var/run/netns/p", [ck.Interface("eth0", "02:00:00:00:00:01",
                                          ["10.231.77.1/24", "fd00::1/64"])])
    assert m.network.interfaces[0].addresses[0] == "10.231.77.1/24"


# -- boot: the opt-in RAM file and the NICs of a restore ----------------------------------
def boot_sb(tmp_path: Path, checkpointable: bool, endpoints: list[Any] | None = None) -> Any:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    config = SimpleNamespace(runtime=SimpleNamespace(checkpointable=checkpointable,
                                                     state_dir=str(state)))
    record = SimpleNamespace(extra={})
    net = SimpleNamespace(endpoints=endpoints) if endpoints is not None else None
    return SimpleNamespace(id="sb", key="sb", config=config, record=record, netns="/n",
                           network=net, persist=lambda: None)


def test_checkpointable_ram_file_only_when_asked_and_without_shared_fs(tmp_path: Path) -> None:
    from pykata.runtime import boot

    spec = host_spec(tmp_path)
    boot.checkpointable_memory(boot_sb(tmp_path, False), spec)
    assert spec.memory_file is None and not spec.checkpointable  # the default: no change
    spec = host_spec(tmp_path, shared_fs_socket=tmp_path / "vfs.sock")
    boot.checkpointable_memory(boot_sb(tmp_path, True), spec)
    assert spec.memory_file is None  # virtio-fs pods could not be saved anyway
    spec = host_spec(tmp_path)
    sb = boot_sb(tmp_path, True)
    boot.checkpointable_memory(sb, spec)
    assert spec.memory_file == tmp_path / "state" / "vm" / "sb.mem"
    assert spec.checkpointable  # its hot-plugged memory will be private
    assert sb.record.extra["memory_file"] == str(spec.memory_file)
    st = os.stat(spec.memory_file)
    assert st.st_size == 0 and st.st_mode & 0o777 == 0o600
    assert os.stat(spec.memory_file.parent).st_mode & 0o777 == 0o700


def test_restore_matches_nics_by_mac(tmp_path: Path) -> None:
    from pykata.runtime import boot

    eps = [SimpleNamespace(mac="02:00:00:00:00:02", fds=[11, 12]),
           SimpleNamespace(mac="02:00:00:00:00:01", fds=[10])]
    m = manifest(tmp_path, plugged=[
        PluggedDevice("nic", "net1", bus="rp0", mac="02:00:00:00:00:02", queues=2)])
    shape = ck.restore_spec(m, host_spec(tmp_path))
    boot._restore_nics(boot_sb(tmp_path, True, eps), shape, m)
    assert [(n.mac, n.fds) for n in shape.nics] == [("02:00:00:00:00:01", [10])]
    assert shape.restore_devices[0].fds == [11, 12]
    assert m.plugged[0].fds == []  # the manifest's stay without fds
    with pytest.raises(errors.FailedPrecondition, match="MAC 02:00:00:00:00:01.* same network"):
        boot._restore_nics(boot_sb(tmp_path, True, eps[:1]), ck.restore_spec(
            m, host_spec(tmp_path)), m)
    with pytest.raises(errors.FailedPrecondition, match="had 2 queues, the new tap has 1"):
        boot._restore_nics(boot_sb(tmp_path, True, [
            SimpleNamespace(mac="02:00:00:00:00:02", fds=[11]), eps[1]]),
            ck.restore_spec(m, host_spec(tmp_path)), m)
