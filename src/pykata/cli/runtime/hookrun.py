"""What `pykata-runtime` does on the host around the keeper, where runc would
do it itself: the container's network namespace and the OCI hooks.

- A spec that asks for a new network namespace (a ``network`` entry without a
  path) gets one on the host, kept by a bind mount on ``<state dir>/netns``:
  the keeper connects the VM to it (and hot-plugs what appears in it later)
  and the stand-in lives in it, so ``/proc/<pid>/ns/net`` of the pid that
  ``state`` and the hooks report is that namespace (Docker's prestart hook
  hands exactly that to dockerd, which moves the container's veth there).
- The host hooks run here, with the stand-in's pid in their state: prestart
  and createRuntime at the end of ``create`` (a failure fails it, and nothing
  is left), poststart after ``start``, poststop after ``delete`` (failures
  logged). The keeper is told (``HOOKS_ENV``) not to run them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pykata.cli.runtime.base import LOG, CLIError
from pykata.runtime import hooks
from pykata.runtime.bundle import spec_annotations
from pykata.utils.libc import libc

NETNS = "netns"
# The keeper's environment: its pod network namespace, and "hooks are the caller's".
NETNS_ENV = "PYKATA_RUNTIME_NETNS"
HOOKS_ENV = "PYKATA_RUNTIME_HOOKS"
CLONE_NEWNET = 0x40000000
MNT_DETACH = 2


def wants_new_netns(spec: dict[str, Any]) -> bool:
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            return not ns.get("path")
    return False


def make_netns(d: Path) -> Path:
    """A new network namespace, bind-mounted on ``d``/netns."""
    path = d / NETNS
    path.touch(mode=0o600)
    try:
        subprocess.run(["unshare", f"--net={path}", "true"], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise CLIError(f"cannot create the container's network namespace: {exc}"
                       f" {detail.decode(errors='replace').strip()}".strip()) from exc
    return path


def remove_netns(d: Path) -> None:
    path = d / NETNS
    if path.exists():
        libc().umount2(bytes(path), MNT_DETACH)
        with contextlib.suppress(OSError):
            path.unlink()


def enter_netns(path: Path | None) -> tuple[Callable[[], None] | None, tuple[int, ...]]:
    """A ``preexec_fn`` that moves a child into ``path``'s network namespace, and
    the fd it needs passed (nothing without ``path``)."""
    if path is None:
        return None, ()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def enter() -> None:
        if libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")

    return enter, (fd,)


# -- hooks ---------------------------------------------------------------------------------
def meta_of(spec: dict[str, Any]) -> dict[str, Any]:
    """What meta.json keeps for the later hooks (the bundle may be gone by then)."""
    return {"hooks": spec.get("hooks") or {}, "ociVersion": spec.get("ociVersion") or ""}


def _state(meta: dict[str, Any], status: str, pid: int) -> dict[str, Any]:
    return hooks.state(meta["id"], status, pid, meta.get("bundle", ""),
                       meta.get("annotations") or {}, meta.get("ociVersion") or "1.0.2")


def run(meta: dict[str, Any], kinds: tuple[str, ...], pid: int, *, fail: bool) -> None:
    """Run the container's ``kinds`` hooks (CLIError on the first failure with
    ``fail``; logged otherwise)."""
    parsed = hooks.parse({"hooks": meta.get("hooks") or {}})
    if not any(parsed.get(k) for k in kinds):
        return

    async def go() -> None:
        for kind in kinds:
            st = _state(meta, hooks.STATUS[kind], pid)
            for hook in parsed.get(kind, []):
                try:
                    await hooks.run(hook, st)
                except hooks.HookError as exc:
                    if fail:
                        raise CLIError(f"{kind} hook failed: {exc}") from None
                    LOG.write("warning", f"container {meta['id']}: {kind} hook failed: {exc}")

    asyncio.run(go())


def create_meta(cid: str, bundle: Path, spec: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "bundle": str(bundle), "annotations": spec_annotations(spec),
            **meta_of(spec)}
