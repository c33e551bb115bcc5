"""Small helpers every build stage uses: running a build tool (its error as a
PykataError naming the missing package or apt's error line), removing a path,
a temporary directory that is always removed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pykata import errors

# The Debian package of each tool the build runs (for "not installed" errors).
TOOL_PACKAGE = {"apt-get": "apt", "apt-cache": "apt", "dpkg-deb": "dpkg", "depmod": "kmod",
                "cpio": "cpio", "lz4": "lz4", "zstd": "zstd"}


def run(argv: list[str], what: str, cwd: Path | None = None,
        env: Mapping[str, str] | None = None) -> str:
    """Run a tool; its last error line becomes a PykataError naming ``what``."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False,
                           env=None if env is None else dict(env))
    except FileNotFoundError as exc:
        pkg = TOOL_PACKAGE.get(Path(argv[0]).name, Path(argv[0]).name)
        raise errors.FailedPrecondition(
            f"{what}: {argv[0]} is not installed (apt-get install {pkg})") from exc
    if p.returncode != 0:
        raise errors.Unavailable(f"{what}: {last_error(p.stderr or p.stdout, p.returncode)}")
    return p.stdout


def last_error(text: str, rc: int) -> str:
    """apt's first ``E:`` line, else the last line of ``text``, else the exit status."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("E:")]
    if errs:
        return errs[0]
    return lines[-1] if lines else f"exit status {rc}"


def rm(p: Path) -> None:
    """Remove a file, symlink or directory tree, if there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.is_symlink() or p.exists():
        p.unlink()


@contextmanager
def tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
