"""A running VM handed from one process to another (the VM cache,
``pykata.runtime.vmcache``), behind the hypervisor contract.

The process that booted the VM (the cache server) makes it with its driver's
``exportable_vm`` (``Driver`` in base.py); once it is booted and idle,
``export()`` gives a :class:`Handoff`: copies of every host-side fd the VM's
owner holds (by name) and a JSON-able description. Those travel over a unix
socket (SCM_RIGHTS). The receiving process (a sandbox's shim) makes its own
:class:`Hypervisor` of them with the driver's ``adopt_vm``, tells the sender,
and the sender ``release()``s the VM: it lets go of everything without
stopping the VMM. Until then the sender still owns the VM and stops it if the
receiver never confirms.

The runtime sees only this module and the driver contract; the QEMU side is
``qemu/adopt.py``.
"""

from __future__ import annotations

import abc
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from pykata import errors
from pykata.hypervisor.base import Hypervisor

# The fds a handoff may carry, in a fixed order (a receiver refuses others).
FD_NAMES = ("qmp", "agent", "portfwd", "console", "output", "pidfd", "lease_dir", "lease")
MAX_FDS = len(FD_NAMES)


@dataclass
class Handoff:
    """What one process gives another of a running VM: fds by name (ours to
    close) and a description (pid, start time, uid lease, shape...)."""

    info: dict[str, Any]
    fds: dict[str, int] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [n for n in FD_NAMES if n in self.fds]

    def fd_list(self) -> list[int]:
        return [self.fds[n] for n in self.names()]

    @classmethod
    def received(cls, info: dict[str, Any], names: list[str], fds: list[int]) -> Handoff:
        """From what arrived on a socket: ``names`` (sent in the description)
        must name each received fd once, in order, and be known names. On any
        mismatch every received fd is closed and InvalidArgument raised."""
        ok = (len(names) == len(fds) and len(set(names)) == len(names)
              and all(isinstance(n, str) and n in FD_NAMES for n in names)
              and names == [n for n in FD_NAMES if n in names])
        if not ok:
            _close_all(fds)
            raise errors.InvalidArgument(
                f"a VM handoff with fds {names!r} and {len(fds)} fds received")
        return cls(info, dict(zip(names, fds, strict=True)))

    def take(self, name: str) -> int:
        """The fd ``name`` (-1 if absent), now the caller's to close."""
        return self.fds.pop(name, -1)

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        _close_all(list(fds.values()))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ExportableVM(Hypervisor):
    """A VM that can be given to another process once it runs."""

    @abc.abstractmethod
    async def export(self) -> Handoff:
        """Copies of the host-side fds and the description; the VM stays ours
        (stop() still stops it) until :meth:`release`."""

    @abc.abstractmethod
    async def release(self) -> None:
        """The receiver has it: let go of everything without stopping the VM."""
