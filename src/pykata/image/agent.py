"""Our code in the guest: the agent's sources (only what it imports) and
protobuf under /opt/pykata/lib, ``/init``, a check that every agent module
imports with the image's own Python, and precompiling to sourceless bytecode
with that Python (run chrooted into the staging tree)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from pykata import errors

log = logging.getLogger(__name__)

# Our code in the guest: only what the agent imports.
AGENT_PARTS = ("__init__.py", "errors.py", "wire.py", "ttrpc", "protos", "guest")

INIT = """#!/usr/bin/python3.11 -SB
import sys
sys.path.insert(0, "/opt/pykata/lib")
from pykata.guest.agent import main
sys.exit(main())
"""


def pykata_root() -> Path:
    import pykata

    return Path(pykata.__file__).parent


def agent_sources() -> list[Path]:
    """The .py files of pykata the guest agent needs."""
    root = pykata_root()
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


def install_agent(root: Path) -> None:
    """Our agent and protobuf (with its C extension when the wheel has one)."""
    src_root = pykata_root()
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


def install_init(root: Path) -> None:
    init = root / "init"
    init.write_text(INIT)
    init.chmod(0o755)


def guest_python(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
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


def check_agent_imports(root: Path) -> None:
    """Import every agent module with the image's own Python, libraries and stdlib:
    a module trimmed away fails the build, not the guest's boot."""
    lib = root / "opt/pykata/lib"
    guest = lib / "pykata/guest"
    names = [".".join(("pykata", "guest", *p.relative_to(guest).with_suffix("").parts))
             for p in sorted(guest.rglob("*.py")) if p.stem != "__init__"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
            "for n in sys.argv[2:]: importlib.import_module(n)\n"
            "import ctypes; ctypes.CDLL('libzstd.so.1')\n"
            "import ssl; c = ssl.create_default_context("
            "cafile='/etc/ssl/certs/ca-certificates.crt')\n"
            "assert c.cert_store_stats()['x509_ca'] > 50, c.cert_store_stats()\n"
            "import asyncio, ctypes, json, socket, signal, struct, logging, hashlib\n"
            "hashlib.sha256(b''); hashlib.md5(b'')\n"
            "from google.protobuf.internal import api_implementation as a\n"
            "print(a.Type())")
    cp = guest_python(root, "-S", "-B", "-c", code, "/opt/pykata/lib", *names)
    if cp.returncode != 0:
        err = (cp.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.Internal(f"the agent cannot run in the guest image: {err}")
    if cp.stderr.strip():
        log.warning("the agent's imports in the guest image print: %s", cp.stderr.strip())
    if cp.stdout.strip() != "upb":
        log.warning("protobuf's C extension does not load in the guest image (implementation:"
                    " %s): the agent works, slower", cp.stdout.strip())


def precompile(root: Path, step: Callable[[str], None]) -> None:
    """Sourceless bytecode made by the guest's own Python: smaller initrd, no
    source stat at import. Tracebacks keep file names and line numbers."""
    dirs = ["usr/lib/python3.11", "opt/pykata/lib"]
    cp = guest_python(root, "-S", "-B", "-m", "compileall", "-q", "-b", *("/" + d for d in dirs))
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
