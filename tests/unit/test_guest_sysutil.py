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


# -- modprobe: names, aliases, dependencies (what the kernel's request_module asks) ----

DEP = """\
kernel/net/bridge/bridge.ko.gz: kernel/net/802/stp.ko.gz kernel/net/llc/llc.ko.gz
kernel/net/802/stp.ko.gz: kernel/net/llc/llc.ko.gz
kernel/net/llc/llc.ko.gz:
kernel/net/bridge/br_netfilter.ko.gz: kernel/net/bridge/bridge.ko.gz kernel/net/802/stp.ko.gz \
kernel/net/llc/llc.ko.gz
kernel/net/netfilter/nfnetlink.ko.gz:
kernel/net/netfilter/nf_tables.ko.gz: kernel/net/netfilter/nfnetlink.ko.gz \
kernel/lib/libcrc32c.ko.gz
kernel/lib/libcrc32c.ko.gz:
kernel/net/netfilter/nft_chain_nat.ko.gz: kernel/net/netfilter/nf_tables.ko.gz \
kernel/net/netfilter/nfnetlink.ko.gz kernel/lib/libcrc32c.ko.gz
kernel/net/netfilter/xt_conntrack.ko.gz:
kernel/net/ipv4/ip_tunnel.ko.gz:
kernel/net/ipv4/ipip.ko.gz: kernel/net/ipv4/ip_tunnel.ko.gz
kernel/drivers/net/macvlan.ko.gz:
kernel/drivers/net/macvtap.ko.gz: kernel/drivers/net/macvlan.ko.gz
kernel/fs/overlayfs/overlay.ko:
""".replace("\\\n", "")

ALIAS = """\
# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias net-pf-16-proto-12 nfnetlink
alias nfnetlink-subsys-10 nf_tables
alias nft-chain-2-nat nft_chain_nat
alias nft-chain-10-nat nft_chain_nat
alias ipt_conntrack xt_conntrack
alias ip6t_conntrack xt_conntrack
alias rtnl-link-ipip ipip
alias tunl0 ipip
alias rtnl-link-macvlan macvlan
alias rtnl-link-macvtap macvtap
alias char-major-10-200 macvtap
alias rtnl-link-mac* macvlan
alias fs-overlay overlay
alias rtnl-link-gone not_shipped
"""


def _idx() -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    return su.parse_modules_dep(DEP), su.parse_modules_alias(ALIAS)


def test_parse_modules_alias() -> None:
    aliases = su.parse_modules_alias(ALIAS + "garbage line\nalias too many words here\n")
    assert aliases[0] == ("rtnl-link-bridge", "bridge")
    assert ("nft-chain-2-nat", "nft_chain_nat") in aliases
    assert len(aliases) == 15  # the comment and the bad lines are skipped
    # modules.symbols has the same form.
    assert su.parse_modules_alias("alias symbol:nf_nat_ftp_hook nf_nat-ftp\n") == [
        ("symbol:nf_nat_ftp_hook", "nf_nat_ftp")]


@pytest.mark.parametrize(("request_", "modules"), [
    ("bridge", ["bridge"]),  # a module name is itself
    ("br-netfilter", ["br_netfilter"]),  # '-' and '_' alike
    ("rtnl-link-bridge", ["bridge"]),  # what `ip link add type bridge` asks
    ("rtnl_link_bridge", ["bridge"]),
    ("net-pf-16-proto-12", ["nfnetlink"]),  # socket(AF_NETLINK, NETLINK_NETFILTER)
    ("nfnetlink-subsys-10", ["nf_tables"]),
    ("nft-chain-2-nat", ["nft_chain_nat"]),  # an nftables nat chain (IPv4)
    ("nft-chain-10-nat", ["nft_chain_nat"]),  # and IPv6
    ("ipt_conntrack", ["xt_conntrack"]),  # iptables -m conntrack
    ("tunl0", ["ipip"]),
    ("rtnl-link-macvtap", ["macvtap", "macvlan"]),  # every match counts, in order
    ("rtnl-link-macwhatever", ["macvlan"]),  # a wildcard pattern
])
def test_resolve_module_names_and_aliases(request_: str, modules: list[str]) -> None:
    deps, aliases = _idx()
    assert su.resolve_module(request_, deps, aliases) == modules


def test_resolve_module_builtin_and_missing() -> None:
    deps, aliases = _idx()
    assert su.resolve_module("unix", deps, aliases, builtin=["unix"]) == []
    with pytest.raises(FileNotFoundError, match="kernel module rtnl-link-gone not found"):
        su.resolve_module("rtnl-link-gone", deps, aliases)  # its module is not shipped
    with pytest.raises(FileNotFoundError, match="kernel module nope not found"):
        su.resolve_module("nope", deps, aliases)


