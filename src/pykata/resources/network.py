"""Pod networking: connect the interfaces CNI put in the pod's network
namespace to the VM.

``tcfilter`` (default): beside each veth a tap device is created in the same
namespace, and tc ingress filters redirect every frame veth -> tap and
tap -> veth (mirred). QEMU gets the tap as a file descriptor; the guest NIC gets
the veth's MAC, and the agent gives it the veth's addresses and routes. The
veth keeps its addresses on the host side, so CNI's own teardown still works.

``macvtap``: a macvtap device on top of each veth instead of tap + filters.
Its character device is opened without any path in the host's /dev (see
``_open_macvtap``): a ``/dev/tap<ifindex>`` node would be predictable, and
ifindexes repeat across namespaces.

Everything runs in a short-lived thread that has entered the namespace
(``setns`` affects one thread), so the shim's own namespace is never changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pykata import errors
from pykata.utils import mounts
from pykata.utils.libc import libc

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
MS_NOEXEC = 0x8
TAP_SUFFIX = "_pk"

T = TypeVar("T")
_libc = libc()


@dataclass
class Endpoint:
    """One pod interface and its way into the VM."""

    name: str  # the veth in the pod namespace (eth0)
    mac: str
    mtu: int
    addresses: list[tuple[int, str, int]]  # (family 4|6, address, prefix length)
    tap: str = ""
    fds: list[int] = field(default_factory=list)  # tap queue fds handed to QEMU


@dataclass
class Route:
    dest: str  # "" = default
    gateway: str
    device: str
    family: int


@dataclass
class PodNetwork:
    netns: str
    model: str
    endpoints: list[Endpoint] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)

    def fds(self) -> list[int]:
        return [fd for ep in self.endpoints for fd in ep.fds]

    def close_fds(self) -> None:
        for ep in self.endpoints:
            for fd in ep.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            ep.fds = []


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that has entered network namespace ``netns``."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            failure.append(errors.NotFound(f"network namespace {netns}: {exc.strerror}"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                failure.append(errors.Internal(f"cannot enter {netns}: {os.strerror(err)}"))
                return
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)
        finally:
            os.close(fd)

    t = threading.Thread(target=run, name=f"netns {netns}")
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def _tc(*args: str) -> None:
    # Runs in the netns thread: a child forked from it inherits that namespace.
    p = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise errors.Internal(f"tc {' '.join(args)}: {p.stderr.strip()}")


def _open_tap(name: str, queues: int) -> list[int]:
    flags = IFF_TAP | IFF_NO_PI | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _open_macvtap(name: str, ifindex: int, queues: int) -> list[int]:
    """``queues`` fds of macvtap ``name``'s character device, opened through no
    path anyone else can see or swap. Called in the pod's netns thread; a helper
    thread (which inherits that network namespace) enters a private mount
    namespace, mounts this network namespace's sysfs on /sys (the host's /sys
    shows the host's interfaces only) to read the device number, mounts a private
    tmpfs on /dev, makes the node there and opens it (O_NOFOLLOW, checked with
    fstat). The mount namespace, its tmpfs and the node end with the thread."""
    fds: list[int] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            mounts.private_mount_namespace()  # this thread only; nothing propagates
            mounts.mount("sysfs", "/sys", "sysfs", mounts.MS_NOSUID | mounts.MS_NODEV | MS_NOEXEC)
            text = Path(f"/sys/class/net/{name}/macvtap/tap{ifindex}/dev").read_text()
            major, minor = (int(x) for x in text.strip().split(":"))
            rdev = os.makedev(major, minor)
            mounts.mount("tmpfs", "/dev", "tmpfs", mounts.MS_NOSUID | MS_NOEXEC,
                         "mode=0700,size=16k,nr_inodes=8")
            os.mknod("/dev/tap", 0o600 | stat.S_IFCHR, rdev)
            for _ in range(queues):
                fd = os.open("/dev/tap", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISCHR(st.st_mode) or st.st_rdev != rdev:
                    raise errors.Internal(f"macvtap {name}: opened the wrong device")
        except BaseException as exc:  # handed to the caller
            failure.append(exc)

    t = threading.Thread(target=run, name=f"macvtap {name}")
    t.start()
    t.join()
    if failure:
        for fd in fds:
            os.close(fd)
        exc = failure[0]
        if isinstance(exc, errors.PykataError):
            raise exc
        raise errors.Internal(f"cannot open macvtap {name}: {exc}") from exc
    return fds


def _scan(ipr: Any) -> tuple[list[Endpoint], list[Route]]:
    endpoints = []
    names = {}
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        names[link["index"]] = name
        kind = (link.get_attr("IFLA_LINKINFO") or {})
        kind = kind.get_attr("IFLA_INFO_KIND") if hasattr(kind, "get_attr") else None
        if name == "lo" or name.endswith(TAP_SUFFIX) or kind in ("tun", "macvtap"):
            continue
        addrs = []
        for a in ipr.get_addr(index=link["index"]):
            fam = 4 if a["family"] == socket.AF_INET else 6
            addr = a.get_attr("IFA_ADDRESS")
            if fam == 6 and ipaddress.ip_address(addr).is_link_local:
                continue
            addrs.append((fam, addr, a["prefixlen"]))
        if not addrs:
            continue
        endpoints.append(Endpoint(name=name, mac=link.get_attr("IFLA_ADDRESS"),
                                  mtu=link.get_attr("IFLA_MTU"), addresses=addrs))
    routes = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=254):
            dev = names.get(r.get_attr("RTA_OIF"), "")
            if not any(ep.name == dev for ep in endpoints):
                continue
            gw = r.get_attr("RTA_GATEWAY") or ""
            dst = r.get_attr("RTA_DST")
            dest = f"{dst}/{r['dst_len']}" if dst else ""
            if not gw and not dest:
                continue
            if fam == socket.AF_INET6 and dest.startswith("fe80"):
                continue
            routes.append(Route(dest, gw, dev, 4 if fam == socket.AF_INET else 6))
    return endpoints, routes


def attach(netns: str, model: str = "tcfilter", queues: int = 1) -> PodNetwork:
    """Read the pod namespace and create what connects each interface to the VM."""
    from pyroute2 import IPRoute

    if model == "none":
        return PodNetwork(netns, model)
    if model not in ("tcfilter", "macvtap"):
        raise errors.InvalidArgument(f"unknown internetworking model {model!r}")

    def work() -> PodNetwork:
        net = PodNetwork(netns, model)
        with IPRoute() as ipr:
            net.endpoints, net.routes = _scan(ipr)
            try:
                for ep in net.endpoints:
                    _connect(ipr, ep, model, queues)
            except BaseException:
                _disconnect(ipr, net)
                net.close_fds()
                raise
        return net

    return in_netns(netns, work)


def attach_new(net: PodNetwork, queues: int = 1) -> list[Endpoint]:
    """Connect interfaces that appeared in the namespace since ``attach`` (a
    second network added to a running pod); refresh the routes. The new ones."""
    from pyroute2 import IPRoute

    if net.model == "none":
        return []

    def work() -> list[Endpoint]:
        known = {ep.name for ep in net.endpoints}
        with IPRoute() as ipr:
            endpoints, routes = _scan(ipr)
            new = [ep for ep in endpoints if ep.name not in known]
            done: list[Endpoint] = []
            try:
                for ep in new:
                    _connect(ipr, ep, net.model, queues)
                    done.append(ep)
            except BaseException:
                _disconnect(ipr, PodNetwork(net.netns, net.model, new))
                for ep in new:
                    for fd in ep.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                raise
        net.endpoints += done
        net.routes = routes
        return done

    return in_netns(net.netns, work)


# rtnetlink multicast groups: links, IPv4 and IPv6 addresses.
_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100


def event_socket(netns: str) -> socket.socket:
    """A non-blocking rtnetlink socket in ``netns`` that becomes readable when a
    link or an address there changes (the caller rescans; messages are not parsed)."""

    def work() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             socket.NETLINK_ROUTE)
        try:
            sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    return in_netns(netns, work)


def _connect(ipr: Any, ep: Endpoint, model: str, queues: int) -> None:
    veth = ipr.link_lookup(ifname=ep.name)[0]
    tap_name = (ep.name[: 15 - len(TAP_SUFFIX)] + TAP_SUFFIX)
    if model == "macvtap":
        ipr.link("add", ifname=tap_name, kind="macvtap", link=veth, macvtap_mode="passthru")
        idx = ipr.link_lookup(ifname=tap_name)[0]
        ipr.link("set", index=idx, state="up", mtu=ep.mtu)
        ep.tap = tap_name
        ep.fds = _open_macvtap(tap_name, idx, queues)
        return
    ep.fds = _open_tap(tap_name, queues)
    ep.tap = tap_name
    idx = ipr.link_lookup(ifname=tap_name)[0]
    ipr.link("set", index=idx, state="up", mtu=ep.mtu)
    # Everything arriving on one side leaves on the other (both directions).
    for src, dst in ((ep.name, tap_name), (tap_name, ep.name)):
        _tc("qdisc", "add", "dev", src, "ingress")
        _tc("filter", "add", "dev", src, "parent", "ffff:", "protocol", "all", "u32",
            "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dst)
    log.debug("%s: %s <-> %s via tc mirred", ep.name, ep.name, tap_name)
    _ = veth


def _disconnect(ipr: Any, net: PodNetwork) -> None:
    for ep in net.endpoints:
        if not ep.tap:
            continue
        with contextlib.suppress(Exception):
            _tc("qdisc", "del", "dev", ep.name, "ingress")
        for idx in ipr.link_lookup(ifname=ep.tap):
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx)


def detach(net: PodNetwork) -> None:
    """Remove taps, macvtaps and filters (the namespace itself belongs to CNI)."""
    from pyroute2 import IPRoute

    net.close_fds()
    if not net.endpoints or not os.path.exists(net.netns):
        return

    def work() -> None:
        with IPRoute() as ipr:
            _disconnect(ipr, net)

    try:
        in_netns(net.netns, work)
    except errors.PykataError as exc:
        log.warning("network teardown in %s: %s", net.netns, exc)


def netns_of(spec: dict[str, Any]) -> str:
    """The network namespace path a spec joins ("" = none given)."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network" and ns.get("path"):
            return str(ns["path"])
    return ""
