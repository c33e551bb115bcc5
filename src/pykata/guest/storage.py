"""Storages in the guest: the drivers that mount one, and what the sandbox and
each container hold.

A Storage (``driver``, ``source``, ``mount_point``, ``fstype``, ``options``)
is made available at its mount point by one of the drivers in
``wire.STORAGE_DRIVERS``: ``virtiofs`` (tag in ``source``; waited for a little,
a cloned VM's device may still be probing), ``tmpfs``, ``local`` (a directory
with ``mode=``), ``blk`` (a guest device path, or a hot-plugged disk's serial:
see disks.py) and ``bind``.

Who owns what (:class:`Storages`):

- the sandbox's own storages (CreateSandbox: the virtio-fs share) stay until
  the sandbox is destroyed;
- storages with ``wire.SANDBOX_SCOPE`` in ``driver_options`` (emptyDir, the
  pod's ``/dev/shm``) belong to the pod: the first container mounts them,
  later ones reuse them, and they stay until the sandbox is destroyed;
- the others belong to their container: unmounted when it is removed (or its
  creation fails), after which the disks it used are released (the last user
  ejects a disk).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from pykata import errors, wire
from pykata.guest import disks as disksmod
from pykata.guest import sysutil
from pykata.protos import agent_pb2 as pb

log = logging.getLogger(__name__)

STORAGE_DRIVERS = wire.STORAGE_DRIVERS


def mount_storage(driver: str, source: str, mount_point: str, fstype: str,
                  options: Sequence[str], wait_device: float = 5.0) -> bool:
    """Make one storage available at ``mount_point``; False if nothing was mounted."""
    if not mount_point.startswith("/"):
        raise errors.InvalidArgument(f"storage mount point {mount_point!r} is not absolute")
    driver = driver or fstype
    try:
        if driver == "local":
            mode = 0o777
            for opt in options:
                if opt.startswith("mode="):
                    try:
                        mode = int(opt[5:], 8)
                    except ValueError:
                        raise errors.InvalidArgument(
                            f"local storage {mount_point}: bad option {opt!r:.80}") from None
                    if not 0 <= mode <= 0o7777:
                        raise errors.InvalidArgument(
                            f"local storage {mount_point}: bad option {opt!r:.80}")
            os.makedirs(mount_point, exist_ok=True)
            os.chmod(mount_point, mode)
            return False
        os.makedirs(mount_point, exist_ok=True)
        if driver == "virtiofs":
            if not source:
                raise errors.InvalidArgument("virtiofs storage needs a source tag")
            # A hot-plugged device (a VM cloned from a template) may still be probing.
            deadline = time.monotonic() + wait_device
            while True:
                try:
                    sysutil.mount_with_options(source, mount_point, "virtiofs", options)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENODEV) or \
                            time.monotonic() >= deadline:
                        raise
                time.sleep(0.02)
        elif driver == "tmpfs":
            sysutil.mount_with_options(source or "tmpfs", mount_point, "tmpfs", options)
        elif driver == "blk":
            if not source.startswith("/dev/"):
                raise errors.InvalidArgument(
                    f"blk storage source {source!r} must be a guest device path")
            deadline = time.monotonic() + wait_device
            while not os.path.exists(source) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not os.path.exists(source):
                raise errors.NotFound(f"block device {source} did not appear in the guest")
            sysutil.mount_with_options(source, mount_point, fstype or "ext4", options)
        elif driver == "bind":
            opts = list(options)
            if "bind" not in opts and "rbind" not in opts:
                opts.append("rbind")
            sysutil.mount_with_options(source, mount_point, None, opts)
        else:
            raise errors.InvalidArgument(
                f"unknown storage driver {driver!r} (known: {', '.join(STORAGE_DRIVERS)})")
    except OSError as exc:
        raise errors.Internal(f"cannot mount {driver} storage {source} at {mount_point}:"
                              f" {exc.strerror or exc}") from None
    return True


def unmount(mount_point: str) -> None:
    try:
        sysutil.umount(mount_point)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return
        try:
            sysutil.umount(mount_point, detach=True)
        except OSError as exc2:
            raise errors.Internal(f"cannot unmount {mount_point}: {exc2.strerror}") from None


def _mount(st: pb.Storage, source: str | None = None) -> bool:
    return mount_storage(st.driver, st.source if source is None else source, st.mount_point,
                         st.fstype, list(st.options))


class Storages:
    """The mounts the sandbox owns (its own and the pod-scoped ones) and the
    hot-plugged disks in use. A container's own mounts and disks are kept by
    the caller (``Container.storages``/``.disks``) and handed back to
    :meth:`release_container`."""

    def __init__(self, disks: disksmod.Disks | None = None) -> None:
        self.sandbox: list[str] = []  # guest mount points the sandbox owns
        self.pod_scoped: set[str] = set()  # pod-scoped storages made so far
        self.disks = disks if disks is not None else disksmod.Disks()

    def mount_sandbox(self, storages: Sequence[pb.Storage]) -> None:
        """The sandbox's own storages, all or none."""
        mounted: list[str] = []
        try:
            for st in storages:
                if _mount(st):
                    mounted.append(st.mount_point)
        except BaseException:
            for mp in reversed(mounted):
                with contextlib.suppress(errors.PykataError):
                    unmount(mp)
            raise
        self.sandbox = mounted

    async def mount_container(self, cid: str, oci: dict[str, Any],
                              storages: Sequence[pb.Storage], devices: Sequence[pb.Device],
                              mounted: list[str], disks: list[str]) -> None:
        """Mount the container's storages and find its disks (pointing ``oci``'s
        device entries at them). What was done is appended to ``mounted`` and
        ``disks`` as it happens, for :meth:`release_container` to undo.
        Pod-scoped storages are mounted once and kept until the sandbox goes."""

        async def disk(serial: str) -> disksmod.Disk:
            started = time.monotonic()
            d = await disksmod.wait_disk(serial)
            log.info("container %s: disk %s is %s (%d:%d), found in %.3fs", cid, serial,
                     d.path, d.major, d.minor, time.monotonic() - started)
            self.disks.use(d, cid)
            if serial not in disks:
                disks.append(serial)
            return d

        for st in storages:
            source = st.source
            if st.driver == "blk" and source and not source.startswith("/"):
                source = (await disk(source)).path
            pod_scoped = wire.SANDBOX_SCOPE in st.driver_options
            if pod_scoped and st.mount_point in self.pod_scoped:
                continue
            done = _mount(st, source)
            if pod_scoped:
                self.pod_scoped.add(st.mount_point)
                if done:
                    self.sandbox.append(st.mount_point)
            elif done:
                mounted.append(st.mount_point)
        for dev in devices:
            if dev.type not in ("blk", "b"):
                raise errors.InvalidArgument(
                    f"device {dev.container_path}: unsupported type {dev.type!r} (known: blk)")
            d = await disk(dev.id)
            disksmod.use_guest_device(oci, dev.container_path, d.major, d.minor)

    async def release_container(self, cid: str, mounted: Sequence[str],
                                disks: Sequence[str]) -> None:
        """Unmount a container's own storages, then let go of its disks (the last
        user ejects a disk). Failures are logged, never raised."""
        for mp in reversed(mounted):
            try:
                unmount(mp)
            except errors.PykataError as exc:
                log.warning("%s", exc)
        for serial in disks:
            try:
                await self.disks.release(serial, cid)
            except Exception as exc:  # removal goes on regardless
                log.warning("container %s: cannot release disk %s: %s", cid, serial, exc)

    def release_sandbox(self) -> list[str]:
        """Unmount what the sandbox owns (last mounted first); the failures."""
        failures: list[str] = []
        for mp in reversed(self.sandbox):
            try:
                unmount(mp)
            except errors.PykataError as exc:
                failures.append(str(exc))
        self.sandbox = []
        self.pod_scoped.clear()
        return failures
