"""Image references: ``[registry[:port]/]name[:tag][@sha256:<hex>]``.

Docker's short forms are understood (``busybox`` is
``docker.io/library/busybox:latest``, and ``docker.io`` is served by
``registry-1.docker.io``). Only sha256 digests are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pykata import errors

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_HOST_RE = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+(?::[0-9]{1,5})?"
                      r"|\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?")
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written (docker.io for Docker Hub)
    name: str  # repository path, e.g. library/busybox
    tag: str | None
    digest: str | None

    @property
    def endpoint(self) -> str:
        """host[:port] to connect to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def ref(self) -> str:
        """The tag or digest the manifest is asked for (the digest wins)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.name}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def check_digest(digest: str, what: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise errors.InvalidArgument(
            f"{what}: unsupported digest {digest[:80]!r} (sha256:<64 hex digits> only)")
    return digest


def parse(text: str) -> Reference:
    """Parse an image reference; InvalidArgument naming the part that is wrong."""
    if not text or len(text) > 1024 or any(c.isspace() for c in text):
        raise errors.InvalidArgument(f"bad image reference {text[:100]!r}")
    rest, at, digest = text.partition("@")
    if at:
        check_digest(digest, f"image reference {text!r}")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
        if not _HOST_RE.fullmatch(registry):
            raise errors.InvalidArgument(f"image reference {text!r}: bad registry {registry!r}")
    else:
        registry, path = DOCKER_HUB, rest
    tag: str | None = None
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise errors.InvalidArgument(f"image reference {text!r}: bad tag {tag!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _NAME_RE.fullmatch(path) or len(path) > 255:
        raise errors.InvalidArgument(f"image reference {text!r}: bad repository name {path!r}")
    if tag is None and not at:
        tag = "latest"
    return Reference(registry, path, tag, digest if at else None)
