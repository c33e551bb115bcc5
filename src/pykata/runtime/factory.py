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
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.agent import AgentClient
from pykata.config import Config
from pykata.hypervisor.base import VMSpec
from pykata.hypervisor.qemu import QemuHypervisor
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.ttrpc import Client
from pykata.utils.process import tail

log = logging.getLogger(__name__)

# Each clone's RAM file (tmpfs): <crc of the state dir>-<sandbox id>.mem
CLONE_MEMORY_DIR = Path("/dev/shm/pykata-vm")
META = "template.json"
MEMORY = "memory"
STATE = "state"


def _file_id(path: Path) -> list[Any]:
    real = Path(os.path.realpath(path))
    st = real.stat()
    return [str(real), st.st_size, st.st_mtime_ns]


def template_key(spec: VMSpec, binary: str, options: QemuOptions) -> str:
    """A digest of everything that shapes a template's saved state."""
    shape = {
        "kernel": _file_id(spec.kernel),
        "initrd": _file_id(spec.initrd) if spec.initrd else None,
        "qemu": _file_id(Path(binary)),
        "vcpus": spec.vcpus, "max_vcpus": spec.max_vcpus, "memory": spec.memory_mib,
        "max_memory": spec.max_memory_mib, "slots": spec.memory_slots,
        "params": spec.kernel_params, "channel": spec.agent_channel, "debug": spec.debug,
        "accel": options.accel, "cpu": options.cpu_model, "machine": options.machine_type,
        "machine_options": options.machine_options, "tb_size": options.tb_size_mib,
        "root_ports": options.pcie_root_ports, "extra": list(options.extra_args),
        "free_page_reporting": spec.free_page_reporting,
        "format": 1,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def eligible(spec: VMSpec) -> str:
    """Why ``spec`` cannot start from a template ("" = it can)."""
    if spec.initrd is None or spec.image is not None:
        return "templating needs an initrd guest image"
    if spec.agent_channel != "serial":
        return "templating needs the virtio-serial agent channel (clones would share a vsock CID)"
    return ""


def clone_memory_path(state_dir: str | Path, sandbox_id: str) -> Path:
    return CLONE_MEMORY_DIR / f"{zlib.crc32(str(state_dir).encode()):08x}-{sandbox_id}.mem"


def clone_memory_files(state_dir: str | Path, sandbox_id: str = "") -> list[Path]:
    """Clone RAM files of sandboxes under ``state_dir`` (or of one sandbox)."""
    prefix = f"{zlib.crc32(str(state_dir).encode()):08x}-"
    if not CLONE_MEMORY_DIR.is_dir():
        return []
    return sorted(p for p in CLONE_MEMORY_DIR.iterdir() if p.name.startswith(prefix)
                  and (not sandbox_id or p.name == f"{prefix}{sandbox_id}.mem"))


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy only the data extents of ``src`` (tmpfs keeps holes); bytes copied."""
    copied = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
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
            off_in, off_out = start, start
            while off_in < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - off_in,
                                       off_in, off_out)
                if n == 0:
                    break
                off_in += n
                off_out += n
                copied += n
            pos = end
    return copied


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
        self.root = Path(config.factory.template_path)

    def current(self) -> Template | None:
        try:
            data = json.loads((self.root / META).read_text())
            t = Template(self.root, **{k: data[k] for k in ("key", "created", "boot_seconds",
                                                            "memory_bytes")})
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return t if t.complete() else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.root}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def ensure(self, spec: VMSpec, binary: str, options: QemuOptions) -> Template:
        """The template for ``spec``'s shape, built now if there is none (or a stale one)."""
        key = template_key(spec, binary, options)
        t = self.current()
        if t is not None and t.key == key:
            return t
        lock = self._locked()
        await asyncio.to_thread(lock.__enter__)
        try:
            t = self.current()
            if t is not None and t.key == key:
                return t
            return await self._build(spec, binary, options, key)
        finally:
            lock.__exit__(None, None, None)

    async def _build(self, spec: VMSpec, binary: str, options: QemuOptions,
                     key: str) -> Template:
        """Boot, wait for the agent, save. Replaces any older template."""
        work = self.root.with_name(f"{self.root.name}.new")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        tspec = dataclasses.replace(
            spec, id="template", run_dir=work / "run", shared_fs_socket=None, nics=[],
            memory_file=work / MEMORY, incoming=False)
        vm = QemuHypervisor(tspec, binary, options)
        t0 = time.monotonic()
        try:
            await vm.prepare()
            await vm.start()
            reader, writer = await vm.agent_channel().connect(
                float(self.config.agent.dial_timeout))
            agent = AgentClient(Client(reader, writer))
            try:
                await agent.check(timeout=float(self.config.agent.dial_timeout))
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
            shutil.rmtree(work / "run", ignore_errors=True)
        t = Template(self.root, key, time.time(), round(booted, 3),
                     _allocated(work / MEMORY))
        (work / META).write_text(json.dumps(dataclasses.asdict(t) | {"dir": str(self.root)}))
        old = self.root.with_name(f"{self.root.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if self.root.exists():
            os.replace(self.root, old)
        os.replace(work, self.root)
        shutil.rmtree(old, ignore_errors=True)
        log.info("VM template %s built in %.2fs (%d MiB of RAM saved)", key, booted,
                 t.memory_bytes >> 20)
        return t

    def destroy(self) -> bool:
        """Remove the template (clones keep running: they have their own RAM)."""
        with self._locked():
            found = self.root.exists()
            for d in (self.root, self.root.with_name(f"{self.root.name}.new"),
                      self.root.with_name(f"{self.root.name}.old")):
                shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.root}.lock")
        return found


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
