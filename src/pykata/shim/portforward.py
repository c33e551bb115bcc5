"""CRI PortForward for a pod in a VM: the pod netns redirect joined to the
guest's port-forward channel.

containerd dials ``localhost:PORT`` in the pod's network namespace on the
host; ``resources.portforward`` catches that dial, and each connection is
carried over ``pykata.ttrpc.mux`` on the VM's port-forward channel to the
guest (``guest/portfwd.py``), which connects to the same port on its own
loopback. A dial of 127.0.0.1 reaches the guest's 127.0.0.1, or its ::1 when
nothing listens there (what containerd's tcp4-then-tcp6 fallback gets with
runc); a dial of ::1 reaches ::1. A port nothing listens on in the guest is a
reset of the accepted connection (containerd reports the forward as failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from pykata import errors
from pykata.hypervisor.base import Hypervisor
from pykata.resources import portforward
from pykata.ttrpc import mux

log = logging.getLogger(__name__)

CHANNEL_TIMEOUT = 5.0


class PortForward:
    def __init__(self, sandbox_id: str, redirect: portforward.Redirect, channel: mux.Mux) -> None:
        self.sandbox_id = sandbox_id
        self.mux = channel
        self.proxy = portforward.Proxy(redirect, self._forward, name=sandbox_id)
        self._run: asyncio.Future[None] | None = None

    @classmethod
    async def start(cls, sandbox_id: str, netns: str, vm: Hypervisor | None
                    ) -> PortForward | None:
        """Port forwarding for the pod, or None (logged) when it cannot be had:
        the pod runs either way."""
        if not netns or vm is None:
            return None
        try:
            reader, writer = await vm.portfwd_channel().connect(CHANNEL_TIMEOUT)
        except errors.PykataError as exc:
            log.warning("sandbox %s: no port forwarding: %s", sandbox_id, exc)
            return None
        try:
            redirect = await asyncio.to_thread(portforward.install, netns)
        except errors.PykataError as exc:
            writer.close()
            log.warning("sandbox %s: no port forwarding: %s", sandbox_id, exc)
            return None
        pf = cls(sandbox_id, redirect, mux.Mux(reader, writer, name=f"portfwd {sandbox_id}"))
        try:
            await pf.proxy.start()
        except BaseException:
            await pf.stop()
            raise
        pf._run = asyncio.ensure_future(pf.mux.run())
        log.debug("sandbox %s: port forwarding from %s (proxy ports %s)", sandbox_id, netns,
                  redirect.ports)
        return pf

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       family: int, port: int) -> None:
        fam = mux.FAMILY_V6 if family == socket.AF_INET6 else mux.FAMILY_ANY
        try:
            await self.mux.forward(port, fam, reader, writer)
        except mux.OpenFailed as exc:
            log.debug("sandbox %s: port %d: %s", self.sandbox_id, port, exc)
            mux.abort(writer)

    async def stop(self) -> None:
        """Remove the redirect and reset every forwarded connection (idempotent)."""
        await self.proxy.stop()
        self.mux.close()
        if self._run is not None:
            self._run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run
            self._run = None