def test_alias_patterns_keep_dashes_inside_brackets() -> None:
    deps = {"m": ["kernel/m.ko"]}
    # A range stays a range ("[0-9]" is not "[0_9]"); dashes elsewhere are '_'.
    assert su.resolve_module("dev-5", deps, [("dev-[0-9]", "m")]) == ["m"]
    assert su.resolve_module("dev_7", deps, [("dev-[0-9]", "m")]) == ["m"]
    with pytest.raises(FileNotFoundError):
        su.resolve_module("dev-_", deps, [("dev-[0-9]", "m")])


def test_module_files_put_dependencies_first_once() -> None:
    deps, _ = _idx()
    assert su.module_files(["nft_chain_nat", "br_netfilter"], deps) == [
        "kernel/lib/libcrc32c.ko.gz", "kernel/net/netfilter/nfnetlink.ko.gz",
        "kernel/net/netfilter/nf_tables.ko.gz", "kernel/net/netfilter/nft_chain_nat.ko.gz",
        "kernel/net/llc/llc.ko.gz", "kernel/net/802/stp.ko.gz",
        "kernel/net/bridge/bridge.ko.gz", "kernel/net/bridge/br_netfilter.ko.gz"]


def test_load_module_by_name_resolves_an_alias_and_skips_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "modules.dep").write_text(DEP)
    (tmp_path / "modules.alias").write_text(ALIAS)
    (tmp_path / "modules.builtin").write_text("kernel/net/unix/unix.ko\n")
    calls: list[tuple[str, str]] = []

    def fake_load(path: str, params: str = "") -> bool:
        calls.append((path, params))
        return True

    monkeypatch.setattr(sysutil, "load_module", fake_load)
    monkeypatch.setattr(sysutil, "module_loaded", lambda p: sysutil.module_name(p) == "llc")
    base = str(tmp_path)
    assert sysutil.load_module_by_name("rtnl-link-bridge", ["stp_mode=1"], base=base) == 2
    assert calls == [(f"{base}/kernel/net/802/stp.ko.gz", ""),
                     (f"{base}/kernel/net/bridge/bridge.ko.gz", "stp_mode=1")]
    calls.clear()
    assert sysutil.load_module_by_name("unix", base=base) == 0  # built in
    assert calls == []
    with pytest.raises(FileNotFoundError, match="kernel module nope not found"):
        sysutil.load_module_by_name("nope", base=base)
    with pytest.raises(OSError, match="no modules.dep for this kernel"):
        sysutil.load_module_by_name("bridge", base=str(tmp_path / "missing"))


class _FakeLibc:
    def __init__(self, ret: int = 0) -> None:
        self.ret = ret
        self.calls: list[tuple[object, ...]] = []

    def syscall(self, *args: object) -> int:
        self.calls.append(args)
        return self.ret


def test_load_module_decompresses_gzip_for_init_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import gzip

    image = b"\x7fELF a module image" * 100
    (tmp_path / "m.ko.gz").write_bytes(gzip.compress(image, mtime=0))
    (tmp_path / "p.ko").write_bytes(image)
    fake = _FakeLibc()
    monkeypatch.setattr(sysutil, "libc", lambda: fake)
    assert sysutil.load_module(str(tmp_path / "m.ko.gz"), "a=1")
    nr, buf, size, params = fake.calls[0]
    assert nr == 175 and isinstance(buf, ctypes.Array) and params == b"a=1"
    assert isinstance(size, ctypes.c_ulong) and size.value == len(image)
    assert bytes(buf)[:len(image)] == image  # init_module gets the decompressed image
    assert sysutil.load_module(str(tmp_path / "p.ko"))
    assert fake.calls[1][0] == 313 and fake.calls[1][2:] == (b"", 0)  # finit_module, no flags


def test_load_module_already_loaded_and_errors(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno

    (tmp_path / "p.ko").write_bytes(b"\x7fELF")
    fake = _FakeLibc(ret=-1)
    monkeypatch.setattr(sysutil, "libc", lambda: fake)
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EEXIST)
    assert sysutil.load_module(str(tmp_path / "p.ko")) is False
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.ENOEXEC)
    with pytest.raises(OSError, match="load module .*p.ko: Exec format error"):
        sysutil.load_module(str(tmp_path / "p.ko"))
