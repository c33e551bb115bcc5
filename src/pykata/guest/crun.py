"""Calls to the crun binary: argv (root, json log), reaped through the agent's
reaper with a timeout, and one clean error line out of crun's log and stderr;
the spec crun is given (``crun_spec``: its hooks)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.guest.engine.mounts import secure_join
from pykata.guest.reaper import Reaper, RunResult
from pykata.guest.settings import Settings
from pykata.wire import HOOK_STATE_ANNOTATION

GUEST_HOOKS = ("createContainer", "startContainer")
NOT_IN_ROOTFS = "not a file in the container's root filesystem (hooks run in the VM)"


def crun_spec(spec: dict[str, Any], container_id: str) -> dict[str, Any]:
    """The guest spec as crun runs it (``spec`` is not modified). crun runs the
    createContainer and startContainer hooks itself, at the points the runtime
    spec names; a hook's binary must be a file of the container's root
    filesystem (nothing of the host is in the VM), else InvalidArgument naming
    it. crun resolves a createContainer path in its own mount namespace's root,
    the guest's, before pivot_root: the path is rewritten to the file below the
    container's root filesystem (symlinks resolved inside it). A startContainer
    path resolves in the container already. crun writes the hooks' state itself
    (its guest bundle, ``"ociVersion": "1.0"``, pid 0 for createContainer):
    the host's part of it (HOOK_STATE_ANNOTATION) is dropped."""
    out = copy.deepcopy(spec)
    annotations = out.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(HOOK_STATE_ANNOTATION, None)
    hooks = out.get("hooks")
    if not hooks:
        out.pop("hooks", None)
        return out
    if not isinstance(hooks, dict):
        raise errors.InvalidArgument("invalid OCI spec: hooks must be an object")
    rootfs = str((out.get("root") or {}).get("path") or "")
    for kind, entries in hooks.items():
        if kind not in GUEST_HOOKS:
            if entries:
                raise errors.InvalidArgument(
                    f"unsupported OCI spec: hooks.{kind} is run by the host, not in the guest")
            continue
        for i, e in enumerate(entries or []):
            path = e.get("path") if isinstance(e, dict) else None
            if not isinstance(path, str) or not path.startswith("/"):
                raise errors.InvalidArgument(
                    f"invalid OCI spec: hooks.{kind}[{i}].path must be an absolute path")
            what = f"cannot create container {container_id}: hooks.{kind}[{i}] ({path})"
            try:
                found = secure_join(rootfs, path)
            except OSError as exc:
                raise errors.InvalidArgument(f"{what}: {exc.strerror or exc}") from None
            if not os.path.isfile(found):
                raise errors.InvalidArgument(f"{what}: {NOT_IN_ROOTFS}")
            if kind == "createContainer":
                e["path"] = found
                if not e.get("args"):
                    e["args"] = [path]  # argv[0] stays what the spec says
    return out


def crun_error(log_text: str, stderr: bytes, status: int) -> str:
    """One clean line out of crun's json log and stderr (its child processes log
    json too: an entry whose message is itself an entry is unwrapped)."""
    for text in (log_text, stderr.decode(errors="replace")):
        msgs = [m for m in (_log_message(line) for line in text.splitlines()) if m]
        if msgs:
            return msgs[-1]
    return f"crun exited with status {status}"


def _log_message(line: str) -> str:
    """The message of one log line: an error entry's ``msg``, a plain line as it is,
    "" for anything else."""
    line = line.strip()
    for _ in range(3):
        try:
            entry = json.loads(line)
        except ValueError:
            return line
        if not isinstance(entry, dict):
            return line
        if entry.get("level", "error") not in ("error", "fatal"):
            return ""
        line = str(entry.get("msg", "")).strip()
    return line


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
