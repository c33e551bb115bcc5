"""The system calls the engine's child makes, through ctypes: each raises
``OSError`` with the errno of the call and what was attempted (x86_64
numbers). Safe to call after ``fork``: no allocation beyond Python's own."""

from __future__ import annotations

import ctypes
import os

from pykata.guest.sysutil import libc

SYS_PIVOT_ROOT = 155
SYS_CAPSET = 126
SYS_UNSHARE = 272
SYS_SETNS = 308
SYS_SECCOMP = 317
SYS_CLOSE_RANGE = 436

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_SET_MODE_FILTER = 1
CLOSE_RANGE_CLOEXEC = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
RLIMIT_NOFILE = 7


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def setns(fd: int, nstype: int, what: str) -> None:
    _check(libc().syscall(SYS_SETNS, fd, nstype), what)


def unshare(flags: int) -> None:
    _check(libc().syscall(SYS_UNSHARE, ctypes.c_ulong(flags)), f"unshare({flags:#x})")


def pivot_root(new: str, old: str) -> None:
    _check(libc().syscall(SYS_PIVOT_ROOT, new.encode(), old.encode()), f"pivot_root {new}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, what: str = "prctl") -> int:
    return _check(libc().prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                               ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(libc().syscall(SYS_CAPSET, ctypes.byref(hdr), data), "capset")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load(prog: bytes, flags: int) -> None:
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(libc().syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog)),
           "load the seccomp filter")


def close_range_cloexec(first: int) -> None:
    _check(libc().syscall(SYS_CLOSE_RANGE, first, ctypes.c_uint(0xFFFFFFFF),
                          CLOSE_RANGE_CLOEXEC), "close_range")


def close_from(first: int) -> None:
    _check(libc().syscall(SYS_CLOSE_RANGE, first, ctypes.c_uint(0xFFFFFFFF), 0), "close_range")


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_uint64), ("max", ctypes.c_uint64)]


def setrlimit(resource: int, soft: int, hard: int) -> None:
    lim = _Rlimit(soft, hard)
    _check(libc().setrlimit(resource, ctypes.byref(lim)), f"setrlimit({resource})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), f"sethostname {name}")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(libc().setdomainname(raw, len(raw)), f"setdomainname {name}")
