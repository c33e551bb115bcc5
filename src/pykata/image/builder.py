"""Guest image builder: Debian's cloud kernel + an initrd holding Debian's
Python, crun, busybox and the pykata agent, built offline from the Debian
registry (``apt-get download`` + ``dpkg-deb -x``).

Layout under ``output_dir``::

    images/<digest>/{vmlinuz,vmlinux,initrd.img,manifest.json}   one build
    current -> images/<digest>                                   switched atomically
    vmlinuz, vmlinux, initrd.img, manifest.json -> current/...   stable paths
    cache/debs/*.deb                                             downloaded packages
    cache/apt-resolution.json                                    resolved versions

The build is cached by a digest of every input (builder version and source,
exact package versions, module list, agent sources, protobuf version, /init):
a second build with unchanged inputs only computes the digest and returns. The
package versions come from ``apt-cache``; they are remembered together with a
fingerprint of apt's state (package lists, dpkg status, /etc/apt), so the
digest is computed without running apt until that state changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pykata import errors

log = logging.getLogger(__name__)

BUILDER_VERSION = "3"
KERNEL_META = "linux-image-cloud-amd64"

# Debian packages of the root filesystem: Python (with the stdlib parts the
# agent imports), crun and the libraries it links, busybox for a shell and `ip`,
# libstdc++/libgcc for protobuf's C extension. Libraries nothing links are
# pruned after unpacking (see _prune_libraries).
ROOTFS_PACKAGES = (
    "libc6", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libexpat1", "zlib1g", "libffi8",
    "crun", "libcap2", "libseccomp2", "libsystemd0", "libyajl2", "libgcrypt20",
    "libgpg-error0", "liblz4-1", "liblzma5", "libzstd1",
    "busybox-static", "libstdc++6", "libgcc-s1",
)

# Kernel modules the guest loads at boot; the builder adds their dependencies
# (from modules.dep) and skips the ones built into the kernel.
GUEST_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "fuse", "virtiofs", "overlay",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "crc16", "mbcache", "jbd2", "ext4", "virtio_balloon",
)

# What the guest never needs.
_TRIM = (
    "usr/share", "usr/lib/binfmt.d", "etc/python3.11", "etc/ld.so.conf.d", "var",
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/distutils", "usr/lib/python3.11/unittest",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu", "usr/lib/python3.11/sqlite3",
    "usr/lib/python3.11/dbm", "usr/lib/python3.11/curses", "usr/lib/python3.11/xmlrpc",
    "usr/lib/python3.11/wsgiref", "usr/lib/python3.11/venv", "usr/lib/python3.11/msilib",
    "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/x86_64-linux-gnu/engines-3", "usr/lib/x86_64-linux-gnu/ossl-modules",
    "usr/lib/x86_64-linux-gnu/libcrun.a", "usr/lib/debug",
    "usr/bin/pydoc3.11", "usr/sbin/ldconfig", "usr/lib/python3.11/sitecustomize.py",
    # Parts of the stdlib the agent never imports (checked at build time).
    "usr/lib/python3.11/email", "usr/lib/python3.11/xml", "usr/lib/python3.11/multiprocessing",
    "usr/lib/python3.11/http", "usr/lib/python3.11/html", "usr/lib/python3.11/zoneinfo",
    "usr/lib/python3.11/tomllib", "usr/lib/python3.11/ctypes/macholib",
    "usr/lib/python3.11/_pydecimal.py", "usr/lib/python3.11/pydoc.py",
    "usr/lib/python3.11/doctest.py", "usr/lib/python3.11/pdb.py", "usr/lib/python3.11/turtle.py",
    "usr/lib/python3.11/mailbox.py", "usr/lib/python3.11/imaplib.py",
    "usr/lib/python3.11/smtplib.py", "usr/lib/python3.11/ftplib.py",
    "usr/lib/python3.11/nntplib.py", "usr/lib/python3.11/tarfile.py",
)

# Extension modules the agent never imports (or whose libraries are not shipped:
# no OpenSSL, so hashlib uses its builtin hashes and asyncio has no ssl).
_TRIM_EXTENSIONS = (
    "_test", "_xx", "xxlimited", "_ctypes_test", "_codecs_", "_multibytecodec", "_curses",
    "_dbm", "_gdbm", "_sqlite3", "_ssl", "_hashlib", "audioop", "nis", "ossaudiodev",
    "readline", "_crypt", "_lsprof", "_decimal", "_uuid", "_zoneinfo", "_lzma", "_bz2",
    "_multiprocessing", "_posixshmem",
)

# Codecs kept (the others are legacy code pages and CJK codecs whose C parts are
# trimmed anyway).
_KEEP_ENCODINGS = {
    "__init__", "aliases", "ascii", "base64_codec", "charmap", "hex_codec", "idna", "latin_1",
    "punycode", "raw_unicode_escape", "undefined", "unicode_escape", "utf_16", "utf_16_be",
    "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7", "utf_8", "utf_8_sig",
    "zlib_codec", "cp437",
}

# Shared libraries nothing links but glibc or Python loads with dlopen.
_DLOPEN_LIBS = (
    "ld-linux-x86-64.so.2", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libnss_files.so.2",
    "libnss_dns.so.2", "libresolv.so.2", "libdl.so.2", "libpthread.so.0", "librt.so.1",
    "libutil.so.1",
)
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")

# Our code in the guest: only what the agent imports.
AGENT_PARTS = ("__init__.py", "errors.py", "ttrpc", "protos", "guest")

INIT = """#!/usr/bin/python3.11 -SB
import sys
sys.path.insert(0, "/opt/pykata/lib")
from pykata.guest.agent import main
sys.exit(main())
"""

_MANIFEST = "manifest.json"
_ARTIFACTS = ("vmlinuz", "vmlinux", "initrd.img", _MANIFEST)


@dataclass(frozen=True)
class ImageArtifacts:
    kernel: Path  # bzImage (vmlinuz) of the Debian cloud kernel
    vmlinux: Path | None  # uncompressed ELF from the bzImage (PVH boot), None if not extracted
    initrd: Path  # uncompressed newc cpio
    kernel_release: str  # e.g. "6.1.0-56-cloud-amd64"
    digest: str  # content hash of the inputs (the cache key)
    size_bytes: int  # initrd size


# -- small helpers -------------------------------------------------------------------
_TOOL_PACKAGE = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "depmod": "kmod",
                 "cpio": "cpio", "lz4": "lz4", "zstd": "zstd"}


def _run(argv: list[str], what: str, cwd: Path | None = None,
         env: Mapping[str, str] | None = None) -> str:
    """Run a tool; its last error line becomes a PykataError naming ``what``."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False,
                           env=None if env is None else dict(env))
    except FileNotFoundError as exc:
        pkg = _TOOL_PACKAGE.get(Path(argv[0]).name, Path(argv[0]).name)
        raise errors.FailedPrecondition(
            f"{what}: {argv[0]} is not installed (apt-get install {pkg})") from exc
    if p.returncode != 0:
        raise errors.Unavailable(f"{what}: {_last_error(p.stderr or p.stdout, p.returncode)}")
    return p.stdout


