"""Checkpoint of a whole sandbox VM: the directory, its manifest, the packed RAM
(issue 20; docs/checkpoint-design.md §6). Driver-neutral: the VM is reached
through the hypervisor contract (``saveable``, ``checkpoint_info``,
``save_to``, ``load``, ``resume``).

The directory (containerd's checkpoint ``path`` or podman's ``--image-path``;
a user may choose it, so no symlink in it is ever followed and every file is
created ``O_EXCL|O_NOFOLLOW``, 0600, relative to the directory's own fd)::

    pykata-checkpoint.json  the manifest, written last (fsync): its presence
                            marks the checkpoint complete
    vmstate                 the VMM's device state (RAM not in it: x-ignore-shared)
    memory.pkram            the guest RAM file, packed: b"PYKRAM1\\n", u64 file
                            size, u32 extent count, count x (u64 offset, u64
                            length), then each extent's bytes in order (little
                            endian); holes are not stored and stay holes
    inventory.img           a marker podman's restore looks for
    dump.log                one line per phase with its duration

API for the shim and the CLI (part B):

Checkpoint, with the sandbox quiesced (no agent call outstanding)::

    why = eligible(sb)                 # "" = it can be checkpointed; else one line
    await settle(sb)                   # optional: freed guest pages reported first
    m = await save(sb, dest, containers=[ContainerEntry(...)], next_stream_id=n,
                   extra={...})
    # The VM is now stopped. Leave it running: await sb.vm.resume(); or tear it down.
    # On error save() removed what it wrote in dest, resumed the VM it had
    # stopped, and raised one line (FailedPrecondition when refused up front).

Restore (before anything starts)::

    m = read_manifest(ckpt)            # strict; one line on anything wrong
    host_spec = sizing.vm_spec(config, sandbox_id, ns, sb.dir, channel=...)
    spec = restore_spec(m, host_spec)  # the checkpointed VM's shape, host paths
    await check_host(m, ckpt, config, driver, spec)  # check_compatible + file sizes
    await boot.restore(sb, driver, spec, ckpt, m)    # VM loaded and paused
    await sb.vm.resume()               # then dial the agent, FinishCheckpoint...

``m.containers``, ``m.agent_next_stream_id`` and ``m.extra`` (a JSON object
the shim fills as it likes) carry what the shim needs to rebuild its objects;
``m.network`` the pod's interfaces (MAC, addresses) and netns.

Eligibility (``eligible``): no virtio-fs (QEMU 7.2 cannot save vhost-user-fs),
the RAM in a file (``[runtime] checkpointable = true`` for a cold boot with
``shared_fs = "none"``; template clones always have it), the serial agent
channel, no hot-plugged block devices, no hot-plugged *shared* memory (a
checkpointable VM's hot-plugged memory is private: the state carries it, and
the restore's command line repeats it, as it repeats hot-plugged vCPUs and NICs).

Restored sandboxes: their memory is ``spec.memory_mib`` plus every
``m.plugged`` DIMM's ``props["size-mib"]``; their vCPUs ``spec.vcpus`` plus the
plugged vCPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import stat
import struct
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykata import __version__, errors
from pykata.hypervisor.base import Driver, PluggedDevice, VMSpec

if TYPE_CHECKING:
    from pykata.config import Config
    from pykata.runtime.sandbox import Sandbox

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "pykata-checkpoint.json"
VMSTATE = "vmstate"
MEMORY = "memory.pkram"
INVENTORY = "inventory.img"
DUMP_LOG = "dump.log"
FILES = (MANIFEST, VMSTATE, MEMORY, INVENTORY, DUMP_LOG)
INVENTORY_TEXT = b"pykata VM checkpoint, see pykata-checkpoint.json\n"

MANIFEST_MAX = 1 << 20  # bytes of manifest read at most
PACK_MAGIC = b"PYKRAM1\n"
_HEAD = struct.Struct("<8sQI")
_EXTENT = struct.Struct("<QQ")
PAGE = 4096
MAX_MEMORY_BYTES = 1 << 40  # a RAM file larger than 1 TiB is not a pykata VM's
MAX_EXTENTS = 1 << 22  # at most this many extents (a 64 MiB table)
CHUNK = 1 << 20  # bytes per read when the kernel cannot copy by itself

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- the manifest -----------------------------------------------------------------------
@dataclass
class GuestImage:
    digest: str = ""  # manifest.json "digest" of the guest image in [image] output_dir
    kernel_release: str = ""


@dataclass
class MemoryInfo:
    size: int = 0  # the RAM file's size
    extents: int = 0  # data extents packed
    data_bytes: int = 0  # bytes in them
    pack_bytes: int = 0  # size of memory.pkram


@dataclass
class ContainerEntry:
    id: str
    guest_id: str = ""
    spec_digest: str = ""  # sha256 of the bundle's config.json
    state: str = ""  # at checkpoint: running, created, paused...
    exec_ids: list[str] = field(default_factory=list)


@dataclass
class Interface:
    name: str
    mac: str
    addresses: list[str] = field(default_factory=list)  # CIDR, as the guest has them


@dataclass
class NetworkInfo:
    netns: str = ""
    interfaces: list[Interface] = field(default_factory=list)


@dataclass
class Manifest:
    format: int
    created: str  # RFC 3339, UTC
    pykata_version: str
    sandbox_id: str
    namespace: str
    guest_image: GuestImage
    vmm: dict[str, str]  # Driver.version()
    vmm_info: dict[str, Any]  # Hypervisor.checkpoint_info() without "plugged"
    driver_identity: dict[str, Any]  # Driver.identity()
    vm_shape: dict[str, Any]  # vm_shape(spec)
    vm_shape_digest: str
    cold_nics: list[str]  # MACs of the NICs on the VM's command line, in order
    plugged: list[PluggedDevice]  # hot-plugged vCPUs and NICs, in order
    memory: MemoryInfo
    vmstate_bytes: int
    containers: list[ContainerEntry] = field(default_factory=list)
    network: NetworkInfo = field(default_factory=NetworkInfo)
    agent_next_stream_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # the shim's own (JSON)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["plugged"] = [d.to_json() for d in self.plugged]
        return out


def _bad(where: str, what: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(f"checkpoint manifest {where}: {what}")


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error line: JSON (control characters escaped), capped."""
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_NOT_STORED = {(PluggedDevice, "fds")}


