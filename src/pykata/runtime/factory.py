"""VM templating: boot once, then start every sandbox as a copy.

A template VM boots the guest image with its RAM in a file on tmpfs, waits
until the agent answers, and is saved (device state to a file; RAM stays in
the memory file, QEMU's ``x-ignore-shared``). A sandbox then starts QEMU with
``-incoming``, its own sparse copy of that memory file and the saved state:
the guest resumes where the template stopped, with the agent already up.

What a template cannot carry is added per clone after the restore: the
virtio-fs device (vhost-user-fs cannot be migrated; it is hot-plugged on a
PCIe root port), the pod's NICs (hot-plugged with their tap fds), the clock
(SetGuestDateTime) and the entropy pool (the agent reseeds from CreateSandbox).

Each clone gets a private copy of the RAM file rather than a copy-on-write
mapping of the template's: virtiofsd maps guest RAM through the file, and a
private mapping would hide the guest's writes from it. Only the pages the
template touched are copied (the file is sparse).

A template is keyed by everything that shapes its saved state (kernel,
initrd, QEMU binary, vCPUs, memory, machine, kernel command line, root
ports); a sandbox whose shape differs boots cold. Creation is serialised
with a file lock, so concurrent sandboxes build it once.

Files: everything lives in root-only directories (0700, owned by root, made
with mkdir and checked with lstat before each use, every directory above them
root's and writable by nobody else unless sticky): ``[factory] template_path``
holds ``lock``, the template in ``current/`` and, while one is built,
``build/``; each clone's RAM is ``<state dir>/vm/<sandbox>.mem``. Files are
created ``O_EXCL|O_NOFOLLOW``, 0600. QEMU (unprivileged) never opens them by
path: the driver hands it fds (RAM files are given to the uid the VM leased
while it runs: the template build and each clone lease their own; the
template's goes back to root once saved, before any clone copies it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.config import Config
from pykata.hypervisor import make_driver
from pykata.hypervisor.base import Driver, VMSpec
from pykata.runtime.dial import dial_agent
from pykata.runtime.sizing import vm_spec
from pykata.runtime.state import DEFAULT_NAMESPACE
from pykata.utils.process import tail

log = logging.getLogger(__name__)

CLONE_MEMORY_SUBDIR = "vm"  # <state dir>/vm/<sandbox>.mem: each clone's RAM
CURRENT = "current"
BUILD = "build"
OLD = "old"
LOCK = "lock"
META = "template.json"
MEMORY = "memory"
STATE = "state"

_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _unsafe_above(path: Path) -> str:
    """Why someone other than root could swap ``path``'s parents ("" if nobody
    can): each directory up to / must be root's and not group/world writable
    (unless sticky, like /dev/shm), and no symlink on the way may be another's."""
    me = os.geteuid()
    prefix = Path("/")
    for part in path.parent.parts[1:]:
        prefix = prefix / part
        st = os.lstat(prefix)
        if stat.S_ISLNK(st.st_mode) and st.st_uid != me:
            return f"{prefix} is a symlink owned by uid {st.st_uid}"
    real = Path(os.path.realpath(path.parent))
    for d in (*reversed(real.parents), real):
        st = os.stat(d)
        if st.st_uid != me:
            return f"{d} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{d} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def private_dir(path: Path, create: bool = True) -> Path:
    """``path`` as a directory only root can use: made (0700, and its missing
    parents 0755) if absent and ``create``; refused (FailedPrecondition) if it
    is a symlink, not a directory, not root's or not mode 0700, or if a
    directory above it could be changed by another user."""
    path = Path(os.path.abspath(path))
    if create:
        missing = [p for p in (path.parent, *path.parent.parents) if not os.path.lexists(p)]
        for p in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(p, 0o755)
    why = _unsafe_above(path)
    if not why:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            why = f"{path} is not a directory (a symlink or a file)"
        elif st.st_uid != os.geteuid():
            why = f"{path} is owned by uid {st.st_uid}"
        elif stat.S_IMODE(st.st_mode) != 0o700:
            why = f"{path} has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    if why:
        raise errors.FailedPrecondition(
            f"refusing to keep VM memory in {path}: {why}. Use a directory only root can"
            f" change (e.g. under /run/pykata), or remove {path} so it is made again")
    return path


def create_private_file(path: Path, flags: int = os.O_RDWR) -> int:
    """A new file (O_EXCL|O_NOFOLLOW, 0600): its fd."""
    return os.open(path, flags | _NEW_FILE, 0o600)


