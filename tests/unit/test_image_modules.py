"""The guest image's kernel modules: the boot set (uncompressed, in load order)
and the on-demand set (gzip), with a modules.dep, modules.alias and
modules.symbols of exactly what is shipped; and the image's modprobe (busybox)
resolving names the way the agent's own resolver does."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pykata import wire
from pykata.guest import sysutil
from pykata.image import kernel
from pykata.image.elf import elf_info

# A kernel package's index (as depmod writes it): boot modules, on-demand ones
# (by directory and by name), their dependencies elsewhere in the tree, and
# modules that must stay out (a GPU driver, a file system).
DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko \
kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
kernel/net/llc/llc.ko:
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko \
kernel/net/llc/llc.ko
kernel/lib/libcrc32c.ko:
kernel/net/netfilter/nfnetlink.ko:
kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nft_chain_nat.ko: kernel/net/netfilter/nf_tables.ko \
kernel/net/netfilter/nfnetlink.ko kernel/lib/libcrc32c.ko
kernel/net/ipv4/netfilter/ip_tables.ko: kernel/net/netfilter/x_tables.ko
kernel/net/netfilter/x_tables.ko:
kernel/drivers/net/veth.ko:
kernel/drivers/net/failover_user.ko: kernel/net/core/failover.ko
kernel/drivers/gpu/drm/drm.ko:
kernel/fs/btrfs/btrfs.ko: kernel/lib/libcrc32c.ko
""".replace("\\\n", "")

ALIAS = """\
# Aliases extracted from modules themselves.
alias virtio:d00000001v* virtio_net
alias fs-overlay overlay
alias rtnl-link-bridge bridge
alias net-pf-16-proto-12 nfnetlink
alias nfnetlink-subsys-10 nf_tables
alias nft-chain-2-nat nft_chain_nat
alias nft-chain-10-nat nft_chain_nat
alias ipt_icmp ip_tables
alias rtnl-link-veth veth
alias pci:v00008086d* drm
alias fs-btrfs btrfs
"""

SYMBOLS = """\
# Aliases for symbols, used by symbol_request().
alias symbol:br_fdb_test_addr_hook bridge
alias symbol:drm_dev_alloc drm
"""

ON_DEMAND = {"bridge", "br_netfilter", "stp", "llc", "libcrc32c", "nfnetlink", "nf_tables",
             "nft_chain_nat", "ip_tables", "x_tables", "veth"}


def _module_bytes(rel: str) -> bytes:
    return b"\x7fELF" + f" module {rel} ".encode() * 50


def _kernel_tree(kroot: Path, release: str) -> Path:
    mdir = kroot / "lib/modules" / release
    for line in DEP.splitlines():
        rel = line.partition(":")[0]
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (mdir / rel).write_bytes(_module_bytes(rel))
    (mdir / "modules.dep").write_text(DEP)
    (mdir / "modules.alias").write_text(ALIAS)
    (mdir / "modules.symbols").write_text(SYMBOLS)
    (mdir / "modules.builtin").write_text("kernel/net/unix/unix.ko\n")
    return mdir


def _install(tmp_path: Path, release: str = "6.1.0-1-cloud-amd64"
             ) -> tuple[kernel.ShippedModules, Path, list[str]]:
    _kernel_tree(tmp_path / "kernel", release)
    root = tmp_path / "root"
    steps: list[str] = []
    shipped = kernel.install_modules(tmp_path / "kernel", root, release, steps.append)
    return shipped, root / "usr/lib/modules" / release, steps


def test_on_demand_modules_are_shipped_compressed_with_their_dependencies(
        tmp_path: Path) -> None:
    shipped, mods, steps = _install(tmp_path)
    release = mods.name
    boot = [sysutil.module_name(p) for p in shipped.boot]
    assert boot == ["virtio_ring", "virtio", "failover", "net_failover", "virtio_net",
                    "overlay"]
    # The boot list is the agent's, uncompressed (finit_module without flags).
    listed = (tmp_path / "root" / wire.GUEST_MODULES_FILE.lstrip("/")).read_text().split()
    assert listed == shipped.boot == [
        f"lib/modules/{release}/{p}" for p in
        ("kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
         "kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
         "kernel/drivers/net/virtio_net.ko", "kernel/fs/overlayfs/overlay.ko")]
    assert (mods / "kernel/fs/overlayfs/overlay.ko").read_bytes() == _module_bytes(
        "kernel/fs/overlayfs/overlay.ko")
    # On demand: by directory (net/bridge, net/netfilter, net/ipv4) and by name
    # (veth), plus their dependencies from anywhere (net/802, net/llc, lib).
    assert set(shipped.on_demand) == ON_DEMAND
    for rel in ("kernel/net/bridge/bridge.ko", "kernel/net/llc/llc.ko", "kernel/lib/libcrc32c.ko",
                "kernel/net/ipv4/netfilter/ip_tables.ko", "kernel/drivers/net/veth.ko"):
        packed = (mods / (rel + ".gz")).read_bytes()
        assert gzip.decompress(packed) == _module_bytes(rel)
        assert packed[4:8] == b"\0\0\0\0"  # no time stamp: the image is reproducible
        assert not (mods / rel).exists()
    assert shipped.on_demand_bytes == sum(
        p.stat().st_size for p in mods.rglob("*.ko.gz"))
    # Never shipped: what nothing asked for (a dependency of a boot module only
    # counts if a boot module needs it; failover_user does not).
    for rel in ("kernel/drivers/gpu/drm/drm.ko", "kernel/fs/btrfs/btrfs.ko",
                "kernel/drivers/net/failover_user.ko"):
        assert not (mods / rel).exists() and not (mods / (rel + ".gz")).exists()
    assert steps == [f"6 kernel modules at boot, {len(ON_DEMAND)} on demand "
                     f"({shipped.on_demand_bytes / 2**20:.1f} MiB)"]


