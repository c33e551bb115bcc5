"""virtio-fs: one virtiofsd per sandbox, sharing the sandbox's shared directory.

The host mounts container root filesystems and bind-mount sources below the
shared directory (``<sandbox>/shared/<container>/...``); the guest mounts the
whole tree once (tag ``pykata.wire.SHARED_FS_TAG``) at ``pykata.wire.GUEST_SHARED_DIR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from pykata import errors
from pykata.utils.logfile import CappedLog, drain
from pykata.utils.process import ProcRef, stop_child, tail
from pykata.utils.unixsock import addressable

log = logging.getLogger(__name__)


def _parent_death_signal() -> Callable[[], None]:
    """A function for the child, between fork and exec: SIGKILL when its owner
    dies. virtiofsd waits for its one connection forever; an owner killed before
    it recorded the pid (the shim, SIGKILLed while the sandbox starts) would
    otherwise leave it behind. libc is looked up here, in the parent: the child
    only calls it."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the owner died before the prctl
            os._exit(1)

    return child


_PR_SET_PDEATHSIG = 1


@functools.lru_cache(maxsize=8)
def _help_text(binary: str, mtime_ns: int) -> str:
    try:
        out = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def namespace_sandbox_supported(binary: str) -> bool:
    """Whether this virtiofsd has ``-o sandbox=namespace`` (asked once per binary)."""
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError:
        return False
    return "sandbox=namespace" in _help_text(binary, mtime)


class VirtioFsDaemon:
    """virtiofsd for one sandbox: root (it must be), in its own sandbox
    (``namespace``: mount, pid and net namespaces with pivot_root into the
    shared tree; else ``chroot``), xattrs only when asked for, its output in a
    capped log, listening on a 0600 socket in the root-only sandbox directory
    (the QEMU driver connects; QEMU gets the connected fd)."""

    def __init__(self, binary: str, source: Path, socket_path: Path, log_path: Path,
                 cache: str = "auto", extra_args: list[str] | None = None,
                 sandbox: str = "auto", xattr: bool = False,
                 log_max_bytes: int = 1 << 20,
                 setting: str = "[hypervisor.qemu] virtio_fs_daemon") -> None:
        self.binary = binary
        self.setting = setting  # where the binary is configured, for the error
        self.source = source
        self.socket_path = socket_path
        self.log_path = log_path
        self.cache = cache
        self.extra_args = list(extra_args or [])
        self.sandbox = sandbox
        self.xattr = xattr
        self.log_max_bytes = log_max_bytes
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[int] | None = None

    def sandbox_mode(self) -> str:
        """namespace where asked for (or auto) and the binary has it, else chroot."""
        if self.sandbox in ("auto", "namespace") and namespace_sandbox_supported(self.binary):
            return "namespace"
        if self.sandbox == "namespace":
            log.warning("%s has no -o sandbox=namespace: using chroot", self.binary)
        return "chroot"

    def argv(self, fd: int, sandbox: str = "chroot") -> list[str]:
        argv = [
            self.binary, f"--fd={fd}", "-o", f"source={self.source}",
            "-o", f"cache={self.cache}", "-o", f"sandbox={sandbox}",
            "-o", "xattr" if self.xattr else "no_xattr",
        ]
        return argv + self.extra_args

    @property
    def ref(self) -> ProcRef | None:
        return ProcRef.of(self._proc.pid) if self._proc is not None else None

    async def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise errors.NotFound(
                f"virtiofsd {self.binary} not found: install qemu-system-common"
                f" or set {self.setting}"
            )
        mode = await asyncio.to_thread(self.sandbox_mode)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # We listen, virtiofsd inherits the socket: the driver can connect at once.
        # The socket file is 0600 before it listens (and its directory root-only).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r = out_w = -1
        cap: CappedLog | None = None
        try:
            with addressable(self.socket_path) as where:
                sock.bind(where)
                os.chmod(where, 0o600)
            sock.listen(1)
            fd = sock.fileno()
            cap = CappedLog(self.log_path, self.log_max_bytes)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv(fd, mode), stdin=asyncio.subprocess.DEVNULL, stdout=out_w,
                stderr=out_w, pass_fds=(fd,), preexec_fn=_parent_death_signal(),
            )
        except OSError as exc:
            if cap is not None:
                cap.close()
            if out_r >= 0:
                os.close(out_r)
            raise errors.Unavailable(f"cannot start virtiofsd: {exc}") from exc
        finally:
            sock.close()
            if out_w >= 0:
                os.close(out_w)
        self._drain = asyncio.ensure_future(drain(out_r, cap))
        # A bad option makes it exit at once; catch that here rather than in QEMU.
        try:
            code = await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.05)
        except TimeoutError:
            return
        await self._stop_drain()
        raise errors.Unavailable(
            f"virtiofsd exited with status {code}: {tail(self.log_path, 3) or 'no output'}"
        )

    async def _stop_drain(self) -> None:
        drain_task, self._drain = self._drain, None
        if drain_task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(drain_task), 2.0)
        drain_task.cancel()
        with contextlib.suppress(BaseException):
            await drain_task

    async def wait(self) -> int:
        """Until virtiofsd exits (FailedPrecondition if it was never started);
        its exit status (negative: the signal that ended it)."""
        proc = self._proc
        if proc is None:
            raise errors.FailedPrecondition("virtiofsd was not started")
        return await proc.wait()

    async def stop(self) -> None:
        if self._proc is not None:
            await stop_child(self._proc, grace=2.0)
            self._proc = None
        await self._stop_drain()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

