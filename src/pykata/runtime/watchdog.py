"""Watching a sandbox's host processes while it lives: the VMM and virtiofsd.

Either one ending without being asked is the end of the pod:

- the VMM (QEMU killed, the guest kernel panicked, the guest powered off: QEMU
  runs with ``-no-reboot``): its processes are gone with it;
- virtiofsd: the guest's root filesystems and volumes are gone, and every file
  access in the guest would wait forever, so the VM is stopped (as Kata does).

The watchdog then calls its owner back once with one line saying why (the
sandbox closes the agent connection, so every process still waited for ends,
and refuses new containers). A sandbox's own stop cancels the watchdog first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from pykata.hypervisor.base import Hypervisor
from pykata.utils.process import tail

log = logging.getLogger(__name__)

STOP_TIMEOUT = 2.0  # seconds a VM gets to quit after its virtiofsd died
VM_EXIT_GRACE = 1.0  # seconds to see whether the VM ended first when virtiofsd ends
# Lines (and bytes) of the guest console searched for a panic message: the
# panic line comes before the call trace and register dump (60-100 lines).
CONSOLE_LINES = 200
CONSOLE_BYTES = 32768
REASON_MAX = 200  # characters of guest console text a reason carries


class Waitable(Protocol):
    """A host process of the sandbox (resources.sharedfs.VirtioFsDaemon)."""

    async def wait(self) -> int: ...


def status_text(code: int) -> str:
    """An exit status as a person reads it: ``status 1``, ``killed by SIGKILL``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"status {code}"


def guest_last_words(console: str) -> str:
    """What the guest console says about the end (untrusted: printable only,
    capped): the kernel's panic line if there is one, else its last line."""
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    said = ""
    for ln in reversed(lines):
        if "Kernel panic" in ln:
            said = ln[ln.index("Kernel panic"):]
            break
    else:
        said = lines[-1] if lines else ""
    said = "".join(ch if ch.isprintable() else "?" for ch in said)
    return said[:REASON_MAX] + ("..." if len(said) > REASON_MAX else "")


def _clean_exit(t: asyncio.Future[int]) -> bool:
    return t.done() and t.exception() is None and t.result() == 0


class Watchdog:
    """Waits for ``vm`` or ``virtiofsd`` to end; then (once) ``on_failure(reason)``."""

    def __init__(self, sandbox_id: str, vm: Hypervisor, virtiofsd: Waitable | None,
                 on_failure: Callable[[str], Awaitable[None]]) -> None:
        self.sandbox_id = sandbox_id
        self.vm = vm
        self.virtiofsd = virtiofsd
        self._on_failure = on_failure
        self._task: asyncio.Task[None] | None = None
        self.reason = ""  # why the sandbox failed ("" while it has not)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    @property
    def fired(self) -> bool:
        return bool(self.reason)

    async def settled(self, timeout: float) -> str:
        """The failure reason, waiting up to ``timeout`` for a VMM that is
        exiting to be noticed ("" if nothing failed in that time)."""
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return self.reason

    async def stop(self) -> None:
        """The sandbox is being stopped on purpose: stop watching."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        vm_exit = asyncio.ensure_future(self.vm.wait())
        fs_exit = asyncio.ensure_future(self.virtiofsd.wait()) if self.virtiofsd else None
        try:
            await asyncio.wait([t for t in (vm_exit, fs_exit) if t is not None],
                               return_when=asyncio.FIRST_COMPLETED)
            if not vm_exit.done() and fs_exit is not None and _clean_exit(fs_exit):
                # virtiofsd also ends, with status 0, when its peer goes: a VM
                # that died (a guest panic) may be noticed a moment after it.
                # Then the VM's end is the reason, not virtiofsd's.
                await asyncio.wait([vm_exit], timeout=VM_EXIT_GRACE)
            if not vm_exit.done() and fs_exit is not None and fs_exit.done():
                code = fs_exit.result() if fs_exit.exception() is None else -1
                self.reason = (f"virtiofsd exited ({status_text(code)}): the guest lost its"
                               " shared files, so its VM was stopped")
                log.error("sandbox %s: %s", self.sandbox_id, self.reason)
                await self.vm.stop(timeout=STOP_TIMEOUT)
            else:
                code = vm_exit.result() if vm_exit.exception() is None else -1
                said = guest_last_words(tail(self.vm.spec.console_log, CONSOLE_LINES,
                                             CONSOLE_BYTES))
                self.reason = (f"its VM exited unexpectedly ({status_text(code)})"
                               + (f"; guest console: {said}" if said else ""))
                log.error("sandbox %s: %s", self.sandbox_id, self.reason)
        finally:
            for t in (vm_exit, fs_exit):
                if t is not None and not t.done():
                    t.cancel()
        await self._on_failure(self.reason)
