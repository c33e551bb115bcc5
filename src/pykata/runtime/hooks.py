"""OCI hooks (config.json ``hooks``) with the runtime spec's semantics.

Where each kind runs in pykata:

- ``prestart`` (deprecated), ``createRuntime``: on the host, after the container
  exists (created in the guest, its network namespace on the host made), before
  ``create`` returns; a failure fails ``create``, and what was made is removed.
- ``poststart``: on the host, after ``start``; a failure is logged.
- ``poststop``: on the host, after ``delete``; a failure is logged.
- ``createContainer``, ``startContainer``: these run in the container's
  namespaces, i.e. inside the VM, run by the guest's container engine
  (``guest/engine/child.py``, or crun): ``to_guest`` puts them in the spec the
  guest gets. No host binary can run in the VM, so a hook's ``path`` names a
  file of the container's root filesystem (the guest refuses create with one
  line if there is none): ``createContainer`` after the container's mounts,
  before pivot_root, run from the guest's root with the container's root
  filesystem below it (the spec's "runtime namespace" is the host, which a VM
  cannot enter); ``startContainer`` after ``start``, before the container's
  process, with the path resolved in the container. A failure fails create or
  start. They run inside the VM before the host's prestart/createRuntime
  (the spec orders createRuntime first): the host runs those once the guest
  has created the container.

Each hook gets the container's state JSON on stdin, runs with exactly its
``env`` (none if not given) and ``args`` (``args[0]`` is its argv[0], as
execv(3)), and is killed after ``timeout`` seconds. Its output goes to the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from pykata.errors import FailedPrecondition, InvalidArgument
from pykata.wire import HOOK_STATE_ANNOTATION

log = logging.getLogger(__name__)

HOST_KINDS = ("prestart", "createRuntime", "poststart", "poststop")
GUEST_KINDS = ("createContainer", "startContainer")
KINDS = (*HOST_KINDS, *GUEST_KINDS)
# The state's status while each host kind runs (runtime spec, "Lifecycle").
STATUS = {"prestart": "creating", "createRuntime": "creating", "poststart": "running",
          "poststop": "stopped"}
DEFAULT_TIMEOUT = 120.0  # a hook without a timeout still ends (the spec sets none)
OUTPUT_CAP = 4096


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: float | None = None
    name: str = ""  # e.g. hooks.prestart[0]


def parse(spec: dict[str, Any]) -> dict[str, list[Hook]]:
    """The spec's hooks by kind; InvalidArgument naming the field for a malformed
    entry."""
    raw = spec.get("hooks")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument("invalid OCI spec: hooks must be an object")
    out: dict[str, list[Hook]] = {}
    for kind, entries in raw.items():
        if kind not in KINDS:
            log.warning("unknown hook kind hooks.%s ignored", kind)
            continue
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise InvalidArgument(f"invalid OCI spec: hooks.{kind} must be a list")
        out[kind] = [_hook(e, f"hooks.{kind}[{i}]") for i, e in enumerate(entries)]
    return out


def _hook(e: Any, name: str) -> Hook:
    if not isinstance(e, dict):
        raise InvalidArgument(f"invalid OCI spec: {name} must be an object")
    path = e.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgument(f"invalid OCI spec: {name}.path must be an absolute path")
    args, env = e.get("args") or [], e.get("env") or []
    for field, value in (("args", args), ("env", env)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"invalid OCI spec: {name}.{field} must be a list of strings")
    timeout = e.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                or timeout <= 0):
        raise InvalidArgument(f"invalid OCI spec: {name}.timeout must be a positive integer")
    return Hook(path, tuple(args), tuple(env), float(timeout) if timeout else None, name)


def to_guest(spec: dict[str, Any], bundle: str, version: str) -> None:
    """Keep in ``spec`` (the guest's copy) only the hooks the guest runs
    (createContainer, startContainer), and put what their state needs that the
    guest cannot know (the host's bundle, the spec's own ociVersion: the guest's
    copy is stamped otherwise) in the annotation ``HOOK_STATE_ANNOTATION``, which
    the guest takes out again before anything else sees the annotations."""
    parsed = parse(spec)
    spec.pop("hooks", None)
    guest = {kind: [{"path": h.path, "args": list(h.args), "env": list(h.env),
                     **({"timeout": int(h.timeout)} if h.timeout else {})}
                    for h in parsed[kind]]
             for kind in GUEST_KINDS if parsed.get(kind)}
    if not guest:
        return
    spec["hooks"] = guest
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict):
        annotations = spec["annotations"] = {}
    annotations[HOOK_STATE_ANNOTATION] = json.dumps({"bundle": bundle, "ociVersion": version})


def state(container_id: str, status: str, pid: int, bundle: str,
          annotations: dict[str, str], version: str) -> dict[str, Any]:
    """The OCI state a hook reads on stdin."""
    st: dict[str, Any] = {"ociVersion": version, "id": container_id, "status": status,
                          "bundle": bundle, "annotations": annotations}
    if status != "stopped" and pid:
        st["pid"] = pid
    return st


class HookError(FailedPrecondition):
    """A hook failed: its name, what happened, the tail of its output."""


async def run(hook: Hook, st: dict[str, Any]) -> None:
    """Run one hook to its end; HookError if it cannot start, fails or times out."""
    argv = list(hook.args) or [hook.path]
    env = dict(e.split("=", 1) for e in hook.env if "=" in e)
    what = f"{hook.name} ({hook.path})"
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, executable=hook.path, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            close_fds=True, cwd="/", start_new_session=True)
    except OSError as exc:
        raise HookError(f"{what} cannot run: {exc.strerror or exc}") from None
    data = json.dumps(st).encode()
    try:
        out, _ = await asyncio.wait_for(proc.communicate(data),
                                        hook.timeout or DEFAULT_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise HookError(f"{what} timed out after {hook.timeout or DEFAULT_TIMEOUT:g}s"
                        ) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out[-OUTPUT_CAP:].decode(errors="replace").strip()
    if text:
        log.info("%s output: %s", what, text)
    code = proc.returncode or 0
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        tail = f": {' '.join(text.split())[-300:]}" if text else ""
        raise HookError(f"{what} {how}{tail}")


async def run_kind(hooks: dict[str, list[Hook]], kind: str, st: dict[str, Any], *,
                   fail: bool) -> None:
    """Run the ``kind`` hooks in order. With ``fail`` the first failure is raised
    (the rest do not run); without, each failure is logged and the rest run."""
    for hook in hooks.get(kind, []):
        try:
            await run(hook, st)
        except HookError as exc:
            if fail:
                raise
            log.warning("container %s: %s", st.get("id", "?"), exc)
