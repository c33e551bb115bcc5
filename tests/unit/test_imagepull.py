"""pykata.guest.imagepull against an in-process fake registry on 127.0.0.1:
auth flows, index resolution, digest and size checks, HTTP framing, and the
layer applier against hostile tars."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio

from pykata import errors
from pykata.guest.imagepull import (
    Credentials,
    PullLimits,
    UnpackOptions,
    parse,
    pull_image,
    unpack_layers,
)
from pykata.guest.imagepull import http as ihttp
from pykata.guest.imagepull.registry import parse_challenge
from pykata.guest.imagepull.tar import TarError, TarReader
from pykata.guest.imagepull.unpack import Applier, LayerError

pytestmark = pytest.mark.timeout(60)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- building layers -------------------------------------------------------------------
@dataclass
class Item:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def make_tar(items: list[Item], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for it in items:
            info = tarfile.TarInfo(it.name)
            info.type = it.type
            info.mode = it.mode
            info.uid, info.gid = it.uid, it.gid
            info.linkname = it.linkname
            if it.type == tarfile.DIRTYPE and it.mode == 0o644:
                info.mode = 0o755
            info.size = len(it.data) if it.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(it.data) if it.type == tarfile.REGTYPE else None)
    return buf.getvalue()


# -- a fake registry -------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


Handler = Callable[[Request], "Reply | None"]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    raw: bytes | None = None  # sent as is instead of a formatted response


class FakeRegistry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}  # tag or digest -> (type, body)
        self.requests: list[Request] = []
        self.auth: str | None = None  # None | bearer | basic
        self.token = "tok123"
        self.user = Credentials("alice", "s3cret")
        self.chunked = False
        self.redirect_to: str | None = None  # base URL blobs redirect to
        self.hook: Handler | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # content
    def add_blob(self, data: bytes) -> dict[str, Any]:
        self.blobs[sha(data)] = data
        return {"digest": sha(data), "size": len(data)}

    def add_image(self, layers: list[bytes], tag: str = "v1", gz: bool = True,
                  arch: str = "amd64") -> tuple[str, bytes]:
        descs = []
        for raw in layers:
            blob = gzip.compress(raw, mtime=0) if gz else raw
            d = self.add_blob(blob)
            d["mediaType"] = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else "")
            descs.append(d)
        config = json.dumps({"architecture": arch, "os": "linux",
                             "config": {"Cmd": ["sh"], "Env": ["A=1"]},
                             "rootfs": {"type": "layers",
                                        "diff_ids": [sha(r) for r in layers]}}).encode()
        cd = self.add_blob(config)
        cd["mediaType"] = "application/vnd.oci.image.config.v1+json"
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cd,
                               "layers": descs}).encode()
        self.manifests[tag] = self.manifests[sha(manifest)] = (OCI_MANIFEST, manifest)
        return sha(manifest), manifest

    def add_index(self, entries: list[tuple[str, bytes, str]], tag: str) -> str:
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": sha(m), "size": len(m),
             "platform": {"os": "linux", "architecture": arch}}
            for _, m, arch in entries]}).encode()
        self.manifests[tag] = self.manifests[sha(index)] = (OCI_INDEX, index)
        return sha(index)

    # serving
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers = {}
            for ln in lines[1:]:
                if ln:
                    k, _, v = ln.partition(":")
                    headers[k.strip().lower()] = v.strip()
            parts = urlsplit(target)
            req = Request(method, parts.path, parse_qs(parts.query), headers)
            self.requests.append(req)
            reply = (self.hook(req) if self.hook else None) or self._route(req)
            if reply.raw is not None:
                writer.write(reply.raw)
            else:
                hdrs = dict(reply.headers)
                chunked = reply.chunked or (self.chunked and reply.status == 200)
                if chunked:
                    hdrs["Transfer-Encoding"] = "chunked"
                else:
                    hdrs["Content-Length"] = str(len(reply.body))
                out = f"HTTP/1.1 {reply.status} X\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
                writer.write(out.encode())
                if chunked:
                    body = reply.body
                    for i in range(0, len(body), 1000):
                        piece = body[i:i + 1000]
                        writer.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
                    writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
                else:
                    writer.write(reply.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _authorized(self, req: Request) -> bool:
        got = req.headers.get("authorization")
        if self.auth == "bearer":
            return got == f"Bearer {self.token}"
        if self.auth == "basic":
            return got == self.user.basic()
        return True

    def _route(self, req: Request) -> Reply:
        if req.path == "/token":
            if req.headers.get("authorization") != self.user.basic():
                return Reply(401)
            return Reply(body=json.dumps({"token": self.token}).encode())
        if req.path.startswith("/storage/"):
            return Reply(body=self.blobs[req.path.rsplit("/", 1)[1]])
        if not self._authorized(req):
            challenge = (f'Bearer realm="http://{self.host}/token",service="fake",'
                         f'scope="repository:test/img:pull"' if self.auth == "bearer"
                         else 'Basic realm="fake"')
            return Reply(401, b'{"errors":[{"message":"auth"}]}',
                         {"WWW-Authenticate": challenge})
        p = req.path.split("/")
        if len(p) >= 5 and p[1] == "v2" and p[-2] == "manifests":
            m = self.manifests.get(p[-1])
            if m is None:
                return Reply(404, b'{"errors":[{"message":"manifest unknown"}]}')
            return Reply(body=m[1], headers={"Content-Type": m[0]})
        if len(p) >= 5 and p[1] == "v2" and p[-2] == "blobs":
            if p[-1] not in self.blobs:
                return Reply(404)
            if self.redirect_to:
                return Reply(307, headers={"Location": f"{self.redirect_to}/storage/{p[-1]}"})
            return Reply(body=self.blobs[p[-1]])
        return Reply(404)


@pytest_asyncio.fixture
async def reg() -> AsyncIterator[FakeRegistry]:
    r = FakeRegistry()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    return root, work


BASE = make_tar([Item("bin", tarfile.DIRTYPE), Item("bin/tool", data=b"tool\n", mode=0o755),
                 Item("bin/sh", tarfile.SYMTYPE, linkname="tool"),
                 Item("etc", tarfile.DIRTYPE), Item("etc/passwd", data=b"root\n"),
                 Item("etc/gone", data=b"x"), Item("var", tarfile.DIRTYPE),
                 Item("var/a", data=b"a"), Item("var/b", data=b"b")])
TOP = make_tar([Item("etc/.wh.gone"), Item("var", tarfile.DIRTYPE),
                Item("var/.wh..wh..opq"), Item("var/c", data=b"c")])


# -- references and challenges ---------------------------------------------------------
def test_reference_parse() -> None:
    r = parse("busybox")
    assert (r.registry, r.name, r.tag, r.digest, r.endpoint) == (
        "docker.io", "library/busybox", "latest", None, "registry-1.docker.io")
    r = parse("127.0.0.1:5000/a/b:v1@sha256:" + "a" * 64)
    assert (r.registry, r.name, r.tag, r.ref) == ("127.0.0.1:5000", "a/b", "v1",
                                                  "sha256:" + "a" * 64)
    assert parse("localhost/x").registry == "localhost"
    for bad in ("", "UPPER/x", "a b", "x@sha512:" + "a" * 128, "x@sha256:abc", "x:bad tag",
                "../x"):
        with pytest.raises(errors.InvalidArgument):
            parse(bad)


def test_parse_challenge() -> None:
    scheme, p = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"')
    assert scheme == "bearer"
    assert p == {"realm": "https://auth.example/token", "service": "reg",
                 "scope": "repository:a/b:pull"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# -- pulls ----------------------------------------------------------------------------
async def test_pull_by_tag_with_token_auth_and_index(reg: FakeRegistry,
                                                     dirs: tuple[Path, Path]) -> None:
    root, work = dirs
    reg.auth = "bearer"
    arm_digest, arm = reg.add_image([make_tar([Item("arm", data=b"arm")])], tag="arm",
                                    arch="arm64")
    amd_digest, amd = reg.add_image([BASE, TOP], tag="amd")
    index_digest = reg.add_index([(arm_digest, arm, "arm64"), (amd_digest, amd, "amd64")], "v1")
    img = await pull_image(f"{reg.host}/test/img:v1", str(root), str(work), plain_http=True,
                           credentials=reg.user)
    assert (img.manifest_digest, img.index_digest, img.digest) == (
        amd_digest, index_digest, index_digest)
    assert img.config["config"]["Cmd"] == ["sh"]
    assert (root / "bin/tool").read_bytes() == b"tool\n"
    assert os.readlink(root / "bin/sh") == "tool"
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o755
    assert not (root / "etc/gone").exists() and (root / "etc/passwd").exists()
    assert sorted(os.listdir(root / "var")) == ["c"]
    assert not (root / "arm").exists()
    assert os.listdir(work) == []
    token_reqs = [r for r in reg.requests if r.path == "/token"]
    assert len(token_reqs) == 1  # the token is reused
    assert token_reqs[0].query == {"scope": ["repository:test/img:pull"], "service": ["fake"]}
    accept = next(r for r in reg.requests if "/manifests/" in r.path).headers["accept"]
    assert OCI_INDEX in accept and "manifest.list.v2" in accept


async def test_token_refused_without_credentials(reg: FakeRegistry,
                                                 dirs: tuple[Path, Path]) -> None:
    reg.auth = "bearer"
    reg.add_image([BASE])
    with pytest.raises(errors.Unavailable, match="token service .* answered 401"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


async def test_basic_auth_and_one_retry(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    reg.auth = "basic"
    reg.add_image([BASE])
    await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]), plain_http=True,
                     credentials=reg.user)
    assert (dirs[0] / "etc/passwd").exists()
    with pytest.raises(errors.Unavailable, match="401"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True, credentials=Credentials("alice", "wrong"))
    with pytest.raises(errors.Unavailable, match="wants credentials"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


async def test_pull_by_digest(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    digest, _ = reg.add_image([BASE])
    img = await pull_image(f"{reg.host}/test/img@{digest}", str(dirs[0]), str(dirs[1]),
                           plain_http=True)
    assert img.manifest_digest == digest and img.index_digest is None


async def test_manifest_digest_mismatch_is_refused(reg: FakeRegistry,
                                                   dirs: tuple[Path, Path]) -> None:
    digest, manifest = reg.add_image([BASE])
    other = "sha256:" + "0" * 64
    reg.manifests[other] = (OCI_MANIFEST, manifest)  # the registry lies
    with pytest.raises(errors.InvalidArgument,
                       match=f"manifest digest mismatch: expected {other}, found {digest}"):
        await pull_image(f"{reg.host}/test/img@{other}", str(dirs[0]), str(dirs[1]),
                         plain_http=True)
    assert not any("/blobs/" in r.path for r in reg.requests)  # nothing else fetched


async def test_index_entry_mismatch_is_refused(reg: FakeRegistry,
                                               dirs: tuple[Path, Path]) -> None:
    digest, manifest = reg.add_image([BASE], tag="amd")
    reg.add_index([(digest, manifest, "amd64")], "v1")
    reg.manifests[digest] = (OCI_MANIFEST, manifest.replace(b'"layers"', b'"layers" '))
    with pytest.raises(errors.InvalidArgument, match="does not match the index"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


async def test_no_amd64_in_index(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    digest, manifest = reg.add_image([BASE], tag="arm", arch="arm64")
    reg.add_index([(digest, manifest, "arm64")], "v1")
    with pytest.raises(errors.NotFound, match="no linux/amd64 manifest"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


async def test_tampered_layer_is_refused_before_unpacking(reg: FakeRegistry,
                                                          dirs: tuple[Path, Path]) -> None:
    root, work = dirs
    reg.add_image([BASE, TOP])
    top_digest = sha(gzip.compress(TOP, mtime=0))
    tampered = gzip.compress(TOP.replace(b"c", b"d", 1), mtime=0)
    reg.blobs[top_digest] = tampered
    with pytest.raises(errors.InvalidArgument) as ei:
        await pull_image(f"{reg.host}/test/img:v1", str(root), str(work), plain_http=True)
    msg = str(ei.value)
    assert f"test/img:v1: blob {top_digest}" in msg
    assert ("digest mismatch" in msg and sha(tampered) in msg) or "size mismatch" in msg
    assert os.listdir(root) == [] and os.listdir(work) == []  # not even the good layer


async def test_blob_longer_than_its_descriptor_is_refused(reg: FakeRegistry,
                                                          dirs: tuple[Path, Path]) -> None:
    reg.add_image([BASE])
    d = sha(gzip.compress(BASE, mtime=0))
    reg.blobs[d] += b"more"
    with pytest.raises(errors.InvalidArgument, match="size mismatch: expected .* sent more"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)
    assert os.listdir(dirs[1]) == []


async def test_oversized_manifest_and_layer(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    reg.add_image([BASE])
    reg.manifests["huge"] = (OCI_MANIFEST, b" " * (4 * 1024 * 1024 + 1))
    with pytest.raises(errors.ResourceExhausted, match="larger than|more than"):
        await pull_image(f"{reg.host}/test/img:huge", str(dirs[0]), str(dirs[1]),
                         plain_http=True)
    with pytest.raises(errors.ResourceExhausted, match="layer sha256:.* more than the 100"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True, limits=PullLimits(max_layer=100))
    with pytest.raises(errors.ResourceExhausted, match="bytes of blobs"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True, limits=PullLimits(max_total=50))
    assert os.listdir(dirs[0]) == []


async def test_chunked_bodies_and_redirect_to_storage(reg: FakeRegistry,
                                                      dirs: tuple[Path, Path]) -> None:
    storage = FakeRegistry()
    await storage.start()
    try:
        reg.auth = "basic"
        reg.chunked = storage.chunked = True
        storage.blobs = reg.blobs
        reg.redirect_to = f"http://{storage.host}"
        reg.add_image([BASE, TOP])
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True, credentials=reg.user)
        assert (dirs[0] / "var/c").read_bytes() == b"c"
        assert storage.requests and all(
            "authorization" not in r.headers for r in storage.requests)  # not leaked
    finally:
        await storage.stop()


async def test_redirect_loop_is_bounded(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    reg.add_image([BASE])
    reg.hook = lambda req: Reply(302, headers={"Location": req.path}) \
        if "/blobs/" in req.path else None
    with pytest.raises(errors.Unavailable, match="more than 3 redirects"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


async def test_http_head_is_bounded(reg: FakeRegistry) -> None:
    reg.hook = lambda req: Reply(raw=b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")
    with pytest.raises(errors.Unavailable, match="line longer|larger than"):
        await ihttp.request("GET", ihttp.URL.parse(f"http://{reg.host}/v2/"))
    reg.hook = lambda req: Reply(raw=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"zz\r\n")
    resp = await ihttp.request("GET", ihttp.URL.parse(f"http://{reg.host}/v2/"))
    with pytest.raises(errors.Unavailable, match="bad chunk size"):
        await resp.read(1000)
    await resp.close()
    reg.hook = lambda req: Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    resp = await ihttp.request("GET", ihttp.URL.parse(f"http://{reg.host}/v2/"))
    with pytest.raises(errors.Unavailable, match="7 bytes of the body missing"):
        await resp.read(1000)
    await resp.close()


async def test_https_without_ssl_context_names_the_problem(monkeypatch: pytest.MonkeyPatch,
                                                           reg: FakeRegistry) -> None:
    import builtins
    real_import = builtins.__import__

    def no_ssl(name: str, *a: Any, **k: Any) -> Any:
        if name == "ssl":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ssl)
    with pytest.raises(errors.Unimplemented, match="https registries need the ssl module"):
        await ihttp.request("GET", ihttp.URL.parse(f"https://{reg.host}/v2/"))


async def test_wrong_architecture_config_is_refused(reg: FakeRegistry,
                                                    dirs: tuple[Path, Path]) -> None:
    reg.add_image([BASE], arch="arm64")
    with pytest.raises(errors.InvalidArgument, match="built for linux/arm64"):
        await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                         plain_http=True)


# -- layers: compression and diff_ids --------------------------------------------------
def _blob(tmp: Path, data: bytes, name: str = "blob") -> str:
    p = tmp / name
    p.write_bytes(data)
    return str(p)


def test_zstd_and_plain_and_multimember_gzip(tmp_path: Path) -> None:
    if not shutil.which("zstd"):
        pytest.fail("the zstd tool is needed (apt-get install zstd)")
    zst = subprocess.run(["zstd", "-q", "-c"], input=BASE, capture_output=True,
                         check=True).stdout
    two = gzip.compress(BASE[:5000], mtime=0) + gzip.compress(BASE[5000:], mtime=0)
    for i, blob in enumerate((zst, BASE, two)):
        root = tmp_path / f"r{i}"
        root.mkdir()
        unpack_layers("x", str(root), [(_blob(tmp_path, blob, f"b{i}"), "d", sha(BASE))])
        assert (root / "bin/tool").read_bytes() == b"tool\n"


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="uncompressed digest mismatch"):
        unpack_layers("x", str(tmp_path), [(_blob(tmp_path, gzip.compress(BASE)), "d",
                                            "sha256:" + "1" * 64)])


def test_gzip_bomb_is_bounded(tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (20 << 20))
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(errors.ResourceExhausted, match="more than 1048576 bytes once"):
        unpack_layers("x", str(root), [(_blob(tmp_path, bomb), "d", "sha256:" + "1" * 64)],
                      max_layer_bytes=1 << 20)


# -- the tar reader --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_long_names(fmt: int) -> None:
    name = "d/" + "n" * 90 + "/" + "m" * (150 if fmt != tarfile.USTAR_FORMAT else 90)
    link = "t" * (200 if fmt != tarfile.USTAR_FORMAT else 90)
    data = make_tar([Item(name, data=b"hello"), Item("l", tarfile.SYMTYPE, linkname=link)], fmt)
    got = [(e.name, e.type, e.linkname, e.read(100)) for e in TarReader(io.BytesIO(data))]
    assert got == [(name, "0", "", b"hello"), ("l", "2", link, b"")]


def test_tar_bad_checksum_and_truncation() -> None:
    data = bytearray(make_tar([Item("a", data=b"x" * 600)]))
    data[0] ^= 1
    with pytest.raises(TarError, match="checksum"):
        list(TarReader(io.BytesIO(bytes(data))))
    good = make_tar([Item("a", data=b"x" * 600)])
    with pytest.raises(TarError, match="truncated"):
        for e in TarReader(io.BytesIO(good[:700])):
            while e.read(100):
                pass


# -- the applier against hostile layers ------------------------------------------------
def apply(root: Path, *layers: bytes, **opts: Any) -> None:
    """Apply ``layers`` to ``root`` in a child process chrooted into the test's
    scratch directory (``root``'s grandparent: the ``jail`` fixture's tmp_path):
    an applier that escapes its root writes into that scratch directory, never
    into this machine's /. A PykataError in the child is raised again here."""
    world = root.parent.parent
    inner = "/" + str(root.relative_to(world))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if os.geteuid() != 0:
                _own_user_namespace()
            os.chroot(world)
            os.chdir("/")
            try:
                with Applier(inner, UnpackOptions(**opts)) as a:
                    for i, layer in enumerate(layers):
                        a.apply(io.BytesIO(layer), f"layer {i}")
                os.write(w, b"ok")
            except errors.PykataError as exc:  # LayerError, ResourceExhausted, ...
                os.write(w, b"E" + f"{type(exc).__name__}\0{exc}".encode()[:4000])
            except BaseException as exc:
                os.write(w, b"X" + repr(exc).encode()[:4000])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    if said.startswith(b"E"):
        name, _, message = said[1:].decode().partition("\0")
        cls = LayerError if name == "LayerError" else getattr(errors, name, errors.PykataError)
        raise cls(message)
    assert said == b"ok", said[1:].decode() or "the confined applier said nothing"


