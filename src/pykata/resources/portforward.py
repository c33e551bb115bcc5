"""Port forwarding, host side: catch what is dialled on the pod's loopback.

containerd's CRI PortForward enters the pod's network namespace on the host
and dials ``localhost:PORT`` (tcp4 first, then tcp6). With a VM nothing
listens there, so in that namespace (never the host's) we add one nftables
table, ``pykata_portfwd`` (family inet, a nat chain on the output hook)::

    meta nfproto ipv4  meta l4proto tcp  ip daddr 127.0.0.1  tcp dport != P4  redirect to :P4
    meta nfproto ipv6  meta l4proto tcp  ip6 daddr ::1       tcp dport != P6  redirect to :P6

where P4 and P6 are two listening sockets of the shim's in that namespace
(127.0.0.1:P4 and [::1]:P6). Each accepted connection's original
destination (``SO_ORIGINAL_DST`` / ``IP6T_SO_ORIGINAL_DST``) names the port
the guest connects to. No port is configured in advance; nothing binds the
loopback port range.

The table is written over netlink (no ``nft`` binary needed) and flagged
``NFT_TABLE_F_OWNER``: the kernel removes it when our netlink socket closes,
so it goes with the shim even if the shim is killed; ``close()`` deletes it
explicitly and closes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pykata import errors
from pykata.resources.network import in_netns

log = logging.getLogger(__name__)

TABLE = "pykata_portfwd"
CHAIN = "output"

# -- netlink / nftables numbers (linux/netlink.h, linux/netfilter/nf_tables.h) -------------
NETLINK_NETFILTER = 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 1, 4, 0x200, 0x400, 0x800
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 3, 6
NFPROTO_UNSPEC, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 0, 1, 2, 10
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFT_TABLE_F_OWNER = 0x2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_TYPE = 1, 3, 4, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NF_INET_LOCAL_OUT = 3
NF_IP_PRI_NAT_DST = -100
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE = 1
NFT_REG_1 = 1
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NF_NAT_RANGE_PROTO_SPECIFIED = 2
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST is the same number at SOL_IPV6


# -- message encoding ----------------------------------------------------------------------
def _attr(kind: int, data: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(data), kind)
    return head + data + b"\0" * (-len(data) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def _msg(msg_type: int, flags: int, seq: int, family: int, body: bytes,
         res_id: int = 0) -> bytes:
    payload = struct.pack("=BBH", family, 0, socket.htons(res_id)) + body
    return struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload


def _nft(msg: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | msg


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(NFTA_LIST_ELEM, _str(NFTA_EXPR_NAME, name), _nest(NFTA_EXPR_DATA, *attrs))


def _meta(key: int) -> bytes:
    return _expr("meta", _u32(1, NFT_REG_1), _u32(2, key))  # DREG, KEY


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, NFT_REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _cmp(op: int, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, NFT_REG_1), _u32(2, op),
                 _nest(3, _attr(NFTA_DATA_VALUE, value)))


def redirect_rule(family: int, port: int) -> list[bytes]:
    """The expressions of one rule: TCP to the loopback address of ``family``
    (NFPROTO_IPV4 or NFPROTO_IPV6), any port but ``port``, redirected to ``port``."""
    if family == NFPROTO_IPV4:
        daddr = _payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4) + _cmp(NFT_CMP_EQ,
                                                                  bytes([127, 0, 0, 1]))
    else:
        daddr = _payload(NFT_PAYLOAD_NETWORK_HEADER, 24, 16) + _cmp(
            NFT_CMP_EQ, ipaddress.IPv6Address("::1").packed)
    be_port = struct.pack(">H", port)
    return [
        _meta(NFT_META_NFPROTO), _cmp(NFT_CMP_EQ, bytes([family])),
        _meta(NFT_META_L4PROTO), _cmp(NFT_CMP_EQ, bytes([socket.IPPROTO_TCP])),
        daddr,
        _payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2), _cmp(NFT_CMP_NEQ, be_port),
        _expr("immediate", _u32(1, NFT_REG_1), _nest(2, _attr(NFTA_DATA_VALUE, be_port))),
        _expr("redir", _u32(1, NFT_REG_1), _u32(2, NFT_REG_1),
              _u32(3, NF_NAT_RANGE_PROTO_SPECIFIED)),
    ]


def table_batch(port4: int, port6: int, seq: int = 1) -> tuple[bytes, list[int]]:
    """The batch that creates the table, its chain and both rules; the
    sequence numbers that must be acknowledged."""
    create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
    msgs = [
        _msg(_nft(NFT_MSG_NEWTABLE), create | NLM_F_EXCL, seq + 1, NFPROTO_INET,
             _str(NFTA_TABLE_NAME, TABLE) + _u32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER)),
        _msg(_nft(NFT_MSG_NEWCHAIN), create, seq + 2, NFPROTO_INET,
             _str(NFTA_CHAIN_TABLE, TABLE) + _str(NFTA_CHAIN_NAME, CHAIN)
             + _nest(NFTA_CHAIN_HOOK, _u32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT),
                     _u32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_DST))
             + _str(NFTA_CHAIN_TYPE, "nat")),
    ]
    for i, (family, port) in enumerate(((NFPROTO_IPV4, port4), (NFPROTO_IPV6, port6))):
        msgs.append(_msg(_nft(NFT_MSG_NEWRULE), create | NLM_F_APPEND, seq + 3 + i,
                         NFPROTO_INET,
                         _str(NFTA_RULE_TABLE, TABLE) + _str(NFTA_RULE_CHAIN, CHAIN)
                         + _nest(NFTA_RULE_EXPRESSIONS, *redirect_rule(family, port))))
    return _batch(msgs, seq), [seq + 1 + i for i in range(len(msgs))]


def delete_batch(seq: int) -> tuple[bytes, list[int]]:
    msg = _msg(_nft(NFT_MSG_DELTABLE), NLM_F_REQUEST | NLM_F_ACK, seq + 1, NFPROTO_INET,
               _str(NFTA_TABLE_NAME, TABLE))
    return _batch([msg], seq), [seq + 1]


def _batch(msgs: list[bytes], seq: int) -> bytes:
    begin = _msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, NFPROTO_UNSPEC, b"",
                 NFNL_SUBSYS_NFTABLES)
    end = _msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(msgs) + 1, NFPROTO_UNSPEC, b"",
               NFNL_SUBSYS_NFTABLES)
    return begin + b"".join(msgs) + end


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in ``data``."""
    out = []
    pos = 0
    while pos + 16 <= len(data):
        length, mtype, _flags, seq, _pid = struct.unpack_from("=IHHII", data, pos)
        if length < 16 or pos + length > len(data):
            break
        out.append((mtype, seq, data[pos + 16:pos + length]))
        pos += (length + 3) & ~3
    return out


