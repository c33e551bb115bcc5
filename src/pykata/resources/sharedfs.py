"""virtio-fs: one virtiofsd per sandbox, sharing the sandbox's shared directory.

The host mounts container root filesystems and bind-mount sources below the
shared directory (``<sandbox>/shared/<container>/...``); the guest mounts the
whole tree once (tag ``pykatashared``) at GUEST_SHARED_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from pykata import errors
from pykata.utils.process import ProcRef, stop_child, tail

log = logging.getLogger(__name__)

SHARED_TAG = "pykatashared"
GUEST_SHARED_DIR = "/run/pykata/shared"


class VirtioFsDaemon:
    def __init__(self, binary: str, source: Path, socket_path: Path, log_path: Path,
                 cache: str = "auto", extra_args: list[str] | None = None,
                 sandbox: str = "auto", xattr: bool = False,
                 log_max_bytes: int = 1 << 20) -> None:
        self.binary = binary
        self.source = source
        self.socket_path = socket_path
        self.log_path = log_path
        self.cache = cache
        self.extra_args = list(extra_args or [])
        self.sandbox = sandbox
        self.xattr = xattr
        self.log_max_bytes = log_max_bytes
        self._proc: asyncio.subprocess.Process | None = None

    def argv(self, fd: int) -> list[str]:
        return [
            self.binary, f"--fd={fd}", "-o", f"source={self.source}",
            "-o", f"cache={self.cache}", "-o", "sandbox=chroot", "-o", "xattr",
            *self.extra_args,
        ]

    @property
    def ref(self) -> ProcRef | None:
        return ProcRef.of(self._proc.pid) if self._proc is not None else None

    async def start(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise errors.NotFound(
                f"virtiofsd {self.binary} not found: install qemu-system-common"
                " or set [hypervisor.qemu] virtio_fs_daemon"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # We listen, virtiofsd inherits the socket: QEMU can connect at once, no polling.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.socket_path))
            sock.listen(1)
            fd = sock.fileno()
            with open(self.log_path, "ab") as logf:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv(fd), stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(fd,),
                )
        except OSError as exc:
            raise errors.Unavailable(f"cannot start virtiofsd: {exc}") from exc
        finally:
            sock.close()
        # A bad option makes it exit at once; catch that here rather than in QEMU.
        try:
            code = await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.05)
        except TimeoutError:
            return
        raise errors.Unavailable(
            f"virtiofsd exited with status {code}: {tail(self.log_path, 3) or 'no output'}"
        )

    async def stop(self) -> None:
        if self._proc is not None:
            await stop_child(self._proc, grace=2.0)
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
