"""Parsing and command construction of pykata.guest.network (pure)."""

from __future__ import annotations

import socket
import struct

import pytest

from pykata import errors
from pykata.guest import network
from pykata.protos import agent_pb2 as pb

IP_ADDR = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "1: lo    inet6 ::1/128 scope host \\       valid_lft forever preferred_lft forever\n"
    "4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n"
    "4: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n"
    "5: veth0@if4    inet 10.0.0.1/30 scope global veth0\n"
)


def test_parse_addresses() -> None:
    addrs = network.parse_addresses(IP_ADDR)
    assert [(a.family, a.address, a.mask) for a in addrs["eth0"]] == [
        (4, "192.0.2.2", "24"), (6, "fe80::1", "64")]
    assert addrs["veth0"][0].address == "10.0.0.1"
    assert len(addrs["lo"]) == 2


def test_parse_routes() -> None:
    routes = network.parse_routes(
        "default via 192.0.2.1 dev eth0 \n"
        "192.0.2.0/24 dev eth0 scope link  src 192.0.2.2 \n"
        "unreachable 10.0.0.0/8\n", 4)
    assert [(r.dest, r.gateway, r.device, r.source, r.scope) for r in routes] == [
        ("", "192.0.2.1", "eth0", "", 0),
        ("192.0.2.0/24", "", "eth0", "192.0.2.2", 253),
    ]
    v6 = network.parse_routes("fd00::/64 dev eth0  metric 256 \n", 6)
    assert v6[0].family == 6 and v6[0].dest == "fd00::/64" and v6[0].device == "eth0"


def test_route_argv() -> None:
    assert network.route_argv(pb.Route(gateway="10.0.0.1", device="eth0")) == [
        "route", "replace", "default", "via", "10.0.0.1", "dev", "eth0"]
    assert network.route_argv(pb.Route(dest="10.0.0.0/24", device="eth0", scope=253,
                                       source="10.0.0.2")) == [
        "route", "replace", "10.0.0.0/24", "dev", "eth0", "src", "10.0.0.2", "scope", "link"]
    assert network.route_argv(pb.Route(dest="fd00::/64", device="eth0", family=6))[:3] == [
        "-6", "route", "replace"]


def test_arpreq_layout() -> None:
    req = network.arpreq("10.0.0.1", "02:00:00:00:00:01", "eth0")
    assert len(req) == 68
    fam, _, addr = struct.unpack("HH4s8x", req[:16])
    assert fam == socket.AF_INET and addr == socket.inet_aton("10.0.0.1")
    hwfam, mac = struct.unpack("H6s8x", req[16:32])
    assert hwfam == 1 and mac == bytes.fromhex("020000000001")
    assert struct.unpack("i", req[32:36])[0] == 0x06
    assert req[52:56] == b"eth0"
    with pytest.raises(errors.InvalidArgument):
        network.arpreq("10.0.0.1", "02:00", "eth0")


def test_link_by_mac(tmp_path: object) -> None:
    from pathlib import Path

    base = Path(str(tmp_path))
    for name, mac in (("lo", "00:00:00:00:00:00"), ("eth0", "AA:bb:cc:dd:ee:ff")):
        (base / name).mkdir()
        (base / name / "address").write_text(mac.lower() + "\n")
    assert network.link_by_mac("aa:BB:cc:dd:ee:ff", str(base)) == "eth0"
    with pytest.raises(errors.NotFound, match="no guest network interface"):
        network.link_by_mac("02:00:00:00:00:09", str(base))
