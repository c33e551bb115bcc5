"""What the fuzz targets share: hang guards, the "one clear line" check, and
strategies for JSON values, OCI specs and protobuf messages (drawn from their
descriptors)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from pykata import wire

T = TypeVar("T")

# Bounds that only a hang reaches (the targets take milliseconds). CPU time for
# synchronous code (not wall-clock: the host's load does not matter), a generous
# wall-clock bound for what awaits a peer.
CPU_SECONDS = 20.0
WALL_SECONDS = 60.0


class Hang(BaseException):
    """A target ran past its bound (a BaseException: no target may swallow it)."""


@contextlib.contextmanager
def cpu_limit(seconds: float = CPU_SECONDS) -> Iterator[None]:
    """Raise Hang in the block once it used ``seconds`` of CPU time (ITIMER_PROF)."""

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds:g} s of CPU time")

    old = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


async def hang_guard(aw: Awaitable[T], seconds: float = WALL_SECONDS) -> T:
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        raise Hang(f"no result after {seconds:g} s") from None


def run(coro_fn: Callable[[], Awaitable[T]], seconds: float = WALL_SECONDS) -> T:
    """Run one example's coroutine in a fresh event loop, bounded."""

    async def main() -> T:
        return await hang_guard(coro_fn(), seconds)

    return asyncio.run(main())


def assert_one_line(message: str, what: str = "error") -> None:
    assert message.strip(), f"empty {what} message"
    assert "\n" not in message and "\r" not in message, f"{what} of several lines: {message!r}"
    assert "Traceback" not in message, f"{what} carries a traceback: {message!r}"


# -- values ---------------------------------------------------------------------------

ODD_PATHS = ["/", "", ".", "..", "../..", "/..", "/../../etc/shadow", "/a/../../b", "rootfs",
             "./rootfs", "rootfs/..", "//double", "/proc", "/proc/self/ns/net", "/proc/1/ns/net",
             "/proc/1/ns/ipc", "/proc/42/ns/uts", "/proc/42/ns/pid", "/proc/42/ns/net",
             "/proc/42/ns/mnt", "/proc/missing/ns/net", "/sys", "/sys/fs/cgroup", "/dev",
             "/dev/sda", "/dev/vdb1", "/dev/null", "/dev/shm", "/dev/missing", "/tmp/x y",
             "/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/cache",
             "/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/mem-vol/",
             "/var/lib/kubelet/pods/p/volumes/kubernetes.io~empty-dir/..",
             "/host/with-sub", "relative/dir", "/a\nb", "/\u00e9t\u00e9", "/" + "x" * 5000,
             "/run/pykata/../../etc", "~", "-", "/x\x00y", wire.SANDBOX_NS_MARKER]

paths = st.sampled_from(ODD_PATHS) | st.text(max_size=40) | st.builds(
    lambda parts: "/" + "/".join(parts),
    st.lists(st.sampled_from(["a", "..", ".", "", "etc", "b c", "proc", "x" * 300]),
             max_size=6))

abs_paths = st.sampled_from([p for p in ODD_PATHS if p.startswith("/")]) | st.builds(
    lambda parts: "/" + "/".join(parts), st.lists(st.sampled_from(["a", "..", ".", "etc"]),
                                                  min_size=1, max_size=4))

huge_ints = st.sampled_from([-(2**63), -(2**31) - 1, -1, 0, 1, 2**31, 2**32, 2**63 - 1,
                             2**64, 10**30, -(10**30)])
ints = st.integers(min_value=-(2**40), max_value=2**40) | huge_ints
texts = st.text(max_size=30) | st.sampled_from(["", "x" * 5000, "\x00", "\n", "\u202e",
                                                  "a" * 4097])

json_scalars = (st.none() | st.booleans() | ints | st.floats(allow_nan=False) | texts
                | paths)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)


def mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]
           ) -> st.SearchStrategy[Any]:
    """``good`` three times in four."""
    return st.one_of(good, good, good, other)


