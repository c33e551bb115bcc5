"""``linux.seccomp`` -> a seccomp BPF program, compiled once per container.

The profile is parsed into rules here (pure, unit-tested). The program is
built with libseccomp (``libseccomp.so.2`` is in the guest image, crun links
it) through ctypes in the agent, exported as raw BPF and kept with the
container: the container's init and every exec load the same bytes with
``seccomp(SECCOMP_SET_MODE_FILTER)``, so the forked child does one syscall
and no library work. Refused: notify actions and ``listenerPath`` (no
seccomp agent), unknown actions, operators, flags and architectures.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
from dataclasses import dataclass, field
from typing import Any

from pykata.errors import InvalidArgument

ACT_KILL_THREAD = 0x00000000
ACT_KILL_PROCESS = 0x80000000
ACT_TRAP = 0x00030000
ACT_ERRNO = 0x00050000
ACT_TRACE = 0x7FF00000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000

OPS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
       "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 1, "SECCOMP_FILTER_FLAG_LOG": 2,
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4}
_KNOWN_FIELDS = {"defaultAction", "defaultErrnoRet", "architectures", "syscalls", "flags",
                 "listenerPath", "listenerMetadata"}
_RULE_FIELDS = {"names", "action", "errnoRet", "args", "comment", "includes", "excludes"}


@dataclass(frozen=True)
class Arg:
    index: int
    op: int
    value: int
    value_two: int = 0


@dataclass(frozen=True)
class SyscallRule:
    name: str
    action: int
    args: tuple[Arg, ...] = ()


@dataclass(frozen=True)
class Profile:
    default_action: int
    architectures: tuple[str, ...] = ()  # libseccomp names: "x86_64", "x86", "x32"
    rules: tuple[SyscallRule, ...] = ()
    flags: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def action(name: Any, errno_ret: Any, field_name: str) -> int:
    if not isinstance(name, str):
        raise InvalidArgument(f"invalid OCI spec: {field_name} must be a string")
    if errno_ret is not None and (isinstance(errno_ret, bool) or not isinstance(errno_ret, int)
                                  or not 0 <= errno_ret <= 0xFFFF):
        raise InvalidArgument(f"invalid OCI spec: errnoRet of {field_name} must be an errno")
    simple = {"SCMP_ACT_KILL": ACT_KILL_THREAD, "SCMP_ACT_KILL_THREAD": ACT_KILL_THREAD,
              "SCMP_ACT_KILL_PROCESS": ACT_KILL_PROCESS, "SCMP_ACT_TRAP": ACT_TRAP,
              "SCMP_ACT_LOG": ACT_LOG, "SCMP_ACT_ALLOW": ACT_ALLOW}
    if name in simple:
        return simple[name]
    if name == "SCMP_ACT_ERRNO":
        return ACT_ERRNO | (errno_mod.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_TRACE":
        return ACT_TRACE | (errno_mod.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_NOTIFY":
        raise InvalidArgument(f"unsupported OCI spec: {field_name}: SCMP_ACT_NOTIFY"
                              " (no seccomp agent in the guest)")
    raise InvalidArgument(f"unsupported OCI spec: {field_name}: unknown action {name!r}")


def _arch(name: Any, field_name: str) -> str:
    table = {"SCMP_ARCH_X86_64": "x86_64", "SCMP_ARCH_X86": "x86", "SCMP_ARCH_X32": "x32"}
    if name not in table:
        raise InvalidArgument(
            f"unsupported OCI spec: {field_name}: architecture {name!r} (this guest is x86_64)")
    return table[name]


def parse(seccomp: Any, field_name: str = "linux.seccomp") -> Profile | None:
    if seccomp is None:
        return None
    if not isinstance(seccomp, dict):
        raise InvalidArgument(f"invalid OCI spec: {field_name} must be an object")
    extra = sorted(set(seccomp) - _KNOWN_FIELDS)
    if extra:
        raise InvalidArgument(f"unsupported OCI spec: {field_name}.{extra[0]}")
    if seccomp.get("listenerPath"):
        raise InvalidArgument(f"unsupported OCI spec: {field_name}.listenerPath"
                              " (no seccomp agent in the guest)")
    default = action(seccomp.get("defaultAction"), seccomp.get("defaultErrnoRet"),
                     f"{field_name}.defaultAction")
    arches = tuple(_arch(a, f"{field_name}.architectures")
                   for a in seccomp.get("architectures") or [])
    flags = 0
    for f in seccomp.get("flags") or []:
        if f not in FLAGS:
            raise InvalidArgument(f"unsupported OCI spec: {field_name}.flags: {f!r}")
        flags |= FLAGS[f]
    rules: list[SyscallRule] = []
    for i, entry in enumerate(seccomp.get("syscalls") or []):
        where = f"{field_name}.syscalls[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"invalid OCI spec: {where} must be an object")
        unknown = sorted(set(entry) - _RULE_FIELDS)
        if unknown:
            raise InvalidArgument(f"unsupported OCI spec: {where}.{unknown[0]}")
        act = action(entry.get("action"), entry.get("errnoRet"), f"{where}.action")
        names = entry.get("names") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"invalid OCI spec: {where}.names must be a list of strings")
        args = []
        for j, a in enumerate(entry.get("args") or []):
            af = f"{where}.args[{j}]"
            if not isinstance(a, dict) or a.get("op") not in OPS:
                raise InvalidArgument(f"unsupported OCI spec: {af}.op {a.get('op')!r}"
                                      if isinstance(a, dict) else f"invalid OCI spec: {af}")
            index = a.get("index")
            if not isinstance(index, int) or not 0 <= index <= 5:
                raise InvalidArgument(f"invalid OCI spec: {af}.index must be 0-5")
            args.append(Arg(index, OPS[a["op"]], int(a.get("value") or 0),
                            int(a.get("valueTwo") or 0)))
        for name in names:
            rules.append(SyscallRule(name, act, tuple(args)))
    return Profile(default, arches, tuple(rules), flags)


def rule_groups(rule: SyscallRule) -> list[tuple[Arg, ...]]:
    """The argument comparisons to add for one rule. libseccomp ANDs the
    comparisons of one rule but refuses two on the same argument: those are
    added as separate rules (OR), the convention runtimes follow."""
    if not rule.args:
        return [()]
    indexes = [a.index for a in rule.args]
    if len(set(indexes)) == len(indexes):
        return [rule.args]
    return [(a,) for a in rule.args]


# -- libseccomp ----------------------------------------------------------------------

class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib: ctypes.CDLL | None = None
_SCMP_FLTATR_CTL_NNP = 3


def _libseccomp() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        for name in ("libseccomp.so.2", "libseccomp.so"):
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        else:
            raise OSError(errno_mod.ENOENT, "libseccomp.so.2 is not in the guest image")
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def compile_bpf(profile: Profile) -> bytes:
    """The raw BPF program (``struct sock_filter[]``) for ``profile``."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(profile.default_action)
    if not ctx:
        raise OSError(errno_mod.EINVAL, "seccomp_init failed")
    try:
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_NNP, 0)
        for arch in profile.architectures:
            token = lib.seccomp_arch_resolve_name(arch.encode())
            if token == 0:
                raise InvalidArgument(f"unsupported OCI spec: linux.seccomp.architectures:"
                                      f" {arch} unknown to libseccomp")
            ret = lib.seccomp_arch_add(ctx, token)
            if ret < 0 and ret != -errno_mod.EEXIST:
                raise OSError(-ret, f"seccomp_arch_add {arch}: {os.strerror(-ret)}")
        for rule in profile.rules:
            if rule.action == profile.default_action:
                continue  # libseccomp refuses rules that change nothing
            nr = lib.seccomp_syscall_resolve_name(rule.name.encode())
            if nr == -1:  # __NR_SCMP_ERROR: a name this libseccomp does not know
                continue
            for group in rule_groups(rule):
                arr = (_ArgCmp * max(1, len(group)))(
                    *(_ArgCmp(a.index, a.op, a.value, a.value_two) for a in group))
                ret = lib.seccomp_rule_add_array(ctx, rule.action, nr, len(group), arr)
                if ret < 0:
                    raise InvalidArgument(
                        f"invalid OCI spec: linux.seccomp: cannot add the rule for"
                        f" {rule.name}: {os.strerror(-ret)}")
        fd = os.memfd_create("seccomp", os.MFD_CLOEXEC)
        try:
            ret = lib.seccomp_export_bpf(ctx, fd)
            if ret < 0:
                raise OSError(-ret, f"seccomp_export_bpf: {os.strerror(-ret)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)
            data = b""
            while len(data) < size:
                chunk = os.read(fd, size - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not data or len(data) % 8:
        raise OSError(errno_mod.EINVAL, f"seccomp_export_bpf gave {len(data)} bytes")
    return data
