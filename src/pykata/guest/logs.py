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


def kernel_init_uptime(kmsg: str = "/dev/kmsg") -> float | None:
    """Guest uptime at which the kernel ran /init ("Run /init as init process" in
    the kernel's log, kept whatever the console log level), or None."""
    import os

    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        for _ in range(100000):  # bounded: the ring buffer holds fewer records
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                return None  # the end of the log
            except OSError:  # EPIPE: a record was overwritten; keep reading
                continue
            if not record:
                return None
            head, _, text = record.partition(";")
            if text.startswith("Run ") and " as init process" in text:
                fields = head.split(",")
                return int(fields[2]) / 1e6 if len(fields) > 2 and fields[2].isdigit() \
                    else None
    finally:
        os.close(fd)
    return None


def boot_summary() -> str:
    """``name=uptime`` of each boot step so far, in order (the agent's "boot:" line):
    kernel_init (the kernel ran /init: the early init in image mode), main (the
    agent's code started), port_open and early_check (the early responder),
    serving (the full service), check (its first Check, if the early responder
    did not answer one)."""
    from pykata.guest.channel import BOOT_STAMPS

    stamps = dict(BOOT_STAMPS)
    init = kernel_init_uptime()
    if init is not None:
        stamps["kernel_init"] = init
    return " ".join(f"{k}={v:.3f}" for k, v in sorted(stamps.items(), key=lambda kv: kv[1]))


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
