"""Issue 19 acceptance: images pulled and verified inside the guest, on real VMs.

A Debian ``docker-registry`` serves plain HTTP inside a network namespace the
test creates; a veth pair links it to the pod's network namespace (nothing
else can reach it: every blob GET in its log comes from the pod's address,
that is from the guest). Images are written straight into the registry's
storage (distribution's filesystem layout), so the test can sign, tamper and
mis-sign them. Containers run from an empty host root directory: their files
can only come from the guest pull.

- through the runtime API (one sandbox with a signature policy): unsigned
  image accepted by the default, run from the guest pull (two layers, marker
  file), host share without the rootfs, guest tmpfs gone after delete;
  tampered layer, unsigned image under a rule requiring signatures, wrong key,
  manifest tampered after signing, rejected repository: each refused with one
  line, nothing left; a correctly signed image runs;
- through containerd (``ctr run --rootfs <empty dir> --annotation
  io.pykata.guest-pull.image=...``): no content, image or snapshot appears in
  containerd, the registry saw the layer fetched from the pod's address only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pykata import config, errors
from pykata.runtime.bundle import default_spec
from pykata.runtime.container import GUEST_PULL_IMAGE_ANNOTATION
from pykata.runtime.sandbox import Sandbox
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.containerd import RUNTIME_TYPE, scratch_containerd
from pykata.testing.images import _layer_tar

pytestmark = pytest.mark.timeout(900)
CACHE = Path("/var/tmp/pykata-test")
REGISTRY = "/usr/bin/docker-registry"
PORT = 5000
GUEST_IMAGES = "/run/pykata/images"  # the agent's guest-pull storage (guest/pull.py)


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, input=input, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode(errors="replace")


# -- the network: the pod's namespace and the registry's -------------------------------
@dataclass
class Net:
    pod_ns: str
    reg_ns: str
    reg_ip: str
    pod_ip: str

    @property
    def registry(self) -> str:
        return f"{self.reg_ip}:{PORT}"


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    n = Net(f"pkgp-pod-{tag}", f"pkgp-reg-{tag}", "10.231.77.1", "10.231.77.2")
    sh("ip", "netns", "add", n.pod_ns)
    try:
        sh("ip", "netns", "add", n.reg_ns)
        try:
            pod_end, reg_end = f"gpp{tag}", f"gpr{tag}"
            sh("ip", "link", "add", pod_end, "type", "veth", "peer", "name", reg_end)
            sh("ip", "link", "set", reg_end, "netns", n.reg_ns)
            sh("ip", "link", "set", pod_end, "netns", n.pod_ns)
            sh("ip", "-n", n.reg_ns, "addr", "add", f"{n.reg_ip}/24", "dev", reg_end)
            sh("ip", "-n", n.reg_ns, "link", "set", reg_end, "up")
            sh("ip", "-n", n.reg_ns, "link", "set", "lo", "up")
            sh("ip", "-n", n.pod_ns, "link", "set", pod_end, "name", "eth0")
            sh("ip", "-n", n.pod_ns, "addr", "add", f"{n.pod_ip}/24", "dev", "eth0")
            sh("ip", "-n", n.pod_ns, "link", "set", "eth0", "up")
            sh("ip", "-n", n.pod_ns, "link", "set", "lo", "up")
            yield n
        finally:
            sh("ip", "netns", "del", n.reg_ns, check=False)
    finally:
        sh("ip", "netns", "del", n.pod_ns, check=False)


# -- the registry and its storage ------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    host: str
    storage: Path
    log: Path

    @property
    def v2(self) -> Path:
        return self.storage / "docker/registry/v2"

    def blob_file(self, digest: str) -> Path:
        h = digest.removeprefix("sha256:")
        return self.v2 / "blobs/sha256" / h[:2] / h / "data"

    def _link(self, path: Path, digest: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "link").write_text(digest)

    def blob(self, repo: str, data: bytes) -> str:
        """Store ``data`` and link it into ``repo``; its digest."""
        d = sha(data)
        f = self.blob_file(d)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        self._link(self.v2 / "repositories" / repo / "_layers/sha256" / d[7:], d)
        return d

    def manifest(self, repo: str, tag: str, doc: dict[str, Any]) -> str:
        raw = json.dumps(doc, sort_keys=True).encode()
        d = sha(raw)
        f = self.blob_file(d)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(raw)
        man = self.v2 / "repositories" / repo / "_manifests"
        self._link(man / "revisions/sha256" / d[7:], d)
        self._link(man / "tags" / tag / "current", d)
        self._link(man / "tags" / tag / "index/sha256" / d[7:], d)
        return d

    def image(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, list[str]]:
        """An OCI image of ``layers`` (tars, stored gzipped): manifest digest, layer digests."""
        blobs = [gzip.compress(t, compresslevel=6, mtime=0) for t in layers]
        descs = [{"mediaType": GZIP_LAYER, "digest": self.blob(repo, b), "size": len(b)}
                 for b in blobs]
        cfg = json.dumps({"architecture": "amd64", "os": "linux",
                          "config": {"Cmd": ["sh"]},
                          "rootfs": {"type": "layers",
                                     "diff_ids": [sha(t) for t in layers]}}).encode()
        digest = self.manifest(repo, tag, {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.blob(repo, cfg),
                       "size": len(cfg)},
            "layers": descs})
        return digest, [str(d["digest"]) for d in descs]

    def sign(self, repo: str, digest: str, key: Path, reference: str) -> None:
        """A cosign-style signature of ``digest`` by ``key`` (openssl), stored as
        cosign stores it: tag sha256-<hex>.sig, payload layer, signature annotation."""
        payload = json.dumps({"critical": {"identity": {"docker-reference": reference},
                                           "image": {"docker-manifest-digest": digest},
                                           "type": "cosign container image signature"},
                              "optional": None}).encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=payload,
                             capture_output=True, check=True, timeout=60).stdout
        cfg = b"{}"
        self.manifest(repo, digest.replace(":", "-") + ".sig", {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": self.blob(repo, cfg),
                       "size": len(cfg)},
            "layers": [{"mediaType": SIMPLESIGNING, "digest": self.blob(repo, payload),
                        "size": len(payload),
                        "annotations": {"dev.cosignproject.cosign/signature":
                                        base64.b64encode(sig).decode()}}]})

    def fetches(self, digest: str) -> list[str]:
        """The client addresses of every GET of blob ``digest`` in the access log."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.match(r"(\S+) .*\"GET /v2/\S+/blobs/(\S+) ", line)
            if m and m.group(2) == digest:
                out.append(m.group(1))
        return out