def _last_error(text: str, rc: int) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("E:")]
    if errs:
        return errs[0]
    return lines[-1] if lines else f"exit status {rc}"


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.is_symlink() or p.exists():
        p.unlink()


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


# -- inputs: packages ----------------------------------------------------------------
def _unavailable(pkg: str, apt_error: str) -> errors.Unavailable:
    return errors.Unavailable(f"cannot download Debian package '{pkg}': {apt_error}"
                              " (run 'apt-get update' first?)")


def parse_kernel_depends(apt_cache_depends: str) -> str | None:
    """The concrete kernel package in ``apt-cache depends linux-image-cloud-amd64``."""
    for line in apt_cache_depends.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\d\S*)", line)
        if m:
            return m.group(1)
    return None


def kernel_package() -> str:
    """linux-image-cloud-amd64 resolved to its linux-image-6.1.0-NN-cloud-amd64."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_META], "apt-cache depends")
    except errors.Unavailable as exc:
        raise _unavailable(KERNEL_META, str(exc).split(": ", 1)[-1]) from None
    pkg = parse_kernel_depends(out)
    if pkg is None:
        raise _unavailable(KERNEL_META, "E: it depends on no linux-image package")
    return pkg


def parse_policy(apt_cache_policy: str) -> dict[str, str]:
    """``apt-cache policy A B ...`` -> {package: candidate version} (known candidates only)."""
    versions: dict[str, str] = {}
    current = ""
    for line in apt_cache_policy.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            v = line.split("Candidate:", 1)[1].strip()
            if v and v != "(none)":
                versions[current] = v
    return versions


def candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    pkgs = list(packages)
    out = _run(["apt-cache", "policy", *pkgs], "apt-cache policy")
    versions = parse_policy(out)
    known = set(re.findall(r"^(\S+):$", out, flags=re.M))
    for p in pkgs:
        if p not in versions:
            why = ("E: Package '%s' has no installation candidate" if p in known
                   else "E: Unable to locate package %s")
            raise _unavailable(p, why % p)
    return versions


def apt_state_fingerprint() -> str:
    """Changes whenever apt's answer about candidate versions could change."""
    h = hashlib.sha256()
    h.update(os.environ.get("APT_CONFIG", "").encode())
    paths = [Path("/var/lib/dpkg/status")]
    for base in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if base.is_dir():
            paths += sorted(p for p in base.rglob("*") if "partial" not in p.parts)
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"{p} {st.st_mtime_ns} {st.st_size}\n".encode())
    return h.hexdigest()


