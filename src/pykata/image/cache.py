"""The build cache: the digest of a build's inputs (its cache key) and the
layout builds are kept in under ``output_dir``::

    images/<digest>/{vmlinuz,vmlinux,initrd.img,manifest.json}   one build
    images/<digest>/{rootfs.erofs,rootfs.ext4,initrd-early.img}  the image root, if built
    current -> images/<digest>                                   switched atomically
    vmlinuz, vmlinux, initrd.img, manifest.json, ... -> current/...  stable paths
    cache/debs/*.deb                                             downloaded packages
    cache/apt-resolution.json                                    resolved versions

The digest hashes every input that changes the image: the builder's version
and its recipe (the source of every module of this package), the exact package
versions, the module list, the agent sources, the protobuf version and /init.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pykata.image.agent import INIT, pykata_root
from pykata.image.kernel import GUEST_MODULES
from pykata.image.tools import rm

BUILDER_VERSION = "4"

MANIFEST = "manifest.json"
EARLY_INITRD = "initrd-early.img"
ARTIFACTS = ("vmlinuz", "vmlinux", "initrd.img", MANIFEST)
# Made only when asked (or when the tool is there): linked when present.
OPTIONAL_ARTIFACTS = ("rootfs.erofs", "rootfs.ext4", EARLY_INITRD)


@dataclass(frozen=True)
class ImageArtifacts:
    kernel: Path  # bzImage (vmlinuz) of the Debian cloud kernel
    vmlinux: Path | None  # uncompressed ELF from the bzImage (PVH boot), None if not extracted
    initrd: Path  # uncompressed newc cpio
    kernel_release: str  # e.g. "6.1.0-56-cloud-amd64"
    digest: str  # content hash of the inputs (the cache key)
    size_bytes: int  # initrd size
    # The image root (see rootimage.py): file system -> image file, and the early
    # initrd that mounts it. Empty / None when the build made none.
    root_images: dict[str, Path] = field(default_factory=dict)
    early_initrd: Path | None = None
    root_data_offset: int = 0  # where the file system starts in each image file


# -- the cache key -------------------------------------------------------------------
def recipe_sources() -> list[Path]:
    """The builder's own recipe: every module of this package, by name."""
    return sorted(Path(__file__).parent.glob("*.py"))


def compute_digest(versions: Mapping[str, str], sources: Iterable[Path], pb_version: str,
                   modules: Iterable[str] = GUEST_MODULES) -> str:
    """The cache key of a build: every input that changes the image."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    for f in recipe_sources():
        data = f.read_bytes()
        h.update(f"recipe {f.name} {len(data)}\n".encode())
        h.update(data)
    for name in sorted(versions):
        h.update(f"pkg {name}={versions[name]}\n".encode())
    h.update(("modules " + " ".join(modules) + "\n").encode())
    h.update(f"protobuf={pb_version}\n".encode())
    root = pykata_root()
    for f in sources:
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        data = f.read_bytes()
        h.update(f"file {rel} {len(data)}\n".encode())
        h.update(data)
    h.update(INIT.encode())
    return h.hexdigest()[:16]


# -- the layout ----------------------------------------------------------------------
def find_image(output_dir: Path) -> ImageArtifacts | None:
    """The current build in ``output_dir`` (from its manifest), or None."""
    output_dir = Path(output_dir)
    try:
        m = json.loads((output_dir / MANIFEST).read_text())
        release, digest, size = str(m["kernel_release"]), str(m["digest"]), int(m["initrd_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kernel, vmlinux, initrd = (output_dir / n for n in ("vmlinuz", "vmlinux", "initrd.img"))
    if not kernel.is_file() or not initrd.is_file():
        return None
    images: dict[str, Path] = {}
    offset = 0
    entries = m.get("root_images")
    for fstype, entry in (entries.items() if isinstance(entries, dict) else ()):
        try:
            path = output_dir / str(entry["file"])
            offset = int(entry["data_offset"])
        except (KeyError, TypeError, ValueError):
            continue
        if path.is_file():
            images[str(fstype)] = path
    early = output_dir / EARLY_INITRD
    return ImageArtifacts(kernel=kernel, vmlinux=vmlinux if vmlinux.is_file() else None,
                          initrd=initrd, kernel_release=release, digest=digest,
                          size_bytes=size, root_images=images,
                          early_initrd=early if images and early.is_file() else None,
                          root_data_offset=offset if images else 0)


@contextmanager
def locked(output_dir: Path) -> Iterator[None]:
    """One build at a time per ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".build.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def install(output_dir: Path, out: Path, digest: str) -> None:
    """Move the finished build into images/<digest> and switch ``current`` to it
    (one atomic rename); the stable names point through ``current``."""
    images = output_dir / "images"
    final = images / digest
    if final.exists():  # a forced rebuild of the same inputs
        old = images / f".old-{digest}-{os.getpid()}"
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.rename(final)

    def link(path: Path, target: str) -> None:
        if path.is_symlink() and os.readlink(path) == target:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        rm(tmp)
        tmp.symlink_to(target)
        tmp.replace(path)

    link(output_dir / "current", f"images/{digest}")
    for name in ARTIFACTS:
        link(output_dir / name, f"current/{name}")
    for name in OPTIONAL_ARTIFACTS:
        if (final / name).exists():
            link(output_dir / name, f"current/{name}")
        elif (output_dir / name).is_symlink():
            (output_dir / name).unlink()


def prune(output_dir: Path, digest: str, debs: Mapping[str, Path]) -> None:
    """Drop older builds and .debs no longer used."""
    for old in (output_dir / "images").iterdir():
        if old.name != digest and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    used = {p.name for p in debs.values()}
    for deb in (output_dir / "cache/debs").glob("*.deb"):
        if deb.name not in used:
            deb.unlink(missing_ok=True)