@pytest.fixture(scope="module")
def registry(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    for tool in (REGISTRY, "openssl", "busybox"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed: apt-get install docker-registry openssl busybox")
    base = tmp_path_factory.mktemp("gp-registry")
    storage = base / "storage"
    storage.mkdir()
    cfg = base / "config.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: warn\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
                   f"http:\n  addr: {net.registry}\n")
    log = base / "registry.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(["ip", "netns", "exec", net.reg_ns, REGISTRY, "serve", str(cfg)],
                                stdout=logf, stderr=logf)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                pytest.fail("docker-registry exited: " + log.read_text(errors="replace")[-2000:])
            r = subprocess.run(["ip", "netns", "exec", net.reg_ns, "busybox", "wget", "-q",
                                "-O", "/dev/null", f"http://{net.registry}/v2/"],
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("docker-registry did not answer /v2/")
        yield Registry(net.registry, storage, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tls_registry(net: Net, registry: Registry,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same storage served over TLS on port 5443 with a self-signed
    certificate (which the guest does not trust): its host:port."""
    base = tmp_path_factory.mktemp("gp-tls-registry")
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-nodes", "-days", "2", "-subj", "/CN=pykata", "-addext",
       f"subjectAltName=IP:{net.reg_ip}", "-keyout", str(base / "key.pem"), "-out",
       str(base / "cert.pem"))
    host = f"{net.reg_ip}:5443"
    cfg = base / "config.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: warn\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {registry.storage}\n"
                   f"http:\n  addr: {host}\n  tls:\n    certificate: {base / 'cert.pem'}\n"
                   f"    key: {base / 'key.pem'}\n")
    with (base / "registry.log").open("wb") as logf:
        proc = subprocess.Popen(["ip", "netns", "exec", net.reg_ns, REGISTRY, "serve", str(cfg)],
                                stdout=logf, stderr=logf)
    try:
        for _ in range(300):
            assert proc.poll() is None, (base / "registry.log").read_text(errors="replace")
            r = subprocess.run(["ip", "netns", "exec", net.reg_ns, "openssl", "s_client",
                                "-connect", host], input=b"", capture_output=True, timeout=30)
            if b"BEGIN CERTIFICATE" in r.stdout:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the TLS docker-registry did not answer")
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_layer() -> bytes:
    return _layer_tar(busybox_rootfs(CACHE / "busybox-rootfs"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Two P-256 key pairs: name -> (private key file, public key PEM)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("good", "other"):
        priv = d / f"{name}.pem"
        sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(priv))
        out[name] = (priv, sh("openssl", "ec", "-in", str(priv), "-pubout"))
    return out


@dataclass
class Images:
    plain: str  # unsigned, accepted by the default
    plain_layers: list[str]
    marker: str
    signed: str
    signed_digest: str
    unsigned: str  # a rule requires a signature
    wrong_key: str
    tampered_layer: str
    tampered_layer_digest: str
    tampered_manifest: str
    rejected: str


@pytest.fixture(scope="module")
def images(registry: Registry, base_layer: bytes, keys: dict[str, tuple[Path, str]]) -> Images:
    host = registry.host
    marker = uuid.uuid4().hex

    def make(repo: str, extra: bytes) -> tuple[str, str, list[str]]:
        layer = tar_of({"etc/gp-marker": extra})
        digest, layers = registry.image(repo, "v1", [base_layer, layer])
        return f"{host}/{repo}:v1", digest, layers

    plain, _, plain_layers = make("gp/plain", marker.encode())
    signed, signed_digest, _ = make("gp/signed", b"signed\n")
    registry.sign("gp/signed", signed_digest, keys["good"][0], f"{host}/gp/signed")
    unsigned, _, _ = make("gp/unsigned", b"unsigned\n")
    wrong, wrong_digest, _ = make("gp/wrongkey", b"wrong\n")
    registry.sign("gp/wrongkey", wrong_digest, keys["other"][0], f"{host}/gp/wrongkey")
    tampered, _, t_layers = make("gp/tlayer", uuid.uuid4().hex.encode() * 50)
    blob = registry.blob_file(t_layers[1])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    tman, tman_digest, _ = make("gp/tmanifest", b"tmanifest\n")
    registry.sign("gp/tmanifest", tman_digest, keys["good"][0], f"{host}/gp/tmanifest")
    mf = registry.blob_file(tman_digest)
    mf.write_bytes(mf.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    rejected, _, _ = make("gp/rejected", b"rejected\n")
    return Images(plain, plain_layers, marker, signed, signed_digest, unsigned, wrong,
                  tampered, t_layers[1], tman, rejected)


def signature_policy(registry: Registry, keys: dict[str, tuple[Path, str]]) -> dict[str, Any]:
    good = keys["good"][1]
    host = registry.host
    return {"version": 1, "default": "accept", "images": [
        {"match": f"{host}/gp/signed", "require": "signed", "keys": [good]},
        {"match": f"{host}/gp/unsigned", "require": "signed", "keys": [good]},
        {"match": f"{host}/gp/wrongkey", "require": "signed", "keys": [good]},
        {"match": f"{host}/gp/tmanifest", "require": "signed", "keys": [good]},
        {"match": f"{host}/gp/rejected*", "require": "reject"},
    ]}


@pytest.fixture(scope="module")
def gp_config(pykata_config: config.Config, registry: Registry,
              keys: dict[str, tuple[Path, str]],
              tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    cfg = copy.deepcopy(pykata_config)
    policy = tmp_path_factory.mktemp("gp-policy") / "signatures.json"
    policy.write_text(json.dumps(signature_policy(registry, keys)))
    cfg.guest_pull.plain_http_registries = [registry.host]
    cfg.guest_pull.storage_mib = 128
    cfg.guest_pull.signature_policy_file = str(policy)
    cfg.runtime.create_container_timeout = 600  # a pull under TCG on a busy machine
    cfg.agent.debug_console = True  # the test looks at the guest's mounts (DebugExec)
    return cfg


# -- through containerd: no layer on the host ------------------------------------------
def test_ctr_run_guest_pull_leaves_no_layer_on_the_host(gp_config: config.Config,
                                                        images: Images, registry: Registry,
                                                        net: Net, tmp_path: Path) -> None:
    cfg_file = tmp_path / "configuration.toml"
    cfg_file.write_text(config.to_toml(gp_config))
    empty = tmp_path / "empty-rootfs"
    empty.mkdir()
    cid = f"gpc{uuid.uuid4().hex[:6]}"
    with scratch_containerd("gp") as ctd:
        before = {layer: len(registry.fetches(layer)) for layer in images.plain_layers}
        r = ctd.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, "--runtime-config-path",
                    str(cfg_file), "--rootfs", "--with-ns",
                    f"network:/run/netns/{net.pod_ns}", "--annotation",
                    f"{GUEST_PULL_IMAGE_ANNOTATION}={images.plain}", str(empty), cid,
                    "cat", "/etc/gp-marker", check=False, timeout=900)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert r.stdout.decode() == images.marker
        # containerd never saw the image: no content, no image, no snapshot.
        assert ctd.ctr("content", "ls", "-q").stdout.strip() == b""
        assert ctd.ctr("images", "ls", "-q").stdout.strip() == b""
        assert ctd.ctr("snapshots", "ls").stdout.decode().strip().count("\n") == 0
        blobs = ctd.root / "io.containerd.content.v1.content/blobs"
        assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
        for layer in images.plain_layers:
            fetched = registry.fetches(layer)[before[layer]:]
            assert fetched == [net.pod_ip], fetched
        assert list(empty.iterdir()) == []
    assert not leftovers(gp_config.runtime.state_dir, f"gp/{cid}")


# -- through the runtime API -----------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb(gp_config: config.Config, net: Net) -> AsyncIterator[Sandbox]:
    s = await Sandbox.create(f"gp-{uuid.uuid4().hex[:6]}", gp_config,
                             netns=f"/run/netns/{net.pod_ns}")
    try:
        yield s
    finally:
        await s.stop()
    assert not leftovers(gp_config.runtime.state_dir, s.id)


def bundle_of(tmp_path: Path, cid: str, args: list[str], image: str = "") -> Path:
    """A bundle whose rootfs is an empty directory (with ``image``: pulled in the guest)."""
    bundle = tmp_path / cid
    (bundle / "rootfs").mkdir(parents=True)
    spec = default_spec(args)
    if image:
        spec["annotations"] = {GUEST_PULL_IMAGE_ANNOTATION: image}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


async def run(sb: Sandbox, tmp_path: Path, args: list[str], image: str,
              during: Any = None) -> tuple[int, str]:
    cid = f"g{uuid.uuid4().hex[:6]}"
    bundle = bundle_of(tmp_path, cid, args, image)
    c = await sb.create_container(cid, bundle)
    try:
        if during is not None:
            during(cid)
        await c.start()
        out = b""
        async with asyncio.timeout(300):
            while chunk := await c.init.read_stdout():
                out += chunk
        status = await c.wait()
    finally:
        await c.delete(force=True)
    return status.code, out.decode(errors="replace")


async def guest_pull_mounts(sb: Sandbox) -> list[str]:
    """The agent's mounts below GUEST_IMAGES, and what is left there: a debug
    exec (outside every container) reads the guest's mountinfo and lists it."""
    from pykata.protos import agent_pb2 as pb

    exec_id = f"d{uuid.uuid4().hex[:6]}"
    process = {"args": ["sh", "-c", f"cat /proc/self/mountinfo; ls -A {GUEST_IMAGES}"],
               "cwd": "/", "env": [], "terminal": False}
    await sb.agent._call("DebugExec", pb.ExecProcessRequest(
        exec_id=exec_id, process_json=json.dumps(process).encode()), pb.ProcessResponse)
    out = b""
    async with asyncio.timeout(120):
        while chunk := await sb.agent.read_stdout("", exec_id):
            out += chunk
    status = await sb.agent.wait_process("", exec_id)
    text = out.decode(errors="replace")
    assert status.code in (0, 1) and " / " in text, text  # ls: 1 if GUEST_IMAGES is absent
    return [line for line in text.splitlines()
            if GUEST_IMAGES in line or not line.count(" ")]


async def create_fails(sb: Sandbox, tmp_path: Path, image: str) -> errors.PykataError:
    cid = f"f{uuid.uuid4().hex[:6]}"
    with pytest.raises(errors.PykataError) as ei:
        await sb.create_container(cid, bundle_of(tmp_path, cid, ["true"], image))
    print(f"{image}: {type(ei.value).__name__}: {ei.value}")
    assert cid not in sb.containers
    assert not (sb.shared_dir / cid).exists()
    return ei.value


@pytest.mark.asyncio(loop_scope="module")
async def test_unsigned_image_runs_from_the_guest_pull(sb: Sandbox, images: Images,
                                                      registry: Registry, net: Net,
                                                      tmp_path: Path) -> None:
    shared: list[bool] = []
    started = time.monotonic()
    code, out = await run(
        sb, tmp_path, ["sh", "-c", "cat /etc/gp-marker; echo; busybox | head -1; ls /bin/sh"],
        image=images.plain,
        during=lambda cid: shared.append((sb.shared_dir / cid / "rootfs").exists()))
    print(f"guest pull + run of {images.plain}: {time.monotonic() - started:.1f}s")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == images.marker and lines[1].startswith("BusyBox"), out
    assert lines[2] == "/bin/sh"
    assert shared == [False], "the host shared a root filesystem for a guest-pulled container"
    # Every layer was fetched, and only from the pod's address (the guest).
    for layer in images.plain_layers:
        assert registry.fetches(layer) and set(registry.fetches(layer)) == {net.pod_ip}
    assert await guest_pull_mounts(sb) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_signed_image_runs(sb: Sandbox, images: Images, tmp_path: Path) -> None:
    code, out = await run(sb, tmp_path, ["cat", "/etc/gp-marker"], image=images.signed)
    assert (code, out) == (0, "signed\n")


@pytest.mark.asyncio(loop_scope="module")
async def test_refused_images(sb: Sandbox, images: Images, registry: Registry,
                              tmp_path: Path) -> None:
    host = registry.host
    err = await create_fails(sb, tmp_path, images.unsigned)
    assert isinstance(err, errors.PermissionDenied), err
    assert "image signature: " in str(err) and "unsigned" in str(err) \
        and "rule images[1] requires a signature" in str(err), err
    err = await create_fails(sb, tmp_path, images.wrong_key)
    assert isinstance(err, errors.PermissionDenied), err
    assert "does not verify with the key" in str(err), err
    # Manifest changed after signing: its digest has no signature.
    err = await create_fails(sb, tmp_path, images.tampered_manifest)
    assert isinstance(err, errors.PermissionDenied) and "unsigned" in str(err), err
    err = await create_fails(sb, tmp_path, images.rejected)
    assert isinstance(err, errors.PermissionDenied), err
    assert f"refused by the signature policy's rule images[4] ('{host}/gp/rejected*')" \
        in str(err), err
    err = await create_fails(sb, tmp_path, images.tampered_layer)
    assert isinstance(err, errors.InvalidArgument), err
    assert f"blob {images.tampered_layer_digest}: digest mismatch" in str(err), err
    assert "\n" not in str(err)
    # Nothing of the refused pulls is left in the guest.
    assert await guest_pull_mounts(sb) == []


@pytest.mark.asyncio(loop_scope="module")
async def test_https_registry_is_spoken_to_with_tls(sb: Sandbox, images: Images,
                                                    tls_registry: str, tmp_path: Path) -> None:
    """The guest image carries TLS (Python's ssl, OpenSSL, the Mozilla CA bundle):
    a registry not listed as plain HTTP is reached over https, and a certificate
    no CA of the bundle signed is refused."""
    image = images.plain.replace(images.plain.split("/")[0], tls_registry)
    err = await create_fails(sb, tmp_path, image)
    assert isinstance(err, errors.Unavailable), err
    assert "CERTIFICATE_VERIFY_FAILED" in str(err) and f"https://{tls_registry}/" in str(err), err


_GUEST_HTTPS = """
import asyncio, json, ssl, sys
sys.path.insert(0, "/pull/src")
from pykata import errors
from pykata.guest.imagepull import pull_image
from pykata.guest.imagepull.http import CA_BUNDLE
ref = sys.argv[1]
out = {"cas": ssl.create_default_context(cafile=CA_BUNDLE).cert_store_stats()["x509_ca"]}
try:
    asyncio.run(pull_image(ref, "/pull/root", "/pull/work"))
except errors.Unavailable as exc:
    out["untrusted"] = str(exc)
ctx = ssl.create_default_context(cafile="/pull/cert.pem")
out["digest"] = asyncio.run(pull_image(ref, "/pull/root", "/pull/work", ssl_context=ctx)
                            ).manifest_digest
print(json.dumps(out))
"""


def test_guest_image_python_pulls_over_https(tmp_path: Path) -> None:
    """The guest image's own Python, OpenSSL and CA bundle (its initrd unpacked
    and chrooted into, no VM) pull over TLS from a registry on 127.0.0.1 whose
    CA it is given; with the image's bundle alone the certificate is refused."""
    from pykata.testing.images import oci_archive
    from tests.integration.test_imagepull_registry import _serve

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
    base = tmp_path / "reg"
    base.mkdir()
    with _serve(base, tls=True) as reg:
        archive = oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"), tmp_path / "bb.tar",
                              ref="pykata/busybox:tls")
        digest = reg.push(f"oci-archive:{archive}", "pykata/busybox:tls")
        shutil.copy(base / "cert.pem", groot / "pull/cert.pem")
        out = subprocess.run(["chroot", str(groot), "/usr/bin/python3.11", "-SB", "-c",
                              _GUEST_HTTPS, f"{reg.host}/pykata/busybox:tls"],
                             capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["cas"] > 100 and got["digest"] == digest, got
    assert "CERTIFICATE_VERIFY_FAILED" in got["untrusted"], got
    assert (groot / "pull/root/bin/busybox").is_file()


# -- through containerd's CRI plugin ---------------------------------------------------
@contextlib.contextmanager
def registry_on_bridge(bridge: str, ip: str, prefix: int, storage: Path,
                       base: Path) -> Iterator[str]:
    """docker-registry serving ``storage`` at ``ip``:5000 from a netns of ours whose
    veth is a port of the CNI ``bridge`` (made here if CNI has not yet)."""
    tag = uuid.uuid4().hex[:6]
    ns, inner, outer = f"pkgp-cri-{tag}", f"gci{tag}", f"gco{tag}"
    if not Path(f"/sys/class/net/{bridge}").exists():
        sh("ip", "link", "add", "name", bridge, "type", "bridge")
    sh("ip", "link", "set", bridge, "up")
    sh("ip", "netns", "add", ns)
    proc = None
    try:
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "link", "set", outer, "master", bridge)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{prefix}", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        cfg = base / "config.yml"
        cfg.write_text("version: 0.1\nlog:\n  level: warn\n"
                       f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
                       f"http:\n  addr: {ip}:{PORT}\n")
        with (base / "registry.log").open("wb") as logf:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, REGISTRY, "serve", str(cfg)],
                                    stdout=logf, stderr=logf)
        for _ in range(300):
            assert proc.poll() is None, (base / "registry.log").read_text(errors="replace")
            r = subprocess.run(["ip", "netns", "exec", ns, "busybox", "wget", "-q", "-O",
                                "/dev/null", f"http://{ip}:{PORT}/v2/"], capture_output=True,
                               timeout=30)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("docker-registry on the CNI bridge did not answer")
        yield f"{ip}:{PORT}"
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sh("ip", "netns", "del", ns, check=False)