def resolve_packages(cache_dir: Path) -> tuple[str, dict[str, str]]:
    """(kernel package, {package: version}) for every package of the image.

    Asks apt (about 2 s here) only when apt's state changed since the last
    answer, which is kept in ``cache_dir/apt-resolution.json``."""
    cache_file = cache_dir / "apt-resolution.json"
    fp = apt_state_fingerprint()
    wanted = [KERNEL_META, *ROOTFS_PACKAGES]
    try:
        cached = json.loads(cache_file.read_text())
        if cached["fingerprint"] == fp and cached["wanted"] == wanted:
            return str(cached["kernel_package"]), dict(cached["versions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kpkg = kernel_package()
    versions = candidate_versions((*ROOTFS_PACKAGES, kpkg))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fp, "wanted": wanted, "kernel_package": kpkg,
                                   "versions": versions}, indent=1))
        tmp.replace(cache_file)
    except OSError as exc:  # a read-only output dir still builds nothing new
        log.debug("cannot cache the apt resolution: %s", exc)
    return kpkg, versions


# -- inputs: our code ------------------------------------------------------------------
def _pykata_root() -> Path:
    import pykata

    return Path(pykata.__file__).parent


def agent_sources() -> list[Path]:
    """The .py files of pykata the guest agent needs."""
    root = _pykata_root()
    files: list[Path] = []
    for part in AGENT_PARTS:
        p = root / part
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    return files


def protobuf_dir() -> Path:
    import google.protobuf

    return Path(google.protobuf.__file__).parent


def protobuf_version() -> str:
    from google.protobuf import __version__

    return str(__version__)


def compute_digest(versions: Mapping[str, str], sources: Iterable[Path], pb_version: str,
                   modules: Iterable[str] = GUEST_MODULES) -> str:
    """The cache key of a build: every input that changes the image."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    h.update(Path(__file__).read_bytes())  # the builder's own recipe
    for name in sorted(versions):
        h.update(f"pkg {name}={versions[name]}\n".encode())
    h.update(("modules " + " ".join(modules) + "\n").encode())
    h.update(f"protobuf={pb_version}\n".encode())
    root = _pykata_root()
    for f in sources:
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        data = f.read_bytes()
        h.update(f"file {rel} {len(data)}\n".encode())
        h.update(data)
    h.update(INIT.encode())
    return h.hexdigest()[:16]


# -- modules -------------------------------------------------------------------------
def module_name(path: str) -> str:
    """kernel/fs/fuse/virtiofs.ko.xz -> virtiofs (dashes as underscores)."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if not sep or not path.strip():
            continue
        out[module_name(path.strip())] = (path.strip(), deps.split())
    return out


