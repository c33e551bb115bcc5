from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pykata.hypervisor.base import NicSpec, VMSpec
from pykata.hypervisor.qemu.accel import probe, probe_firmware
from pykata.hypervisor.qemu.cmdline import (
    QemuFds,
    QemuOptions,
    build_argv,
    kernel_command_line,
    nic_device,
    tap_netdev,
)


def spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(id="sb1", run_dir=Path("/run/pykata/sbs/sb1"),
                                   kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.img"))
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def opts(**kw: object) -> QemuOptions:
    return QemuOptions(**kw)  # type: ignore[arg-type]


FDS = QemuFds(qmp=3, console=4, agent=5, shared_fs=6, memory=7, image=8, vhost_vsock=9)


def build(binary: str, s: VMSpec, o: QemuOptions, fds: QemuFds = FDS) -> list[str]:
    return build_argv(binary, s, o, fds)


def arg_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_tcg_basic_shape() -> None:
    argv = build("/usr/bin/qemu-system-x86_64", spec(), opts(accel="tcg", tb_size_mib=64))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert arg_after(argv, "-accel") == ["tcg,tb-size=64"]
    assert arg_after(argv, "-cpu") == ["max"]
    assert arg_after(argv, "-machine") == ["q35,memory-backend=pykata-mem"]
    assert arg_after(argv, "-kernel") == ["/k/vmlinux"]
    assert arg_after(argv, "-initrd") == ["/k/initrd.img"]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    # Shared guest RAM for vhost-user (virtio-fs).
    assert "memory-backend-memfd,id=pykata-mem,size=512M,share=on" in arg_after(argv, "-object")
    # The console goes into a pipe the host drains (into a capped log).
    assert "fd=4,set=2,opaque=console" in arg_after(argv, "-add-fd")
    assert "file,id=console,path=/dev/fdset/2,append=on" in arg_after(argv, "-chardev")
    assert arg_after(argv, "-serial") == ["chardev:console"]


def test_kvm_uses_host_cpu_and_no_tb_size() -> None:
    argv = build("q", spec(), opts(accel="kvm", tb_size_mib=64))
    assert arg_after(argv, "-accel") == ["kvm"]
    assert arg_after(argv, "-cpu") == ["host"]


def test_smp_and_memory_hotplug_limits() -> None:
    argv = build("q", spec(vcpus=2, max_vcpus=4, memory_mib=256, max_memory_mib=2048,
                                memory_slots=8), opts())
    assert arg_after(argv, "-smp") == ["2,maxcpus=4"]
    assert arg_after(argv, "-m") == ["256M,slots=8,maxmem=2048M"]
    argv = build("q", spec(memory_mib=256, max_memory_mib=256, memory_slots=8), opts())
    assert arg_after(argv, "-m") == ["256M"]


def test_serial_agent_channel() -> None:
    argv = build("q", spec(agent_channel="serial"), opts())
    devices = arg_after(argv, "-device")
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=agent.channel.0" in devices
    assert "socket,id=agent,fd=5" in arg_after(argv, "-chardev")
    assert not any("vsock" in d for d in devices)


def test_vsock_agent_channel() -> None:
    argv = build("q", spec(agent_channel="vsock", vsock_cid=42), opts())
    devices = arg_after(argv, "-device")
    assert "vhost-vsock-pci,id=vsock0,guest-cid=42,vhostfd=9" in devices
    assert not any("virtserialport" in d for d in devices)


def test_qmp_is_a_socketpair_fd() -> None:
    argv = build("q", spec(), opts())
    assert "socket,id=qmp,fd=3" in arg_after(argv, "-chardev")
    assert arg_after(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_virtio_fs_and_dax() -> None:
    argv = build("q", spec(shared_fs_socket=Path("/r/vfs.sock"),
                                shared_fs_cache_size_mib=256), opts())
    assert "socket,id=vfs,fd=6" in arg_after(argv, "-chardev")
    assert ("vhost-user-fs-pci,chardev=vfs,tag=pykatashared,queue-size=1024,cache-size=256M"
            in arg_after(argv, "-device"))
    assert not any("vhost-user-fs" in d for d in arg_after(build("q", spec(), opts()),
                                                           "-device"))


def test_kernel_command_line_and_debug() -> None:
    assert kernel_command_line(spec(kernel_params="quiet panic=-1")) == \
        "console=ttyS0 quiet panic=-1"
    dbg = kernel_command_line(spec(kernel_params="quiet loglevel=1 panic=-1", debug=True))
    assert "quiet" not in dbg.split() and "loglevel=1" not in dbg
    assert dbg.endswith("pykata.agent.log=debug")


def test_root_ports_disk_image_and_taps() -> None:
    argv = build("q", spec(initrd=None, image=Path("/i.img"), nics=[NicSpec([7])]),
                      opts(pcie_root_ports=2, extra_args=("-S",)))
    devices = arg_after(argv, "-device")
    assert "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1" in devices
    assert "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2" in devices
    assert "-initrd" not in argv
    assert "fd=8,set=1,opaque=rootdisk" in arg_after(argv, "-add-fd")
    assert "if=none,id=rootdisk,file=/dev/fdset/1,format=raw,readonly=on" in \
        arg_after(argv, "-drive")
    assert arg_after(argv, "-netdev") == ["tap,id=net0,fd=7"]
    assert argv[-1] == "-S"


def test_probe_firmware_reset_vector() -> None:
    fw = probe_firmware()
    assert len(fw) == 65536
    # The CPU starts 16 bytes below the top: mov al,0x2a; out 0xf4,al; hlt.
    assert fw[-16:-12] == bytes([0xB0, 0x2A, 0xE6, 0xF4])


def test_probe_obeys_configuration() -> None:
    assert probe("/nonexistent", "tcg").accel == "tcg"
    assert probe("/nonexistent", "kvm").accel == "kvm"


def test_tap_nics_get_the_pod_macs() -> None:
    argv = build("q", spec(nics=[NicSpec([7], "02:42:0a:00:00:05"), NicSpec([9])]), opts())
    assert arg_after(argv, "-netdev") == ["tap,id=net0,fd=7", "tap,id=net1,fd=9"]
    devices = arg_after(argv, "-device")
    assert "virtio-net-pci,netdev=net0,mac=02:42:0a:00:00:05" in devices
    assert "virtio-net-pci,netdev=net1" in devices


def test_multi_queue_tap() -> None:
    argv = build("q", spec(nics=[NicSpec([7, 8, 9], "02:42:0a:00:00:05")]), opts())
    assert arg_after(argv, "-netdev") == ["tap,id=net0,fds=7:8:9"]
    assert "virtio-net-pci,netdev=net0,mac=02:42:0a:00:00:05,mq=on,vectors=8" in \
        arg_after(argv, "-device")


def test_hotplugged_nic_arguments() -> None:
    assert tap_netdev("net1", ["a"]) == {"type": "tap", "id": "net1", "fd": "a"}
    assert tap_netdev("net1", ["a", "b"]) == {"type": "tap", "id": "net1", "fds": "a:b"}
    assert nic_device("net1", "02:00:00:00:00:01", 2, "rp3") == {
        "driver": "virtio-net-pci", "id": "dev-net1", "netdev": "net1", "bus": "rp3",
        "mac": "02:00:00:00:00:01", "mq": True, "vectors": 6}
    assert "mq" not in nic_device("net1", "", 1, "rp0")


def test_template_memory_and_incoming() -> None:
    plain = build("q", spec(), opts())
    assert any(a.startswith("memory-backend-memfd,") for a in plain)
    assert "-incoming" not in plain
    clone = build("q", spec(memory_file=Path("/run/pykata/vm/x.mem"), incoming=True), opts())
    assert ("memory-backend-file,id=pykata-mem,size=512M,mem-path=/proc/self/fd/7,share=on"
            in clone)
    assert arg_after(clone, "-incoming") == ["defer"]


def test_free_page_reporting_balloon() -> None:
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in arg_after(
        build("q", spec(free_page_reporting=True), opts()), "-device")
    assert not any("balloon" in d for d in arg_after(build("q", spec(), opts()), "-device"))


def test_seccomp_sandbox() -> None:
    value = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    argv = build("q", spec(), opts(seccomp_sandbox=value))
    assert arg_after(argv, "-sandbox") == [value]
    assert "-sandbox" not in build("q", spec(), opts())


def test_no_path_in_the_run_dir_or_of_the_guest_files() -> None:
    """QEMU (unprivileged) cannot open anything in the root-only run dir: every
    file and socket there comes as an fd."""
    s = spec(shared_fs_socket=Path("/run/pykata/sbs/sb1/vfs.sock"),
             memory_file=Path("/run/pykata/vm/sb1.mem"), image=Path("/var/lib/x.img"),
             initrd=None, nics=[NicSpec([10])])
    argv = build("q", s, opts(seccomp_sandbox="on"))
    for a in argv:
        assert str(s.run_dir) not in a and "/run/pykata" not in a, a
        assert "x.img" not in a, a
    assert all((a.startswith("socket,") and ",fd=" in a) or "path=/dev/fdset/" in a
               for a in arg_after(argv, "-chardev"))


def test_missing_fd_is_a_bug_not_a_path() -> None:
    with pytest.raises(ValueError, match="virtio-fs"):
        build("q", spec(shared_fs_socket=Path("/r/vfs.sock")), opts(),
              QemuFds(qmp=3, console=4, agent=5))


def test_kernel_and_initrd_by_fd() -> None:
    fds = QemuFds(qmp=3, console=4, agent=5, kernel=10, initrd=11)
    argv = build("q", spec(), opts(), fds)
    assert arg_after(argv, "-kernel") == ["/proc/self/fd/10"]
    assert arg_after(argv, "-initrd") == ["/proc/self/fd/11"]
    assert set(fds.all()) == {3, 4, 5, 10, 11}


def test_check_reports_the_qemu_user_and_seccomp() -> None:
    from pykata import config
    from pykata.cli.admin import _confinement_checks

    cfg = config.Config()
    cfg.qemu.run_as_user = "pykata-no-such-user"
    cfg.qemu.seccomp_sandbox = ""
    rows = {what: (ok, detail, fix) for what, ok, detail, fix in _confinement_checks(cfg, "tcg")}
    ok, detail, fix = rows["QEMU user"]
    assert not ok and "no such user" in detail and "make setup" in fix and "useradd" in fix
    assert rows["QEMU seccomp"][0] and "off" in rows["QEMU seccomp"][1]
    cfg.qemu.run_as_user = ""
    rows = {what: (ok, detail, fix) for what, ok, detail, fix in _confinement_checks(cfg, "tcg")}
    assert rows["QEMU user"][0] and "root" in rows["QEMU user"][1]


def test_check_warns_when_qemu_processes_share_one_uid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata import config
    from pykata.cli.admin import WARNING, _confinement_checks
    from pykata.hypervisor.qemu import uids

    monkeypatch.setattr(uids, "SUBUID", tmp_path / "subuid")
    monkeypatch.setattr(uids, "SUBGID", tmp_path / "subgid")
    cfg = config.Config()
    cfg.qemu.run_as_user = "nobody"
    cfg.qemu.seccomp_sandbox = ""
    rows = {what: (ok, detail, fix) for what, ok, detail, fix in _confinement_checks(cfg, "tcg")}
    ok, detail, fix = rows["QEMU uids"]
    assert ok and detail.startswith(WARNING) and "share one uid" in detail
    assert fix == "run make setup (adds a subordinate uid range to nobody)"
    (tmp_path / "subuid").write_text("nobody:200000:65536\n")
    (tmp_path / "subgid").write_text("nobody:300000:65536\n")
    rows = {what: (ok, detail, fix) for what, ok, detail, fix in _confinement_checks(cfg, "tcg")}
    ok, detail, fix = rows["QEMU uids"]
    assert ok and not detail.startswith(WARNING) and "200000-265535" in detail, detail


def test_uid_lease_dir_is_an_option_not_on_the_command_line() -> None:
    argv = build("q", spec(), opts(run_as_user="u", uid_lease_dir=Path("/run/pykata/uids")))
    assert not [a for a in argv if "uids" in a]
    assert QemuOptions().uid_lease_dir is None


def test_qmp_client_keeps_no_unbounded_event_queue() -> None:
    import asyncio

    from pykata.hypervisor.qemu.driver import _QMP, _Listener

    async def main() -> None:
        qmp = _QMP("t")
        assert qmp.events not in qmp._listeners  # the default all-events listener
        listener = _Listener(("RTC_CHANGE",), maxsize=4)
        with qmp.listen(listener):
            for i in range(100):
                await qmp._event_dispatch({"event": "RTC_CHANGE", "data": {"offset": i}})
                await qmp._event_dispatch({"event": "OTHER", "data": {}})
            assert listener._queue.qsize() == 4 and not listener._history
            assert (await listener.get())["data"]["offset"] == 96
        assert qmp._listeners == []

    asyncio.run(main())


@pytest.mark.parametrize("device", ["nvdimm", "virtio-pmem"])
def test_root_image_on_pmem_is_a_shared_read_only_mapping(device: str) -> None:
    s = spec(initrd=Path("/k/initrd-early.img"), image=Path("/k/rootfs.erofs"),
             image_device=device, memory_mib=512, max_memory_mib=2048, memory_slots=4)
    fds = dataclasses.replace(FDS, image_bytes=32 << 20)
    argv = build("qemu", s, opts(), fds)
    objs = arg_after(argv, "-object")
    assert ("memory-backend-file,id=rootimg,mem-path=/proc/self/fd/8,size=33554432,"
            "share=on,readonly=on") in objs
    devices = arg_after(argv, "-device")
    want = ("nvdimm,id=rootnv,memdev=rootimg,unarmed=on" if device == "nvdimm"
            else "virtio-pmem-pci,id=rootpmem,memdev=rootimg")
    assert want in devices
    assert ("nvdimm=on" in arg_after(argv, "-machine")[0].split(",")) == (device == "nvdimm")
    # One more slot and room for the image above what memory hotplug may add.
    assert arg_after(argv, "-m") == ["512M,slots=5,maxmem=2080M"]
    assert not any(a.startswith("if=none,id=rootdisk") for a in arg_after(argv, "-drive"))


def test_root_image_on_pmem_needs_slots_even_without_memory_hotplug() -> None:
    s = spec(image=Path("/k/rootfs.erofs"), image_device="nvdimm", memory_mib=512,
             max_memory_mib=512, memory_slots=0)
    argv = build("qemu", s, opts(), dataclasses.replace(FDS, image_bytes=30 << 20))
    assert arg_after(argv, "-m") == ["512M,slots=1,maxmem=542M"]
    with pytest.raises(ValueError, match="size is unknown"):
        build("qemu", s, opts(), FDS)


def test_root_image_on_virtio_blk_skips_the_pmem_header() -> None:
    s = spec(image=Path("/k/rootfs.erofs"), image_device="virtio-blk", image_offset=2 << 20)
    argv = build("qemu", s, opts())
    assert ("if=none,id=rootdisk,file=/dev/fdset/1,format=raw,readonly=on,offset=2097152"
            in arg_after(argv, "-drive"))
    assert "fd=8,set=1,opaque=rootdisk" in arg_after(argv, "-add-fd")
    assert not any("rootimg" in a for a in arg_after(argv, "-object"))


def test_a_small_translation_cache_with_cpu_hotplug_runs_single_threaded_tcg() -> None:
    grow = spec(vcpus=1, max_vcpus=4)
    assert arg_after(build("q", grow, opts(accel="tcg", tb_size_mib=32)), "-accel") == [
        "tcg,tb-size=32,thread=single"]
    fixed = spec(vcpus=2, max_vcpus=2)
    assert arg_after(build("q", fixed, opts(accel="tcg", tb_size_mib=32)), "-accel") == [
        "tcg,tb-size=32"]
    assert arg_after(build("q", grow, opts(accel="tcg")), "-accel") == ["tcg"]
    assert arg_after(build("q", grow, opts(accel="kvm", tb_size_mib=32)), "-accel") == ["kvm"]


def test_restore_argv_repeats_hot_plugged_devices_with_their_ids_and_buses() -> None:
    from pykata.hypervisor.base import PluggedDevice

    plugged = [
        PluggedDevice("nic", "net0", bus="rp0", mac="02:00:00:00:00:0a", fds=[40]),
        PluggedDevice("vcpu", "cpu-1", driver="max-x86_64-cpu",
                      props={"socket-id": 1, "core-id": 0, "thread-id": 0}),
        PluggedDevice("nic", "net1", bus="rp1", mac="02:00:00:00:00:0b", queues=2,
                      fds=[41, 42]),
    ]
    s = spec(vcpus=1, max_vcpus=4, memory_file=Path("/m"), incoming=True,
             restore_devices=plugged)
    argv = build("q", s, opts(pcie_root_ports=6))
    devices = arg_after(argv, "-device")
    assert "max-x86_64-cpu,id=cpu-1,socket-id=1,core-id=0,thread-id=0" in devices
    assert "virtio-net-pci,netdev=net0,id=dev-net0,bus=rp0,mac=02:00:00:00:00:0a" in devices
    assert ("virtio-net-pci,netdev=net1,id=dev-net1,bus=rp1,mac=02:00:00:00:00:0b,"
            "mq=on,vectors=6") in devices
    assert arg_after(argv, "-netdev") == ["tap,id=net0,fd=40", "tap,id=net1,fds=41:42"]
    # in the order they were plugged, after the root ports they sit on, before -incoming
    idx = [i for i, a in enumerate(argv) if "dev-net" in a or "id=cpu-1" in a]
    assert [argv[i].split(",")[0] for i in idx] == ["virtio-net-pci", "max-x86_64-cpu",
                                                    "virtio-net-pci"]
    assert max(i for i, a in enumerate(argv) if a.startswith("pcie-root-port")) < idx[0]
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-smp" in argv and arg_after(argv, "-smp") == ["1,maxcpus=4"]
    # the same spec without them: exactly the argv of today
    plain = build("q", dataclasses.replace(s, restore_devices=[]), opts(pcie_root_ports=6))
    assert argv == [*plain[:-2],
        "-netdev", "tap,id=net0,fd=40",
        "-device", "virtio-net-pci,netdev=net0,id=dev-net0,bus=rp0,mac=02:00:00:00:00:0a",
        "-device", "max-x86_64-cpu,id=cpu-1,socket-id=1,core-id=0,thread-id=0",
        "-netdev", "tap,id=net1,fds=41:42",
        "-device",
        "virtio-net-pci,netdev=net1,id=dev-net1,bus=rp1,mac=02:00:00:00:00:0b,mq=on,vectors=6",
        "-incoming", "defer"]


def test_restore_argv_refuses_a_nic_without_its_taps() -> None:
    from pykata.hypervisor.base import PluggedDevice

    s = spec(restore_devices=[PluggedDevice("nic", "net0", bus="rp0", queues=2, fds=[40])])
    with pytest.raises(ValueError, match="needs 2 tap fds, has 1"):
        build("q", s, opts(pcie_root_ports=2))
    s = spec(restore_devices=[PluggedDevice("disk", "d0")])
    with pytest.raises(ValueError, match="cannot restore"):
        build("q", s, opts())


def test_restore_argv_repeats_private_memory_in_order() -> None:
    from pykata.hypervisor.base import PluggedDevice

    s = spec(memory_slots=2, memory_mib=256, max_memory_mib=1024, restore_devices=[
        PluggedDevice("dimm", "dimm0", props={"size-mib": 128}),
        PluggedDevice("dimm", "dimm1", props={"size-mib": 256})])
    argv = build("q", s, opts())
    assert "memory-backend-ram,id=mem-dimm0,size=128M" in arg_after(argv, "-object")
    assert "memory-backend-ram,id=mem-dimm1,size=256M" in arg_after(argv, "-object")
    assert [d for d in arg_after(argv, "-device") if d.startswith("pc-dimm")] == [
        "pc-dimm,id=dimm0,memdev=mem-dimm0", "pc-dimm,id=dimm1,memdev=mem-dimm1"]
    assert arg_after(argv, "-m") == ["256M,slots=2,maxmem=1024M"]
    with pytest.raises(ValueError, match="no size"):
        build("q", spec(restore_devices=[PluggedDevice("dimm", "dimm0")]), opts())