def _parse(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``, checked all the way down."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, f"is {_show(value)}, not true or false")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(where, f"is {_show(value)}, not an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, f"is {_show(value)}, not a string")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _bad(where, f"is {_show(value)}, not a list")
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _bad(where, f"is {_show(value)}, not an object")
        return {k: _parse(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _bad(where, f"is {_show(value)}, not an object")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp) if (tp, f.name) not in _NOT_STORED]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _bad(where, f"has an unknown field {_show(unknown[0])}")
        missing = [n for n in names if n not in value]
        if missing:
            raise _bad(where, f"lacks the field {missing[0]!r}")
        return tp(**{n: _parse(hints[n], value[n], f"{where}.{n}") for n in names})
    raise TypeError(f"no parser for {tp!r}")  # a field type this module never uses


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {_show(k)}")
        out[k] = v
    return out


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in ``data`` (the file's bytes), strictly checked."""
    if len(data) > MANIFEST_MAX:
        raise _bad(MANIFEST, f"is larger than {MANIFEST_MAX} bytes")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constants,
                         object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(MANIFEST, f"is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(doc, dict):
        raise _bad(MANIFEST, "is not a JSON object")
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise _bad("format", f"is {_show(fmt)}, not an integer")
    if fmt > FORMAT:
        raise errors.FailedPrecondition(
            f"checkpoint format {fmt} is newer than this pykata knows ({FORMAT}):"
            " restore it with the pykata that took it")
    if fmt != FORMAT:
        raise _bad("format", f"{fmt} is not a checkpoint format pykata knows ({FORMAT})")
    m: Manifest = _parse(Manifest, doc, "manifest")
    _check_values(m)
    return m


def _check_values(m: Manifest) -> None:
    """What goes onto a VMM command line or into sizes must be plain: ids,
    buses, types, MACs from a checkpoint a user handed us."""
    import re

    ident = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
    mac = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
    for i, d in enumerate(m.plugged):
        where = f"plugged[{i}]"
        if d.kind not in ("vcpu", "nic", "dimm"):
            raise _bad(f"{where}.kind", f"{_show(d.kind)} is not vcpu, nic or dimm")
        if not ident.fullmatch(d.id):
            raise _bad(f"{where}.id", f"{_show(d.id)} is not a device id")
        if d.kind == "dimm":
            size = d.props.get("size-mib")
            if set(d.props) != {"size-mib"} or size is None or not 0 < size <= 1 << 20:
                raise _bad(f"{where}.props", f"{_show(d.props)} is not a memory size")
        elif d.kind == "vcpu":
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", d.driver):
                raise _bad(f"{where}.driver", f"{_show(d.driver)} is not a CPU type")
            for k, v in d.props.items():
                if not re.fullmatch(r"[a-z][a-z-]{0,31}", k) or not 0 <= v < 65536 or \
                        isinstance(v, bool):
                    raise _bad(f"{where}.props", f"{_show({k: v})} is not a CPU slot property")
        else:
            if not re.fullmatch(r"rp[0-9]{1,2}", d.bus):
                raise _bad(f"{where}.bus", f"{_show(d.bus)} is not a root port")
            if d.mac and not mac.fullmatch(d.mac):
                raise _bad(f"{where}.mac", f"{_show(d.mac)} is not a MAC address")
            if not 1 <= d.queues <= 16:
                raise _bad(f"{where}.queues", f"{d.queues} is not 1 to 16")
    for i, a in enumerate(m.cold_nics):
        if not mac.fullmatch(a):
            raise _bad(f"cold_nics[{i}]", f"{_show(a)} is not a MAC address")
    mem = m.memory
    for name in ("size", "extents", "data_bytes", "pack_bytes"):
        if getattr(mem, name) < 0:
            raise _bad(f"memory.{name}", "is negative")
    if mem.size > MAX_MEMORY_BYTES or mem.size % PAGE:
        raise _bad("memory.size", f"{mem.size} is not a RAM size")
    if m.vmstate_bytes <= 0:
        raise _bad("vmstate_bytes", f"{m.vmstate_bytes} is not a state size")
    for key in ("vcpus", "max_vcpus", "memory", "max_memory", "slots"):
        count = m.vm_shape.get(key)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 1 << 24:
            raise _bad(f"vm_shape.{key}", f"is {_show(count)}, not a count")


# -- the directory ----------------------------------------------------------------------
def open_dir(path: Path, create: bool = False) -> int:
    """An fd of the checkpoint directory ``path`` (made 0700 if absent and
    ``create``); never through a symlink. FailedPrecondition, one line."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        return os.open(path, _DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise errors.FailedPrecondition(
                f"checkpoint directory {path} is not a directory (a symlink or a file)") from None
        raise errors.FailedPrecondition(
            f"cannot open the checkpoint directory {path}: {exc.strerror}") from None


def open_entry(dfd: int, name: str, where: Path) -> int:
    """``name`` in the directory ``dfd``, read-only: a regular file, not a symlink."""
    try:
        # O_NONBLOCK: a FIFO planted there must not block the open.
        fd = os.open(name, _READ | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise errors.FailedPrecondition(
                f"checkpoint file {where / name} is a symlink") from None
        raise errors.FailedPrecondition(
            f"cannot open the checkpoint file {where / name}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.FailedPrecondition(f"checkpoint file {where / name} is not a regular file")
    return fd


def create_entry(dfd: int, name: str, where: Path, flags: int = os.O_WRONLY) -> int:
    """A new file ``name`` (0600) in the directory ``dfd``; refused if anything
    (a file, a symlink) already has that name."""
    try:
        return os.open(name, flags | _NEW, 0o600, dir_fd=dfd)
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"cannot create the checkpoint file {where / name}: {exc.strerror}") from None


def _read_bounded(fd: int, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of ``fd`` (so a caller sees "too large")."""
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        b = os.read(fd, min(left, 1 << 16))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def read_manifest(path: Path) -> Manifest:
    """The manifest of the checkpoint in directory ``path``: bounded, every field
    type-checked, an unknown format refused; FailedPrecondition in one line."""
    dfd = open_dir(path)
    try:
        return _read_manifest(dfd, path)
    finally:
        os.close(dfd)


def _read_manifest(dfd: int, path: Path) -> Manifest:
    try:
        fd = open_entry(dfd, MANIFEST, path)
    except errors.FailedPrecondition as exc:
        if not os.path.lexists(path / MANIFEST):
            raise errors.FailedPrecondition(
                f"{path} holds no pykata checkpoint (no {MANIFEST}): the checkpoint is"
                " incomplete or was not taken by pykata") from None
        raise exc from None
    try:
        if os.fstat(fd).st_size > MANIFEST_MAX:
            raise _bad(MANIFEST, f"is larger than {MANIFEST_MAX} bytes")
        data = _read_bounded(fd, MANIFEST_MAX)
    finally:
        os.close(fd)
    return parse_manifest(data)


def check_files(path: Path, m: Manifest) -> None:
    """The state and RAM files are there, regular, not symlinks, of the sizes
    the manifest gives (a truncated copy is refused before any VMM starts)."""
    dfd = open_dir(path)
    try:
        for name, want in ((VMSTATE, m.vmstate_bytes), (MEMORY, m.memory.pack_bytes)):
            fd = open_entry(dfd, name, path)
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size != want:
                raise errors.FailedPrecondition(
                    f"checkpoint file {path / name} has {size} bytes, the manifest says"
                    f" {want}: the checkpoint is truncated or damaged")
    finally:
        os.close(dfd)


# -- what the host must match ---------------------------------------------------------
def _file_id(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    real = os.path.realpath(path)
    try:
        return [real, os.stat(real).st_size]
    except OSError:
        return [real, -1]


def vm_shape(spec: VMSpec) -> dict[str, Any]:
    """Everything of a VMSpec that shapes its saved state (not the host's fds,
    directories or hot-plugged devices, which the manifest keeps apart)."""
    return {
        "kernel": _file_id(spec.kernel), "initrd": _file_id(spec.initrd),
        "image": _file_id(spec.image),
        "image_device": spec.image_device if spec.image else None,
        "image_offset": spec.image_offset if spec.image else 0,
        "vcpus": spec.vcpus, "max_vcpus": spec.max_vcpus, "memory": spec.memory_mib,
        "max_memory": spec.max_memory_mib, "slots": spec.memory_slots,
        "params": spec.kernel_params, "channel": spec.agent_channel, "debug": spec.debug,
        "free_page_reporting": spec.free_page_reporting,
    }


def shape_digest(shape: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def restore_spec(m: Manifest, host: VMSpec) -> VMSpec:
    """The VMSpec a restore starts: the host's own (paths, directories, channel
    ids: never a path from the checkpoint) with the checkpointed VM's size and
    its hot-plugged devices; ``incoming``. The caller still sets
    ``memory_file`` (boot.restore does) and the NICs' fds."""
    s = m.vm_shape
    return dataclasses.replace(
        host, vcpus=int(s["vcpus"]), max_vcpus=int(s["max_vcpus"]),
        memory_mib=int(s["memory"]), max_memory_mib=int(s["max_memory"]),
        memory_slots=int(s["slots"]), shared_fs_socket=None, incoming=True, nics=[],
        checkpointable=True,
        restore_devices=[dataclasses.replace(d, fds=[]) for d in m.plugged])


def guest_image(config: Config) -> GuestImage:
    """The guest image this host boots ([image] output_dir/manifest.json)."""
    p = Path(config.image.output_dir) / "manifest.json"
    try:
        with open(p, "rb") as f:
            doc = json.loads(f.read(MANIFEST_MAX))
        return GuestImage(str(doc.get("digest", "")), str(doc.get("kernel_release", "")))
    except (OSError, ValueError, AttributeError):
        return GuestImage()


def _first_difference(ckpt: dict[str, Any], host: dict[str, Any]) -> str:
    for k in sorted(set(ckpt) | set(host)):
        if ckpt.get(k) != host.get(k):
            return k
    return ""


def check_compatible(m: Manifest, *, image: GuestImage, vmm: dict[str, str],
                     identity: dict[str, Any], spec: VMSpec) -> None:
    """Refuse (FailedPrecondition, one line naming the field, the checkpoint's
    value and this host's) a checkpoint this host cannot restore: another
    format, guest image, VMM version, driver identity (binary, machine,
    accelerator...) or VM shape (``spec``: what :func:`restore_spec` gives)."""

    def refuse(what: str, theirs: Any, ours: Any, advice: str) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            f"cannot restore checkpoint of sandbox {m.sandbox_id}: {what} is {_show(theirs)}"
            f" in the checkpoint, {_show(ours)} on this host: {advice}")

    if m.format != FORMAT:
        raise refuse("format", m.format, FORMAT, "restore it with the pykata that took it")
    if m.guest_image.digest != image.digest:
        raise refuse("guest_image.digest", m.guest_image.digest, image.digest,
                     "build that image (pykata image build at the commit that took it)"
                     " or checkpoint again")
    key = _first_difference(m.vmm, vmm)
    if key:
        raise refuse(f"vmm.{key}", m.vmm.get(key), vmm.get(key),
                     "restore with the same hypervisor version")
    key = _first_difference(m.driver_identity, identity)
    if key:
        raise refuse(f"driver_identity.{key}", m.driver_identity.get(key), identity.get(key),
                     "restore with the same hypervisor binary and settings")
    shape = vm_shape(spec)
    if shape_digest(shape) != m.vm_shape_digest or shape != m.vm_shape:
        key = _first_difference(m.vm_shape, shape) or "digest"
        raise refuse(f"vm_shape.{key}", m.vm_shape.get(key, m.vm_shape_digest),
                     shape.get(key, shape_digest(shape)),
                     "restore with the same guest files and VM settings")


async def check_host(m: Manifest, path: Path, config: Config, driver: Driver,
                     spec: VMSpec) -> None:
    """:func:`check_compatible` against this host, then :func:`check_files`."""
    check_compatible(m, image=guest_image(config), vmm=await driver.version(),
                     identity=driver.identity(), spec=spec)
    await asyncio.to_thread(check_files, path, m)


# -- eligibility ---------------------------------------------------------------------
def eligible(sb: Sandbox) -> str:
    """Why sandbox ``sb`` cannot be checkpointed ("" = it can), one line."""
    if sb.failure:
        return f"it failed: {sb.failure}"
    vm = sb.vm
    if vm is None:
        return "it has no VM"
    if sb.virtiofsd is not None:
        return ("its VM has a virtio-fs device (QEMU 7.2 cannot save vhost-user-fs);"
                " use shared_fs = \"none\" with guest-pulled images")
    return vm.saveable()


# -- packed RAM ----------------------------------------------------------------------
def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every data extent of ``fd`` below ``size`` (SEEK_DATA
    and SEEK_HOLE: a file system without holes gives one extent)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


def _copy(fin: int, fout: int, src_off: int, dst_off: int, length: int) -> None:
    """``length`` bytes from ``fin`` at ``src_off`` to ``fout`` at ``dst_off``:
    in the kernel where it can, else by bounded reads. A source that ends
    early is an error (a truncated pack, a shrunk RAM file)."""
    done = 0
    kernel = True
    while done < length:
        want = length - done
        if kernel:
            try:
                n = os.copy_file_range(fin, fout, want, src_off + done, dst_off + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                     errno.EOPNOTSUPP):
                    raise
                kernel = False
                continue
        else:
            b = os.pread(fin, min(want, CHUNK), src_off + done)
            n = os.pwrite(fout, b, dst_off + done) if b else 0
        if n == 0:
            raise errors.FailedPrecondition(
                f"the source ended {length - done} bytes early (at {src_off + done})")
        done += n


def pack_fd(src: int, out: int) -> MemoryInfo:
    """Pack the RAM file ``src`` into the new, empty file ``out``; what was packed."""
    size = os.fstat(src).st_size
    extents = data_extents(src, size)
    if len(extents) > MAX_EXTENTS:
        raise errors.ResourceExhausted(
            f"the RAM file has {len(extents)} data extents, more than {MAX_EXTENTS}")
    table = b"".join(_EXTENT.pack(o, n) for o, n in extents)
    head = _HEAD.pack(PACK_MAGIC, size, len(extents)) + table
    os.pwrite(out, head, 0)
    pos = len(head)
    for o, n in extents:
        _copy(src, out, o, pos, n)
        pos += n
    os.fsync(out)
    return MemoryInfo(size=size, extents=len(extents),
                      data_bytes=sum(n for _, n in extents), pack_bytes=pos)


def read_pack_table(fd: int, expect: MemoryInfo | None = None) -> tuple[int, list[tuple[int, int]]]:
    """(RAM size, extents) of the pack ``fd``, checked against its own length
    (and ``expect``, the manifest's figures): a truncated, padded or
    inconsistent pack is refused (FailedPrecondition) before anything is written."""
    total = os.fstat(fd).st_size

    def bad(why: str) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(f"packed RAM {MEMORY} is damaged: {why}")

    head = os.pread(fd, _HEAD.size, 0)
    if len(head) != _HEAD.size:
        raise bad(f"{total} bytes, shorter than its header")
    magic, size, count = _HEAD.unpack(head)
    if magic != PACK_MAGIC:
        raise bad("no PYKRAM1 header")
    if size > MAX_MEMORY_BYTES:
        raise bad(f"a RAM size of {size} bytes")
    if count > MAX_EXTENTS or count > size // PAGE + 1:
        raise bad(f"{count} extents for {size} bytes of RAM")
    start = _HEAD.size + count * _EXTENT.size
    if total < start:
        raise bad(f"{total} bytes, shorter than its extent table")
    raw = b""
    while len(raw) < count * _EXTENT.size:
        b = os.pread(fd, min(count * _EXTENT.size - len(raw), CHUNK), _HEAD.size + len(raw))
        if not b:
            raise bad("its extent table ends early")
        raw += b
    extents = [_EXTENT.unpack_from(raw, i * _EXTENT.size) for i in range(count)]
    end = 0
    data = 0
    for i, (o, n) in enumerate(extents):
        if n == 0 or o < end or o + n > size:
            raise bad(f"extent {i} ({o}, {n}) overlaps, is empty or lies past {size}")
        end = o + n
        data += n
    if start + data != total:
        raise bad(f"{total} bytes, but its table says {start + data}"
                  " (truncated or padded)")
    if expect is not None and (expect.size, expect.extents, expect.data_bytes,
                               expect.pack_bytes) != (size, count, data, total):
        raise bad(f"size {size}, {count} extents, {data} data bytes, {total} bytes; the"
                  f" manifest says {expect.size}, {expect.extents}, {expect.data_bytes},"
                  f" {expect.pack_bytes}")
    return size, extents


def unpack_fd(src: int, out: int, expect: MemoryInfo | None = None) -> MemoryInfo:
    """Unpack the pack ``src`` into the new, empty file ``out`` (sized, the
    extents written where they were: holes stay holes)."""
    size, extents = read_pack_table(src, expect)
    os.ftruncate(out, size)
    pos = _HEAD.size + len(extents) * _EXTENT.size
    for o, n in extents:
        _copy(src, out, pos, o, n)
        pos += n
    return MemoryInfo(size=size, extents=len(extents),
                      data_bytes=sum(n for _, n in extents), pack_bytes=pos)


def _with_files(src: Path, dst: Path, work: Callable[[int, int], MemoryInfo]) -> MemoryInfo:
    fin = os.open(src, _READ | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fin).st_mode):
            raise errors.FailedPrecondition(f"{src} is not a regular file")
        fout = os.open(dst, os.O_RDWR | _NEW, 0o600)
        try:
            return work(fin, fout)
        except BaseException:
            os.close(fout)
            fout = -1
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        finally:
            if fout >= 0:
                os.close(fout)
    finally:
        os.close(fin)


def pack_memory(src_path: Path, dst_path: Path) -> MemoryInfo:
    """Pack the RAM file ``src_path`` into the new file ``dst_path`` (O_EXCL,
    0600; neither followed if a symlink); removed again on error."""
    return _with_files(src_path, dst_path, pack_fd)


def unpack_memory(src_path: Path, dst_path: Path,
                  expect: MemoryInfo | None = None) -> MemoryInfo:
    """Unpack ``src_path`` into the new RAM file ``dst_path`` (O_EXCL, 0600);
    a damaged pack is refused in one line and ``dst_path`` is not left."""
    return _with_files(src_path, dst_path, lambda i, o: unpack_fd(i, o, expect))


# -- taking a checkpoint --------------------------------------------------------------
class _DumpLog:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._t = time.monotonic()

    def phase(self, what: str) -> None:
        now = time.monotonic()
        self.lines.append(f"{what}: {now - self._t:.3f}s\n")
        self._t = now


async def settle(sb: Sandbox, timeout: float = 8.0) -> None:
    """Wait (bounded) until the guest's free page reporting has punched what it
    freed out of the RAM file (it stops shrinking): a smaller checkpoint."""
    from pykata.runtime.factory import _settle_reporting

    vm = sb.vm
    if vm is not None and vm.spec.memory_file is not None and vm.spec.free_page_reporting:
        await _settle_reporting(vm.spec.memory_file, timeout)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


async def save(sb: Sandbox, dest: Path, *, containers: list[ContainerEntry] | None = None,
               next_stream_id: int = 0, network: NetworkInfo | None = None,
               extra: dict[str, Any] | None = None) -> Manifest:
    """Checkpoint the VM of ``sb`` (quiesced by the caller) into directory
    ``dest`` (made 0700 if absent; none of the checkpoint's files may exist in
    it). Returns the manifest with the VM **stopped**: the caller resumes it
    (``sb.vm.resume()``) or tears it down. On error, what was written in
    ``dest`` is removed, a VM stopped here is resumed, and one line is raised."""
    why = eligible(sb)
    if why:
        raise errors.FailedPrecondition(f"cannot checkpoint sandbox {sb.id}: {why}")
    vm = sb.vm
    assert vm is not None and vm.spec.memory_file is not None
    dlog = _DumpLog()
    dfd = open_dir(dest, create=True)
    written: list[str] = []
    stopped = False
    try:
        info = await vm.checkpoint_info()
        plugged = [_plugged_from(d) for d in info.pop("plugged", [])]
        driver_identity, vmm = await _driver_facts(sb)
        dlog.phase("checkpoint_info")
        fd = create_entry(dfd, VMSTATE, dest)
        written.append(VMSTATE)
        try:
            stopped = True  # save_to stops the VM before it writes
            await vm.save_to(fd)
            await asyncio.to_thread(os.fsync, fd)
            vmstate_bytes = os.fstat(fd).st_size
        finally:
            os.close(fd)
        dlog.phase("vmstate")
        mem_src = os.open(vm.spec.memory_file, _READ)
        try:
            out = create_entry(dfd, MEMORY, dest, os.O_RDWR)
            written.append(MEMORY)
            try:
                memory = await asyncio.to_thread(pack_fd, mem_src, out)
            finally:
                os.close(out)
        finally:
            os.close(mem_src)
        dlog.phase(f"memory ({memory.data_bytes >> 20} MiB in {memory.extents} extents)")
        shape = vm_shape(vm.spec)
        m = Manifest(
            format=FORMAT, created=datetime.now(UTC).isoformat(timespec="seconds"),
            pykata_version=__version__, sandbox_id=sb.id, namespace=sb.namespace,
            guest_image=guest_image(sb.config), vmm=vmm, vmm_info=info,
            driver_identity=driver_identity, vm_shape=shape,
            vm_shape_digest=shape_digest(shape),
            cold_nics=[n.mac for n in vm.spec.nics], plugged=plugged, memory=memory,
            vmstate_bytes=vmstate_bytes, containers=list(containers or []),
            network=network or pod_network(sb), agent_next_stream_id=next_stream_id,
            extra=dict(extra or {}))
        body = json.dumps(m.to_json(), sort_keys=True, indent=1).encode() + b"\n"
        parse_manifest(body)  # what we write, we can read back
        for name, data in ((INVENTORY, INVENTORY_TEXT), (DUMP_LOG, "".join(dlog.lines).encode())):
            fd = create_entry(dfd, name, dest)
            written.append(name)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        fd = create_entry(dfd, MANIFEST, dest)
        written.append(MANIFEST)
        try:
            _write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(dfd)
        return m
    except BaseException as exc:
        for name in reversed(written):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
        if stopped:
            try:
                await vm.resume()
            except errors.PykataError as again:
                log.error("sandbox %s: cannot resume its VM after a failed checkpoint: %s",
                          sb.id, again)
        if isinstance(exc, OSError):
            raise errors.Internal(
                f"cannot checkpoint sandbox {sb.id} into {dest}: {exc.strerror or exc}"
            ) from None
        raise
    finally:
        os.close(dfd)


def pod_network(sb: Sandbox) -> NetworkInfo:
    """The pod's interfaces as the guest was given them, and its netns."""
    net = getattr(sb, "network", None)
    if net is None:
        return NetworkInfo(netns=getattr(sb, "netns", "") or "")
    return NetworkInfo(netns=net.netns, interfaces=[
        Interface(ep.name, ep.mac, [f"{addr}/{plen}" for _, addr, plen in ep.addresses])
        for ep in net.endpoints])


def _plugged_from(d: Any) -> PluggedDevice:
    return _parse(PluggedDevice, dict(d), "plugged")  # type: ignore[no-any-return]


async def _driver_facts(sb: Sandbox) -> tuple[dict[str, Any], dict[str, str]]:
    from pykata.hypervisor import make_driver

    driver = sb.parts.driver or await make_driver(sb.config)
    return driver.identity(), await driver.version()
