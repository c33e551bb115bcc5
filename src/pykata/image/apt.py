"""Debian packages of the image, offline from the Debian registry: versions
resolved with ``apt-cache`` (remembered against a fingerprint of apt's state),
``.deb`` files downloaded once with ``apt-get download`` into a cache and
unpacked with ``dpkg-deb -x``. Which packages is the recipe's business
(:mod:`.kernel`, :mod:`.rootfs`); this module only fetches them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pykata import errors
from pykata.image.tools import last_error, run, tempdir

log = logging.getLogger(__name__)


def unavailable(pkg: str, apt_error: str) -> errors.Unavailable:
    return errors.Unavailable(f"cannot download Debian package '{pkg}': {apt_error}"
                              " (run 'apt-get update' first?)")


# -- versions ------------------------------------------------------------------------
def parse_kernel_depends(apt_cache_depends: str) -> str | None:
    """The concrete kernel package in ``apt-cache depends linux-image-cloud-amd64``."""
    for line in apt_cache_depends.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\d\S*)", line)
        if m:
            return m.group(1)
    return None


def kernel_package(meta: str) -> str:
    """A kernel metapackage (linux-image-cloud-amd64) resolved to its concrete
    linux-image-6.1.0-NN-cloud-amd64."""
    try:
        out = run(["apt-cache", "depends", meta], "apt-cache depends")
    except errors.Unavailable as exc:
        raise unavailable(meta, str(exc).split(": ", 1)[-1]) from None
    pkg = parse_kernel_depends(out)
    if pkg is None:
        raise unavailable(meta, "E: it depends on no linux-image package")
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
    out = run(["apt-cache", "policy", *pkgs], "apt-cache policy")
    versions = parse_policy(out)
    known = set(re.findall(r"^(\S+):$", out, flags=re.M))
    for p in pkgs:
        if p not in versions:
            why = ("E: Package '%s' has no installation candidate" if p in known
                   else "E: Unable to locate package %s")
            raise unavailable(p, why % p)
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


def resolve_packages(cache_dir: Path, kernel_meta: str,
                     packages: Sequence[str]) -> tuple[str, dict[str, str]]:
    """(kernel package, {package: version}) for ``kernel_meta`` and ``packages``.

    Asks apt (about 2 s here) only when apt's state changed since the last
    answer, which is kept in ``cache_dir/apt-resolution.json``."""
    cache_file = cache_dir / "apt-resolution.json"
    fp = apt_state_fingerprint()
    wanted = [kernel_meta, *packages]
    try:
        cached = json.loads(cache_file.read_text())
        if cached["fingerprint"] == fp and cached["wanted"] == wanted:
            return str(cached["kernel_package"]), dict(cached["versions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kpkg = kernel_package(kernel_meta)
    versions = candidate_versions((*packages, kpkg))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fp, "wanted": wanted, "kernel_package": kpkg,
                                   "versions": versions}, indent=1))
        tmp.replace(cache_file)
    except OSError as exc:  # a read-only output dir still builds nothing new
        log.debug("cannot cache the apt resolution: %s", exc)
    return kpkg, versions


# -- .deb files ----------------------------------------------------------------------
def deb_filename(name: str, version: str) -> str:
    """The file ``apt-get download name=version`` writes (without the arch)."""
    return f"{name}_{version.replace(':', '%3a')}_"


def cached_deb(cache: Path, name: str, version: str) -> Path | None:
    prefix = deb_filename(name, version)
    return next((p for p in sorted(cache.glob("*.deb")) if p.name.startswith(prefix)), None)


def apt_error_package(apt_error: str, packages: Iterable[str]) -> str:
    """The package an apt error line is about (all of them if it names none)."""
    names = sorted(packages)
    for n in sorted(names, key=len, reverse=True):
        if re.search(rf"[\s'\"]{re.escape(n)}[\s'\"=:]", f" {apt_error} "):
            return n
    return ", ".join(names)


def download(versions: Mapping[str, str], cache: Path,
             step: Callable[[str], None]) -> dict[str, Path]:
    """The .deb of every package, downloaded into ``cache`` unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = {n: v for n, v in versions.items() if cached_deb(cache, n, v) is None}
    if missing:
        step(f"download {len(missing)} Debian packages")
        with tempdir(cache, ".download-") as tmp:
            p = subprocess.run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                 *(f"{n}={v}" for n, v in sorted(missing.items()))],
                cwd=tmp, capture_output=True, text=True, check=False)
            if p.returncode != 0:
                err = last_error(p.stderr or p.stdout, p.returncode)
                raise unavailable(apt_error_package(err, missing), err)
            for fresh in tmp.glob("*.deb"):
                fresh.replace(cache / fresh.name)
    debs: dict[str, Path] = {}
    for n, v in versions.items():
        deb = cached_deb(cache, n, v)
        if deb is None:
            raise unavailable(n, f"E: apt-get download {n}={v} left no .deb in {cache}")
        debs[n] = deb
    return debs


def unpack(debs: Mapping[str, Path], kernel_pkg: str, root: Path, kroot: Path,
           step: Callable[[str], None]) -> None:
    """Every package into ``root``, except the kernel's, which goes to ``kroot``."""
    for name, deb in sorted(debs.items()):
        run(["dpkg-deb", "-x", str(deb), str(kroot if name == kernel_pkg else root)],
            f"cannot unpack Debian package '{name}' ({deb.name})")
        step(f"unpack {name}")
