"""The guest kernel: Debian's cloud kernel (``vmlinuz``), the uncompressed
``vmlinux`` ELF taken out of it for PVH boot, the kernel modules the guest
loads at boot (with their dependencies, in load order, uncompressed), and the
modules container workloads load on demand (gzip-compressed, never loaded at
boot).

The on-demand modules are what a privileged pod, or one with CAP_NET_ADMIN,
expects of a node's kernel: bridge, veth, vxlan, tunnels, nf_tables,
iptables, ipset, IPVS, tc... The guest kernel asks for them itself
(``request_module``: ``rtnl-link-bridge``, ``nft-chain-2-nat``,
``net-pf-16-proto-12``...) by running ``/sbin/modprobe -q -- <name>``, which
is busybox's: it resolves the name through ``modules.alias``, loads the
dependencies from ``modules.dep`` and decompresses the ``.ko.gz`` itself. Both
files list only the shipped modules, so nothing else can be asked for.

modules.dep is read with the guest agent's own parser
(:func:`pykata.guest.sysutil.parse_modules_dep`), so the image and the agent
agree on module names and dependency lists.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pykata import errors, wire
from pykata.guest.sysutil import module_name, parse_modules_alias, parse_modules_dep
from pykata.image.elf import elf_complete
from pykata.image.tools import run

log = logging.getLogger(__name__)

KERNEL_META = "linux-image-cloud-amd64"

# Kernel modules the guest loads at boot; the builder adds their dependencies
# (from modules.dep) and skips the ones built into the kernel.
GUEST_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "fuse", "virtiofs", "overlay",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "crc16", "mbcache", "jbd2", "ext4", "virtio_balloon",
)

# Shipped, never loaded at boot: what container workloads load on demand (the
# kernel's request_module runs busybox's modprobe). Every module under these
# directories of the kernel package (paths in modules.dep start with
# "kernel/"), plus ON_DEMAND_MODULES by name, plus their dependencies.
ON_DEMAND_DIRS = (
    "net/netfilter/",  # nf_tables and nft_*, x_tables and xt_*, conntrack, NAT, ipset, IPVS
    "net/ipv4/",  # iptables (ip_tables, iptable_*, ipt_*), ipip, gre, vti, fou, esp, diag
    "net/ipv6/",  # ip6tables, ip6_tunnel, sit, ip6_gre, ...
    "net/bridge/",  # bridge, br_netfilter, ebtables, nft_bridge
    "net/sched/",  # tc qdiscs, classifiers and actions (CNI bandwidth, netem, clsact+bpf)
    "net/8021q/",  # VLANs
    "net/xfrm/", "net/key/",  # IPsec (ip xfrm, af_key)
    "net/sctp/", "net/tls/",
    "drivers/net/vxlan/", "drivers/net/ipvlan/", "drivers/net/bonding/",
    "drivers/net/wireguard/",
)
ON_DEMAND_MODULES = (
    "dummy", "veth", "macvlan", "macvtap", "geneve", "tun", "vrf", "ifb",
    "netlink_diag", "af_packet_diag", "unix_diag",
)
# The on-demand modules are stored gzip-compressed (busybox modprobe and the
# agent decompress them): a quarter of their size, which the initrd costs in RAM
# per VM. gzip rather than xz: it decompresses about 4x faster and the guest's
# Python has zlib built in.
ON_DEMAND_SUFFIX = ".gz"


# -- vmlinuz and vmlinux -------------------------------------------------------------
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def find_lz4_vmlinux(bzimage: bytes, start: int = 0) -> int:
    """Offset of the next LZ4 (legacy frame) magic at or after ``start``, or -1."""
    return bzimage.find(LZ4_LEGACY_MAGIC, start)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed vmlinux ELF inside an LZ4-compressed bzImage, or None."""
    off = find_lz4_vmlinux(bzimage)
    while off >= 0:
        try:
            # lz4 complains about the bytes after the stream; the output is what counts.
            raw = subprocess.run(["lz4", "-dc"], input=bzimage[off:], capture_output=True,
                                 check=False).stdout
        except FileNotFoundError:
            log.warning("lz4 is not installed: no uncompressed vmlinux (apt-get install lz4)")
            return None
        if elf_complete(raw):
            return raw
        off = find_lz4_vmlinux(bzimage, off + 1)
    return None


