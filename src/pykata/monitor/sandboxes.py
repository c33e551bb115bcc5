"""The sandboxes under one state directory, as the monitor sees them: found from
the directory tree (``<state_dir>/sbs/<namespace>/<id>``, the layout of
pykata.runtime.state), their recorded state, and their logs.

Nothing here follows a link at the last component or trusts a file's size:
state and logs are opened with O_NOFOLLOW, read up to a cap, and what is shown
of a log has its control characters replaced (a guest writes the console)."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pykata.errors import FailedPrecondition, InvalidArgument, NotFound
from pykata.runtime.state import STATE_FILE, all_sandboxes, check_id, sandbox_dir
from pykata.utils import logfile

METRICS_SOCKET = "metrics.sock"  # the shim serves GET /metrics on it (0600)
STATE_MAX_BYTES = 256 * 1024
# The guest console (written by the VMM driver, a CappedLog rotated to .1):
# the kernel's lines and the agent's log (PID 1's stderr).
LOG_FILES = ("console.log",)
LOG_MAX_BYTES = 1 << 20  # what one log request reads at most, per file
LOG_MAX_LINES = 20000


@dataclass(frozen=True)
class SandboxRef:
    namespace: str
    id: str
    dir: Path

    @property
    def metrics_socket(self) -> Path:
        return self.dir / METRICS_SOCKET


def valid_id(value: str) -> bool:
    try:
        check_id("sandbox", value)
    except InvalidArgument:
        return False
    return True


def discover(state_dir: str | Path) -> list[SandboxRef]:
    """Every sandbox directory under ``state_dir`` whose namespace and id are
    well-formed (anything else there is not a sandbox of ours: skipped)."""
    return [SandboxRef(ns, sid, sandbox_dir(state_dir, sid, ns))
            for ns, sid in all_sandboxes(state_dir) if valid_id(ns) and valid_id(sid)]


def find(state_dir: str | Path, sandbox_id: str, namespace: str | None = None) -> SandboxRef:
    """The sandbox ``sandbox_id`` (in ``namespace`` if given, else in the one
    namespace that has it)."""
    check_id("sandbox", sandbox_id)
    if namespace is not None:
        check_id("namespace", namespace)
    hits = [r for r in discover(state_dir)
            if r.id == sandbox_id and (namespace is None or r.namespace == namespace)]
    if not hits:
        raise NotFound(f"no sandbox {sandbox_id}" + (f" in {namespace}" if namespace else ""))
    if len(hits) > 1:
        raise FailedPrecondition(
            f"sandbox {sandbox_id} is in namespaces {', '.join(r.namespace for r in hits)}:"
            " name one with ?namespace=")
    return hits[0]


def _read_capped(path: Path, cap: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, cap + 1)
    finally:
        os.close(fd)


def recorded_state(ref: SandboxRef) -> str:
    """The sandbox's state as its record says ("running", ...), "" if unreadable."""
    try:
        data = _read_capped(ref.dir / STATE_FILE, STATE_MAX_BYTES)
        if len(data) > STATE_MAX_BYTES:
            return ""
        value = json.loads(data).get("state", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) and valid_id(value) else ""


def logs(ref: SandboxRef, lines: int = 500, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of the sandbox's guest console (console.log.1
    then console.log), under a header line naming the file."""
    lines = max(1, min(lines, LOG_MAX_LINES))
    max_bytes = max(1, min(max_bytes, LOG_MAX_BYTES))
    out = []
    for name in LOG_FILES:
        path = ref.dir / name
        if not os.path.lexists(path) and not os.path.lexists(logfile.rotated(path)):
            continue
        out.append(f"==> {name} <==")
        text = logfile.tail(path, lines, max_bytes)
        if text:
            out.append(text)
    return "\n".join(out) + "\n" if out else ""
