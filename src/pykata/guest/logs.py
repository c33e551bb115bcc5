"""Agent logging: sandbox and container ids in every record, to stderr (the console)."""

from __future__ import annotations

import contextvars
import logging
import sys
from typing import TextIO

sandbox_id: contextvars.ContextVar[str] = contextvars.ContextVar("sandbox_id", default="-")
container_id: contextvars.ContextVar[str] = contextvars.ContextVar("container_id", default="-")

FORMAT = ("%(asctime)s.%(msecs)03d pykata-agent %(levelname)s sandbox=%(sandbox)s"
          " container=%(container)s %(name)s: %(message)s")


class ContextFilter(logging.Filter):
    """Copies the ids of the request being handled into each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "sandbox"):
            record.sandbox = sandbox_id.get()
        if not hasattr(record, "container"):
            record.container = container_id.get()
        return True


def setup(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