def _file_id(path: Path) -> list[Any]:
    real = Path(os.path.realpath(path))
    st = real.stat()
    return [str(real), st.st_size, st.st_mtime_ns]


def template_key(spec: VMSpec, identity: dict[str, Any]) -> str:
    """A digest of everything that shapes a template's saved state: the VM's
    shape and the driver's ``identity()`` (binary, machine, accelerator...)."""
    shape = {
        "kernel": _file_id(spec.kernel),
        "initrd": _file_id(spec.initrd) if spec.initrd else None,
        "image": _file_id(spec.image) if spec.image else None,
        "image_device": spec.image_device if spec.image else None,
        "vcpus": spec.vcpus, "max_vcpus": spec.max_vcpus, "memory": spec.memory_mib,
        "max_memory": spec.max_memory_mib, "slots": spec.memory_slots,
        "params": spec.kernel_params, "channel": spec.agent_channel, "debug": spec.debug,
        "free_page_reporting": spec.free_page_reporting,
        "driver": identity,
        "format": 3,  # 3: the driver's identity; 2: RAM and state passed to QEMU as fds
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def eligible(spec: VMSpec) -> str:
    """Why ``spec`` cannot start from a template ("" = it can)."""
    if spec.initrd is None:
        return "templating needs an initrd (the guest root, or the early one of a root image)"
    if spec.image is not None and spec.image_device == "virtio-blk":
        return "templating cannot carry a virtio-blk root disk (use rootfs_device = nvdimm)"
    if spec.agent_channel != "serial":
        return "templating needs the virtio-serial agent channel (clones would share a vsock CID)"
    return ""


def clone_memory_path(state_dir: str | Path, sandbox_id: str) -> Path:
    """Where the clone ``sandbox_id`` keeps its RAM; the directory is made (or
    checked) root-only here."""
    return private_dir(Path(state_dir) / CLONE_MEMORY_SUBDIR) / f"{sandbox_id}.mem"


def clone_memory_files(state_dir: str | Path, sandbox_id: str = "") -> list[Path]:
    """Clone RAM files of sandboxes under ``state_dir`` (or of one sandbox)."""
    d = Path(state_dir) / CLONE_MEMORY_SUBDIR
    if not d.is_dir() or d.is_symlink():
        return []
    return sorted(p for p in d.iterdir() if p.name.endswith(".mem")
                  and (not sandbox_id or p.name == f"{sandbox_id}.mem"))


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy only the data extents of ``src`` (tmpfs keeps holes) into a new file
    ``dst`` (0600, not through a symlink; a stale one of ours is replaced);
    bytes copied."""
    copied = 0
    try:
        out = create_private_file(dst, os.O_WRONLY)
    except FileExistsError:
        os.unlink(dst)
        out = create_private_file(dst, os.O_WRONLY)
    with open(out, "wb") as fout, open(src, "rb", opener=_nofollow) as fin:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            copied += _copy_range(fin.fileno(), fout.fileno(), start, end)
            pos = end
    return copied


def _copy_range(fin: int, fout: int, start: int, end: int) -> int:
    """Bytes [start, end) of ``fin`` to the same offsets of ``fout``: in the kernel
    where it can (copy_file_range), else (across file systems) read and write."""
    off = start
    while off < end:
        try:
            n = os.copy_file_range(fin, fout, end - off, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(fout, os.pread(fin, min(end - off, 1 << 20), off), off)
        if n == 0:
            break
        off += n
    return off - start


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


@dataclass
class Template:
    dir: Path
    key: str
    created: float = 0.0
    boot_seconds: float = 0.0
    memory_bytes: int = 0  # data in the memory file

    @property
    def memory(self) -> Path:
        return self.dir / MEMORY

    @property
    def state(self) -> Path:
        return self.dir / STATE

    def complete(self) -> bool:
        return self.memory.is_file() and self.state.is_file()


class Factory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = Path(os.path.abspath(config.factory.template_path))

    def _dir(self, create: bool) -> Path | None:
        """The template directory, checked (None if absent and not ``create``)."""
        if not create and not os.path.lexists(self.root):
            return None
        return private_dir(self.root, create=create)

    def current(self) -> Template | None:
        root = self._dir(create=False)
        if root is None:
            return None
        d = root / CURRENT
        try:
            with open(d / META, opener=_nofollow) as f:
                data = json.load(f)
            t = Template(d, **{k: data[k] for k in ("key", "created", "boot_seconds",
                                                    "memory_bytes")})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return t if t.complete() else None

    @contextlib.contextmanager
    def _locked(self, root: Path) -> Iterator[None]:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def ensure(self, spec: VMSpec, driver: Driver) -> Template:
        """The template for ``spec``'s shape, built now if there is none (or a stale one)."""
        key = template_key(spec, driver.identity())
        t = self.current()
        if t is not None and t.key == key:
            return t
        root = self._dir(create=True)
        assert root is not None
        lock = self._locked(root)
        await asyncio.to_thread(lock.__enter__)
        try:
            t = self.current()
            if t is not None and t.key == key:
                return t
            return await self._build(root, spec, driver, key)
        finally:
            lock.__exit__(None, None, None)

    async def _build(self, root: Path, spec: VMSpec, driver: Driver, key: str) -> Template:
        """Boot, wait for the agent, save. Replaces any older template."""
        work = root / BUILD
        _rmtree(work)
        os.mkdir(work, 0o700)
        os.close(create_private_file(work / MEMORY))  # QEMU sizes it
        tspec = dataclasses.replace(
            spec, id="template", run_dir=work / "run", shared_fs_socket=None, nics=[],
            memory_file=work / MEMORY, incoming=False)
        vm = driver.vm(tspec)
        t0 = time.monotonic()
        try:
            await vm.prepare()
            await vm.start()
            agent = await dial_agent(vm, float(self.config.agent.dial_timeout))
            try:
                # The guest is idle once the agent answers; let its boot-time
                # work (module loading) finish so clones don't redo it.
                await agent.guest_details()
                booted = time.monotonic() - t0
                if tspec.free_page_reporting:
                    await _settle_reporting(work / MEMORY)
                await vm.save(work / STATE)
            finally:
                await agent.close()
        except errors.PykataError as exc:
            console = tail(tspec.console_log, 3)
            raise errors.VMLaunchError(
                f"cannot build the VM template in {work}: {exc}",
                console_tail=console) from exc
        finally:
            await vm.stop(timeout=2.0)
            _rmtree(work / "run")
        # QEMU's user had the RAM file while it ran; saved, it is root's again.
        fd = os.open(work / MEMORY, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, os.geteuid(), os.getegid())
        finally:
            os.close(fd)
        t = Template(root / CURRENT, key, time.time(), round(booted, 3),
                     _allocated(work / MEMORY))
        fd = create_private_file(work / META, os.O_WRONLY)
        with open(fd, "w") as f:
            json.dump(dataclasses.asdict(t) | {"dir": str(t.dir)}, f)
        old = root / OLD
        _rmtree(old)
        with contextlib.suppress(FileNotFoundError):
            os.rename(root / CURRENT, old)
        os.rename(work, root / CURRENT)
        _rmtree(old)
        log.info("VM template %s built in %.2fs (%d MiB of RAM saved)", key, booted,
                 t.memory_bytes >> 20)
        return t

    def destroy(self) -> bool:
        """Remove the template (clones keep running: they have their own RAM)."""
        root = self._dir(create=False)
        if root is None:
            return False
        with self._locked(root):
            found = (root / CURRENT).exists()
            for name in (CURRENT, BUILD, OLD):
                _rmtree(root / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(root / LOCK)
        with contextlib.suppress(OSError):
            os.rmdir(root)
        return found


def _rmtree(path: Path) -> None:
    """Remove a tree of ours (never follows a symlink); nothing if absent."""
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def _settle_reporting(memory: Path, timeout: float = 8.0) -> None:
    """Wait (bounded) until the guest's free page reporting has handed back what
    boot freed (the initrd image, boot-time buffers): the RAM file stops shrinking.
    Every clone then copies less. The guest reports after about 2 s of quiet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, stable_since = _allocated(memory), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.25)
        now = _allocated(memory)
        if now < last:
            last, stable_since = now, loop.time()
        elif loop.time() - stable_since >= 3.0:
            break


async def init_template(config: Config) -> Template:
    """Build (or find) the VM template a default-sized sandbox starts from."""
    driver = await make_driver(config)
    state = Path(config.runtime.state_dir)
    spec = vm_spec(config, "template-init", DEFAULT_NAMESPACE, state / "template-init",
                   channel=driver.agent_channel(config.vm.agent_channel))
    why = eligible(spec)
    if why:
        raise errors.FailedPrecondition(f"cannot build a VM template: {why}")
    return await Factory(config).ensure(spec, driver)
