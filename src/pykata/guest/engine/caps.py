"""Capability names (OCI ``CAP_*``) -> bit numbers and masks: pure.

Numbers are the kernel's (``include/uapi/linux/capability.h``). A name this
table does not know is refused, naming the spec field; a known capability
the running kernel lacks (above ``cap_last_cap``) is left out, as the kernel
could not grant it anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pykata.errors import InvalidArgument

CAPS: dict[str, int] = {name: i for i, name in enumerate((
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
))}
LAST_KNOWN = max(CAPS.values())
SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def cap_number(name: str, field: str) -> int:
    key = name.upper()
    if not key.startswith("CAP_"):
        key = "CAP_" + key
    try:
        return CAPS[key]
    except KeyError:
        raise InvalidArgument(f"unsupported OCI spec: {field}: unknown capability {name!r}") \
            from None


def mask(names: Iterable[Any], field: str, last_cap: int = LAST_KNOWN) -> int:
    """The bit mask of ``names``; capabilities above ``last_cap`` are left out."""
    if not isinstance(names, list | tuple):
        raise InvalidArgument(f"invalid OCI spec: {field} must be a list of capability names")
    out = 0
    for name in names:
        if not isinstance(name, str):
            raise InvalidArgument(f"invalid OCI spec: {field}: {name!r} is not a name")
        n = cap_number(name, field)
        if n <= last_cap:
            out |= 1 << n
    return out


def names(bits: int) -> list[str]:
    by_number = {v: k for k, v in CAPS.items()}
    return [by_number.get(i, str(i)) for i in range(64) if bits >> i & 1]


@dataclass(frozen=True)
class CapSets:
    bounding: int = 0
    effective: int = 0
    permitted: int = 0
    inheritable: int = 0
    ambient: int = 0


def cap_sets(caps: Any, field: str = "process.capabilities",
             last_cap: int = LAST_KNOWN) -> CapSets:
    """``process.capabilities`` -> masks (a missing object or set means none)."""
    if caps is None:
        return CapSets()
    if not isinstance(caps, dict):
        raise InvalidArgument(f"invalid OCI spec: {field} must be an object")
    unknown = sorted(set(caps) - set(SETS))
    if unknown:
        raise InvalidArgument(f"unsupported OCI spec: {field}.{unknown[0]}")
    masks = {s: mask(caps.get(s) or [], f"{field}.{s}", last_cap) for s in SETS}
    return CapSets(**masks)