def test_shipped_indexes_name_only_shipped_modules(tmp_path: Path) -> None:
    shipped, mods, _ = _install(tmp_path)
    deps = sysutil.parse_modules_dep((mods / "modules.dep").read_text())
    assert set(deps) == ON_DEMAND | {sysutil.module_name(p) for p in shipped.boot}
    assert deps["br_netfilter"] == ["kernel/net/bridge/br_netfilter.ko.gz",
                                    "kernel/net/bridge/bridge.ko.gz", "kernel/net/802/stp.ko.gz",
                                    "kernel/net/llc/llc.ko.gz"]
    assert deps["virtio_net"][0] == "kernel/drivers/net/virtio_net.ko"
    for name, (own, *needed) in deps.items():  # every file named is there
        assert all((mods / p).is_file() for p in (own, *needed)), name
    aliases = (mods / "modules.alias").read_text().splitlines()
    assert aliases == [
        "alias virtio:d00000001v* virtio_net", "alias fs-overlay overlay",
        "alias rtnl-link-bridge bridge", "alias net-pf-16-proto-12 nfnetlink",
        "alias nfnetlink-subsys-10 nf_tables", "alias nft-chain-2-nat nft_chain_nat",
        "alias nft-chain-10-nat nft_chain_nat", "alias ipt_icmp ip_tables",
        "alias rtnl-link-veth veth"]
    assert (mods / "modules.symbols").read_text() == (
        "alias symbol:br_fdb_test_addr_hook bridge\n")
    assert (mods / "modules.builtin").read_text() == "kernel/net/unix/unix.ko\n"


def test_on_demand_order_leaves_the_boot_modules_out() -> None:
    deps = sysutil.parse_modules_dep(DEP)
    boot = kernel.module_load_order(kernel.GUEST_MODULES, deps, set())
    extra = kernel.on_demand_order(deps, {"llc"}, boot)
    assert not set(extra) & set(boot)
    assert "kernel/net/llc/llc.ko" not in extra  # built in
    assert extra.index("kernel/net/802/stp.ko") < extra.index("kernel/net/bridge/bridge.ko")
    assert extra.index("kernel/net/netfilter/x_tables.ko") < extra.index(
        "kernel/net/ipv4/netfilter/ip_tables.ko")


def test_shipped_aliases_filter() -> None:
    text = ("# comment\nalias a-b m1\nalias c m2\nnot an alias line\n"
            "alias d m-1\n  alias e m3  \n")
    assert kernel.shipped_aliases(text, {"m1"}) == "alias a-b m1\n"
    # Module names as the kernel spells them: '-' is '_'.
    assert kernel.shipped_aliases(text, {"m_1", "m3"}) == "alias d m-1\nalias e m3\n"
    assert kernel.shipped_aliases(text, set()) == ""


def _static_busybox() -> str | None:
    bb = shutil.which("busybox")
    if bb is None:
        return None
    info = elf_info(Path(bb).read_bytes())
    return bb if info is not None and not info.interp else None


@pytest.mark.skipif(os.geteuid() != 0 or _static_busybox() is None,
                    reason="needs root (chroot) and a static busybox")
@pytest.mark.parametrize("request_", [
    "rtnl-link-bridge", "br_netfilter", "br-netfilter", "nft-chain-2-nat",
    "net-pf-16-proto-12", "nfnetlink-subsys-10", "ipt_icmp", "rtnl-link-veth", "veth"])
def test_busybox_modprobe_resolves_like_the_agent(tmp_path: Path, request_: str) -> None:
    """The guest kernel's request_module runs busybox's modprobe in the image; the
    agent loads with sysutil: both read the shipped indexes the same way."""
    _, mods, _ = _install(tmp_path, os.uname().release)  # busybox looks under uname -r
    root = tmp_path / "root"
    (root / "bin").mkdir(exist_ok=True)
    (root / "lib").symlink_to("usr/lib")  # merged /usr, as in the image
    bb = _static_busybox()
    assert bb is not None
    shutil.copy2(bb, root / "bin/busybox")
    cp = subprocess.run(["chroot", str(root), "/bin/busybox", "modprobe", "-D", "-q", "--",
                         request_], capture_output=True, text=True, timeout=30, check=False)
    assert cp.returncode == 0, cp.stderr
    busybox_loads = [line.split()[1] for line in cp.stdout.splitlines()
                     if line.startswith("insmod ")]
    base = f"/lib/modules/{mods.name}"
    deps = sysutil.parse_modules_dep((mods / "modules.dep").read_text())
    aliases = sysutil.parse_modules_alias((mods / "modules.alias").read_text())
    ours = sysutil.module_files(sysutil.resolve_module(request_, deps, aliases), deps)
    assert busybox_loads == [f"{base}/{p}" for p in ours]
    # A name the image does not ship, and a path (the kernel builds some names from
    # what a user passed, e.g. rtnl-link-<kind>), are refused by both.
    evil = root / "tmp/evil.ko"
    evil.parent.mkdir(exist_ok=True)
    evil.write_bytes(_module_bytes("evil"))
    for name in ("fs-btrfs", "rtnl-link-../../../../tmp/evil.ko", "/tmp/evil.ko",
                 "../../../../tmp/evil"):
        cp = subprocess.run(["chroot", str(root), "/bin/busybox", "modprobe", "-D", "-q", "--",
                             name], capture_output=True, text=True, timeout=30, check=False)
        assert cp.returncode != 0 and "insmod" not in cp.stdout, (name, cp.stdout)
        with pytest.raises(FileNotFoundError):
            sysutil.resolve_module(name, deps, aliases)
