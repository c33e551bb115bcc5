"""Guest network configuration with the ``ip`` tool (busybox in the guest).

Interfaces are found by MAC address (the host knows the MAC it gave the VM's
NIC), renamed, given an MTU and addresses, and brought up. IPv4 ARP entries
are set with the SIOCSARP ioctl (busybox ``ip neigh`` cannot add them).
Parsing and command construction are pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import shutil
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from pykata import errors
from pykata.guest.reaper import RunResult
from pykata.protos import agent_pb2 as pb

Runner = Callable[[list[str]], Awaitable[RunResult]]

SYS_NET = "/sys/class/net"


def ip_command() -> list[str]:
    for path in ("/sbin/ip", "/usr/sbin/ip", "/bin/ip", "/usr/bin/ip"):
        if os.path.exists(path) and not os.path.realpath(path).endswith("busybox"):
            return [path]
    bb = shutil.which("busybox") or "/bin/busybox"
    return [bb, "ip"]


def links(sys_net: str = SYS_NET) -> dict[str, str]:
    """Interface name -> MAC address (lower case)."""
    out = {}
    try:
        names = sorted(os.listdir(sys_net))
    except OSError:
        return {}
    for name in names:
        try:
            out[name] = Path(sys_net, name, "address").read_text().strip().lower()
        except OSError:
            continue
    return out


NIC_WAIT_SECONDS = 10.0  # for a hot-plugged NIC to show up


def link_by_mac(mac: str, sys_net: str = SYS_NET) -> str:
    want = mac.strip().lower()
    for name, addr in links(sys_net).items():
        if addr == want:
            return name
    raise errors.NotFound(f"no guest network interface with MAC address {mac}")


async def wait_link_by_mac(mac: str, timeout: float = NIC_WAIT_SECONDS,
                           sys_net: str = SYS_NET) -> str:
    """The NIC with ``mac``, waiting (bounded) for one that is still being
    hot-plugged (a VM cloned from a template, a second network)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.01
    while True:
        try:
            return link_by_mac(mac, sys_net)
        except errors.NotFound:
            if loop.time() >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def _mtu(name: str, sys_net: str = SYS_NET) -> int:
    try:
        return int(Path(sys_net, name, "mtu").read_text())
    except (OSError, ValueError):
        return 0


def parse_addresses(text: str) -> dict[str, list[pb.IPAddress]]:
    """``ip -o addr show`` -> interface name -> addresses."""
    out: dict[str, list[pb.IPAddress]] = {}
    for line in text.splitlines():
        parts = line.replace("\\", " ").split()
        if len(parts) < 4 or parts[2] not in ("inet", "inet6"):
            continue
        name = parts[1].split("@")[0]
        addr, _, prefix = parts[3].partition("/")
        family = 4 if parts[2] == "inet" else 6
        out.setdefault(name, []).append(
            pb.IPAddress(family=family, address=addr, mask=prefix or ("32" if family == 4
                                                                      else "128")))
    return out


