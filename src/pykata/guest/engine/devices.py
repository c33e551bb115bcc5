"""Devices: the nodes made in the container's /dev and the device cgroup.

Cgroup v2 has no devices file: access is decided by an eBPF program of type
``BPF_PROG_TYPE_CGROUP_DEVICE`` attached to the container's cgroup. This
module assembles that program from the spec's ``linux.resources.devices``
rules (pure, unit-tested) and loads and attaches it with ``bpf(2)``.

Rule semantics are the OCI/runc ones: rules apply in order and the last one
that matches decides; the default devices every container gets (null, zero,
full, random, urandom, tty, console, ptmx, pts/*) and the spec's
``linux.devices`` are allowed after the spec's rules. A spec without any
device rule gets no program (every device allowed, as with no controller).
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from pykata.errors import InvalidArgument

# struct bpf_cgroup_dev_ctx: access_type = (access << 16) | type, major, minor
DEV_BLOCK = 1
DEV_CHAR = 2
ACC_MKNOD = 1
ACC_READ = 2
ACC_WRITE = 4
_ACCESS = {"m": ACC_MKNOD, "r": ACC_READ, "w": ACC_WRITE}
_TYPES = {"a": 0, "b": DEV_BLOCK, "c": DEV_CHAR}


@dataclass(frozen=True)
class Rule:
    allow: bool
    type: int  # 0: any
    major: int  # -1: any
    minor: int  # -1: any
    access: int  # ACC_* bits


@dataclass(frozen=True)
class Node:
    """A device node to make in the container (``linux.devices`` or a default)."""

    path: str
    kind: int  # stat.S_IFCHR / S_IFBLK / S_IFIFO
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


DEFAULT_NODES = tuple(
    Node(f"/dev/{name}", stat.S_IFCHR, major, minor, 0o666, 0, 0)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7),
                               ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)))
DEFAULT_ALLOW = (
    *(Rule(True, DEV_CHAR, n.major, n.minor, 7) for n in DEFAULT_NODES),
    Rule(True, DEV_CHAR, 5, 1, 7),  # console
    Rule(True, DEV_CHAR, 5, 2, 7),  # ptmx
    Rule(True, DEV_CHAR, 136, -1, 7),  # pts/*
)


def _int(value: Any, field: str, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"invalid OCI spec: {field} must be an integer")
    return value


def parse_access(text: Any, field: str) -> int:
    if text is None or text == "":
        return 7
    if not isinstance(text, str):
        raise InvalidArgument(f"invalid OCI spec: {field} must be a string")
    bits = 0
    for ch in text:
        if ch not in _ACCESS:
            raise InvalidArgument(f"invalid OCI spec: {field}: unknown access {ch!r}")
        bits |= _ACCESS[ch]
    return bits


def parse_rules(entries: Any, field: str = "linux.resources.devices") -> list[Rule]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InvalidArgument(f"invalid OCI spec: {field} must be a list")
    out = []
    for i, e in enumerate(entries):
        f = f"{field}[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("allow"), bool):
            raise InvalidArgument(f"invalid OCI spec: {f}.allow must be a boolean")
        kind = e.get("type") or "a"
        if kind not in _TYPES:
            raise InvalidArgument(f"invalid OCI spec: {f}.type must be a, b or c, not {kind!r}")
        out.append(Rule(e["allow"], _TYPES[kind], _int(e.get("major"), f"{f}.major", -1),
                        _int(e.get("minor"), f"{f}.minor", -1),
                        parse_access(e.get("access"), f"{f}.access")))
    return out


def parse_nodes(entries: Any, field: str = "linux.devices") -> list[Node]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise InvalidArgument(f"invalid OCI spec: {field} must be a list")
    kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
    out = []
    for i, e in enumerate(entries):
        f = f"{field}[{i}]"
        if not isinstance(e, dict):
            raise InvalidArgument(f"invalid OCI spec: {f} must be an object")
        path = e.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgument(f"invalid OCI spec: {f}.path must be an absolute path")
        kind = e.get("type")
        if kind not in kinds:
            raise InvalidArgument(f"invalid OCI spec: {f}.type must be c, u, b or p")
        major = _int(e.get("major"), f"{f}.major", 0)
        minor = _int(e.get("minor"), f"{f}.minor", 0)
        if kind != "p" and (e.get("major") is None or e.get("minor") is None):
            raise InvalidArgument(f"invalid OCI spec: {f} needs major and minor")
        out.append(Node(path, kinds[kind], major, minor,
                        _int(e.get("fileMode"), f"{f}.fileMode", 0o666) & 0o7777,
                        _int(e.get("uid"), f"{f}.uid", 0), _int(e.get("gid"), f"{f}.gid", 0)))
    return out


def effective_rules(spec_rules: list[Rule], nodes: list[Node]) -> list[Rule]:
    """What the program enforces: [] (no program) when the spec has no rule."""
    if not spec_rules:
        return []
    extra = [Rule(True, DEV_BLOCK if n.kind == stat.S_IFBLK else DEV_CHAR, n.major, n.minor, 7)
             for n in nodes if n.kind != stat.S_IFIFO]
    return [*spec_rules, *DEFAULT_ALLOW, *extra]


# -- eBPF ------------------------------------------------------------------------------

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_MOV64_X = 0xBF
_MOV64_K = 0xB7
_AND64_K = 0x57
_RSH64_K = 0x77
_JNE_K = 0x55
_JEQ_K = 0x15
_JSET_K = 0x45
_EXIT = 0x95


def _rule_block(rule: Rule) -> list[bytes]:
    """Instructions for one rule: tests that jump past the block, then the verdict.
    Registers: r2 access, r3 type, r4 major, r5 minor."""
    tests: list[tuple[int, int, int, int]] = []  # (code, dst, imm, extra insns before)
    pre: list[list[bytes]] = []
    if rule.type:
        tests.append((_JNE_K, 3, rule.type, 0))
        pre.append([])
    if rule.major >= 0:
        tests.append((_JNE_K, 4, rule.major, 0))
        pre.append([])
    if rule.minor >= 0:
        tests.append((_JNE_K, 5, rule.minor, 0))
        pre.append([])
    if rule.allow:
        others = ~rule.access & 7
        if others:
            # the request asks for something this rule does not grant: no match
            tests.append((_JSET_K, 2, others, 0))
            pre.append([])
    elif rule.access != 7:
        # a deny rule matches a request sharing any of its access bits
        tests.append((_JEQ_K, 6, 0, 2))
        pre.append([_insn(_MOV64_X, 6, 2), _insn(_AND64_K, 6, imm=rule.access)])
    verdict = [_insn(_MOV64_K, 0, imm=1 if rule.allow else 0), _insn(_EXIT)]
    # Lay out backwards so every jump knows how far the block's end is.
    out: list[bytes] = list(verdict)
    for (code, dst, imm, _), before in zip(reversed(tests), reversed(pre), strict=True):
        out = [*before, _insn(code, dst, off=len(out), imm=imm), *out]
    return out


def program(rules: list[Rule]) -> bytes:
    """The eBPF program for ``rules`` (last matching rule decides; default deny)."""
    code = [
        _insn(_LDX_W, 2, 1, 0), _insn(_MOV64_X, 3, 2), _insn(_AND64_K, 3, imm=0xFFFF),
        _insn(_RSH64_K, 2, imm=16), _insn(_LDX_W, 4, 1, 4), _insn(_LDX_W, 5, 1, 8),
    ]
    for rule in reversed(rules):
        block = _rule_block(rule)
        code += block
        if len(block) == 2:
            # matches every request: what follows is unreachable (the verifier refuses it)
            return b"".join(code)
    code += [_insn(_MOV64_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(code)


def evaluate(rules: list[Rule], kind: int, major: int, minor: int, access: int) -> bool:
    """What the program decides, in Python (for tests and for reasoning)."""
    for rule in reversed(rules):
        if rule.type and rule.type != kind:
            continue
        if rule.major >= 0 and rule.major != major:
            continue
        if rule.minor >= 0 and rule.minor != minor:
            continue
        if rule.allow and access & ~rule.access & 7:
            continue
        if not rule.allow and not access & rule.access:
            continue
        return rule.allow
    return False


_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_PROG_TYPE_CGROUP_DEVICE = 15
_ATTACH_CGROUP_DEVICE = 6


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    from pykata.guest.sysutil import libc

    ret = int(libc().syscall(_SYS_BPF, cmd, attr, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# Loaded programs by their instructions (most containers have the same rules):
# the verifier runs once per distinct program. Their fds are CLOEXEC, and a forked
# child closes them with every other fd.
_LOADED: dict[bytes, int] = {}
_LOADED_MAX = 16


def _load(prog: bytes) -> int:
    fd = _LOADED.get(prog)
    if fd is not None:
        return fd
    insns = ctypes.create_string_buffer(prog, len(prog))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, _PROG_TYPE_CGROUP_DEVICE, len(prog) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 0, 0, 0)
    try:
        fd = _bpf(_BPF_PROG_LOAD, attr)
    except OSError as exc:
        log = ctypes.create_string_buffer(65536)
        struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        detail = ""
        try:
            os.close(_bpf(_BPF_PROG_LOAD, attr))
        except OSError:
            lines = log.value.decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else ""
        raise OSError(exc.errno, f"load device cgroup program: {exc.strerror}"
                      + (f" ({detail})" if detail else "")) from None
    if len(_LOADED) >= _LOADED_MAX:
        os.close(_LOADED.pop(next(iter(_LOADED))))
    _LOADED[prog] = fd
    return fd


def attach(cgroup_dir: str, prog: bytes) -> None:
    """Load ``prog`` (once per distinct program) and attach it to the cgroup (it
    stays while the cgroup does)."""
    prog_fd = _load(prog)
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIII", attr, 0, cg, prog_fd, _ATTACH_CGROUP_DEVICE, 0)
        try:
            _bpf(_BPF_PROG_ATTACH, attr)
        except OSError as exc:
            raise OSError(exc.errno, f"attach device cgroup program to {cgroup_dir}:"
                          f" {exc.strerror}") from None
    finally:
        os.close(cg)
