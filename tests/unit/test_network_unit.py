from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid

import pytest

from pykata.resources import network
from pykata.resources.network import netns_of


def test_netns_of_spec() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"},
                                     {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    assert netns_of(spec) == "/var/run/netns/cni-1"
    assert netns_of({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    assert netns_of({}) == ""


def _sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout


def _macvtap_dev(ns: str, name: str) -> tuple[int, int]:
    # `ip netns exec` mounts the namespace's own sysfs: the true device number.
    idx = _sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{name}/ifindex").strip()
    dev = _sh("ip", "netns", "exec", ns, "cat",
              f"/sys/class/net/{name}/macvtap/tap{idx}/dev").strip()
    major, minor = (int(x) for x in dev.split(":"))
    return int(idx), os.makedev(major, minor)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip")
@pytest.mark.parametrize("queues", [1, 2])
def test_macvtap_device_is_this_namespaces_not_dev_tap_ifindex(queues: int) -> None:
    """Issue 12: /dev/tap<ifindex> (devtmpfs names macvtap nodes by ifindex, which
    repeats across namespaces) may be another pod's device, or a node planted
    there: the fds must be this namespace's macvtap."""
    tag = uuid.uuid4().hex[:6]
    ours, other = f"pkmvt-{tag}", f"pkmvo-{tag}"
    net = None
    try:
        for ns in (other, ours):  # same layout: same ifindexes
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        _sh("ip", "-n", other, "link", "add", "link", "eth0", "name", "eth0_pk", "type",
            "macvtap", "mode", "passthru")
        other_idx, other_dev = _macvtap_dev(other, "eth0_pk")
        _sh("ip", "-n", ours, "addr", "add", "10.251.0.2/24", "dev", "eth0")
        _sh("ip", "-n", ours, "link", "set", "eth0", "up")
        net = network.attach(f"/run/netns/{ours}", "macvtap", queues=queues)
        (ep,) = net.endpoints
        assert ep.tap == "eth0_pk" and len(ep.fds) == queues
        idx, dev = _macvtap_dev(ours, "eth0_pk")
        assert idx == other_idx and dev != other_dev  # the trap is set
        for fd in ep.fds:
            st = os.fstat(fd)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev
        assert os.path.exists("/sys/class/net/lo")  # the shim's own /sys is untouched
        assert not os.path.exists("/dev/tap")  # nor its /dev
    finally:
        if net is not None:
            network.detach(net)
        for ns in (ours, other):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    assert net is not None and not net.fds()