def _transact(sock: socket.socket, batch: bytes, acks: list[int]) -> None:
    """Send a batch and wait for every acknowledgement; the first error raised."""
    sock.send(batch)
    waiting = set(acks)
    while waiting:
        for mtype, seq, payload in _messages(sock.recv(65536)):
            if mtype == NLMSG_ERROR and seq in waiting:
                waiting.discard(seq)
                code = struct.unpack_from("=i", payload)[0]
                if code < 0:
                    raise OSError(-code, os.strerror(-code))


def _table_names(sock: socket.socket) -> list[str]:
    sock.send(_msg(_nft(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_DUMP, 1, NFPROTO_UNSPEC, b""))
    names: list[str] = []
    while True:
        for mtype, _seq, payload in _messages(sock.recv(65536)):
            if mtype in (NLMSG_DONE, NLMSG_ERROR):
                return names
            pos = 4  # after nfgenmsg
            while pos + 4 <= len(payload):
                alen, akind = struct.unpack_from("=HH", payload, pos)
                if alen < 4:
                    break
                if akind & 0x3FFF == NFTA_TABLE_NAME:
                    names.append(payload[pos + 4:pos + alen].rstrip(b"\0").decode(
                        errors="replace"))
                pos += (alen + 3) & ~3


def _netlink() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(5.0)
    return sock


def nft_tables(netns: str) -> list[str]:
    """Names of the nftables tables in ``netns`` (tests, diagnostics)."""
    def work() -> list[str]:
        with _netlink() as sock:
            return _table_names(sock)
    return in_netns(netns, work)


def original_destination(sock: socket.socket) -> tuple[int, int]:
    """(address family, port) the accepted ``sock`` was dialled at, before the redirect."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from(">H", raw, 2)[0]
    return sock.family, port


# -- the redirect --------------------------------------------------------------------------
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, int], Awaitable[None]]


@dataclass
class Redirect:
    """The table and the two listening sockets in one pod network namespace."""

    netns: str
    nl: socket.socket
    listeners: list[socket.socket] = field(default_factory=list)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(s.getsockname()[1] for s in self.listeners)

    def close(self) -> None:
        """Delete the table and close the sockets (idempotent)."""
        if self.nl.fileno() >= 0:
            try:
                _transact(self.nl, *delete_batch(100))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot delete nftables table %s in %s: %s", TABLE, self.netns,
                                exc)
            self.nl.close()  # the kernel drops an owned table with its socket anyway
        for s in self.listeners:
            s.close()
        self.listeners = []



def install(netns: str) -> Redirect:
    """Listen on 127.0.0.1 and ::1 in ``netns`` and redirect its loopback TCP there."""
    def work() -> Redirect:
        listeners: list[socket.socket] = []
        nl: socket.socket | None = None
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                listeners.append(s)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, 0))
                s.listen(128)
                s.setblocking(False)
            nl = _netlink()
            _transact(nl, *table_batch(listeners[0].getsockname()[1],
                                       listeners[1].getsockname()[1]))
            return Redirect(netns, nl, listeners)
        except BaseException:
            for s in listeners:
                s.close()
            if nl is not None:
                nl.close()
            raise
    try:
        return in_netns(netns, work)
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"cannot set up port forwarding in {netns}: {exc.strerror or exc}") from exc


class Proxy:
    """Accepts what the redirect catches and hands each connection, with the
    port it was dialled at, to ``handler`` (family: socket.AF_INET or AF_INET6)."""

    def __init__(self, redirect: Redirect, handler: Handler, name: str = "") -> None:
        self.redirect = redirect
        self.handler = handler
        self.name = name or redirect.netns
        self._servers: list[asyncio.base_events.Server] = []

    async def start(self) -> None:
        for s in self.redirect.listeners:
            self._servers.append(await asyncio.start_server(self._accepted, sock=s))

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            family, port = original_destination(sock)
        except OSError as exc:
            log.warning("port forward %s: no original destination: %s", self.name, exc)
            writer.transport.abort()
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.handler(reader, writer, family, port)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        self.redirect.close()