def module_load_order(wanted: Iterable[str], deps: Mapping[str, tuple[str, list[str]]],
                      builtin: set[str]) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first.
    Built-in and unknown modules are skipped."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            return
        path, requires = deps[name]
        for dep in reversed(requires):  # modules.dep lists the closest dependency first
            visit(module_name(dep))
        order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


def _decompressed(rel: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if rel.endswith(suffix):
            return rel.removesuffix(suffix)
    return rel


def _install_module(src: Path, dst: Path) -> None:
    """Copy a module, decompressed (the agent calls finit_module without flags)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".xz"):
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.name.endswith(".gz"):
        import gzip

        dst.write_bytes(gzip.decompress(src.read_bytes()))
    elif src.name.endswith(".zst"):
        with open(dst, "wb") as fh:
            subprocess.run(["zstd", "-dc", str(src)], stdout=fh, check=True)
    else:
        shutil.copyfile(src, dst)


# -- kernel --------------------------------------------------------------------------
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def find_lz4_vmlinux(bzimage: bytes, start: int = 0) -> int:
    """Offset of the next LZ4 (legacy frame) magic at or after ``start``, or -1."""
    return bzimage.find(LZ4_LEGACY_MAGIC, start)


def elf_complete(data: bytes) -> bool:
    """A 64-bit ELF whose section header table (at the end) is all there."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    return bool(len(data) >= shoff + shentsize * shnum)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed vmlinux ELF inside an LZ4-compressed bzImage, or None."""
    off = find_lz4_vmlinux(bzimage)
    while off >= 0:
        try:
            # lz4 complains about the bytes after the stream; the output is what counts.
            raw = subprocess.run(["lz4", "-dc"], input=bzimage[off:], capture_output=True,
                                 check=False).stdout
        except FileNotFoundError:
            log.warning("lz4 is not installed: no uncompressed vmlinux (apt-get install lz4)")
            return None
        if elf_complete(raw):
            return raw
        off = find_lz4_vmlinux(bzimage, off + 1)
    return None


# -- ELF dependencies ---------------------------------------------------------------------
@dataclass(frozen=True)
class ElfInfo:
    interp: str | None  # PT_INTERP (the dynamic loader), None for static binaries
    needed: tuple[str, ...]  # DT_NEEDED


def elf_info(data: bytes) -> ElfInfo | None:
    """Loader and needed libraries of a little-endian ELF64 file, None if not one."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return None
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, off)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return ElfInfo(interp, ())
    strtab_vaddr = None
    needed_offsets = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1] - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed_offsets.append(val)
        elif tag == 5:  # DT_STRTAB
            strtab_vaddr = val
    if strtab_vaddr is None:
        return ElfInfo(interp, ())
    strtab = next((strtab_vaddr - v + o for v, o, sz in loads if v <= strtab_vaddr < v + sz),
                  None)
    if strtab is None:
        return None
    names = tuple(data[strtab + n:data.index(b"\0", strtab + n)].decode()
                  for n in needed_offsets)
    return ElfInfo(interp, names)


def _resolve_in(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with symlinks (absolute ones too) resolved within it."""
    cur = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            cur = cur.parent if cur != root else root
            continue
        nxt = cur / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise errors.Internal(f"symlink loop at {nxt} in the guest image")
            target = os.readlink(nxt)
            if target.startswith("/"):
                cur = root
            parts = [p for p in target.split("/") if p] + parts
            continue
        cur = nxt
    return cur


def _prune_libraries(root: Path) -> None:
    """Check that every shared library (and loader) the image's programs need is in
    it, then delete the libraries nothing needs."""
    dirs = [root / d for d in _LIB_DIRS]

    def find(lib: str) -> Path | None:
        for d in dirs:
            if os.path.lexists(d / lib):
                return d / lib
        return None

    programs = [p for p in (root / "usr/bin").iterdir() if p.is_file() and not p.is_symlink()]
    programs += [p for p in root.glob("usr/lib/python3.11/lib-dynload/*.so")]
    programs += [p for p in (root / "opt").rglob("*.so") if p.is_file()]
    keep: set[Path] = set()
    missing: dict[str, str] = {}
    queue: list[tuple[Path, str]] = [(p, p.name) for p in programs]
    queue += [(found, n) for n in _DLOPEN_LIBS if (found := find(n)) is not None]
    seen: set[Path] = set()
    while queue:
        path, why = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        real = _resolve_in(root, str(path.relative_to(root)))
        keep.update({path, real})
        info = elf_info(real.read_bytes()) if real.is_file() else None
        if info is None:
            continue
        if info.interp:
            loader = _resolve_in(root, info.interp)
            if not loader.is_file():
                missing[info.interp] = why
            else:
                queue.append((loader, why))
        for name in info.needed:
            dep = find(name)
            if dep is None:
                missing[name] = why
            else:
                queue.append((dep, why))
    if missing:
        raise errors.Internal(
            "guest image is missing shared libraries: "
            + ", ".join(f"{k} (for {v})" for k, v in sorted(missing.items())))
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if re.match(r"lib.*\.so(\.|$)", p.name) and p not in keep:
                _rm(p)


# -- build steps ---------------------------------------------------------------------
@contextmanager
def _tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def _locked(output_dir: Path) -> Iterator[None]:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / ".build.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def deb_filename(name: str, version: str) -> str:
    """The file ``apt-get download name=version`` writes (without the arch)."""
    return f"{name}_{version.replace(':', '%3a')}_"


def _cached_deb(cache: Path, name: str, version: str) -> Path | None:
    prefix = deb_filename(name, version)
    return next((p for p in sorted(cache.glob("*.deb")) if p.name.startswith(prefix)), None)


def apt_error_package(apt_error: str, packages: Iterable[str]) -> str:
    """The package an apt error line is about (all of them if it names none)."""
    names = sorted(packages)
    for n in sorted(names, key=len, reverse=True):
        if re.search(rf"[\s'\"]{re.escape(n)}[\s'\"=:]", f" {apt_error} "):
            return n
    return ", ".join(names)


def _download(versions: Mapping[str, str], cache: Path,
              step: Callable[[str], None]) -> dict[str, Path]:
    """The .deb of every package, downloaded into ``cache`` unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = {n: v for n, v in versions.items() if _cached_deb(cache, n, v) is None}
    if missing:
        step(f"download {len(missing)} Debian packages")
        with _tempdir(cache, ".download-") as tmp:
            p = subprocess.run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                 *(f"{n}={v}" for n, v in sorted(missing.items()))],
                cwd=tmp, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                err = _last_error(p.stderr or p.stdout, p.returncode)
                raise _unavailable(apt_error_package(err, missing), err)
            for fresh in tmp.glob("*.deb"):
                fresh.replace(cache / fresh.name)
    debs: dict[str, Path] = {}
    for n, v in versions.items():
        deb = _cached_deb(cache, n, v)
        if deb is None:
            raise _unavailable(n, f"E: apt-get download {n}={v} left no .deb in {cache}")
        debs[n] = deb
    return debs


def _merge_usr(root: Path) -> None:
    """Debian's merged /usr: /bin, /sbin, /lib, /lib64 are symlinks into /usr."""
    for top in ("bin", "sbin", "lib", "lib64"):
        src = root / top
        dst = root / "usr" / top
        dst.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            for dirpath, dirnames, filenames in os.walk(src):
                rel = Path(dirpath).relative_to(src)
                (dst / rel).mkdir(exist_ok=True)
                for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                    target = dst / rel / name
                    if not os.path.lexists(target):
                        os.rename(Path(dirpath) / name, target)
            shutil.rmtree(src)
        elif src.is_symlink():
            src.unlink()
        src.symlink_to(f"usr/{top}")


def _unpack(debs: Mapping[str, Path], kernel_pkg: str, root: Path, kroot: Path,
            step: Callable[[str], None]) -> None:
    for name, deb in sorted(debs.items()):
        _run(["dpkg-deb", "-x", str(deb), str(kroot if name == kernel_pkg else root)],
             f"cannot unpack Debian package '{name}' ({deb.name})")
        step(f"unpack {name}")


def _kernel(kroot: Path, out: Path, step: Callable[[str], None]) -> str:
    vmlinuz = next(iter(sorted((kroot / "boot").glob("vmlinuz-*"))), None)
    if vmlinuz is None:
        raise errors.Internal(f"no /boot/vmlinuz-* in the kernel package ({kroot})")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    raw = extract_vmlinux(vmlinuz.read_bytes())
    if raw is not None:
        (out / "vmlinux").write_bytes(raw)
    else:
        log.warning("no uncompressed vmlinux in %s: the guest boots from the bzImage", vmlinuz)
    step(f"kernel {release}" + (" + vmlinux" if raw is not None else ""))
    return release


def _modules(kroot: Path, root: Path, release: str, step: Callable[[str], None]) -> list[str]:
    """Copy the closure of GUEST_MODULES; write /etc/pykata/modules (load order,
    paths relative to /) and a modules.dep of the shipped modules."""
    mdir = kroot / "lib/modules" / release
    if not (mdir / "modules.dep").exists():  # depmod runs at install time, not in the .deb
        _run(["depmod", "-b", str(kroot), release], f"cannot index the modules of {release}")
    deps = parse_modules_dep((mdir / "modules.dep").read_text())
    builtin_file = mdir / "modules.builtin"
    builtin = ({module_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    order = module_load_order(GUEST_MODULES, deps, builtin)
    absent = [m for m in GUEST_MODULES if m.replace("-", "_") not in deps
              and m.replace("-", "_") not in builtin]
    if absent:
        log.warning("kernel %s has neither module nor built-in: %s", release, " ".join(absent))
    base = Path("lib/modules") / release
    load_list: list[str] = []
    dep_lines: list[str] = []
    for rel in order:
        _install_module(mdir / rel, root / "usr" / base / _decompressed(rel))
        load_list.append(str(base / _decompressed(rel)))
        own_deps = deps[module_name(rel)][1]
        dep_lines.append(f"{_decompressed(rel)}: " + " ".join(_decompressed(d) for d in own_deps))
    if builtin_file.exists():  # lets the agent tell "built in" from "missing"
        shutil.copyfile(builtin_file, root / "usr" / base / "modules.builtin")
    (root / "usr" / base / "modules.dep").write_text("\n".join(dep_lines) + "\n")
    (root / "etc/pykata").mkdir(parents=True, exist_ok=True)
    (root / "etc/pykata/modules").write_text("\n".join(load_list) + "\n")
    step(f"{len(load_list)} kernel modules")
    return load_list


def _trim(root: Path, step: Callable[[str], None]) -> None:
    for rel in _TRIM:
        _rm(root / rel)
    for p in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if p.name.startswith(_TRIM_EXTENSIONS):
            p.unlink()
    for p in (root / "usr/lib/python3.11/encodings").glob("*.py"):
        if p.stem not in _KEEP_ENCODINGS:
            p.unlink()
    for p in list(root.rglob("__pycache__")):
        shutil.rmtree(p, ignore_errors=True)
    step("trim")


def _guest_python(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the image's own Python chrooted into the image (the host is x86_64
    Linux): only the image's loader, libraries and stdlib can serve it."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/root"}
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "chroot"
    try:
        return subprocess.run([chroot, str(root), "/usr/bin/python3.11", *args],
                              capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition("chroot is not installed (apt-get install coreutils)") \
            from exc


def _install_agent(root: Path, digest: str, release: str, step: Callable[[str], None]) -> None:
    # busybox applets (absolute links: they resolve in the guest).
    bb = root / "usr/bin/busybox"
    applets = _run([str(bb), "--list-full"], "busybox --list-full").split()
    for a in applets:
        where, _, name = a.strip("/").removeprefix("usr/").rpartition("/")
        if where not in ("bin", "sbin"):  # e.g. /linuxrc
            continue
        link = root / "usr" / where / name
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    # Our agent and protobuf (with its C extension when the wheel has one).
    src_root = _pykata_root()
    lib = root / "opt/pykata/lib"
    for f in agent_sources():
        dst = lib / "pykata" / f.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    pb = protobuf_dir()
    shutil.copytree(pb, lib / "google/protobuf", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "testdata", "compiler", "*.pyi",
                                                  "py.typed"))
    upb = pb.parent / "_upb"
    if upb.is_dir():
        shutil.copytree(upb, lib / "google/_upb", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))
    (lib / "google/__init__.py").touch()
    # The rest of a tiny root: mount points, device nodes for before devtmpfs, /init.
    for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "root", "var/tmp", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/tmp").chmod(0o1777)
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnobody:x:65534:\n")
    (root / "etc/hostname").write_text("pykata\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (root / "etc/nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\n"
                                            "hosts: files dns\nnetworks: files\n")
    (root / "etc/pykata/image.json").write_text(json.dumps(
        {"digest": digest, "kernel_release": release, "builder": BUILDER_VERSION}) + "\n")
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    step("agent, protobuf, busybox, /init")


def _check_agent_imports(root: Path) -> None:
    """Import every agent module with the image's own Python, libraries and stdlib:
    a module trimmed away fails the build, not the guest's boot."""
    lib = root / "opt/pykata/lib"
    names = ["pykata.guest." + p.stem for p in sorted((lib / "pykata/guest").glob("*.py"))
             if p.stem != "__init__"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
            "for n in sys.argv[2:]: importlib.import_module(n)\n"
            "import asyncio, ctypes, json, socket, signal, struct, logging, hashlib\n"
            "hashlib.sha256(b''); hashlib.md5(b'')\n"
            "from google.protobuf.internal import api_implementation as a\n"
            "print(a.Type())")
    cp = _guest_python(root, "-S", "-B", "-c", code, "/opt/pykata/lib", *names)
    if cp.returncode != 0:
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.Internal(f"the agent cannot run in the guest image: {err}")
    if cp.stderr.strip():
        log.warning("the agent's imports in the guest image print: %s", cp.stderr.strip())
    if cp.stdout.strip() != "upb":
        log.warning("protobuf's C extension does not load in the guest image (implementation:"
                    " %s): the agent works, slower", cp.stdout.strip())


def _precompile(root: Path, step: Callable[[str], None]) -> None:
    """Sourceless bytecode made by the guest's own Python: smaller initrd, no
    source stat at import. Tracebacks keep file names and line numbers."""
    dirs = ["usr/lib/python3.11", "opt/pykata/lib"]
    cp = _guest_python(root, "-S", "-B", "-m", "compileall", "-q", "-b", *("/" + d for d in dirs))
    if cp.returncode != 0:
        detail = (cp.stdout + cp.stderr).strip().splitlines()
        raise errors.Internal("cannot compile the guest's Python: "
                              + (detail[-1] if detail else f"exit status {cp.returncode}"))
    for d in dirs:
        for src in (root / d).rglob("*.py"):
            if src.with_suffix(".pyc").exists():
                src.unlink()
        for cache in list((root / d).rglob("__pycache__")):
            shutil.rmtree(cache)
    step("precompile Python")


def _cpio(root: Path, dest: Path, step: Callable[[str], None]) -> int:
    """newc cpio, uncompressed (QEMU keeps its own copy; compression does not help)."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames + filenames:
            names.append(n if rel == "." else f"{rel}/{n}")
    data = ("\n".join(sorted(names)) + "\n").encode()
    with open(dest, "wb") as fh:
        try:
            p = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible",
                                "--owner", "0:0"], cwd=root, input=data, stdout=fh,
                               stderr=subprocess.PIPE, check=False)
        except FileNotFoundError as exc:
            raise errors.FailedPrecondition("cpio is not installed (apt-get install cpio)") \
                from exc
    if p.returncode != 0:
        raise errors.Internal(f"cpio failed: {p.stderr.decode(errors='replace').strip()}")
    size = dest.stat().st_size
    step(f"initrd {size / 2**20:.1f} MiB")
    return size


# -- public API ----------------------------------------------------------------------
def find_image(output_dir: Path) -> ImageArtifacts | None:
    """The current build in ``output_dir`` (from its manifest), or None."""
    output_dir = Path(output_dir)
    try:
        m = json.loads((output_dir / _MANIFEST).read_text())
        release, digest, size = str(m["kernel_release"]), str(m["digest"]), int(m["initrd_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kernel, vmlinux, initrd = (output_dir / n for n in ("vmlinuz", "vmlinux", "initrd.img"))
    if not kernel.is_file() or not initrd.is_file():
        return None
    return ImageArtifacts(kernel=kernel, vmlinux=vmlinux if vmlinux.is_file() else None,
                          initrd=initrd, kernel_release=release, digest=digest,
                          size_bytes=size)


def image_digest(output_dir: Path) -> tuple[str, str, dict[str, str]]:
    """(digest, kernel package, versions) of what a build would produce now."""
    kpkg, versions = resolve_packages(Path(output_dir) / "cache")
    return compute_digest(versions, agent_sources(), protobuf_version()), kpkg, versions


def build_image(output_dir: Path, *, force: bool = False, progress: bool = True,
                work_dir: Path | None = None) -> ImageArtifacts:
    """Build the guest image into ``output_dir``, or return the current one when
    its inputs are unchanged (and ``force`` is false)."""
    output_dir = Path(output_dir)
    digest, kpkg, versions = image_digest(output_dir)
    current = find_image(output_dir)
    if current is not None and current.digest == digest and not force:
        log.info("guest image %s is up to date", digest)
        return current
    with _locked(output_dir):
        current = find_image(output_dir)  # built by someone else meanwhile?
        if current is not None and current.digest == digest and not force:
            return current
        return _build(output_dir, digest, kpkg, versions, progress, work_dir)


def _build(output_dir: Path, digest: str, kpkg: str, versions: dict[str, str], progress: bool,
           work_dir: Path | None) -> ImageArtifacts:
    t0 = time.monotonic()
    images = output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(".*"):  # left by a killed build (we hold the lock)
        _rm(stale)
    prog = _Progress(progress, total=len(versions) + 7)
    try:
        with _tempdir(work_dir or images, ".build-") as stage, \
                _tempdir(images, f".new-{digest}-") as out:
            debs = _download(versions, output_dir / "cache/debs", prog.step)
            root, kroot = stage / "root", stage / "kernel"
            root.mkdir()
            kroot.mkdir()
            _unpack(debs, kpkg, root, kroot, prog.step)
            _merge_usr(root)
            release = _kernel(kroot, out, prog.step)
            modules = _modules(kroot, root, release, prog.step)
            shutil.rmtree(kroot)
            _trim(root, prog.step)
            _install_agent(root, digest, release, prog.step)
            _prune_libraries(root)
            _check_agent_imports(root)
            _precompile(root, prog.step)
            size = _cpio(root, out / "initrd.img", prog.step)
            manifest = {
                "digest": digest, "builder": BUILDER_VERSION, "kernel_release": release,
                "kernel_package": kpkg, "packages": dict(sorted(versions.items())),
                "initrd_bytes": size, "vmlinuz_bytes": (out / "vmlinuz").stat().st_size,
                "vmlinux": (out / "vmlinux").exists(), "modules": modules,
                "protobuf": protobuf_version(),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1),
            }
            (out / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            out.chmod(0o755)
            _install(output_dir, out, digest)
        _prune(output_dir, digest, debs)
    finally:
        prog.close()
    art = find_image(output_dir)
    if art is None:
        raise errors.Internal(f"the guest image built in {images / digest} cannot be found")
    log.info("guest image %s built in %.1fs", digest, time.monotonic() - t0)
    return art


def _install(output_dir: Path, out: Path, digest: str) -> None:
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
        _rm(tmp)
        tmp.symlink_to(target)
        tmp.replace(path)

    link(output_dir / "current", f"images/{digest}")
    for name in _ARTIFACTS:
        link(output_dir / name, f"current/{name}")


def _prune(output_dir: Path, digest: str, debs: Mapping[str, Path]) -> None:
    """Drop older builds and .debs no longer used."""
    for old in (output_dir / "images").iterdir():
        if old.name != digest and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    used = {p.name for p in debs.values()}
    for deb in (output_dir / "cache/debs").glob("*.deb"):
        if deb.name not in used:
            deb.unlink(missing_ok=True)