def install_kernel(kroot: Path, out: Path, step: Callable[[str], None]) -> str:
    """``out/vmlinuz`` (and ``out/vmlinux`` when it can be extracted) from the
    unpacked kernel package in ``kroot``; the kernel release."""
    vmlinuz = next(iter(sorted((kroot / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        raise errors.Internal(f"no /boot/vmlinuz-* in the kernel package ({kroot})")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    raw = extract_vmlinux(vmlinuz.read_bytes())
    if raw is not None:
        (out / "vmlinux").write_bytes(raw)
    else:
        log.warning("no uncompressed vmlinux in %s: the guest boots from the bzImage", vmlinuz)
    step(f"kernel {release}" + (" + vmlinux" if raw is not None else ""))
    return release


# -- modules -------------------------------------------------------------------------
def module_load_order(wanted: Iterable[str], deps: Mapping[str, Sequence[str]],
                      builtin: set[str]) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first.
    ``deps`` is :func:`pykata.guest.sysutil.parse_modules_dep` output (name ->
    [its path, then its dependencies' paths]). Built-in and unknown modules are
    skipped."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            return
        path, *requires = deps[name]
        for dep in reversed(requires):  # modules.dep lists the closest dependency first
            visit(module_name(dep))
        order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


def decompressed(rel: str) -> str:
    """A module's file name once decompressed (foo.ko.xz -> foo.ko)."""
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(suffix):
            return rel.removesuffix(suffix)
    return rel


def install_module(src: Path, dst: Path, compress: bool = False) -> int:
    """Copy a module, decompressed (the agent calls finit_module without flags),
    or gzip-compressed when ``compress`` (reproducibly: no name, no time). Its
    size once installed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".xz"):
        data = lzma.decompress(src.read_bytes())
    elif src.name.endswith(".gz"):
        data = gzip.decompress(src.read_bytes())
    elif src.name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", str(src)], capture_output=True,
                              check=True).stdout
    else:
        data = src.read_bytes()
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    dst.write_bytes(data)
    return len(data)


def module_index(kroot: Path, release: str) -> tuple[dict[str, list[str]], set[str]]:
    """(modules.dep as parsed by the guest, names built into the kernel) of the
    unpacked kernel package in ``kroot``; runs depmod when the .deb has no index."""
    mdir = kroot / "lib/modules" / release
    if not (mdir / "modules.dep").exists():  # depmod runs at install time, not in the .deb
        run(["depmod", "-b", str(kroot), release], f"cannot index the modules of {release}")
    deps = parse_modules_dep((mdir / "modules.dep").read_text())
    builtin_file = mdir / "modules.builtin"
    builtin = ({module_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    return deps, builtin


def on_demand_order(deps: Mapping[str, Sequence[str]], builtin: set[str],
                    boot: Iterable[str]) -> list[str]:
    """modules.dep paths of the on-demand modules (ON_DEMAND_DIRS, ON_DEMAND_MODULES)
    and their dependencies, dependencies first, without the ``boot`` ones (paths)."""
    prefixes = tuple("kernel/" + d for d in ON_DEMAND_DIRS)
    wanted = sorted(name for name, (path, *_) in deps.items() if path.startswith(prefixes))
    at_boot = set(boot)
    return [p for p in module_load_order([*wanted, *ON_DEMAND_MODULES], deps, builtin)
            if p not in at_boot]


def shipped_aliases(text: str, shipped: set[str]) -> str:
    """The ``alias`` lines of a modules.alias (or modules.symbols) whose module is
    ``shipped`` (names), in their order: the guest's modprobe resolves nothing else."""
    keep = []
    for line in text.splitlines():
        entry = parse_modules_alias(line)
        if entry and entry[0][1] in shipped:
            keep.append(line.strip() + "\n")
    return "".join(keep)


@dataclass(frozen=True)
class ShippedModules:
    boot: list[str]  # loaded at boot, in order: paths relative to / (/etc/pykata/modules)
    on_demand: list[str]  # names of the modules loaded only when asked for
    on_demand_bytes: int  # their size in the image (compressed)


def install_modules(kroot: Path, root: Path, release: str,
                    step: Callable[[str], None]) -> ShippedModules:
    """Copy the closure of GUEST_MODULES (uncompressed) and of the on-demand
    modules (gzip); write /etc/pykata/modules (boot load order, paths relative
    to /) and the modules.dep, modules.alias and modules.symbols of the shipped
    modules (plus the kernel's modules.builtin)."""
    mdir = kroot / "lib/modules" / release
    deps, builtin = module_index(kroot, release)
    builtin_file = mdir / "modules.builtin"
    order = module_load_order(GUEST_MODULES, deps, builtin)
    absent = [m for m in GUEST_MODULES if m.replace("-", "_") not in deps
              and m.replace("-", "_") not in builtin]
    if absent:
        log.warning("kernel %s has neither module nor built-in: %s", release, " ".join(absent))
    extra = on_demand_order(deps, builtin, order)
    base = Path("lib/modules") / release
    dest = root / "usr" / base
    load_list: list[str] = []
    dep_lines: list[str] = []
    shipped_as: dict[str, str] = {}  # modules.dep path in the package -> in the image
    for rel in order:
        shipped_as[rel] = decompressed(rel)
    for rel in extra:
        shipped_as[rel] = decompressed(rel) + ON_DEMAND_SUFFIX
    extra_bytes = 0
    at_boot = set(order)
    for rel, name in shipped_as.items():
        size = install_module(mdir / rel, dest / name, compress=rel not in at_boot)
        if rel in at_boot:
            load_list.append(str(base / name))
        else:
            extra_bytes += size
        # Only shipped dependencies: a built-in one is no file to load.
        needs = [shipped_as[d] for d in deps[module_name(rel)][1:] if d in shipped_as]
        dep_lines.append(f"{name}: " + " ".join(needs))
    if builtin_file.exists():  # lets the agent tell "built in" from "missing"
        shutil.copyfile(builtin_file, dest / "modules.builtin")
    (dest / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    names = {module_name(rel) for rel in shipped_as}
    for index in ("modules.alias", "modules.symbols"):
        src = mdir / index
        text = src.read_text() if src.exists() else ""
        (dest / index).write_text(shipped_aliases(text, names))
    modules_file = root / wire.GUEST_MODULES_FILE.lstrip("/")
    modules_file.parent.mkdir(parents=True, exist_ok=True)
    modules_file.write_text("\n".join(load_list) + "\n")
    step(f"{len(load_list)} kernel modules at boot, {len(extra)} on demand "
         f"({extra_bytes / 2**20:.1f} MiB)")
    return ShippedModules(load_list, sorted(module_name(rel) for rel in extra), extra_bytes)
