from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pykata import config
from pykata.errors import InvalidArgument


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYKATA_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.qemu.machine_type == "q35"
    assert cfg.runtime.internetworking_model == "tcfilter"
    assert cfg.source == ""


def test_file_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[hypervisor.qemu]\ndefault_memory = 1024\nkernel_params = "quiet"\n'
                 '[runtime]\nstate_dir = "/tmp/s"\n')
    monkeypatch.setenv("PYKATA_CONFIG", str(f))
    cfg = config.load()
    assert cfg.qemu.default_memory == 1024
    assert cfg.qemu.default_vcpus == 1  # untouched default
    assert cfg.vm is cfg.qemu  # no [hypervisor] driver: QEMU, as before
    assert cfg.runtime.state_dir == "/tmp/s"
    assert cfg.source == str(f)


def test_explicit_missing_file_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PYKATA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        config.load()


@pytest.mark.parametrize(("text", "message"), [
    ("[hypervisor.qemu]\nfoo = 1", r"unknown key 'foo' in \[hypervisor.qemu\]"),
    ("[hypervisor.qemu]\ndefault_memory = \"big\"", "must be an integer"),
    ("[hypervisor.qemu]\ndefault_memory = true", "must be an integer"),
    ("[hypervisor.qemu]\ndefault_memory = 16", "below 64"),
    ("[hypervisor.qemu]\naccelerator = \"xen\"", "not one of auto, kvm, tcg"),
    ("[runtime]\ninternetworking_model = \"bridge\"", "not one of tcfilter, macvtap, none"),
    ("[hypervisor.qemu]\nextra_args = [1]", "list of strings"),
    ("[hypervisor]\nqemu = 3", r"\[hypervisor.qemu\] must be a table"),
    ("[nope]\nx = 1", "unknown key 'nope'"),
    ("[hypervisor.qemu]\ndefault_vcpus = 4\ndefault_maxvcpus = 2",
     r"\[hypervisor.qemu\] default_maxvcpus \(2\) is below default_vcpus"),
    ("[hypervisor]\ndriver = \"clh\"", r"\[hypervisor\] driver = 'clh' is not one of qemu$"),
    ("[hypervisor]\ndriver = 1", r"\[hypervisor\] driver must be a string"),
    ("[hypervisor.clh]\ndefault_vcpus = 1", r"unknown key 'clh' in \[hypervisor\]"),
    ("this is = = not toml", "not valid TOML"),
])
def test_invalid_config_names_file_section_and_key(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as ei:
        config.parse(text, "/etc/pykata/x.toml")
    assert str(ei.value).startswith("/etc/pykata/x.toml: ")


def test_to_toml_round_trips() -> None:
    cfg = config.parse('[hypervisor.qemu]\nextra_args = ["-a", "b\\"c"]\n[agent]\n'
                       'enable_debug = true\n')
    again = config.parse(config.to_toml(cfg))
    assert again.qemu.extra_args == ["-a", 'b"c']
    assert again.agent.enable_debug is True
    assert config.to_toml(again) == config.to_toml(cfg)


def test_kernel_defaults_to_built_image(tmp_path: Path) -> None:
    cfg = config.parse(f'[image]\noutput_dir = "{tmp_path}"\n')
    assert cfg.kernel_path() == tmp_path / "vmlinuz"
    (tmp_path / "vmlinux").write_bytes(b"")
    assert cfg.kernel_path() == tmp_path / "vmlinux"
    assert cfg.initrd_path() == tmp_path / "initrd.img"


def test_agent_container_engine() -> None:
    assert config.parse("").agent.container_engine == "native"
    assert config.parse('[agent]\ncontainer_engine = "crun"\n').agent.container_engine == "crun"
    with pytest.raises(InvalidArgument, match=r"\[agent\] container_engine = 'runc' is not one"
                                              r" of native, crun"):
        config.parse('[agent]\ncontainer_engine = "runc"\n')


def test_rootfs_mode_picks_the_boot_files(tmp_path: Path) -> None:
    cfg = config.parse(f'[image]\noutput_dir = "{tmp_path}"\n')
    assert cfg.qemu.rootfs == "initrd" and cfg.root_image_path() is None
    assert cfg.initrd_path() == tmp_path / "initrd.img"
    cfg = config.parse(f'[image]\noutput_dir = "{tmp_path}"\n'
                       '[hypervisor.qemu]\nrootfs = "image"\nrootfs_device = "virtio-pmem"\n')
    assert cfg.initrd_path() == tmp_path / "initrd-early.img"
    assert cfg.root_image_path() == tmp_path / "rootfs.erofs"
    with pytest.raises(InvalidArgument, match=r"rootfs_device = 'scsi' is not one of"):
        config.parse('[hypervisor.qemu]\nrootfs_device = "scsi"\n')


def test_vm_cache_keys() -> None:
    cfg = config.parse("")
    assert cfg.factory.vm_cache_number == 0  # off by default
    assert cfg.factory.vm_cache_endpoint == "/run/pykata/vmcache.sock"
    cfg = config.parse('[factory]\nvm_cache_number = 2\nvm_cache_endpoint = "/run/x/c.sock"\n')
    assert (cfg.factory.vm_cache_number, cfg.factory.vm_cache_endpoint) == (2, "/run/x/c.sock")
    assert config.parse(config.to_toml(cfg)).factory.vm_cache_number == 2


@pytest.mark.parametrize(("text", "message"), [
    ("[factory]\nvm_cache_number = -1", r"\[factory\] vm_cache_number = -1 is below 0"),
    ("[factory]\nvm_cache_number = 65", r"\[factory\] vm_cache_number = 65 is above 64"),
    ("[factory]\nvm_cache_number = true", r"vm_cache_number must be an integer"),
    ('[factory]\nvm_cache_endpoint = "rel.sock"', r"vm_cache_endpoint must be an absolute"),
])
def test_vm_cache_keys_validated(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        config.parse(text, "c.toml")


def test_driver_selection() -> None:
    default = config.parse("")
    assert default.hypervisor.driver == "qemu" and default.vm is default.qemu
    assert isinstance(default.vm, config.VMConfig)
    explicit = config.parse('[hypervisor]\ndriver = "qemu"\n[hypervisor.qemu]\n'
                            'default_vcpus = 2\n')
    assert explicit.vm.default_vcpus == 2 and explicit.vm is explicit.qemu
    assert '[hypervisor]\ndriver = "qemu"\n' in config.to_toml(explicit)
    assert config.parse(config.to_toml(explicit)).vm.default_vcpus == 2
    explicit.hypervisor.driver = "firecracker"  # set in code, past the file's checks
    with pytest.raises(InvalidArgument, match=r"^<string>: \[hypervisor\] driver ="
                                              r" 'firecracker' is not one of qemu$"):
        explicit.vm  # noqa: B018


def test_the_common_keys_are_checked_in_any_driver_section() -> None:
    """A second driver's section gets the rules of the keys every driver has."""
    with pytest.raises(InvalidArgument, match=r"\[hypervisor.clh\] shared_fs = '9p' is not"):
        config._check_value("c.toml", "hypervisor.clh", "shared_fs", str, "9p")
    with pytest.raises(InvalidArgument, match=r"\[hypervisor.clh\] default_memory = 8 is below"):
        config._check_value("c.toml", "hypervisor.clh", "default_memory", int, 8)
    # QEMU's own rules stay QEMU's.
    assert config._check_value("c.toml", "hypervisor.clh", "accelerator", str, "x") == "x"
    common = {f.name for f in dataclasses.fields(config.VMConfig)}
    assert {"default_vcpus", "shared_fs", "virtio_fs_daemon", "agent_channel",
            "kernel_params", "rootfs_device"} <= common
    assert not common & {"machine_type", "accelerator", "tb_size", "run_as_user"}


async def test_make_driver_picks_the_configured_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from pykata import hypervisor
    from pykata.testing.fakes import FakeDriver

    assert tuple(hypervisor.DRIVERS) == config.HypervisorConfig.drivers()
    made = FakeDriver()
    seen: list[config.Config] = []

    async def setup(cfg: config.Config) -> FakeDriver:
        seen.append(cfg)
        return made

    monkeypatch.setitem(hypervisor.DRIVERS, "qemu", setup)
    cfg = config.parse('[hypervisor]\ndriver = "qemu"\n', "c.toml")
    assert await hypervisor.make_driver(cfg) is made and seen == [cfg]
    cfg.hypervisor.driver = "clh"
    with pytest.raises(InvalidArgument, match=r"^c.toml: \[hypervisor\] driver = 'clh' is not"
                                              r" one of qemu$"):
        await hypervisor.make_driver(cfg)
    assert seen == [cfg]
