"""Cleaning up after a sandbox whose owner (its shim) is gone, from what its
state record says: kill its VMM and virtiofsd, unmount exactly what it
mounted, remove its directory (never following a link, never crossing a mount)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.runtime.sharedtree import SharedTree
from pykata.runtime.state import DEFAULT_NAMESPACE, SandboxRecord, check_id, sandbox_dir
from pykata.utils import mounts
from pykata.utils.process import ProcRef, terminate

log = logging.getLogger(__name__)


def remove_sandbox_dir(d: Path) -> None:
    """Unmount what is mounted below ``d`` (exact mount points, never a resolved
    path) and remove it without following a symlink or crossing a mount; then its
    namespace directory if that is now empty."""
    if not d.exists():
        return
    failed = mounts.umount_all(d)
    if failed:
        raise errors.Internal(f"cannot unmount {', '.join(failed)}; left {d} in place")
    try:
        mounts.remove_tree(d)
    except OSError as exc:
        raise errors.Internal(f"cannot remove {d}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        os.rmdir(d.parent)


def remove_memory_file(path: Any) -> None:
    """A template clone's RAM file (as recorded), if it is still there."""
    if isinstance(path, str) and path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def cleanup(state_dir: str | Path, sandbox_id: str,
                  namespace: str = DEFAULT_NAMESPACE, *, force: bool = False) -> bool:
    """Clean up a sandbox whose owner is gone: kill its VMM and virtiofsd, unmount,
    remove its state. True if there was something to clean. A sandbox whose owner
    (its shim) still runs is left alone unless ``force``."""
    check_id("sandbox", sandbox_id)
    check_id("namespace", namespace)
    d = sandbox_dir(state_dir, sandbox_id, namespace)
    if not d.exists():
        return False
    try:
        rec = SandboxRecord.load(d)
    except (errors.NotFound, ValueError, TypeError, KeyError):
        rec = None
    owner = ProcRef.from_json(rec.owner) if rec is not None else None
    if owner is not None and owner.pid != os.getpid() and owner.alive() and not force:
        log.info("sandbox %s/%s is in use by pid %d: left alone", namespace, sandbox_id,
                 owner.pid)
        return False
    if rec is not None:
        for data in (rec.vmm, rec.virtiofsd):
            ref = ProcRef.from_json(data)
            if ref is not None:
                await terminate(ref, grace=2.0)
        remove_memory_file(rec.extra.get("memory_file"))
    remove_sandbox_dir(d)
    return True


def cleanup_container_mounts(state_dir: str | Path, sandbox_id: str, container_id: str,
                             namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Unmount and remove what a container shared with its VM (after its shim died);
    what could not be unmounted."""
    check_id("sandbox", sandbox_id)
    check_id("container", container_id)
    check_id("namespace", namespace)
    return SharedTree(sandbox_dir(state_dir, sandbox_id, namespace)).clear(container_id)
