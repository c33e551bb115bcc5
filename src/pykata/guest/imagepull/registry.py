"""The registry v2 client: auth challenges, manifests (index -> linux/amd64),
blobs streamed to files and checked against their digests and sizes.

Nothing the registry sends is trusted: the manifest's sha256 must equal the
digest the user asked for (``name@sha256:...``), or is recorded when pulling
by tag; a manifest picked from an index must match the index's descriptor;
every blob must have exactly its descriptor's size and digest, checked while
it streams into a file and before the file is used. The ``Docker-Content-Digest``
header is never relied upon.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin

from pykata import errors
from pykata.guest.imagepull import http
from pykata.guest.imagepull.reference import Reference, check_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json")
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)
PLATFORM = ("linux", "amd64")
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 4096
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class PullLimits:
    max_manifest: int = 4 << 20
    max_config: int = 4 << 20
    max_layer: int = 2 << 30  # one compressed layer
    max_total: int = 8 << 30  # all compressed blobs of the image
    max_redirects: int = 3
    timeout: float = 120.0  # connecting, and waiting for a response head


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    digest: str  # of the image manifest itself (not of an index it came from)
    index_digest: str | None  # the index the reference named, if it named one
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {realm:..., service:...})."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        quoted, bare = m.group(2), m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None \
            else bare or ""
        pos = m.end()
    return scheme.lower(), params


def _descriptor(d: Any, what: str, types: tuple[str, ...] | None) -> Descriptor:
    if not isinstance(d, dict):
        raise errors.InvalidArgument(f"{what}: descriptor is not an object")
    media_type, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0 or not isinstance(media_type, str):
        raise errors.InvalidArgument(f"{what}: descriptor without mediaType, digest or size")
    check_digest(digest, what)
    if types is not None and media_type not in types:
        raise errors.Unimplemented(f"{what}: unsupported media type {media_type[:100]!r}")
    if d.get("urls"):
        raise errors.Unimplemented(f"{what}: foreign layers (urls) are not fetched")
    return Descriptor(media_type, digest, size)


class Registry:
    """One repository of one registry, for one pull."""

    def __init__(self, ref: Reference, *, credentials: Credentials | None = None,
                 plain_http: bool = False, ssl_context: Any = None,
                 limits: PullLimits | None = None, token: str = "") -> None:
        self.ref = ref
        self.credentials = credentials
        self.ssl_context = ssl_context
        self.limits = limits or PullLimits()
        scheme = "http" if plain_http else "https"
        self.base = http.URL.parse(f"{scheme}://{ref.endpoint}/")
        # A registry token given by the caller (CRI's RegistryToken) is sent as is.
        if token and (not token.isprintable() or " " in token):
            raise errors.InvalidArgument(f"{ref}: the registry token is not printable")
        self._auth: str | None = f"Bearer {token}" if token else None

    def _same_origin(self, url: http.URL) -> bool:
        return (url.scheme, url.host, url.port) == (self.base.scheme, self.base.host,
                                                   self.base.port)

    async def _authenticate(self, challenge: str | None, url: http.URL) -> str:
        scheme, params = parse_challenge(challenge or "")
        if scheme == "basic":
            if self.credentials is None:
                raise errors.Unavailable(f"{self.ref}: the registry wants credentials (Basic)")
            return self.credentials.basic()
        if scheme != "bearer" or not params.get("realm"):
            raise errors.Unavailable(
                f"{self.ref}: 401 from {url} with an unusable challenge"
                f" {(challenge or '')[:120]!r}")
        realm = http.URL.parse(params["realm"])
        if realm.scheme == "http" and self.base.scheme == "https":
            raise errors.Unavailable(f"{self.ref}: token realm {realm} is not https")
        query = {"scope": params.get("scope") or f"repository:{self.ref.name}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        sep = "&" if "?" in realm.target else "?"
        token_url = http.URL(realm.scheme, realm.host, realm.port,
                             realm.target + sep + urlencode(query))
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        resp = await http.request("GET", token_url, headers, timeout=self.limits.timeout,
                                  ssl_context=self.ssl_context)
        try:
            if resp.status != 200:
                raise errors.Unavailable(
                    f"{self.ref}: token service {realm} answered {resp.status} {resp.reason}")
            body = await resp.read(MAX_TOKEN_RESPONSE)
        finally:
            await resp.close()
        try:
            doc = json.loads(body)
        except ValueError:
            raise errors.Unavailable(f"{self.ref}: token service sent no JSON") from None
        token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or not token.isprintable() or " " in token:
            raise errors.Unavailable(f"{self.ref}: token service sent no usable token")
        return f"Bearer {token}"

    async def get(self, path: str, accept: str | None) -> http.Response:
        """GET ``path`` on the registry: one auth retry on 401, a few redirects
        (credentials are sent to the registry's own origin only)."""
        url = http.URL.parse(urljoin(str(self.base), path))
        authed = False
        redirects = 0
        while True:
            headers: dict[str, str] = {}
            if accept:
                headers["Accept"] = accept
            if self._auth and self._same_origin(url):
                headers["Authorization"] = self._auth
            resp = await http.request("GET", url, headers, timeout=self.limits.timeout,
                                      ssl_context=self.ssl_context)
            if resp.status == 200:
                return resp
            try:
                if resp.status == 401 and not authed and self._same_origin(url):
                    authed = True
                    self._auth = await self._authenticate(resp.header("www-authenticate"), url)
                    continue
                if resp.status in (301, 302, 303, 307, 308) and resp.header("location"):
                    redirects += 1
                    if redirects > self.limits.max_redirects:
                        raise errors.Unavailable(
                            f"{self.ref}: more than {self.limits.max_redirects} redirects"
                            f" for {path}")
                    nxt = http.URL.parse(urljoin(str(url), resp.header("location") or ""))
                    if url.scheme == "https" and nxt.scheme == "http":
                        raise errors.Unavailable(f"{self.ref}: redirect from https to {nxt}")
                    url = nxt
                    continue
                raise await self._error(resp, path)
            finally:
                await resp.close()

    async def _error(self, resp: http.Response, path: str) -> errors.PykataError:
        detail = ""
        with contextlib.suppress(errors.PykataError, ValueError, AttributeError, IndexError,
                                 TypeError):
            body = await resp.read(MAX_ERROR_BODY)
            detail = str(json.loads(body)["errors"][0]["message"])[:200]
        msg = f"{self.ref}: GET {path}: {resp.status} {resp.reason}" + (
            f" ({detail})" if detail else "")
        if resp.status == 404:
            return errors.NotFound(msg)
        if resp.status == 429:
            return errors.ResourceExhausted(msg)
        return errors.Unavailable(msg)

    async def _fetch(self, path: str, accept: str | None, limit: int) -> tuple[bytes, str]:
        resp = await self.get(path, accept)
        try:
            return await resp.read(limit), (resp.header("content-type") or "").split(";")[0]
        finally:
            await resp.close()

    async def fetch(self, path: str, accept: str | None, limit: int) -> tuple[bytes, str]:
        """GET ``path`` (at most ``limit`` bytes): the body and its content type."""
        return await self._fetch(path, accept, limit)

    async def manifest(self) -> Manifest:
        """The image manifest for the reference, resolved to linux/amd64, verified."""
        ref = self.ref
        raw, ctype = await self._fetch(f"/v2/{ref.name}/manifests/{ref.ref}", ACCEPT,
                                       self.limits.max_manifest)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ref.digest and digest != ref.digest:
            raise errors.InvalidArgument(
                f"image {ref}: manifest digest mismatch: expected {ref.digest}, found {digest}")
        doc = self._json(raw, "manifest")
        media_type = doc.get("mediaType") or ctype
        index_digest: str | None = None
        if media_type in (OCI_INDEX, DOCKER_LIST) or (not media_type and "manifests" in doc):
            chosen = self._platform(doc)
            index_digest = digest
            raw, _ = await self._fetch(f"/v2/{ref.name}/manifests/{chosen.digest}", ACCEPT,
                                       self.limits.max_manifest)
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            if digest != chosen.digest or len(raw) != chosen.size:
                raise errors.InvalidArgument(
                    f"image {ref}: manifest for linux/amd64 does not match the index: expected"
                    f" {chosen.digest} ({chosen.size} bytes), found {digest} ({len(raw)} bytes)")
            doc = self._json(raw, "manifest")
            media_type = doc.get("mediaType") or OCI_MANIFEST
        if doc.get("schemaVersion") == 1:
            raise errors.Unimplemented(f"image {ref}: schema 1 manifests are not supported")
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST, ""):
            raise errors.Unimplemented(
                f"image {ref}: unsupported manifest type {str(media_type)[:100]!r}")
        config = _descriptor(doc.get("config"), f"image {ref}: config", CONFIG_TYPES)
        layers_doc = doc.get("layers")
        if not isinstance(layers_doc, list):
            raise errors.InvalidArgument(f"image {ref}: manifest has no layers list")
        layers = tuple(_descriptor(d, f"image {ref}: layer {i}", LAYER_TYPES)
                       for i, d in enumerate(layers_doc))
        for d in layers:
            if d.size > self.limits.max_layer:
                raise errors.ResourceExhausted(
                    f"image {ref}: layer {d.digest} of {d.size} bytes, more than the"
                    f" {self.limits.max_layer} allowed")
        total = config.size + sum(d.size for d in layers)
        if total > self.limits.max_total or config.size > self.limits.max_config:
            raise errors.ResourceExhausted(
                f"image {ref}: {total} bytes of blobs (config {config.size}), more than the"
                f" {self.limits.max_total} allowed")
        return Manifest(digest, index_digest, config, layers)

    def _json(self, raw: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError:
            raise errors.InvalidArgument(f"image {self.ref}: {what} is not JSON") from None
        if not isinstance(doc, dict):
            raise errors.InvalidArgument(f"image {self.ref}: {what} is not a JSON object")
        return doc

    def _platform(self, index: dict[str, Any]) -> Descriptor:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise errors.InvalidArgument(f"image {self.ref}: index has no manifests list")
        found: list[tuple[bool, Descriptor]] = []
        for i, m in enumerate(entries):
            p = m.get("platform") if isinstance(m, dict) else None
            if isinstance(p, dict) and (p.get("os"), p.get("architecture")) == PLATFORM:
                d = _descriptor(m, f"image {self.ref}: index entry {i}",
                                (OCI_MANIFEST, DOCKER_MANIFEST))
                found.append((bool(p.get("variant")), d))
        if not found:
            raise errors.NotFound(f"image {self.ref}: no linux/amd64 manifest in the index")
        found.sort(key=lambda t: t[0])  # one without a variant first
        return found[0][1]

    async def blob_bytes(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise errors.ResourceExhausted(
                f"image {self.ref}: blob {desc.digest} of {desc.size} bytes, more than {limit}")
        data, _ = await self._fetch(f"/v2/{self.ref.name}/blobs/{desc.digest}", None, desc.size)
        self._verify(desc, len(data), "sha256:" + hashlib.sha256(data).hexdigest())
        return data

    def _verify(self, desc: Descriptor, size: int, digest: str) -> None:
        if size != desc.size:
            raise errors.InvalidArgument(
                f"image {self.ref}: blob {desc.digest}: size mismatch: expected {desc.size}"
                f" bytes, found {size}")
        if digest != desc.digest:
            raise errors.InvalidArgument(
                f"image {self.ref}: blob {desc.digest}: digest mismatch: expected"
                f" {desc.digest}, found {digest}")

    async def blob_to_file(self, desc: Descriptor, path: str) -> None:
        """Stream a blob into a new file ``path`` (0600), checked; the file is removed
        when anything is wrong."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        ok = False
        try:
            resp = await self.get(f"/v2/{self.ref.name}/blobs/{desc.digest}", None)
            sha = hashlib.sha256()
            size = 0
            try:
                try:
                    async for chunk in resp.chunks(desc.size):
                        sha.update(chunk)
                        size += len(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                except errors.ResourceExhausted:
                    raise errors.InvalidArgument(
                        f"image {self.ref}: blob {desc.digest}: size mismatch: expected"
                        f" {desc.size} bytes, the registry sent more") from None
            finally:
                await resp.close()
            self._verify(desc, size, "sha256:" + sha.hexdigest())
            ok = True
        finally:
            os.close(fd)
            if not ok:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
