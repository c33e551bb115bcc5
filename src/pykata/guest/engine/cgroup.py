"""The container's cgroup (v2, the guest's hierarchy): create it, write the
spec's ``linux.resources``, freeze, signal and remove.

``resource_writes`` turns the spec's resources into (file, value) pairs
(pure, unit-tested), with the OCI v1 -> v2 conversions (cpu shares ->
cpu.weight, blkio weight -> io.weight, memory+swap -> memory.swap.max).
Fields that only mean something on cgroup v1 or that the engine does not
implement are refused, naming the field.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import Any

from pykata.errors import InvalidArgument

CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io", "hugetlb", "misc")


def _int(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(f"invalid OCI spec: {field} must be an integer")
    return v


def _refuse(section: dict[str, Any], names: tuple[str, ...], base: str,
            unless: Any = None) -> None:
    for n in names:
        if n in section and section[n] not in (None, unless, 0, False, [], {}):
            raise InvalidArgument(f"unsupported OCI spec: {base}.{n} (cgroup v1 only or not"
                                  " implemented by the guest engine)")


def shares_to_weight(shares: int) -> int:
    if shares <= 0:
        return 0
    shares = max(2, min(shares, 262144))
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_to_io_weight(weight: int) -> int:
    weight = max(10, min(weight, 1000))
    return 1 + ((weight - 10) * 9999) // 990


def resource_writes(res: Any, field: str = "linux.resources") -> list[tuple[str, str]]:
    """(cgroup file, value) pairs for ``res``; devices are handled elsewhere."""
    if res is None:
        return []
    if not isinstance(res, dict):
        raise InvalidArgument(f"invalid OCI spec: {field} must be an object")
    known = {"devices", "memory", "cpu", "pids", "hugepageLimits", "blockIO", "unified",
             "network", "rdma"}
    unknown = sorted(set(res) - known)
    if unknown:
        raise InvalidArgument(f"unsupported OCI spec: {field}.{unknown[0]}")
    _refuse(res, ("network", "rdma"), field)
    out: list[tuple[str, str]] = []
    mem = res.get("memory") or {}
    if mem:
        f = f"{field}.memory"
        _refuse(mem, ("kernel", "kernelTCP", "swappiness", "disableOOMKiller"), f)
        if mem.get("useHierarchy") is False:
            raise InvalidArgument(f"unsupported OCI spec: {f}.useHierarchy false")
        limit = mem.get("limit")
        if limit is not None:
            limit = _int(limit, f"{f}.limit")
            out.append(("memory.max", "max" if limit < 0 else str(limit)))
        if mem.get("reservation") is not None:
            r = _int(mem["reservation"], f"{f}.reservation")
            out.append(("memory.low", "max" if r < 0 else str(r)))
        swap = mem.get("swap")
        if swap is not None:
            swap = _int(swap, f"{f}.swap")
            if swap < 0:
                out.append(("memory.swap.max", "max"))
            elif limit is not None and limit > 0:
                if swap < limit:
                    raise InvalidArgument(f"invalid OCI spec: {f}.swap ({swap}) is memory +"
                                          f" swap and must not be below {f}.limit ({limit})")
                out.append(("memory.swap.max", str(swap - limit)))
            elif swap > 0:
                raise InvalidArgument(f"invalid OCI spec: {f}.swap needs {f}.limit")
    cpu = res.get("cpu") or {}
    if cpu:
        f = f"{field}.cpu"
        _refuse(cpu, ("realtimeRuntime", "realtimePeriod"), f)
        if cpu.get("shares"):
            out.append(("cpu.weight", str(shares_to_weight(_int(cpu["shares"], f"{f}.shares")))))
        quota, period = cpu.get("quota"), cpu.get("period")
        if quota is not None or period is not None:
            q = _int(quota, f"{f}.quota") if quota is not None else -1
            p = _int(period, f"{f}.period") if period else 100000
            out.append(("cpu.max", f"{'max' if q <= 0 else q} {p}"))
        if cpu.get("idle") is not None:
            out.append(("cpu.idle", str(_int(cpu["idle"], f"{f}.idle"))))
        if cpu.get("cpus"):
            out.append(("cpuset.cpus", str(cpu["cpus"])))
        if cpu.get("mems"):
            out.append(("cpuset.mems", str(cpu["mems"])))
    pids = res.get("pids") or {}
    if pids and pids.get("limit") is not None:
        n = _int(pids["limit"], f"{field}.pids.limit")
        out.append(("pids.max", "max" if n <= 0 else str(n)))
    for i, h in enumerate(res.get("hugepageLimits") or []):
        f = f"{field}.hugepageLimits[{i}]"
        size = h.get("pageSize") if isinstance(h, dict) else None
        if not isinstance(size, str) or not size or "/" in size:
            raise InvalidArgument(f"invalid OCI spec: {f}.pageSize")
        out.append((f"hugetlb.{size}.max", str(_int(h.get("limit"), f"{f}.limit"))))
    blk = res.get("blockIO") or {}
    if blk:
        f = f"{field}.blockIO"
        _refuse(blk, ("leafWeight", "weightDevice"), f)
        if blk.get("weight"):
            out.append(("io.weight", f"default {blkio_to_io_weight(_int(blk['weight'], f))}"))
        for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                          ("throttleReadIOPSDevice", "riops"),
                          ("throttleWriteIOPSDevice", "wiops")):
            for j, d in enumerate(blk.get(key) or []):
                df = f"{f}.{key}[{j}]"
                out.append(("io.max", f"{_int(d.get('major'), df)}:{_int(d.get('minor'), df)}"
                                      f" {name}={_int(d.get('rate'), df)}"))
    unified = res.get("unified") or {}
    if not isinstance(unified, dict):
        raise InvalidArgument(f"invalid OCI spec: {field}.unified must be an object")
    for key, value in unified.items():
        if not isinstance(key, str) or "/" in key or key.startswith(".") or "." not in key:
            raise InvalidArgument(f"invalid OCI spec: {field}.unified: bad file name {key!r}")
        out.append((key, str(value)))
    return out


def controllers_for(writes: list[tuple[str, str]]) -> set[str]:
    return {name.split(".", 1)[0] for name, _ in writes}


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def create(root: str, rel: str) -> str:
    """mkdir the cgroup ``rel`` under ``root``, enabling the controllers on the way."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"invalid OCI spec: linux.cgroupsPath {rel!r}")
    path = root
    for i, part in enumerate(parts):
        try:
            available = _read(os.path.join(path, "cgroup.controllers")).split()
            enabled = _read(os.path.join(path, "cgroup.subtree_control")).split()
        except OSError:
            available, enabled = [], []
        for c in CONTROLLERS:
            if c in available and c not in enabled:
                with contextlib.suppress(OSError):
                    _write(os.path.join(path, "cgroup.subtree_control"), f"+{c}")
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if i == len(parts) - 1:
                raise OSError(errno.EEXIST, f"cgroup {path} exists already") from None
    return path


