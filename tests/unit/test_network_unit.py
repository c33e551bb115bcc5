from __future__ import annotations

from pykata.resources.network import netns_of


def test_netns_of_spec() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"},
                                     {"type": "network", "path": "/var/run/netns/cni-1"}]}}
    assert netns_of(spec) == "/var/run/netns/cni-1"
    assert netns_of({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    assert netns_of({}) == ""
