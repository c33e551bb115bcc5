"""Guest image builder: Debian's cloud kernel + an initrd holding Debian's
Python, crun, busybox and the pykata agent, built offline from the Debian
registry (``apt-get download`` + ``dpkg-deb -x``).

The output is cached by a digest of every input (builder version, exact
package versions, module list, agent sources, protobuf version): a second
build with unchanged inputs only computes the digest and returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pykata import errors

log = logging.getLogger(__name__)

BUILDER_VERSION = "2"
KERNEL_META = "linux-image-cloud-amd64"

# Debian packages of the root filesystem: Python (with the stdlib parts the
# agent imports), crun and the libraries it links, busybox for a shell and `ip`,
# libstdc++/libgcc for protobuf's C extension.
ROOTFS_PACKAGES = (
    "libc6", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5",
    "crun", "libcap2", "libseccomp2", "libsystemd0", "libyajl2", "libgcrypt20",
    "libgpg-error0", "liblz4-1", "libzstd1", "busybox-static", "libstdc++6", "libgcc-s1",
)

# Kernel modules the guest loads at boot, in an order that satisfies their
# dependencies (the builder adds any missing dependency from modules.dep).
GUEST_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "fuse", "virtiofs", "overlay",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "crc16", "mbcache", "jbd2", "ext4",
)

# What the guest never needs.
_TRIM = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "usr/share/bug", "usr/share/bash-completion", "usr/share/gcc",
    "usr/share/gdb", "usr/share/apport", "usr/share/binfmts", "usr/share/pixmaps",
    "usr/share/applications", "usr/share/python3", "etc/python3.11",
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/distutils", "usr/lib/python3.11/unittest",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu", "usr/lib/python3.11/sqlite3",
    "usr/lib/python3.11/dbm", "usr/lib/python3.11/curses", "usr/lib/python3.11/xmlrpc",
    "usr/lib/python3.11/wsgiref", "usr/lib/python3.11/venv", "usr/lib/python3.11/msilib",
    "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit",
    "usr/lib/x86_64-linux-gnu/engines-3", "usr/lib/x86_64-linux-gnu/ossl-modules",
    "usr/bin/pydoc3.11", "usr/sbin", "var", "sbin/ldconfig", "usr/lib/debug",
    # Parts of the stdlib the agent never imports.
    "usr/lib/python3.11/email", "usr/lib/python3.11/xml", "usr/lib/python3.11/multiprocessing",
    "usr/lib/python3.11/http", "usr/lib/python3.11/html", "usr/lib/python3.11/zoneinfo",
    "usr/lib/python3.11/tomllib", "usr/lib/python3.11/ctypes/macholib",
    "usr/lib/python3.11/_pydecimal.py", "usr/lib/python3.11/pydoc.py",
    "usr/lib/python3.11/doctest.py", "usr/lib/python3.11/pdb.py", "usr/lib/python3.11/turtle.py",
    "usr/lib/python3.11/mailbox.py", "usr/lib/python3.11/imaplib.py",
    "usr/lib/python3.11/smtplib.py", "usr/lib/python3.11/ftplib.py",
    "usr/lib/python3.11/nntplib.py", "usr/lib/python3.11/tarfile.py",
    # OpenSSL: asyncio works without ssl; hashlib falls back to its builtin hashes.
    "usr/lib/x86_64-linux-gnu/libcrypto.so.3", "usr/lib/x86_64-linux-gnu/libssl.so.3",
    "usr/lib/x86_64-linux-gnu/libcrun.a",
)

# Extension modules the agent never imports (or whose libraries are not shipped).
_TRIM_EXTENSIONS = (
    "_test", "_xx", "xxlimited", "_ctypes_test", "_codecs_", "_multibytecodec", "_curses",
    "_dbm", "_gdbm", "_sqlite3", "_ssl", "_hashlib", "audioop", "nis", "ossaudiodev",
    "readline", "_crypt", "_lsprof", "_decimal", "_uuid", "_zoneinfo", "_lzma", "_bz2",
)

# Our code in the guest: only what the agent imports.
AGENT_PARTS = ("__init__.py", "errors.py", "ttrpc", "protos", "guest")

INIT = """#!/usr/bin/python3.11 -SB
import sys
sys.path.insert(0, "/opt/pykata/lib")
from pykata.guest.agent import main
sys.exit(main())
"""


@dataclass(frozen=True)
class ImageArtifacts:
    kernel: Path
    vmlinux: Path | None
    initrd: Path
    kernel_release: str
    digest: str
    size_bytes: int


# -- small helpers -------------------------------------------------------------------
def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError as exc:
        raise errors.NotFound(f"{what}: {argv[0]} is not installed") from exc
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise errors.Unavailable(f"{what}: {err[-1] if err else f'exit {p.returncode}'}")
    return p.stdout


class _Progress:
    """rich progress on a terminal, log lines otherwise."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._rich = None
        self._task = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("{task.description:40}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"),
                                  TimeElapsedColumn(), transient=False)
            self._rich.start()
            self._task = self._rich.add_task("guest image", total=total)
        self.enabled = enabled

    def step(self, text: str) -> None:
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, description=text, advance=1)
        elif self.enabled:
            print(f"  - {text}", file=sys.stderr, flush=True)
        log.info("image build: %s", text)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# -- inputs --------------------------------------------------------------------------
def kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META], f"cannot resolve {KERNEL_META}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise errors.Unavailable(
        f"cannot resolve Debian package '{KERNEL_META}' (run 'apt-get update' first?)")


def candidate_versions(packages: Iterable[str]) -> dict[str, str]:
    pkgs = list(packages)
    out = _run(["apt-cache", "policy", *pkgs], "cannot query package versions")
    versions: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif "Candidate:" in line and current:
            v = line.split("Candidate:", 1)[1].strip()
            if v and v != "(none)":
                versions[current] = v
    missing = [p for p in pkgs if p not in versions]
    if missing:
        raise errors.Unavailable(
            f"cannot find Debian package(s) {', '.join(missing)}: E: Unable to locate package"
            " (run 'apt-get update' first?)")
    return versions


def agent_sources() -> list[Path]:
    import pykata

    root = Path(pykata.__file__).parent
    files: list[Path] = []
    for part in AGENT_PARTS:
        p = root / part
        if p.is_file():
            files.append(p)
        else:
            files += sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    return files


def protobuf_dir() -> Path:
    import google.protobuf

    return Path(google.protobuf.__file__).parent


def compute_digest(versions: dict[str, str], sources: Iterable[Path], pb_version: str) -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    for name in sorted(versions):
        h.update(f"pkg {name}={versions[name]}\n".encode())
    h.update(("modules " + " ".join(GUEST_MODULES) + "\n").encode())
    h.update(f"protobuf={pb_version}\n".encode())
    import pykata

    root = Path(pykata.__file__).parent
    for f in sources:
        h.update(f"file {f.relative_to(root)}\n".encode())
        h.update(f.read_bytes())
    h.update(INIT.encode())
    return h.hexdigest()[:16]


# -- modules -------------------------------------------------------------------------
def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [dependency paths])}."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        out[name] = (path, deps.split())
    return out


def module_load_order(wanted: Iterable[str], deps: dict[str, tuple[str, list[str]]],
                      builtin: set[str]) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, dependencies first."""
    by_path = {v[0]: k for k, v in deps.items()}
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
            visit(by_path.get(dep, Path(dep).name.split(".ko")[0].replace("-", "_")))
        order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


def find_lz4_vmlinux(bzimage: bytes) -> int:
    """Offset of the LZ4 (legacy frame) stream holding vmlinux in a bzImage, or -1."""
    return bzimage.find(b"\x02\x21\x4c\x18")


# -- build ---------------------------------------------------------------------------
@contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=".build-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _download(versions: dict[str, str], cache: Path, step: Callable[[str], None]) -> list[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    debs = []
    for name, version in sorted(versions.items()):
        quoted = version.replace(":", "%3a")
        existing = list(cache.glob(f"{name}_{quoted}_*.deb"))
        if not existing:
            step(f"download {name} {version}")
            try:
                _run(["apt-get", "download", f"{name}={version}"],
                     f"cannot download Debian package '{name}'", cwd=cache)
            except errors.Unavailable as exc:
                raise errors.Unavailable(f"{exc} (run 'apt-get update' first?)") from None
            existing = list(cache.glob(f"{name}_{quoted}_*.deb"))
            if not existing:
                raise errors.Unavailable(f"apt-get download {name} produced no .deb in {cache}")
        debs.append(existing[0])
    return debs


def _check_libraries(root: Path) -> None:
    """Every shared library our binaries need is in the image (ldd against the
    host's identical Debian libraries tells the names)."""
    libdirs = [root / "usr/lib/x86_64-linux-gnu", root / "lib/x86_64-linux-gnu", root / "lib64",
               root / "usr/lib64"]
    have = {p.name for d in libdirs if d.is_dir() for p in d.iterdir()}
    elves = [root / "usr/bin/python3.11", root / "usr/bin/crun"]
    elves += list((root / "usr/lib/python3.11/lib-dynload").glob("*.so"))
    elves += list((root / "opt/pykata/lib").rglob("*.so"))
    missing: dict[str, str] = {}
    needed_re = re.compile(r"\(NEEDED\)\s+Shared library: \[(.+)\]")
    for elf in elves:
        try:
            out = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True,
                                 check=False).stdout
        except FileNotFoundError:
            return  # binutils absent: skip the check
        for lib in needed_re.findall(out):
            if lib not in have:
                missing[lib] = elf.name
    # Modules whose libraries we chose not to ship; the agent never imports them.
    optional = {"libncursesw.so.6", "libtinfo.so.6", "libreadline.so.8", "libsqlite3.so.0",
                "libdb-5.3.so", "libgdbm.so.6", "libgdbm_compat.so.4", "libmpdec.so.3",
                "libuuid.so.1", "libnsl.so.2", "libtirpc.so.3", "libcrypt.so.1",
                "libpanelw.so.6"}
    hard = {k: v for k, v in missing.items() if k not in optional}
    if hard:
        raise errors.Internal(
            "guest image is missing shared libraries: "
            + ", ".join(f"{k} (for {v})" for k, v in sorted(hard.items())))


