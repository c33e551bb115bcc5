"""pykata.guest.imagepull on the host against a real registry: Debian's
``docker-registry`` (distribution) on 127.0.0.1 with private storage, images
pushed with skopeo, pulled by tag and by digest, tampered blobs and manifests
refused. No VM is booted."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata import errors
from pykata.guest.imagepull import pull_image
from pykata.testing import busybox_rootfs
from pykata.testing.images import oci_archive

pytestmark = pytest.mark.timeout(300)
CACHE = Path("/var/tmp/pykata-test")
REGISTRY = "/usr/bin/docker-registry"


@dataclass
class Registry:
    host: str
    storage: Path
    proc: subprocess.Popen[bytes]

    def blob_file(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def push(self, source: str, repo: str) -> str:
        """skopeo copy ``source`` to ``repo`` (name:tag); the manifest digest."""
        dest = f"docker://{self.host}/{repo}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, dest],
                       check=True, capture_output=True, timeout=120)
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", dest],
                             check=True, capture_output=True, timeout=60).stdout
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def manifest(self, digest: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.blob_file(digest).read_bytes())
        return doc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _serve(base: Path, tls: bool) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 (a free port) with storage in ``base``; with ``tls``,
    a self-signed certificate for 127.0.0.1 in ``base/cert.pem``."""
    for tool in (REGISTRY, "skopeo", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed: apt-get install docker-registry skopeo openssl")
    storage = base / "storage"
    storage.mkdir()
    port = _free_port()
    tls_conf = ""
    ctx: ssl.SSLContext | None = None
    if tls:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=pykata",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                        str(base / "key.pem"), "-out", str(base / "cert.pem")],
                       check=True, capture_output=True, timeout=60)
        tls_conf = (f"  tls:\n    certificate: {base / 'cert.pem'}\n"
                    f"    key: {base / 'key.pem'}\n")
        ctx = ssl.create_default_context(cafile=str(base / "cert.pem"))
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + tls_conf)
    log = (base / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log, stderr=log)
    reg = Registry(f"127.0.0.1:{port}", storage, proc)
    try:
        for _ in range(300):  # readiness: /v2/ answers (a bounded number of polls)
            if proc.poll() is not None:
                pytest.fail("docker-registry exited: "
                            + (base / "registry.log").read_text(errors="replace")[-2000:])
            try:
                url = f"{'https' if tls else 'http'}://{reg.host}/v2/"
                with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            pytest.fail("docker-registry did not answer /v2/")
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with _serve(tmp_path_factory.mktemp("registry"), tls=False) as reg:
        yield reg


@pytest.fixture(scope="module")
def busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """busybox pushed as pykata/busybox:v1: (reference by tag, manifest digest)."""
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    archive = oci_archive(rootfs, tmp_path_factory.mktemp("oci") / "busybox.tar",
                          ref="pykata/busybox:v1")
    digest = registry.push(f"oci-archive:{archive}", "pykata/busybox:v1")
    return f"{registry.host}/pykata/busybox:v1", digest


