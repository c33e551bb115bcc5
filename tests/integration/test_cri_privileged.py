"""Issue 22: privileged pods, and pods given CAP_NET_ADMIN, use the networking of
their VM's kernel as they would the node's on runc: bridges, veth, VLANs,
macvlan/ipvlan, tunnels, nftables and iptables rules. The modules are
in the guest image and never loaded at boot: the guest kernel asks for them
(request_module -> the image's busybox modprobe) when a workload first needs
them. A container without NET_ADMIN is refused (EPERM) as on runc. Through
containerd's CRI plugin, in both guest root modes (initrd, read-only image)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.guest.sysutil import module_name
from pykata.image.cache import find_image
from pykata.testing import busybox_rootfs
from pykata.testing.containerd import PrivateContainerd
from pykata.testing.cri import (
    CNINetwork,
    CRIClient,
    container_config,
    cri_containerd,
    pod_config,
)
from pykata.testing.images import oci_archive
from pykata.testing.leaks import pod_leftovers

pytestmark = pytest.mark.timeout(900)

HANDLER = "pykata"
LABEL = {"pykata.test": "cri-privileged"}
CACHE = Path("/var/tmp/pykata-test")
NETTOOLS_REF = "docker.io/pykata/nettools:latest"
SLEEP = "trap 'exit 0' TERM; sleep 3600 & wait"
Env = tuple[PrivateContainerd, CNINetwork, CRIClient]

# What the workloads of the issue load (Calico/Flannel-style CNI in a pod,
# Docker-in-pod, Istio-style iptables, VPNs): all shipped, none loaded at boot.
ON_DEMAND = (
    "bridge", "br_netfilter", "veth", "dummy", "macvlan", "ipvlan", "8021q", "vxlan", "tun",
    "ipip", "ip_gre", "gre", "sit", "ip6_tunnel", "nf_tables", "nft_chain_nat", "nft_ct",
    "nft_nat", "nft_masq", "nft_compat", "nfnetlink", "x_tables", "ip_tables", "ip6_tables",
    "iptable_filter", "iptable_nat", "iptable_mangle", "ip6table_filter", "ip6table_nat",
    "nf_nat", "nf_conntrack", "xt_conntrack", "xt_MASQUERADE", "xt_addrtype", "xt_comment",
    "xt_mark", "xt_nat", "xt_tcpudp", "ip_set", "ip_vs", "sch_ingress", "wireguard",
)

# The test image: busybox (ip, brctl, ip tunnel) and the host's iptables
# (nft and legacy) with the libraries and xtables plugins it loads.
XTABLES = ("/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi")
XTABLES_PLUGINS = Path("/usr/lib/x86_64-linux-gnu/xtables")
XTABLES_LINKS = {
    "xtables-nft-multi": ("iptables", "iptables-nft", "ip6tables", "ip6tables-nft",
                          "iptables-nft-save", "ip6tables-nft-save"),
    "xtables-legacy-multi": ("iptables-legacy", "ip6tables-legacy", "iptables-legacy-save"),
}


def _libraries(paths: list[Path]) -> set[str]:
    """The shared libraries and the loader ``paths`` need (ldd: absolute paths)."""
    out: set[str] = set()
    for p in paths:
        text = subprocess.run(["ldd", str(p)], capture_output=True, text=True, check=True,
                              timeout=60).stdout
        out.update(m.group(1) for m in re.finditer(r"(/\S+) \(0x", text))
    return out


def nettools_rootfs(cache: Path) -> Path:
    """busybox plus the host's iptables (``iptables`` is iptables-nft), cached."""
    dest = cache / "nettools-rootfs"
    if (dest / ".pykata-rootfs").exists():
        return dest
    missing = [p for p in XTABLES if not Path(p).exists()]
    if missing or not XTABLES_PLUGINS.is_dir():
        pytest.fail(f"iptables is not installed on this host ({missing or XTABLES_PLUGINS}): "
                    "apt-get install iptables")
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(busybox_rootfs(cache / "busybox-rootfs"), tmp, symlinks=True)
    plugins = sorted(XTABLES_PLUGINS.glob("*.so"))
    programs = [Path(p) for p in XTABLES]
    for lib in sorted(_libraries(programs + plugins)):
        target = tmp / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, target)  # the file behind any symlink
    for prog in programs:
        shutil.copy2(prog, tmp / "usr/sbin" / prog.name)
        for name in XTABLES_LINKS[prog.name]:
            (tmp / "usr/sbin" / name).symlink_to(prog.name)
    (tmp / XTABLES_PLUGINS.relative_to("/")).mkdir(parents=True, exist_ok=True)
    for so in plugins:
        shutil.copy2(so, tmp / so.relative_to("/"), follow_symlinks=False)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def cri_env(name: str, pykata_toml: str) -> Iterator[Env]:
    """A private containerd with the CRI plugin and the test image; ``name``
    keeps its metadata apart from another module-scoped one alive at once."""
    with cri_containerd(Path(f"/run/pykata-crip-{uuid.uuid4().hex[:6]}"),
                        Path(f"/var/lib/pykata-crip-{name}-test"), LABEL,
                        pykata_config=pykata_toml) as env:
        archive = oci_archive(nettools_rootfs(CACHE), CACHE / "nettools.oci.tar",
                              ref=NETTOOLS_REF, cmd=["sh"])
        env[0].ctr("images", "import", str(archive))
        yield env


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """The guest root as an initrd."""
    yield from cri_env("initrd", '[hypervisor.qemu]\nrootfs = "initrd"\n')