def _check_agent_imports(root: Path) -> None:
    """Import every agent module with the image's own Python and stdlib (the
    host runs the same Debian, so the binary runs here): a trimmed-away module
    fails the build, not the guest's boot."""
    import pykata.guest

    names = ["pykata.guest." + p.stem for p in Path(pykata.guest.__file__).parent.glob("*.py")
             if p.stem != "__init__"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
            "for n in sys.argv[2:]: importlib.import_module(n)\n"
            "from google.protobuf.internal import api_implementation as a\n"
            "print(a.Type())")
    env = {"PYTHONHOME": str(root / "usr"), "PATH": "/usr/bin:/bin"}
    cp = subprocess.run([str(root / "usr/bin/python3.11"), "-S", "-B", "-c", code,
                         str(root / "opt/pykata/lib"), *names], capture_output=True, text=True,
                        env=env, check=False)
    if cp.returncode != 0:
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.Internal(f"the agent cannot run in the guest image: {err}")
    if cp.stdout.strip() != "upb":
        raise errors.Internal("protobuf's C extension does not load in the guest image "
                              f"(implementation: {cp.stdout.strip()})")


def _assemble(stage: Path, debs: list[Path], kernel_pkg: str, out: Path,
              step: Callable[[str], None]) -> tuple[str, int]:
    root = stage / "root"
    kroot = stage / "kernel"
    root.mkdir()
    kroot.mkdir()
    for deb in debs:
        target = kroot if deb.name.startswith(kernel_pkg + "_") else root
        _run(["dpkg-deb", "-x", str(deb), str(target)], f"cannot unpack {deb.name}")
    step("unpack packages")

    # Kernel.
    vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copy2(vmlinuz, out / "vmlinuz")
    data = vmlinuz.read_bytes()
    off = find_lz4_vmlinux(data)
    if off >= 0:
        raw = subprocess.run(["lz4", "-dc"], input=data[off:], capture_output=True,
                             check=False).stdout
        if raw[:4] == b"\x7fELF":
            (out / "vmlinux").write_bytes(raw)
    step(f"kernel {release}")

    # Modules: the closure of GUEST_MODULES, decompressed, with a load-order list.
    mdir = kroot / "lib/modules" / release
    if not (mdir / "modules.dep").exists():  # depmod runs at install time, not in the .deb
        _run(["depmod", "-b", str(kroot), release], "depmod failed")
    deps = parse_modules_dep((mdir / "modules.dep").read_text())
    builtin = {Path(x).name.split(".ko")[0].replace("-", "_")
               for x in (mdir / "modules.builtin").read_text().split()}
    order = module_load_order(GUEST_MODULES, deps, builtin)
    load_list = []
    for rel in order:
        src = mdir / rel
        dst_rel = Path("lib/modules") / release / rel
        dst = root / dst_rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".xz"):
            dst = dst.with_suffix("")
            dst.write_bytes(subprocess.run(["xz", "-dc", str(src)], capture_output=True,
                                           check=True).stdout)
            dst_rel = dst_rel.with_suffix("")
        else:
            shutil.copy2(src, dst)
        load_list.append(str(dst_rel))
    (root / "etc/pykata").mkdir(parents=True, exist_ok=True)
    (root / "etc/pykata/modules").write_text("\n".join(load_list) + "\n")
    lines = [f"{p}:" for p in load_list]
    (root / "lib/modules" / release / "modules.dep").write_text("\n".join(lines) + "\n")
    step(f"{len(load_list)} kernel modules")

    # Trim what the guest never uses.
    for rel in _TRIM:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if p.name.startswith(_TRIM_EXTENSIONS):
            p.unlink()
    for p in list(root.rglob("__pycache__")):
        shutil.rmtree(p, ignore_errors=True)
    step("trim")

    # busybox applets, our agent, protobuf, /init, device nodes.
    bb = root / "bin/busybox"
    applets = subprocess.run([str(bb), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        link = root / a
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    import pykata

    src_root = Path(pykata.__file__).parent
    lib = root / "opt/pykata/lib"
    for f in agent_sources():
        dst = lib / "pykata" / f.relative_to(src_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    shutil.copytree(protobuf_dir(), lib / "google/protobuf", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "testdata", "compiler", "*.pyi"))
    upb = protobuf_dir().parent / "_upb"
    if upb.is_dir():  # protobuf's C extension (the fast backend)
        shutil.copytree(upb, lib / "google/_upb", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (lib / "google/__init__.py").touch()
    for d in ("proc", "sys", "dev", "tmp", "run", "mnt", "root", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    os.mknod(root / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\nnobody:x:65534:\n")
    (root / "etc/hostname").write_text("pykata\n")
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)
    _check_libraries(root)
    _check_agent_imports(root)
    step("agent, protobuf, init")

    # Sourceless bytecode: compile next to each source (the guest's Python is
    # 3.11 like ours, same bytecode), then drop the sources. Smaller initrd,
    # and no source stat at import.
    py_dirs = [str(root / "usr/lib/python3.11"), str(lib)]
    cp = subprocess.run([sys.executable, "-m", "compileall", "-q", "-b", "-s", str(root),
                         "-p", "/", *py_dirs], capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        raise errors.Internal(f"cannot compile the guest's Python: {cp.stdout[-300:]}")
    for d in py_dirs:
        for src in Path(d).rglob("*.py"):
            if src.with_suffix(".pyc").exists():
                src.unlink()
    step("precompile Python")

    # cpio (newc, uncompressed: QEMU keeps its own copy and boots it faster).
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True,
                           check=True).stdout
    sorted_names = b"\n".join(sorted(names.split(b"\n"))).strip() + b"\n"
    with open(out / "initrd.img", "wb") as fh:
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "--reproducible"], cwd=root,
                           input=sorted_names, stdout=fh, stderr=subprocess.PIPE, check=False)
    if cpio.returncode != 0:
        raise errors.Internal(f"cpio failed: {cpio.stderr.decode(errors='replace').strip()}")
    step("initrd")
    return release, (out / "initrd.img").stat().st_size


def find_image(output_dir: Path) -> ImageArtifacts | None:
    """The current build in ``output_dir`` (from its manifest), or None."""
    try:
        m = json.loads((output_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    d = (output_dir / "manifest.json").resolve().parent
    vmlinux = d / "vmlinux"
    art = ImageArtifacts(kernel=output_dir / "vmlinuz",
                         vmlinux=(output_dir / "vmlinux") if vmlinux.exists() else None,
                         initrd=output_dir / "initrd.img", kernel_release=m["kernel_release"],
                         digest=m["digest"], size_bytes=int(m["initrd_bytes"]))
    if not art.kernel.exists() or not art.initrd.exists():
        return None
    return art


def build_image(output_dir: Path, *, force: bool = False, progress: bool = True,
                work_dir: Path | None = None) -> ImageArtifacts:
    """Build the guest image into ``output_dir`` (or reuse the cached one)."""
    kpkg = kernel_package()
    from google.protobuf import __version__ as pb_version

    versions = candidate_versions((*ROOTFS_PACKAGES, kpkg))
    digest = compute_digest(versions, agent_sources(), pb_version)
    current = find_image(output_dir)
    if current is not None and current.digest == digest and not force:
        log.info("guest image %s is up to date", digest)
        return current
    t0 = time.monotonic()
    images = output_dir / "images"
    final = images / digest
    prog = _Progress(progress, total=len(versions) + 8)
    try:
        with _staging(work_dir or images) as stage:
            debs = _download(versions, output_dir / "cache" / "debs", prog.step)
            out = stage / "out"
            out.mkdir()
            release, size = _assemble(stage, debs, kpkg, out, prog.step)
            manifest = {
                "digest": digest, "kernel_release": release, "kernel_package": kpkg,
                "packages": versions, "initrd_bytes": size,
                "vmlinuz_bytes": (out / "vmlinuz").stat().st_size,
                "vmlinux": (out / "vmlinux").exists(), "modules": list(GUEST_MODULES),
                "protobuf": pb_version, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1),
            }
            (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
    finally:
        prog.close()
    for name in ("vmlinuz", "vmlinux", "initrd.img", "manifest.json"):
        link = output_dir / name
        tmp = output_dir / f".{name}.new"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        if (final / name).exists():
            tmp.symlink_to(Path("images") / digest / name)
            tmp.replace(link)
        elif link.is_symlink():
            link.unlink()
    for old in images.iterdir():
        if old.name != digest and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    art = find_image(output_dir)
    assert art is not None
    log.info("guest image %s built in %.1fs", digest, time.monotonic() - t0)
    return art