def _own_user_namespace() -> None:
    """Without root: a user namespace of our own, where chroot is allowed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    root = tmp_path / "jail" / "root"
    root.mkdir(parents=True)
    return root


def outside(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name != "root")


def test_dotdot_is_refused(jail: Path) -> None:
    with pytest.raises(LayerError, match="'..'"):
        apply(jail, make_tar([Item("../x", data=b"evil")]))
    with pytest.raises(LayerError, match="'..'"):
        apply(jail, make_tar([Item("a/../../x", data=b"evil")]))
    assert outside(jail) == []


def test_absolute_names_stay_inside(jail: Path) -> None:
    apply(jail, make_tar([Item("/abs/x", data=b"in")]))
    assert (jail / "abs/x").read_bytes() == b"in"
    assert outside(jail) == []


@pytest.mark.parametrize("target", ["/", "..", "../..", "/../..", "../../.."])
def test_symlink_escape_then_write_through_it(jail: Path, target: str) -> None:
    name = f"pykata-escape-{uuid.uuid4().hex[:8]}"  # a broken applier writes it in / ...
    try:
        apply(jail, make_tar([Item("esc", tarfile.SYMTYPE, linkname=target),
                              Item(f"esc/{name}", data=b"evil"),
                              Item(f"esc/{name}.d/deeper", data=b"evil")]))
        world = jail.parent.parent  # the confined applier's /
        assert outside(jail) == [] and not (world / name).exists()
        assert not Path("/" + name).exists()
        assert (jail / name).read_bytes() == b"evil"  # resolved inside the root
        assert os.readlink(jail / "esc") == target  # the link itself is kept as written
    finally:  # ... and the test removes it again
        Path("/" + name).unlink(missing_ok=True)
        shutil.rmtree("/" + name + ".d", ignore_errors=True)


def test_symlink_in_an_earlier_layer_is_resolved_in_the_root(jail: Path) -> None:
    (jail.parent / "victim").mkdir()
    apply(jail, make_tar([Item("lib", tarfile.SYMTYPE, linkname=str(jail.parent / "victim"))]),
          make_tar([Item("lib/x", data=b"evil")]))
    assert os.listdir(jail.parent / "victim") == []
    assert (jail / str(jail.parent / "victim").lstrip("/") / "x").read_bytes() == b"evil"


def test_symlink_loop_is_refused(jail: Path) -> None:
    with pytest.raises(LayerError, match="too many symlinks"):
        apply(jail, make_tar([Item("a", tarfile.SYMTYPE, linkname="b"),
                              Item("b", tarfile.SYMTYPE, linkname="a"),
                              Item("a/x", data=b"x")]))


def test_final_symlink_is_replaced_not_followed(jail: Path) -> None:
    victim = jail.parent / "victim"
    victim.write_bytes(b"safe")
    apply(jail, make_tar([Item("f", tarfile.SYMTYPE, linkname=str(victim)),
                          Item("f", data=b"evil")]))
    assert victim.read_bytes() == b"safe"
    assert (jail / "f").read_bytes() == b"evil" and not (jail / "f").is_symlink()


def test_hardlinks(jail: Path) -> None:
    victim = jail.parent / "victim"
    victim.write_bytes(b"secret")
    with pytest.raises(LayerError, match="'..'"):
        apply(jail, make_tar([Item("h", tarfile.LNKTYPE, linkname="../victim")]))
    with pytest.raises(LayerError, match="not in the image"):
        apply(jail, make_tar([Item("h", tarfile.LNKTYPE, linkname=str(victim))]))
    # through a symlink that points out: resolved inside, where nothing is
    with pytest.raises(LayerError, match="not in the image"):
        apply(jail, make_tar([Item("up", tarfile.SYMTYPE, linkname=".."),
                              Item("h", tarfile.LNKTYPE, linkname="up/victim")]))
    apply(jail, make_tar([Item("a", data=b"A"), Item("b", tarfile.LNKTYPE, linkname="a")]))
    assert (jail / "a").stat().st_ino == (jail / "b").stat().st_ino
    assert victim.stat().st_nlink == 1


def test_devices_and_setuid(jail: Path) -> None:
    dev = make_tar([Item("null", tarfile.CHRTYPE, mode=0o666)])
    with pytest.raises(LayerError, match="device nodes are not allowed"):
        apply(jail, dev)
    apply(jail, dev, allow_devices=True)
    assert stat.S_ISCHR((jail / "null").lstat().st_mode)
    suid = make_tar([Item("su", data=b"x", mode=0o4755, uid=1000, gid=1000)])
    apply(jail, suid)
    st = (jail / "su").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 1000, 1000)
    apply(jail, suid, keep_setuid=True)
    assert stat.S_IMODE((jail / "su").stat().st_mode) == 0o4755


def test_whiteouts_and_opaque_dirs(jail: Path) -> None:
    lower = make_tar([Item("d", tarfile.DIRTYPE), Item("d/old", data=b"1"),
                      Item("d/sub", tarfile.DIRTYPE), Item("d/sub/x", data=b"2"),
                      Item("keep", data=b"k"), Item("rm", tarfile.DIRTYPE),
                      Item("rm/y", data=b"3")])
    # the opaque marker after a new entry of the same layer keeps that entry
    upper = make_tar([Item("d/new", data=b"n"), Item("d/.wh..wh..opq"), Item(".wh.rm"),
                      Item(".wh.absent"), Item("nowhere/.wh.x")])
    apply(jail, lower, upper)
    assert sorted(os.listdir(jail)) == ["d", "keep"]
    assert sorted(os.listdir(jail / "d")) == ["new"]
    with pytest.raises(LayerError, match="bad whiteout"):
        apply(jail, make_tar([Item(".wh...")]))  # ".." after the prefix
    assert outside(jail) == []


def test_caps_on_entries_and_bytes(jail: Path) -> None:
    many = make_tar([Item(f"f{i}", data=b"x") for i in range(20)])
    with pytest.raises(errors.ResourceExhausted, match="more than 10 entries"):
        apply(jail, many, max_entries=10)
    with pytest.raises(errors.ResourceExhausted, match="more than 5 bytes"):
        apply(jail, many, max_bytes=5)


def test_parent_that_is_a_file_is_refused(jail: Path) -> None:
    with pytest.raises(LayerError, match="is not a directory"):
        apply(jail, make_tar([Item("f", data=b"x"), Item("f/g", data=b"y")]))


def test_basic_header_credentials() -> None:
    assert Credentials("a", "b").basic() == "Basic " + base64.b64encode(b"a:b").decode()


async def test_stalled_body_is_a_deadline(reg: FakeRegistry) -> None:
    never = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await never.wait()  # the rest never comes
        writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        resp = await ihttp.request("GET", ihttp.URL.parse(f"http://127.0.0.1:{port}/"),
                                   timeout=0.2)
        with pytest.raises(errors.DeadlineExceeded, match="no data for 0.2s"):
            await resp.read(100)
        await resp.close()
    finally:
        never.set()
        server.close()
        await server.wait_closed()


def test_tar_ids_out_of_range_are_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("f")
        info.uid = 1 << 40  # base-256 in a GNU header
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(TarError, match="uid/gid out of range"):
        list(TarReader(io.BytesIO(buf.getvalue())))


def test_tar_pax_headers_are_bounded_per_entry() -> None:
    def pax_header(i: int) -> bytes:
        info = tarfile.TarInfo(f"p{i}")
        info.type = tarfile.XHDTYPE
        record = f"x{i}=" + "v" * 600_000 + "\n"
        body = f"{len(record) + 7} {record}".encode()  # the length counts its 6 digits too
        assert int(body.split(b" ")[0]) == len(body)
        info.size = len(body)
        return info.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)

    data = pax_header(1) + pax_header(2) + make_tar([Item("f", data=b"x")])
    with pytest.raises(TarError, match="PAX headers of more than"):
        list(TarReader(io.BytesIO(data)))


async def test_docker_media_types(reg: FakeRegistry, dirs: tuple[Path, Path]) -> None:
    """A Docker manifest list and a Docker v2 manifest with a rootfs.diff.tar.gzip layer."""
    layer = gzip.compress(BASE, mtime=0)
    ld = reg.add_blob(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha(BASE)]}}).encode()
    cd = reg.add_blob(config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {**cd, "mediaType": "application/vnd.docker.container.image.v1+json"},
        "layers": [{**ld, "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"}],
    }).encode()
    mtype = "application/vnd.docker.distribution.manifest.v2+json"
    reg.manifests[sha(manifest)] = (mtype, manifest)
    lst = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{"mediaType": mtype, "digest": sha(manifest), "size": len(manifest),
                       "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    reg.manifests["v1"] = ("application/vnd.docker.distribution.manifest.list.v2+json", lst)
    img = await pull_image(f"{reg.host}/test/img:v1", str(dirs[0]), str(dirs[1]),
                           plain_http=True)
    assert (img.manifest_digest, img.index_digest) == (sha(manifest), sha(lst))
    assert (dirs[0] / "bin/tool").read_bytes() == b"tool\n"


async def test_foreign_and_unknown_layers_are_refused(reg: FakeRegistry,
                                                      dirs: tuple[Path, Path]) -> None:
    _, manifest = reg.add_image([BASE])
    doc = json.loads(manifest)
    doc["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar"
    reg.manifests["odd"] = (OCI_MANIFEST, json.dumps(doc).encode())
    with pytest.raises(errors.Unimplemented, match="unsupported media type"):
        await pull_image(f"{reg.host}/test/img:odd", str(dirs[0]), str(dirs[1]),
                         plain_http=True)
    doc = json.loads(manifest)
    doc["layers"][0]["urls"] = ["http://example.invalid/layer"]
    reg.manifests["foreign"] = (OCI_MANIFEST, json.dumps(doc).encode())
    with pytest.raises(errors.Unimplemented, match="foreign layers"):
        await pull_image(f"{reg.host}/test/img:foreign", str(dirs[0]), str(dirs[1]),
                         plain_http=True)