@pytest.fixture(scope="module")
def image_env() -> Iterator[Env]:
    """The guest root as the read-only image, the agent loading ip_tables and
    ip6_tables at sandbox creation ([agent] kernel_modules)."""
    art = find_image(Path(config.load().image.output_dir))
    if art is None or "erofs" not in art.root_images or art.early_initrd is None:
        pytest.fail("the guest image has no erofs root image: run 'make setup'")
    yield from cri_env("image", '[hypervisor.qemu]\nrootfs = "image"\n'
                       '[agent]\nkernel_modules = ["ip_tables", "ip6_tables"]\n')


class Pod:
    def __init__(self, env: Env, *, privileged: bool = False) -> None:
        self.ctd, _, self.c = env
        self.tag = uuid.uuid4().hex[:10]
        self.config = pod_config(f"pp-{self.tag}", "pykata-test", uid=self.tag,
                                 log_directory=self.ctd.base / "pods" / self.tag,
                                 labels=LABEL, privileged=privileged)
        self.id = self.c.run_pod_sandbox(self.config, runtime_handler=HANDLER)
        self.cids: list[str] = []

    def container(self, name: str, *, privileged: bool = False,
                  add_capabilities: tuple[str, ...] = ()) -> str:
        cfg = container_config(name, NETTOOLS_REF, ["/bin/sh", "-c"], [SLEEP],
                               log_path=f"{name}.log", privileged=privileged,
                               add_capabilities=add_capabilities)
        cid = self.c.create_container(self.id, cfg, self.config)
        self.cids.append(cid)
        self.c.start_container(cid)
        return cid

    def sh(self, cid: str, script: str, timeout: int = 120) -> tuple[str, int]:
        """stdout and stderr together, and the exit code."""
        r = self.c.exec_sync(cid, ["sh", "-c", "exec 2>&1; " + script], timeout=timeout)
        return r.stdout.decode(errors="replace"), r.exit_code

    def modules(self, cid: str) -> set[str]:
        out, rc = self.sh(cid, "cut -d' ' -f1 /proc/modules")
        assert rc == 0, out
        return set(out.split())

    def leftovers(self) -> list[str]:
        needles = [self.id, *self.cids]
        sbs = Path("/run/pykata/sbs")
        return pod_leftovers(needles) + [f"state {p}" for n in needles
                                         for p in sbs.glob(f"*/{n}")]

    def remove(self) -> list[str]:
        """Stop and remove the pod; what is left of it after 30 s."""
        self.c.stop_pod_sandbox(self.id)
        self.c.remove_pod_sandbox(self.id)
        deadline = time.monotonic() + 30
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def _sh_ok(pod: Pod, cid: str, script: str) -> str:
    out, rc = pod.sh(cid, script)
    assert rc == 0, f"{script}\n-> exit {rc}:\n{out}"
    return out


def _links(pod: Pod, cid: str) -> set[str]:
    out = _sh_ok(pod, cid, "ip -o link show")
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if line.count(":") >= 2}


def test_the_image_ships_the_modules_and_loads_none_at_boot() -> None:
    art = find_image(Path(config.load().image.output_dir))
    assert art is not None, "no guest image: run 'make setup'"
    manifest = json.loads((art.initrd.parent / "manifest.json").read_text())
    on_demand = set(manifest["on_demand_modules"])
    assert not set(ON_DEMAND) - on_demand, f"missing: {set(ON_DEMAND) - on_demand}"
    at_boot = {module_name(p) for p in manifest["modules"]}
    assert not at_boot & on_demand
    assert "overlay" in at_boot and "bridge" not in at_boot


