"""Guest image builder: Debian's cloud kernel + an initrd holding Debian's
Python, crun, busybox and the pykata agent, built offline from the Debian
registry (``apt-get download`` + ``dpkg-deb -x``); the same root also as a
read-only file system image (erofs and/or ext4) for NVDIMM / virtio-pmem with
DAX, with the small early initrd that mounts it.

This module is the orchestration; each stage has its own module:

=================  ============================================================
:mod:`.apt`        package versions (cached against apt's state), download, unpack
:mod:`.kernel`     vmlinuz, the vmlinux inside it, kernel modules: boot (load order), on demand
:mod:`.rootfs`     the root's packages, merged /usr, trimming, base files, libraries
:mod:`.agent`      the agent and protobuf, /init, import check, bytecode
:mod:`.initrd`     the staging tree as a newc cpio
:mod:`.rootimage`  the staging tree as a read-only erofs / ext4 image for pmem (DAX)
:mod:`.early`      the early initrd (busybox, modules, /init) that mounts that image
:mod:`.cache`      the digest (cache key), the output layout, install and prune
:mod:`.elf`        ELF reading (vmlinux completeness, needed libraries)
:mod:`.tools`      running tools, temporary directories
=================  ============================================================

The build is cached by a digest of every input (see :mod:`.cache`): a second
build with unchanged inputs only computes the digest and returns. The package
versions come from ``apt-cache``; they are remembered together with a
fingerprint of apt's state (package lists, dpkg status, /etc/apt), so the
digest is computed without running apt until that state changes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pykata import errors
from pykata.image import agent, apt, early, initrd, kernel, rootfs, rootimage
from pykata.image.cache import (
    BUILDER_VERSION,
    EARLY_INITRD,
    MANIFEST,
    ImageArtifacts,
    compute_digest,
    find_image,
    install,
    locked,
    prune,
)
from pykata.image.tools import rm, tempdir

log = logging.getLogger(__name__)

__all__ = ["ImageArtifacts", "build_image", "find_image", "image_digest"]


class _Progress:
    """rich progress on a terminal, log lines otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self._rich = None
        self._task = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description:44}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"),
                                  TimeElapsedColumn(), transient=False)
            self._rich.start()
            self._task = self._rich.add_task("guest image", total=total)

    def step(self, text: str) -> None:
        log.info("image build: %s", text)
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, description=text, advance=1)
        elif self.enabled and not log.isEnabledFor(logging.INFO):
            # Nobody shows our log lines: a plain line per step on stderr.
            print(f"  - {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None and self._task is not None:
            task = self._rich.tasks[0]
            self._rich.update(self._task, completed=task.total)
            self._rich.stop()


def image_digest(output_dir: Path) -> tuple[str, str, dict[str, str]]:
    """(digest, kernel package, versions) of what a build would produce now."""
    kpkg, versions = apt.resolve_packages(Path(output_dir) / "cache", kernel.KERNEL_META,
                                          rootfs.ROOTFS_PACKAGES)
    return (compute_digest(versions, agent.agent_sources(), agent.protobuf_version()),
            kpkg, versions)


def root_image_choice(requested: Sequence[str] | None) -> tuple[str, ...]:
    """The root image file systems to build: ``requested`` checked (each needs
    its mkfs tool), or by default erofs when mkfs.erofs is installed."""
    if requested is None:
        if rootimage.available("erofs"):
            return ("erofs",)
        log.warning("mkfs.erofs is not installed (apt-get install erofs-utils): building"
                    " the initrd only, no read-only root image")
        return ()
    out: list[str] = []
    for fs in requested:
        if fs not in rootimage.FILESYSTEMS:
            raise errors.InvalidArgument(f"root image file system {fs!r}: one of "
                                         + ", ".join(rootimage.FILESYSTEMS))
        if not rootimage.available(fs):
            pkg = "erofs-utils" if fs == "erofs" else "e2fsprogs"
            raise errors.FailedPrecondition(
                f"{rootimage.MKFS[fs]} is not installed (apt-get install {pkg})")
        if fs not in out:
            out.append(fs)
    return tuple(out)


def build_image(output_dir: Path, *, force: bool = False, progress: bool = True,
                work_dir: Path | None = None,
                root_images: Sequence[str] | None = None) -> ImageArtifacts:
    """Build the guest image into ``output_dir``, or return the current one when
    its inputs are unchanged, it has every root image asked for (and ``force`` is
    false). ``root_images``: file systems of the read-only root image ("erofs",
    "ext4"; () for none; None: erofs if mkfs.erofs is installed)."""
    output_dir = Path(output_dir)
    wanted = root_image_choice(root_images)
    digest, kpkg, versions = image_digest(output_dir)

    def up_to_date(art: ImageArtifacts | None) -> bool:
        return (art is not None and art.digest == digest and not force
                and all(fs in art.root_images for fs in wanted))

    current = find_image(output_dir)
    if up_to_date(current):
        log.info("guest image %s is up to date", digest)
        assert current is not None
        return current
    with locked(output_dir):
        current = find_image(output_dir)  # built by someone else meanwhile?
        if up_to_date(current):
            assert current is not None
            return current
        return _build(output_dir, digest, kpkg, versions, progress, work_dir, wanted)


def _build(output_dir: Path, digest: str, kpkg: str, versions: dict[str, str], progress: bool,
           work_dir: Path | None, wanted: Sequence[str] = ()) -> ImageArtifacts:
    t0 = time.monotonic()
    images = output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(".*"):  # left by a killed build (we hold the lock)
        rm(stale)
    prog = _Progress(progress, total=len(versions) + 7 + (len(wanted) + 1 if wanted else 0))
    try:
        with tempdir(work_dir or images, ".build-") as stage, \
                tempdir(images, f".new-{digest}-") as out:
            debs = apt.download(versions, output_dir / "cache/debs", prog.step)
            root, kroot = stage / "root", stage / "kernel"
            root.mkdir()
            kroot.mkdir()
            apt.unpack(debs, kpkg, root, kroot, prog.step)
            rootfs.merge_usr(root)
            release = kernel.install_kernel(kroot, out, prog.step)
            modules = kernel.install_modules(kroot, root, release, prog.step)
            early_info: dict[str, object] = {}
            if wanted:
                deps, builtin = kernel.module_index(kroot, release)
                order = early.early_module_order(deps, builtin)
                esize = early.build_early_initrd(
                    root / "usr/bin/busybox", kroot / "lib/modules" / release, order,
                    out / EARLY_INITRD, stage, prog.step,
                    early.module_groups(order, deps, builtin))
                early_info = {"file": EARLY_INITRD, "bytes": esize, "modules": order}
            shutil.rmtree(kroot)
            rootfs.trim(root, prog.step)
            rootfs.busybox_links(root)
            agent.install_agent(root)
            rootfs.base_files(root, digest, release)
            agent.install_init(root)
            prog.step("agent, protobuf, busybox, /init")
            rootfs.prune_libraries(root)
            agent.check_agent_imports(root)
            agent.precompile(root, prog.step)
            size = initrd.write_cpio(root, out / "initrd.img", prog.step)
            root_imgs = [rootimage.build_root_image(root, out, fs, digest, prog.step)
                      for fs in wanted]
            manifest = {
                "digest": digest, "builder": BUILDER_VERSION, "kernel_release": release,
                "kernel_package": kpkg, "packages": dict(sorted(versions.items())),
                "initrd_bytes": size, "vmlinuz_bytes": (out / "vmlinuz").stat().st_size,
                "vmlinux": (out / "vmlinux").exists(), "modules": modules.boot,
                "on_demand_modules": modules.on_demand,
                "on_demand_modules_bytes": modules.on_demand_bytes,
                "protobuf": agent.protobuf_version(),
                "root_images": {img.fstype: img.manifest() for img in root_imgs},
                "early_initrd": early_info or None,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1),
            }
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            out.chmod(0o755)
            install(output_dir, out, digest)
        prune(output_dir, digest, debs)
    finally:
        prog.close()
    art = find_image(output_dir)
    if art is None:
        raise errors.Internal(f"the guest image built in {images / digest} cannot be found")
    log.info("guest image %s built in %.1fs", digest, time.monotonic() - t0)
    return art