def _layer(files: dict[str, bytes | None]) -> bytes:
    """A layer tar: name -> content (None: an empty whiteout marker file)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data or b"")
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _oci_layout(out: Path, layers: list[tuple[bytes, str]]) -> Path:
    """An OCI layout directory with ``layers`` ((tar, "gzip"|"zstd")), tag ``t``."""
    blobs = out / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return "sha256:" + d

    descs = []
    for raw, comp in layers:
        blob = gzip.compress(raw, mtime=0) if comp == "gzip" else subprocess.run(
            ["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
        descs.append({"mediaType": f"application/vnd.oci.image.layer.v1.tar+{comp}",
                      "digest": put(blob), "size": len(blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [
                             "sha256:" + hashlib.sha256(r).hexdigest() for r, _ in layers]}
                         }).encode()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": put(config), "size": len(config)},
                           "layers": descs}).encode()
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "t"}}]}))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir()
    work.mkdir()
    return root, work


async def test_pull_busybox_by_tag_and_by_digest(registry: Registry, busybox: tuple[str, str],
                                                 dirs: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    ref, digest = busybox
    root, work = dirs
    img = await pull_image(ref, str(root), str(work), plain_http=True)
    assert img.manifest_digest == digest and img.index_digest is None
    assert img.config["config"]["Cmd"] == ["sh"]
    host_busybox = CACHE / "busybox-rootfs/bin/busybox"
    assert _sha(root / "bin/busybox") == _sha(host_busybox)
    assert os.readlink(root / "bin/ls") == os.readlink(CACHE / "busybox-rootfs/bin/ls")
    assert os.listdir(work) == []
    root2 = tmp_path / "root2"
    root2.mkdir()
    by_digest = f"{registry.host}/pykata/busybox@{digest}"
    img2 = await pull_image(by_digest, str(root2), str(work), plain_http=True)
    assert img2.manifest_digest == digest
    assert _sha(root2 / "bin/busybox") == _sha(host_busybox)
    with pytest.raises(errors.NotFound, match="manifest unknown|404"):
        await pull_image(f"{registry.host}/pykata/busybox@sha256:{'0' * 64}", str(root2),
                         str(work), plain_http=True)


async def test_zstd_layer_and_whiteouts_through_the_registry(registry: Registry,
                                                             dirs: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    if not shutil.which("zstd"):
        pytest.fail("the zstd tool is needed (apt-get install zstd)")
    mark = uuid.uuid4().hex.encode()
    lower = _layer({"etc/keep": b"k", "etc/gone": b"g", "data/old": mark})
    upper = _layer({"etc/.wh.gone": None, "data/.wh..wh..opq": None, "data/new": mark})
    layout = _oci_layout(tmp_path / "layout", [(lower, "gzip"), (upper, "zstd")])
    digest = registry.push(f"oci:{layout}:t", "pykata/layers:v1")
    layers = registry.manifest(digest)["layers"]
    assert isinstance(layers, list)
    kinds = [str(d["mediaType"]) for d in layers]
    assert kinds[1].endswith("+zstd")  # the registry kept the zstd layer
    root, work = dirs
    await pull_image(f"{registry.host}/pykata/layers:v1", str(root), str(work), plain_http=True)
    assert sorted(os.listdir(root / "etc")) == ["keep"]
    assert os.listdir(root / "data") == ["new"] and (root / "data/new").read_bytes() == mark


async def test_tampered_layer_in_storage_is_refused(registry: Registry, dirs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    # a layer of its own (the registry stores blobs by digest for all repositories)
    layer = _layer({"file": uuid.uuid4().hex.encode() * 100})
    layout = _oci_layout(tmp_path / "layout", [(layer, "gzip")])
    digest = registry.push(f"oci:{layout}:t", "pykata/tampered:v1")
    layers = registry.manifest(digest)["layers"]
    assert isinstance(layers, list)
    layer_digest = str(layers[0]["digest"])
    blob = registry.blob_file(layer_digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    found = "sha256:" + hashlib.sha256(data).hexdigest()
    root, work = dirs
    with pytest.raises(errors.InvalidArgument) as ei:
        await pull_image(f"{registry.host}/pykata/tampered:v1", str(root), str(work),
                         plain_http=True)
    assert str(ei.value) == (
        f"image {registry.host}/pykata/tampered:v1: blob {layer_digest}: digest mismatch:"
        f" expected {layer_digest}, found {found}")
    assert os.listdir(root) == [] and os.listdir(work) == []


async def test_tampered_manifest_in_storage_is_refused(registry: Registry,
                                                       dirs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    layout = _oci_layout(tmp_path / "layout", [(_layer({"f": uuid.uuid4().hex.encode()}),
                                                "gzip")])
    digest = registry.push(f"oci:{layout}:t", "pykata/tampered-manifest:v1")
    manifest = registry.blob_file(digest)
    before = manifest.read_bytes()
    after = before.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')  # same JSON
    assert after != before
    manifest.write_bytes(after)
    root, work = dirs
    with pytest.raises(errors.InvalidArgument,
                       match=f"manifest digest mismatch: expected {digest}"):
        await pull_image(f"{registry.host}/pykata/tampered-manifest@{digest}", str(root),
                         str(work), plain_http=True)
    assert os.listdir(root) == []


_GUEST_PULL = """
import asyncio, hashlib, json, sys
sys.path.insert(0, "/pull/src")
from pykata.guest.imagepull import pull_image
img = asyncio.run(pull_image(sys.argv[1], "/pull/root", "/pull/work", plain_http=True))
data = open("/pull/root/bin/busybox", "rb").read()
print(json.dumps({"digest": img.manifest_digest, "busybox": hashlib.sha256(data).hexdigest(),
                  "ssl": "ssl" in sys.modules, "tarfile": "tarfile" in sys.modules}))
"""


def test_pull_with_the_guest_images_python(registry: Registry, busybox: tuple[str, str],
                                           tmp_path: Path) -> None:
    """The guest image's own trimmed Python (its initrd unpacked and chrooted into,
    no VM) pulls through the real registry: the package needs nothing the image
    strips (http, email, tarfile; ssl is in the image since the guest pull's
    https, and asyncio imports it)."""
    from pykata import config

    initrd = config.load().initrd_path()
    if not initrd.exists():
        pytest.fail(f"guest image missing ({initrd}): run 'make setup'")
    groot = tmp_path / "guest"
    groot.mkdir()
    with initrd.open("rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=groot, check=True,
                       timeout=120)
    src = Path(__file__).resolve().parents[2] / "src/pykata"
    dest = groot / "pull/src/pykata"
    (dest / "guest").mkdir(parents=True)
    for name in ("__init__.py", "errors.py"):
        shutil.copy(src / name, dest / name)
    (dest / "guest/__init__.py").write_text("")
    shutil.copytree(src / "guest/imagepull", dest / "guest/imagepull",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d in ("root", "work"):
        (groot / "pull" / d).mkdir()
    ref, digest = busybox
    out = subprocess.run(["chroot", str(groot), "/usr/bin/python3.11", "-SB", "-c",
                          _GUEST_PULL, ref], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got == {"digest": digest, "busybox": _sha(CACHE / "busybox-rootfs/bin/busybox"),
                   "ssl": True, "tarfile": False}
    assert os.listdir(groot / "pull/work") == []


async def test_pull_over_https(tmp_path_factory: pytest.TempPathFactory,
                               dirs: tuple[Path, Path]) -> None:
    """TLS to the registry (what the guest needs ssl for): verified against the
    registry's CA, refused without it."""
    base = tmp_path_factory.mktemp("tls-registry")
    with _serve(base, tls=True) as reg:
        archive = oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"), base / "bb.tar",
                              ref="pykata/busybox:tls")
        digest = reg.push(f"oci-archive:{archive}", "pykata/busybox:tls")
        ref = f"{reg.host}/pykata/busybox:tls"
        root, work = dirs
        with pytest.raises(errors.Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await pull_image(ref, str(root), str(work))
        ctx = ssl.create_default_context(cafile=str(base / "cert.pem"))
        img = await pull_image(ref, str(root), str(work), ssl_context=ctx)
        assert img.manifest_digest == digest
        assert _sha(root / "bin/busybox") == _sha(CACHE / "busybox-rootfs/bin/busybox")