def _check_privileged_networking(pod: Pod, cid: str) -> None:
    before = pod.modules(cid)
    assert not {"bridge", "nf_tables", "veth", "tun"} & before, before
    # The critest case, then iproute2's way, up and shown.
    _sh_ok(pod, cid, "brctl addbr foobar")
    out = _sh_ok(pod, cid, "ip link add br0 type bridge && ip link set br0 up && "
                           "ip link show br0")
    assert "br0" in out and "UP" in out.split(">")[0], out
    # Other link kinds (their modules load the same way); busybox's `ip tunnel`
    # goes through the tunnel's fallback device (netdev-tunl0...).
    _sh_ok(pod, cid, "ip link add v0 type veth && ip link add d0 type dummy && "
                     "ip link add d1 type dummy && "
                     "ip link add link d0 name d0.5 type vlan id 5 && "
                     "ip link add link d0 name mv0 type macvlan && "
                     "ip link add link d1 name iv0 type ipvlan && "
                     "ip tunnel add t4 mode ipip remote 192.0.2.1 local 192.0.2.2 && "
                     "ip tunnel add g4 mode gre remote 192.0.2.1 local 192.0.2.2 && "
                     "ip tunnel add s6 mode sit remote 192.0.2.1 local 192.0.2.2")
    links = _links(pod, cid)
    assert {"foobar", "br0", "v0", "d0", "d0.5", "mv0", "iv0", "t4", "g4", "s6"} <= links, links
    # nftables through iptables-nft: filter, nat and mangle, IPv4 and IPv6.
    _sh_ok(pod, cid,
           "iptables -A INPUT -p tcp --dport 8080 -m conntrack --ctstate NEW "
           "-m comment --comment pykata -j ACCEPT && "
           "iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE && "
           "iptables -t nat -A PREROUTING -p tcp --dport 81 -j DNAT --to-destination 10.0.0.1:80"
           " && iptables -t mangle -A PREROUTING -m addrtype --dst-type LOCAL "
           "-j MARK --set-mark 0x4000 && ip6tables -A INPUT -p udp --dport 53 -j DROP")
    rules = _sh_ok(pod, cid, "iptables-nft-save && ip6tables-nft-save")
    for rule in ("-A INPUT -p tcp -m tcp --dport 8080 -m conntrack --ctstate NEW "
                 '-m comment --comment pykata -j ACCEPT',
                 "-A POSTROUTING -o eth0 -j MASQUERADE",
                 "-A PREROUTING -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.0.0.1:80",
                 "-A PREROUTING -m addrtype --dst-type LOCAL -j MARK --set-xmark 0x4000/",
                 "-A INPUT -p udp -m udp --dport 53 -j DROP"):
        assert rule in rules, f"{rule!r} not in:\n{rules}"
    after = pod.modules(cid)
    # (Which xt_* iptables-nft needs depends on its version: not listed.)
    loaded = {"bridge", "stp", "llc", "veth", "dummy", "8021q", "macvlan", "ipvlan", "ipip",
              "ip_gre", "sit", "nfnetlink", "nf_tables", "nft_chain_nat",
              "nf_conntrack", "nf_nat"}
    assert loaded <= after, f"not loaded: {loaded - after}"


def test_privileged_pod_builds_its_network_in_the_vm(env: Env) -> None:
    pod = Pod(env, privileged=True)
    try:
        cid = pod.container("net", privileged=True)
        _check_privileged_networking(pod, cid)
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_net_admin_alone_is_enough_and_without_it_eperm(env: Env) -> None:
    pod = Pod(env)
    try:
        plain = pod.container("plain")
        # iptables-legacy's modules come with the first container that may use them
        assert "ip_tables" not in pod.modules(plain)
        admin = pod.container("admin", add_capabilities=("NET_ADMIN",))
        assert {"ip_tables", "ip6_tables"} <= pod.modules(plain)
        # Refused before anything is loaded, as on runc (rtnetlink checks
        # CAP_NET_ADMIN first).
        out, rc = pod.sh(plain, "ip link add br1 type bridge")
        assert rc != 0 and "Operation not permitted" in out, (rc, out)
        out, rc = pod.sh(plain, "iptables -S")
        assert rc != 0 and "Permission denied" in out, (rc, out)
        assert "bridge" not in pod.modules(plain)
        out = _sh_ok(pod, admin, "ip link add br1 type bridge && ip link set br1 up && "
                                 "ip link show br1")
        assert "br1" in out and "UP" in out.split(">")[0], out
        _sh_ok(pod, admin, "iptables -A OUTPUT -p tcp --dport 9 -j REJECT && iptables -S OUTPUT")
        out = _sh_ok(pod, admin, "iptables-legacy -A INPUT -p tcp --dport 81 -j ACCEPT && "
                                 "iptables-legacy -S INPUT")
        assert "-A INPUT -p tcp -m tcp --dport 81 -j ACCEPT" in out, out
        assert "bridge" in pod.modules(plain)  # one VM: loaded for the whole pod
        out, rc = pod.sh(plain, "ip link del br1")
        assert rc != 0 and "Operation not permitted" in out, (rc, out)
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_image_root_privileged_pod_and_agent_loaded_modules(image_env: Env) -> None:
    pod = Pod(image_env, privileged=True)
    try:
        cid = pod.container("net", privileged=True)
        # [agent] kernel_modules: loaded by the agent (gzip, with x_tables first)
        # before the pod's first container.
        assert {"ip_tables", "ip6_tables", "x_tables"} <= pod.modules(cid)
        _check_privileged_networking(pod, cid)
        # iptables-legacy works once ip_tables is loaded (its own modprobe in the
        # container cannot reach the guest's modules).
        _sh_ok(pod, cid, "iptables-legacy -A INPUT -p tcp --dport 81 -j ACCEPT && "
                         "ip6tables-legacy -A INPUT -p tcp --dport 81 -j ACCEPT")
        out = _sh_ok(pod, cid, "iptables-legacy -S INPUT")
        assert "-A INPUT -p tcp -m tcp --dport 81 -j ACCEPT" in out, out
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"
