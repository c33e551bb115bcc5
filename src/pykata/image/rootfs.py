"""The guest's root filesystem before it becomes an initrd: which Debian
packages go in, Debian's merged /usr, what is trimmed away, busybox applet
links, the few files a tiny root needs, and pruning of the shared libraries
nothing links (after checking that every library something needs is there)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pykata import errors
from pykata.image.cache import BUILDER_VERSION
from pykata.image.elf import elf_info
from pykata.image.tools import rm, run

# Debian packages of the root filesystem: Python (with the stdlib parts the
# agent imports), crun and the libraries it links, busybox for a shell and `ip`,
# libstdc++/libgcc for protobuf's C extension. Libraries nothing links are
# pruned after unpacking (see prune_libraries).
ROOTFS_PACKAGES = (
    "libc6", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libexpat1", "zlib1g", "libffi8",
    "crun", "libcap2", "libseccomp2", "libsystemd0", "libyajl2", "libgcrypt20",
    "libgpg-error0", "liblz4-1", "liblzma5", "libzstd1",
    "busybox-static", "libstdc++6", "libgcc-s1",
    # TLS for the guest pull (https registries): Python's _ssl links libssl3, and
    # the trust store is ca-certificates' Mozilla bundle (ca_bundle below).
    "libssl3", "ca-certificates",
)

# The CA bundle the guest trusts (pykata.guest.imagepull.http.CA_BUNDLE).
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"

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

# Extension modules the agent never imports (hashlib uses its builtin hashes;
# _ssl stays for the guest pull's https).
_TRIM_EXTENSIONS = (
    "_test", "_xx", "xxlimited", "_ctypes_test", "_codecs_", "_multibytecodec", "_curses",
    "_dbm", "_gdbm", "_sqlite3", "_hashlib", "audioop", "nis", "ossaudiodev",
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
    "libzstd.so.1",  # zstd image layers (guest pull: pykata.guest.imagepull.decompress)
)
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib")


def merge_usr(root: Path) -> None:
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


def ca_bundle(root: Path) -> None:
    """/etc/ssl/certs/ca-certificates.crt from ca-certificates' Mozilla
    certificates (what its postinst, update-ca-certificates, would write)."""
    certs = sorted((root / "usr/share/ca-certificates/mozilla").glob("*.crt"))
    if not certs:
        raise errors.Internal("the guest image has no CA certificates"
                              " (ca-certificates unpacked?)")
    out = root / CA_BUNDLE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
    rm(root / "usr/sbin/update-ca-certificates")


def trim(root: Path, step: Callable[[str], None]) -> None:
    """Remove what the guest never needs (docs, most of the stdlib's extras, codecs)."""
    ca_bundle(root)  # before usr/share goes
    for rel in _TRIM:
        rm(root / rel)
    for p in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if p.name.startswith(_TRIM_EXTENSIONS):
            p.unlink()
    for p in (root / "usr/lib/python3.11/encodings").glob("*.py"):
        if p.stem not in _KEEP_ENCODINGS:
            p.unlink()
    for p in list(root.rglob("__pycache__")):
        shutil.rmtree(p, ignore_errors=True)
    step("trim")


def busybox_links(root: Path) -> None:
    """busybox applets as absolute links to /bin/busybox (they resolve in the guest)."""
    bb = root / "usr/bin/busybox"
    applets = run([str(bb), "--list-full"], "busybox --list-full").split()
    for a in applets:
        where, _, name = a.strip("/").removeprefix("usr/").rpartition("/")
        if where not in ("bin", "sbin"):  # e.g. /linuxrc
            continue
        link = root / "usr" / where / name
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")


def base_files(root: Path, digest: str, release: str) -> None:
    """The rest of a tiny root: mount points, device nodes for before devtmpfs,
    /etc files, /etc/pykata/image.json (what this image is)."""
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


# -- shared libraries ------------------------------------------------------------------
def resolve_in(root: Path, path: str) -> Path:
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


def prune_libraries(root: Path) -> None:
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
        real = resolve_in(root, str(path.relative_to(root)))
        keep.update({path, real})
        info = elf_info(real.read_bytes()) if real.is_file() else None
        if info is None:
            continue
        if info.interp:
            loader = resolve_in(root, info.interp)
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
                rm(p)