def test_cri_pod_with_guest_pull_ignores_the_hosts_copy(
        gp_config: config.Config, registry: Registry, base_layer: bytes,
        tmp_path: Path) -> None:
    """A CRI pod asking for the guest pull (pod annotation io.pykata.guest-pull):
    containerd 1.6 has the image (imported here under the same name, with other
    content: a stand-in for the host's pull), but the container runs from what
    the guest pulled from the registry; the host's snapshot is never mounted on
    the bundle, and everything goes with the pod."""
    from pykata.protos import cri_api_pb2 as cri
    from pykata.testing.cri import (
        CRI_NAMESPACE,
        container_config,
        cri_containerd,
        pod_config,
    )
    from pykata.testing.images import oci_archive
    from pykata.testing.leaks import pod_leftovers

    label = {"pykata.test": "guest-pull-cri"}
    base = Path(f"/run/pykata-crigp-{uuid.uuid4().hex[:6]}")
    marker = uuid.uuid4().hex
    cfg = copy.deepcopy(gp_config)
    root = Path(f"/var/lib/pykata-crigp-{uuid.uuid4().hex[:6]}")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        ctd, net, client = stack.enter_context(cri_containerd(
            base, root, label, pykata_config=config.to_toml(cfg)))
        ip = str(net.subnet.network_address + 250)
        (tmp_path / "reg").mkdir()
        with registry_on_bridge(net.bridge, ip, net.subnet.prefixlen, registry.storage,
                                tmp_path / "reg") as host:
            cfg.guest_pull.plain_http_registries = [host]
            (base / "pykata.toml").write_text(config.to_toml(cfg))
            image = f"{host}/gp/cri:v1"
            registry.image("gp/cri", "v1", [base_layer, tar_of({"etc/gp-marker":
                                                                marker.encode()})])
            # The host's copy: the same name, another marker.
            hostroot = tmp_path / "hostcopy"
            shutil.copytree(busybox_rootfs(CACHE / "busybox-rootfs"), hostroot,
                            symlinks=True)
            (hostroot / "etc/gp-marker").write_text("host-copy")
            archive = oci_archive(hostroot, tmp_path / "host.tar", ref=image)
            sh("ctr", "--address", str(ctd.socket), "--namespace", CRI_NAMESPACE, "images",
               "import", str(archive))
            tag = uuid.uuid4().hex[:10]
            pcfg = pod_config(f"gp-{tag}", "pykata-test", uid=tag,
                              log_directory=base / "pods" / tag, hostname=f"h-{tag}",
                              labels=label, annotations={"io.pykata.guest-pull": "true"})
            pod = client.run_pod_sandbox(pcfg, runtime_handler="pykata")
            needles = [pod]
            try:
                cid = client.create_container(pod, container_config(
                    "app", image, ["/bin/sh", "-c"], ["trap 'exit 0' TERM; sleep 3600 & wait"],
                    log_path="app.log"), pcfg)
                needles.append(cid)
                client.start_container(cid)
                r = client.exec_sync(cid, ["cat", "/etc/gp-marker"], timeout=60)
                assert (r.exit_code, r.stdout.decode()) == (0, marker), r
                bundle_root = (ctd.base / "state/io.containerd.runtime.v2.task" / CRI_NAMESPACE
                               / cid / "rootfs")
                assert bundle_root.is_dir() and not os.path.ismount(bundle_root)
                assert list(bundle_root.iterdir()) == []
                st = client.container_status(cid).status
                assert st.state == cri.CONTAINER_RUNNING, st
            finally:
                client.stop_pod_sandbox(pod)
                client.remove_pod_sandbox(pod)
            deadline = time.monotonic() + 30
            while pod_leftovers(needles) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not pod_leftovers(needles)
