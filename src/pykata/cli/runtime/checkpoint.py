"""``checkpoint`` and ``restore``: runc's verbs, as podman drives them
(``podman container checkpoint|restore``; docs/runtime-cli.md,
docs/checkpoint-design.md §2 and §6.6).

pykata checkpoints the container's whole VM: the keeper's Checkpoint (the
shim's, the same code containerd reaches) writes the checkpoint directory
(runtime/checkpoint.py) at ``--image-path``; ``restore`` is ``create`` whose
keeper restores that VM, paused, instead of booting one, then ``start``.

- ``checkpoint`` without ``--leave-running`` stops the container, as runc's
  does: its processes end with status 137, the stand-in exits with it (conmon
  sees the container exit), the state stays until ``delete``. The flags that
  tune criu for a process tree (``--tcp-established``, ``--file-locks``,
  ``--ext-unix-sk``, ``--shell-job``, ...) are accepted: a VM keeps its
  connections, sockets, jobs and locks anyway. Incremental and remote dumps
  (``--pre-dump``, ``--parent-path``, ``--lazy-pages``, ``--page-server``)
  are refused in one line.
- ``restore`` takes conmon's argv (``--bundle --pid-file --detach
  --image-path --work-path ...``). The VM's RAM is copied out of the image
  path before ``restore`` returns, so the caller may delete it (podman does).
  Without ``--detach`` it waits for the container and exits with its status.
- Only a VM without a shared file system can be saved (QEMU 7.2 cannot save
  virtio-fs): the keeper refuses the others in one line and the container
  runs on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from google.protobuf import any_pb2, empty_pb2

from pykata.cli.rtclient import call
from pykata.cli.runtime.base import CLIError
from pykata.cli.runtime.keeper import destroy
from pykata.cli.runtime.lifecycle import create, wait_in_foreground
from pykata.cli.runtime.state import (
    existing,
    load_meta,
    standin_ref,
    state_dir,
    task_status,
)
from pykata.protos import containerd_runc_options_pb2 as runcopts
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import checkpoint as ckpt

CHECKPOINT_TIMEOUT = 600.0  # seconds: the VM's RAM is packed (under TCG, on a busy host)
RESTORE_TIMEOUT = 600.0  # seconds: the VM's RAM is unpacked, its state loaded
START_TIMEOUT = 60.0
STOP_WAIT = 30.0  # seconds a checkpoint with exit waits for the stand-in to exit
RUNC_OPTIONS_URL = "type.googleapis.com/containerd.runc.v1.CheckpointOptions"


def image_dir(path: str) -> Path:
    """``--image-path``; runc's default is ``checkpoint`` in the current directory."""
    return Path(os.path.abspath(path or "checkpoint"))


def _unsupported(a: argparse.Namespace, verb: str) -> None:
    if getattr(a, "pre_dump", False) or getattr(a, "parent_path", ""):
        raise CLIError(f"{verb} --pre-dump/--parent-path is not supported: pykata saves the"
                       " whole VM at once (no incremental checkpoints)")
    if a.lazy_pages or getattr(a, "page_server", ""):
        raise CLIError(f"{verb} --lazy-pages/--page-server is not supported: pykata saves"
                       " the whole VM into --image-path")


def run_options(leave_running: bool) -> any_pb2.Any:
    """What the keeper's Checkpoint is told: runc's CheckpointOptions, exit
    unless the container is left running."""
    opts = runcopts.CheckpointOptions(exit=not leave_running)
    return any_pb2.Any(type_url=RUNC_OPTIONS_URL, value=opts.SerializeToString())


def do_checkpoint(a: argparse.Namespace) -> int:
    _unsupported(a, "checkpoint")
    d = existing(a.root, a.id)
    status = task_status(d, a.id)
    if status not in ("running", "paused"):
        raise CLIError(f"cannot checkpoint container {a.id}: it is {status}, not running")
    image = image_dir(a.image_path)
    made = not image.exists()
    try:
        image.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Into a new directory inside it first: a checkpoint already there (podman
        # checkpoints -R into the same path) is replaced only by a complete one.
        work = Path(tempfile.mkdtemp(prefix=".pykata-", dir=image))
        try:
            call(d, "Checkpoint", pb.CheckpointTaskRequest(
                id=a.id, path=str(work), options=run_options(a.leave_running)),
                empty_pb2.Empty, timeout=CHECKPOINT_TIMEOUT)
            _move_in(work, image)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                image.rmdir()
        raise
    if not a.leave_running:
        _wait_stopped(d)
    return 0


def _move_in(work: Path, image: Path) -> None:
    """The checkpoint's files from ``work`` into ``image``, over whatever files
    of those names were there (never followed); the manifest, which marks a
    checkpoint complete, goes first and comes back last."""
    src, dst = ckpt.open_dir(work), ckpt.open_dir(image)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ckpt.MANIFEST, dir_fd=dst)
        for name in (*(f for f in ckpt.FILES if f != ckpt.MANIFEST), ckpt.MANIFEST):
            os.replace(name, name, src_dir_fd=src, dst_dir_fd=dst)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def _wait_stopped(d: Path) -> None:
    """runc's checkpoint returns with the container stopped: wait (bounded) for
    the stand-in, which exits with the container's status."""
    ref = standin_ref(d, load_meta(d))
    deadline = time.monotonic() + STOP_WAIT
    while ref is not None and ref.alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def do_restore(a: argparse.Namespace) -> int:
    _unsupported(a, "restore")
    image = image_dir(a.image_path)
    if not (image / ckpt.MANIFEST).is_file():
        raise CLIError(f"cannot restore container {a.id}: {image} holds no pykata checkpoint"
                       f" (no {ckpt.MANIFEST})")
    a.preserve_fds = 0
    create(a, checkpoint=image, timeout=RESTORE_TIMEOUT)
    d = state_dir(a.root, a.id)
    try:
        call(d, "Start", pb.StartRequest(id=a.id), pb.StartResponse, timeout=START_TIMEOUT)
    except BaseException:
        destroy(d, a.id)
        raise
    if a.detach:
        return 0
    return wait_in_foreground(d, a.id)