def wrong(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, sometimes any JSON value (a wrong type)."""
    return st.one_of(good, good, good, json_values)


def obj(required: dict[str, st.SearchStrategy[Any]],
        optional: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A JSON object of this shape: fields sometimes missing, extra fields sometimes,
    the whole sometimes of another type."""
    shaped = st.fixed_dictionaries(
        {k: v for k, v in required.items()},
        optional={**optional, **{k + "\u200b": json_values for k in list(required)[:1]}},
    ) | st.fixed_dictionaries({}, optional={**required, **optional})
    return wrong(shaped)


def lists_of(s: st.SearchStrategy[Any], max_size: int = 4) -> st.SearchStrategy[Any]:
    return wrong(st.lists(s, max_size=max_size))


strings = wrong(texts | paths)
ns_types = wrong(st.sampled_from(["pid", "network", "ipc", "uts", "mount", "user", "cgroup",
                                  "time", "net", "mnt", "bogus", ""]))
mount_types = wrong(st.sampled_from(["bind", "rbind", "none", "", "tmpfs", "proc", "sysfs",
                                     "ext4", "xfs", "devpts", "cgroup", "overlay", "virtiofs"]))
mount_options = st.sampled_from(["bind", "rbind", "ro", "rw", "rro", "rrw", "nosuid", "nodev",
                                 "noexec", "private", "rprivate", "shared", "rshared", "slave",
                                 "rslave", "unbindable", "mode=755", "size=65536k", "remount",
                                 "relatime", "strictatime"]) | texts

mount = obj({"destination": wrong(paths)},
            {"type": mount_types, "source": wrong(paths), "options": lists_of(
                wrong(mount_options), 6), "uidMappings": json_values})
namespace = obj({"type": ns_types}, {"path": wrong(paths)})
device = obj({"path": wrong(paths), "type": wrong(st.sampled_from(["b", "c", "u", "p", "a"]))},
             {"major": wrong(ints), "minor": wrong(ints), "fileMode": wrong(ints),
              "uid": wrong(ints), "gid": wrong(ints)})
device_rule = obj({}, {"allow": wrong(st.booleans()), "type": wrong(st.sampled_from(
    ["a", "b", "c"])), "major": wrong(ints), "minor": wrong(ints),
    "access": wrong(st.sampled_from(["r", "rw", "rwm", "m", ""]))})
resources = obj({}, {
    "memory": obj({}, {k: wrong(ints) for k in ("limit", "reservation", "swap", "kernel",
                                                 "kernelTCP", "swappiness")}
                  | {"disableOOMKiller": wrong(st.booleans()),
                     "useHierarchy": wrong(st.booleans())}),
    "cpu": obj({}, {k: wrong(ints) for k in ("shares", "quota", "period", "realtimeRuntime",
                                              "realtimePeriod")}
               | {"cpus": strings, "mems": strings}),
    "pids": obj({}, {"limit": wrong(ints)}),
    "devices": lists_of(device_rule),
    "blockIO": obj({}, {"weight": wrong(ints), "leafWeight": wrong(ints),
                        "weightDevice": json_values}),
    "network": json_values, "rdma": json_values, "hugepageLimits": json_values,
    "unified": wrong(st.dictionaries(texts, texts, max_size=3)),
})
hook = obj({"path": wrong(paths)}, {"args": lists_of(strings), "env": lists_of(strings),
                                    "timeout": wrong(ints)})
hooks = obj({}, {k: lists_of(hook, 2) for k in (
    "prestart", "createRuntime", "createContainer", "startContainer", "poststart",
    "poststop", "bogus")})
process = obj({"args": lists_of(strings), "cwd": wrong(paths)}, {
    "env": lists_of(strings), "terminal": wrong(st.booleans()),
    "user": obj({"uid": wrong(ints), "gid": wrong(ints)},
                {"additionalGids": lists_of(wrong(ints)), "umask": wrong(ints),
                 "username": strings}),
    "capabilities": obj({}, {k: lists_of(strings) for k in ("bounding", "effective")}),
    "rlimits": lists_of(obj({"type": strings, "hard": wrong(ints), "soft": wrong(ints)}, {})),
    "noNewPrivileges": wrong(st.booleans()), "oomScoreAdj": wrong(ints),
    "ioPriority": json_values, "scheduler": json_values, "consoleSize": json_values,
    "apparmorProfile": strings,
})
linux = obj({}, {
    "namespaces": lists_of(namespace, 8), "devices": lists_of(device),
    "resources": resources, "sysctl": wrong(st.dictionaries(texts, json_values, max_size=3)),
    "cgroupsPath": strings, "maskedPaths": lists_of(strings), "readonlyPaths": lists_of(strings),
    "uidMappings": json_values, "seccomp": json_values, "netDevices": json_values,
    "memoryPolicy": json_values, "intelRdt": json_values, "rootfsPropagation": strings,
})
annotations = wrong(st.dictionaries(
    st.sampled_from(["io.kubernetes.cri.container-type", "io.kubernetes.cri.sandbox-id",
                     "io.kubernetes.cri-o.ContainerType", "io.kubernetes.cri-o.SandboxID"])
    | texts, wrong(st.sampled_from(["sandbox", "container", "x"]) | texts), max_size=4))
oci_versions = wrong(st.sampled_from(["1.0.0", "1.0.2", "1.1.0", "1.2.0", "1.3.0", "1.4.0",
                                      "2.0.0", "1.0.2-dev", "1.0", "", "x.y.z",
                                      "1.0.0\n", "01.0.0"]))

any_spec: st.SearchStrategy[Any] = obj(
    {"ociVersion": oci_versions, "process": process,
     "root": obj({"path": wrong(st.sampled_from(["rootfs", "./rootfs", "/"]) | paths)},
                 {"readonly": wrong(st.booleans())})},
    {"mounts": lists_of(mount, 8), "linux": linux, "hooks": hooks, "annotations": annotations,
     "hostname": strings, "domainname": strings, "solaris": json_values})


# -- protobuf messages from their descriptors -----------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int_in(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (lo, hi, 0, 1, -1, 2, 64, 65, 65535, 65536, 2**31 - 1, 2**31,
                         2**32 - 1, -(2**31)) if lo <= v <= hi]
    return st.sampled_from(edges) | st.integers(min_value=max(lo, -1000), max_value=min(hi,
                                                                                     100_000))