def apply(path: str, writes: list[tuple[str, str]]) -> None:
    for name, value in writes:
        target = os.path.join(path, name)
        if name == "memory.swap.max" and value == "0" and not os.path.exists(target):
            continue  # no swap accounting in this kernel: there is no swap either
        try:
            _write(target, value)
        except OSError as exc:
            raise OSError(exc.errno, f"cgroup {name}={value}: {exc.strerror}") from None


def procs(path: str) -> list[int]:
    try:
        return [int(x) for x in _read(os.path.join(path, "cgroup.procs")).split()]
    except (OSError, ValueError):
        return []


def signal_all(path: str, sig: int) -> int:
    """Send ``sig`` to every process of the cgroup; how many there were."""
    if sig == signal.SIGKILL and os.path.exists(os.path.join(path, "cgroup.kill")):
        n = len(procs(path))
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "cgroup.kill"), "1")
        return n
    n = 0
    for pid in procs(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            n += 1
    return n


def freeze(path: str, frozen: bool) -> None:
    _write(os.path.join(path, "cgroup.freeze"), "1" if frozen else "0")


def is_frozen(path: str) -> bool:
    try:
        for line in _read(os.path.join(path, "cgroup.events")).splitlines():
            k, _, v = line.partition(" ")
            if k == "frozen":
                return v.strip() == "1"
    except OSError:
        pass
    return False


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
