"""Names and defaults of `pykata-runtime`, its user-facing error and the
``--log`` writer (runc's text or JSON log lines)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime

from pykata.runtime.bundle import OCI_VERSION

PROG = "pykata-runtime"
DEFAULT_ROOT = "/run/pykata-runtime"
NAMESPACE = "pykata-runtime"
CREATE_TIMEOUT = 180.0

__all__ = ["CREATE_TIMEOUT", "DEFAULT_ROOT", "LOG", "NAMESPACE", "OCI_VERSION", "PROG",
           "CLIError", "Log", "now_rfc3339"]


class CLIError(Exception):
    """A user-facing error: one line on stderr, exit 1."""


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Log:
    def __init__(self, path: str = "", fmt: str = "text", debug: bool = False) -> None:
        self.path, self.fmt, self.debug_on = path, fmt, debug

    def write(self, level: str, msg: str) -> None:
        if not self.path:
            return
        now = now_rfc3339()
        if self.fmt == "json":
            line = json.dumps({"level": level, "msg": msg, "time": now})
        else:
            line = f'time="{now}" level={level} msg={json.dumps(msg)}'
        with contextlib.suppress(OSError), open(self.path, "a") as f:
            f.write(line + "\n")

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self.write("debug", msg)


LOG = Log()