def scalar_for(field: FieldDescriptor,
               overrides: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    if field.name in overrides:
        return overrides[field.name]
    t = field.type
    if t in _INT_RANGES:
        return _int_in(*_INT_RANGES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t == FieldDescriptor.TYPE_STRING:
        return texts | paths
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64) | st.sampled_from([b"", b"\x00" * 70_000, b"{}", b"[]",
                                                          b"{" * 5000, b"[" * 100_000])
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.sampled_from(values) | st.integers(min_value=-5, max_value=1000)
    raise AssertionError(f"no strategy for field {field.full_name} of type {t}")


def message_of(desc: Descriptor, cls: type[Message],
               overrides: dict[str, st.SearchStrategy[Any]] | None = None,
               depth: int = 3) -> st.SearchStrategy[Message]:
    """Well-typed random instances of ``cls`` (whose descriptor is ``desc``): every
    field maybe set, repeated fields with a few entries, nested messages to ``depth``;
    ``overrides`` gives the strategy for fields by name (e.g. JSON payloads)."""
    ov = overrides or {}

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for field in desc.fields:
            # A field named in ``overrides`` is what matters: nearly always set.
            if draw(st.integers(0, 9)) >= (9 if field.name in ov else 5):
                continue
            if field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    key_f = field.message_type.fields_by_name["key"]
                    val_f = field.message_type.fields_by_name["value"]
                    if val_f.message_type is not None:
                        continue
                    entries = draw(st.dictionaries(scalar_for(key_f, {}), scalar_for(val_f, {}),
                                                   max_size=3))
                    getattr(msg, field.name).update(entries)
                    continue
                if depth <= 0:
                    continue
                sub_cls = type(getattr(msg, field.name).add() if _repeated(field)
                               else getattr(msg, field.name))
                if _repeated(field):
                    getattr(msg, field.name).pop()
                sub = message_of(field.message_type, sub_cls, ov, depth - 1)
                if _repeated(field):
                    for item in draw(st.lists(sub, max_size=3)):
                        getattr(msg, field.name).add().CopyFrom(item)
                else:
                    getattr(msg, field.name).CopyFrom(draw(sub))
                continue
            s = scalar_for(field, ov)
            if _repeated(field):
                getattr(msg, field.name).extend(draw(st.lists(s, max_size=4)))
            else:
                setattr(msg, field.name, draw(s))
        return msg

    return build()


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


@st.composite
def _repaired(draw: st.DrawFn) -> Any:
    spec = draw(any_spec)
    if isinstance(spec, dict) and draw(st.booleans()):
        # Past the first checks (a command, a root), to reach what comes after them.
        proc = spec.get("process")
        spec["process"] = {**(proc if isinstance(proc, dict) else {}), "args": ["true"],
                           "cwd": "/"}
        spec["root"] = {"path": draw(st.sampled_from(["rootfs", "/"]))}
    return spec


oci_spec: st.SearchStrategy[Any] = _repaired()
