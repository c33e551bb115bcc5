"""Calls to the crun binary: argv (root, json log), reaped through the agent's
reaper with a timeout, and one clean error line out of crun's log and stderr."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.guest.reaper import Reaper, RunResult
from pykata.guest.settings import Settings


def crun_error(log_text: str, stderr: bytes, status: int) -> str:
    """One clean line out of crun's json log and stderr."""
    msgs = []
    for line in log_text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            msgs.append(line)
            continue
        if isinstance(entry, dict) and entry.get("level", "error") in ("error", "fatal"):
            msgs.append(str(entry.get("msg", "")).strip())
    msgs = [m for m in msgs if m]
    if msgs:
        return msgs[-1]
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    if lines:
        return lines[-1]
    return f"crun exited with status {status}"


def read_log(path: Path) -> str:
    """The text of one crun call's log file, which is removed."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


class Crun:
    """Calls to the crun binary, each reaped through the agent's reaper."""

    def __init__(self, reaper: Reaper, settings: Settings) -> None:
        self.reaper = reaper
        self.settings = settings
        self._seq = itertools.count(1)
        # The native engine's per-agent state (pykata.guest.engine.runner.Engine), made on
        # the first native create; kept here because every container is given this object.
        self.engine: Any = None

    def argv(self, *args: str, log_file: Path | None = None) -> list[str]:
        out = [self.settings.crun, "--root", str(self.settings.crun_state)]
        if log_file is not None:
            out += [f"--log=file:{log_file}", "--log-format=json"]
        return [*out, *args]

    async def run(self, *args: str, timeout: float | None = None) -> RunResult:
        return await self.reaper.run(self.argv(*args),
                                     timeout=timeout or self.settings.crun_timeout)

    async def check(self, what: str, *args: str, timeout: float | None = None,
                    kind: type[errors.PykataError] = errors.Internal) -> RunResult:
        res = await self.run(*args, timeout=timeout)
        if not res.ok:
            raise kind(f"{what}: {crun_error('', res.stderr, res.status)}")
        return res

    def log_file(self, bundle: Path, op: str) -> Path:
        return bundle / f"crun-{op}-{next(self._seq)}.log"
