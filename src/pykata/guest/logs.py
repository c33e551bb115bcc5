"""Agent logging: sandbox and container ids in every record, to stderr (the console)."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import TextIO

container_id: contextvars.ContextVar[str] = contextvars.ContextVar("container_id", default="-")

_FIELDS = "%(levelname)s sandbox=%(sandbox)s container=%(container)s %(name)s: %(message)s"
FORMAT = "%(asctime)s.%(msecs)03d pykata-agent " + _FIELDS
# In the guest the wall clock jumps when the host sets it: stamp records with the
# time since boot instead, like the kernel's own console lines.
GUEST_FORMAT = "[%(uptime)12.6f] pykata-agent " + _FIELDS


_sandbox = "-"


def set_sandbox(sandbox_id: str) -> None:
    """The sandbox this agent serves (one per VM): in every record from now on."""
    global _sandbox
    _sandbox = sandbox_id or "-"


class ContextFilter(logging.Filter):
    """Copies the ids of the request being handled into each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "sandbox"):
            record.sandbox = _sandbox
        if not hasattr(record, "container"):
            record.container = container_id.get()
        record.uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
        return True


def setup(level: int = logging.INFO, stream: TextIO | None = None, guest: bool = False) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(GUEST_FORMAT if guest else FORMAT,
                                           datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