def parse_routes(text: str, family: int) -> list[pb.Route]:
    """``ip route show`` lines -> routes."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] in ("unreachable", "prohibit", "blackhole", "local",
                                     "broadcast", "multicast"):
            continue
        route = pb.Route(family=family)
        route.dest = "" if parts[0] == "default" else parts[0]
        i = 1
        while i < len(parts) - 1:
            key, val = parts[i], parts[i + 1]
            if key == "via":
                route.gateway = val
            elif key == "dev":
                route.device = val
            elif key == "src":
                route.source = val
            elif key == "scope":
                route.scope = {"global": 0, "universe": 0, "site": 200, "link": 253,
                               "host": 254}.get(val, 0)
            else:
                i += 1
                continue
            i += 2
        out.append(route)
    return out


def route_argv(route: pb.Route) -> list[str]:
    """``ip route`` arguments adding ``route``."""
    dest = route.dest or "default"
    v6 = route.family == 6 or ":" in route.dest or ":" in route.gateway
    args = (["-6"] if v6 else []) + ["route", "replace", dest]
    if route.gateway:
        args += ["via", route.gateway]
    if route.device:
        args += ["dev", route.device]
    if route.source:
        args += ["src", route.source]
    if route.scope == 253:
        args += ["scope", "link"]
    elif route.scope == 254:
        args += ["scope", "host"]
    return args


def arpreq(ip: str, mac: str, device: str, permanent: bool = True) -> bytes:
    """struct arpreq for SIOCSARP."""
    pa = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))
    try:
        hw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    except ValueError:
        hw = b""
    if len(hw) != 6:
        raise errors.InvalidArgument(f"invalid MAC address {mac!r}")
    ha = struct.pack("H6s8x", 1, hw)  # ARPHRD_ETHER
    flags = 0x02 | (0x04 if permanent else 0)  # ATF_COM | ATF_PERM
    return pa + ha + struct.pack("i", flags) + bytes(16) + struct.pack("16s", device.encode())


SIOCSARP = 0x8955


class Network:
    def __init__(self, run: Runner, sys_net: str = SYS_NET) -> None:
        self._run = run
        self.sys_net = sys_net
        self.ip = ip_command()

    async def _ip(self, *args: str) -> RunResult:
        res = await self._run([*self.ip, *args])
        if not res.ok:
            raise errors.InvalidArgument(f"ip {' '.join(args)}: {res.error_line()}")
        return res

    async def update_interface(self, iface: pb.Interface) -> pb.Interface:
        if not iface.hw_addr:
            raise errors.InvalidArgument("interface hw_addr is required to find the guest NIC")
        name = await wait_link_by_mac(iface.hw_addr, sys_net=self.sys_net)
        want = iface.device or iface.name or name
        if want != name:
            await self._ip("link", "set", "dev", name, "down")
            await self._ip("link", "set", "dev", name, "name", want)
            name = want
        if iface.mtu:
            await self._ip("link", "set", "dev", name, "mtu", str(iface.mtu))
        await self._ip("addr", "flush", "dev", name)
        for a in iface.ip_addresses:
            try:
                ipaddress.ip_address(a.address)
            except ValueError:
                raise errors.InvalidArgument(f"invalid IP address {a.address!r}") from None
            fam = ["-6"] if a.family == 6 or ":" in a.address else []
            await self._ip(*fam, "addr", "add", f"{a.address}/{a.mask or '24'}", "dev", name)
        await self._ip("link", "set", "dev", name, "up")
        for listed in await self.list_interfaces():
            if listed.name == name:
                return listed
        raise errors.Internal(f"interface {name} vanished while being configured")

    async def update_routes(self, routes: Sequence[pb.Route]) -> list[pb.Route]:
        devices = {r.device for r in routes if r.device}
        for dev in sorted(devices):
            await self._run([*self.ip, "route", "flush", "dev", dev])
            await self._run([*self.ip, "-6", "route", "flush", "dev", dev])
        # Routes without a gateway first: a gateway must be reachable when added.
        for r in sorted(routes, key=lambda r: bool(r.gateway)):
            await self._ip(*route_argv(r))
        return await self.list_routes()

    def add_arp_neighbors(self, neighbors: Sequence[pb.ARPNeighbor]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for n in neighbors:
                ip = n.to_ip_address.address
                if n.to_ip_address.family == 6 or ":" in ip:
                    raise errors.Unimplemented(f"IPv6 neighbour {ip}: only IPv4 ARP entries"
                                               " are supported")
                try:
                    fcntl.ioctl(s.fileno(), SIOCSARP, arpreq(ip, n.ll_addr, n.device))
                except OSError as exc:
                    raise errors.InvalidArgument(
                        f"cannot add ARP entry {ip} -> {n.ll_addr} on {n.device}:"
                        f" {exc.strerror}") from None

    async def list_interfaces(self) -> list[pb.Interface]:
        addrs = parse_addresses((await self._ip("-o", "addr", "show")).stdout.decode())
        out = []
        for name, mac in links(self.sys_net).items():
            out.append(pb.Interface(device=name, name=name, hw_addr=mac,
                                    mtu=_mtu(name, self.sys_net),
                                    ip_addresses=addrs.get(name, [])))
        return out

    async def list_routes(self) -> list[pb.Route]:
        v4 = (await self._ip("route", "show")).stdout.decode()
        v6 = await self._run([*self.ip, "-6", "route", "show"])
        routes = parse_routes(v4, 4)
        if v6.ok:
            routes += parse_routes(v6.stdout.decode(), 6)
        return routes
