"""Guest pull pieces without a VM: the signature policy parser, fetching and
verifying cosign signatures from a fake registry before any layer is fetched,
the agent's credential handling and early refusals, and the host's choice of
guest pull for a container (runtime.container.guest_pull_of)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pykata import config, errors
from pykata.guest import cosign
from pykata.guest.imagepolicy import ImagePolicy
from pykata.guest.imagepull import Manifest, Registry, pull_image
from pykata.guest.imagepull.signature import (
    PAYLOAD_TYPE,
    SIGNATURE_ANNOTATION,
    fetch_signatures,
    signature_tag,
    verify_signed,
)
from pykata.guest.pull import GuestPulls, credentials
from pykata.protos import agent_pb2 as pb
from pykata.runtime.container import guest_pull_of
from tests.unit.test_imagepull import BASE, OCI_MANIFEST, FakeRegistry, reg, sha  # noqa: F401

OPENSSL = shutil.which("openssl")
pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("good", "other"):
        priv = d / f"{name}.pem"
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                        "-out", str(priv)], check=True, capture_output=True)
        pub = subprocess.run(["openssl", "ec", "-in", str(priv), "-pubout"], check=True,
                             capture_output=True, text=True).stdout
        out[name] = (priv, pub)
    return out


def sign(r: FakeRegistry, digest: str, key: Path, reference: str,
         payload: bytes | None = None) -> None:
    payload = payload or json.dumps({"critical": {
        "identity": {"docker-reference": reference},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature"}, "optional": None}).encode()
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=payload,
                         capture_output=True, check=True).stdout
    layer = r.add_blob(payload)
    layer["mediaType"] = PAYLOAD_TYPE
    layer["annotations"] = {SIGNATURE_ANNOTATION: base64.b64encode(sig).decode()}
    cfg = r.add_blob(b"{}")
    cfg["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg,
                           "layers": [layer]}).encode()
    r.manifests[signature_tag(digest)] = (OCI_MANIFEST, manifest)


# -- the signature policy ---------------------------------------------------------------
def test_policy_parse_and_decide(keys: dict[str, tuple[Path, str]]) -> None:
    pem = keys["good"][1]
    p = ImagePolicy.parse(json.dumps({"version": 1, "default": "reject", "images": [
        {"match": "r.example/app/*", "require": "signed", "keys": [pem]},
        {"match": "r.example/app/free", "require": "none"},
        {"match": "docker.io/library/busybox", "require": "none"}]}))
    assert p.decide("r.example/app/x").where == "images[0]"
    assert p.decide("r.example/app/free").require == "signed"  # the first match wins
    assert p.decide("docker.io/library/busybox").require == "none"
    assert p.decide("docker.io/library/busyboxx").require == "reject"
    assert p.decide("other/x").where == "default"
    assert ImagePolicy.parse(b"").decide("any/thing").require == "none"
    assert ImagePolicy.parse(b'{"version": 1}').empty


@pytest.mark.parametrize(("doc", "message"), [
    ('{"version": 2}', "version: must be 1"),
    ('{}', "document: 'version' is required"),
    ('{"version": 1, "default": "allow"}', "default: must be one of accept, reject"),
    ('{"version": 1, "extra": 1}', "document: unknown key 'extra'"),
    ('{"version": 1, "version": 1}', "document: duplicate key 'version'"),
    ('{"version": NaN}', "document: NaN is not allowed"),
    ('[1]', "document: must be an object"),
    ('{"version": 1, "images": {}}', "images: must be a list"),
    ('{"version": 1, "images": [{"match": "a/b"}]}', "images[0]: 'require' is required"),
    ('{"version": 1, "images": [{"match": "a/*b", "require": "none"}]}',
     "images[0].match: a repository"),
    ('{"version": 1, "images": [{"match": "a/b@sha256:00", "require": "none"}]}',
     "images[0].match: a repository"),
    ('{"version": 1, "images": [{"match": "a/b", "require": "maybe"}]}',
     "images[0].require: must be one of signed, none, reject"),
    ('{"version": 1, "images": [{"match": "a/b", "require": "signed"}]}',
     "images[0].keys: a rule requiring a signature needs at least one key"),
    ('{"version": 1, "images": [{"match": "a/b", "require": "signed", "keys": ["x"]}]}',
     "images[0].keys[0]: public key: not one PEM 'PUBLIC KEY' block"),
    ('{"version": 1, "images": [{"match": "a/b", "require": "none", "keys": ["x"]}]}',
     "images[0].keys: keys mean nothing with require 'none'"),
    ('{"version": 1', "document: not JSON"),
])
def test_policy_refuses_malformed_documents(doc: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as ei:
        ImagePolicy.parse(doc)
    assert str(ei.value).startswith(f"invalid image signature policy: {message}"), ei.value
    assert "\n" not in str(ei.value)


def test_policy_bounds() -> None:
    with pytest.raises(errors.InvalidArgument, match="more than 262144"):
        ImagePolicy.parse(b"{" + b" " * 300_000 + b"}")
    rules = [{"match": f"r/{i}", "require": "none"} for i in range(257)]
    with pytest.raises(errors.InvalidArgument, match="more than 256 rules"):
        ImagePolicy.parse(json.dumps({"version": 1, "images": rules}))


# -- signatures from the registry, before any layer ------------------------------------
def layer_gets(r: FakeRegistry, manifest: bytes) -> list[str]:
    layers = {d["digest"] for d in json.loads(manifest)["layers"]}
    return [q.path for q in r.requests if q.path.rsplit("/", 1)[-1] in layers]


async def signed_pull(r: FakeRegistry, tmp_path: Path, keys: tuple[str, ...],
                      reference: str) -> None:
    root, work = tmp_path / "root", tmp_path / "work"
    root.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)

    async def before(registry: Registry, manifest: Manifest) -> None:
        await verify_signed(registry, manifest.index_digest or manifest.digest, keys,
                            reference, "images[0]")

    await pull_image(f"{r.host}/test/img:v1", str(root), str(work), plain_http=True,
                     before_layers=before)


async def test_signed_image_is_pulled(reg: FakeRegistry, tmp_path: Path,  # noqa: F811
                                      keys: dict[str, tuple[Path, str]]) -> None:
    digest, manifest = reg.add_image([BASE])
    sign(reg, digest, keys["good"][0], f"{reg.host}/test/img")
    await signed_pull(reg, tmp_path, (keys["other"][1], keys["good"][1]),
                      f"{reg.host}/test/img")
    assert (tmp_path / "root/bin/tool").read_bytes() == b"tool\n"
    assert layer_gets(reg, manifest)


@pytest.mark.parametrize("case", ["unsigned", "wrong key", "other digest", "other repository",
                                  "tampered payload"])
async def test_bad_signatures_are_refused_before_any_layer(
        reg: FakeRegistry, tmp_path: Path, keys: dict[str, tuple[Path, str]],  # noqa: F811
        case: str) -> None:
    digest, manifest = reg.add_image([BASE])
    ref = f"{reg.host}/test/img"
    if case == "wrong key":
        sign(reg, digest, keys["other"][0], ref)
    elif case == "other digest":
        sign(reg, digest, keys["good"][0], ref, json.dumps({"critical": {
            "identity": {"docker-reference": ref},
            "image": {"docker-manifest-digest": sha(b"x")},
            "type": "cosign container image signature"}}).encode())
    elif case == "other repository":
        sign(reg, digest, keys["good"][0], f"{reg.host}/test/other")
    elif case == "tampered payload":
        sign(reg, digest, keys["good"][0], ref)
        _, raw = reg.manifests[signature_tag(digest)]
        doc = json.loads(raw)
        payload = reg.blobs[doc["layers"][0]["digest"]].replace(b"cosign", b"cosigN")
        doc["layers"][0].update(digest=sha(payload), size=len(payload))
        reg.blobs[sha(payload)] = payload
        reg.manifests[signature_tag(digest)] = (OCI_MANIFEST, json.dumps(doc).encode())
    with pytest.raises(cosign.SignatureError) as ei:
        await signed_pull(reg, tmp_path, (keys["good"][1],), ref)
    msg = str(ei.value)
    expected = {"unsigned": f"unsigned (no {signature_tag(digest)} in the registry), and"
                            " rule images[0] requires a signature",
                "wrong key": "does not verify with the key",
                "other digest": f"the signature is for manifest {sha(b'x')}",
                "other repository": f"the signature is for '{reg.host}/test/other'",
                "tampered payload": "does not verify with the key"}[case]
    assert msg.startswith("image signature: ") and expected in msg, msg
    assert layer_gets(reg, manifest) == []  # refused before any layer was asked for
    assert list((tmp_path / "root").iterdir()) == []


@pytest.mark.parametrize("signed", ["index", "platform manifest"])
async def test_an_index_is_signed_by_its_own_digest(
        reg: FakeRegistry, tmp_path: Path, keys: dict[str, tuple[Path, str]],  # noqa: F811
        signed: str) -> None:
    """cosign signs the digest the reference resolves to: for a multi-platform
    image, the index's; a signature of the linux/amd64 manifest alone does not
    stand for the index."""
    digest, manifest = reg.add_image([BASE], tag="amd64-only")
    index = reg.add_index([("", manifest, "amd64")], tag="v1")
    ref = f"{reg.host}/test/img"
    sign(reg, index if signed == "index" else digest, keys["good"][0], ref)
    if signed == "index":
        await signed_pull(reg, tmp_path, (keys["good"][1],), ref)
        assert (tmp_path / "root/bin/tool").is_file()
        return
    with pytest.raises(cosign.SignatureError, match=f"unsigned \\(no {signature_tag(index)}"):
        await signed_pull(reg, tmp_path, (keys["good"][1],), ref)
    assert layer_gets(reg, manifest) == []


async def test_signature_manifest_payload_is_checked(reg: FakeRegistry,  # noqa: F811
                                                     keys: dict[str, tuple[Path, str]]) -> None:
    digest, _ = reg.add_image([BASE])
    sign(reg, digest, keys["good"][0], f"{reg.host}/test/img")
    _, raw = reg.manifests[signature_tag(digest)]
    payload_digest = json.loads(raw)["layers"][0]["digest"]
    reg.blobs[payload_digest] = reg.blobs[payload_digest].replace(b"cosign", b"cosigN")
    from pykata.guest.imagepull import parse

    registry = Registry(parse(f"{reg.host}/test/img:v1"), plain_http=True)
    with pytest.raises(errors.InvalidArgument, match=f"blob {payload_digest}: digest mismatch"):
        await fetch_signatures(registry, digest)


# -- the agent's side before anything is mounted ----------------------------------------
def test_credentials() -> None:
    assert credentials(pb.GuestPull(image="x")) is None
    c = credentials(pb.GuestPull(image="x", username="u", password="p"))
    assert c is not None and (c.username, c.password) == ("u", "p")
    c = credentials(pb.GuestPull(image="x", auth=base64.b64encode(b"u:p:q").decode()))
    assert c is not None and (c.username, c.password) == ("u", "p:q")
    with pytest.raises(errors.InvalidArgument, match="auth is not base64"):
        credentials(pb.GuestPull(image="x", auth="%%"))
    with pytest.raises(errors.Unimplemented, match="identity tokens"):
        credentials(pb.GuestPull(image="x", identity_token="t"))


async def test_rejected_or_bad_policy_refuses_before_mounting(tmp_path: Path) -> None:
    pulls = GuestPulls(tmp_path / "images")
    policy = json.dumps({"version": 1, "default": "reject"}).encode()
    with pytest.raises(cosign.SignatureError, match="refused by the signature policy's rule"
                       " default"):
        await pulls.pull("c1", pb.GuestPull(image="r.example/app:v1"), policy, lambda d: None)
    with pytest.raises(errors.InvalidArgument, match="invalid image signature policy"):
        await pulls.pull("c1", pb.GuestPull(image="r.example/app:v1"), b"{", lambda d: None)
    with pytest.raises(errors.InvalidArgument, match="bad image reference"):
        await pulls.pull("c1", pb.GuestPull(image="a b"), b"", lambda d: None)
    assert not (tmp_path / "images").exists() and pulls.mounts == {}


# -- the host's choice ---------------------------------------------------------------------
def spec_with(annotations: dict[str, str]) -> dict[str, Any]:
    return {"annotations": annotations}


def test_guest_pull_selection() -> None:
    cfg = config.Config()
    cfg.guest_pull.plain_http_registries = ["10.0.0.1:5000"]
    cfg.guest_pull.storage_mib = 64
    assert guest_pull_of(spec_with({}), cfg) is None
    assert guest_pull_of(spec_with({"io.kubernetes.cri.image-name": "busybox"}), cfg) is None
    gp = guest_pull_of(spec_with({"io.pykata.guest-pull": "true",
                                  "io.kubernetes.cri.image-name": "busybox:1"}), cfg)
    assert gp is not None and gp.image == "busybox:1"
    assert gp.plain_http_registries == ("10.0.0.1:5000",) and gp.storage_bytes == 64 << 20
    gp = guest_pull_of(spec_with({"io.pykata.guest-pull.image": "r/x:1",
                                  "io.kubernetes.cri.image-name": "busybox:1"}), cfg)
    assert gp is not None and gp.image == "r/x:1"  # the explicit annotation wins
    assert guest_pull_of(spec_with({"io.pykata.guest-pull": "false",
                                    "io.pykata.guest-pull.image": "r/x:1"}), cfg) is None
    with pytest.raises(errors.InvalidArgument, match="must be true or false"):
        guest_pull_of(spec_with({"io.pykata.guest-pull": "yes"}), cfg)
    cfg.guest_pull.enabled = True
    gp = guest_pull_of(spec_with({"io.kubernetes.cri.image-name": "busybox"}), cfg)
    assert gp is not None and gp.image == "busybox"
    # The pod's sandbox (pause) container runs from the host's root.
    assert guest_pull_of(spec_with({"io.kubernetes.cri.container-type": "sandbox"}), cfg) is None
    with pytest.raises(errors.InvalidArgument, match="names no image") as ei:
        guest_pull_of(spec_with({}), cfg)
    assert "--annotation io.pykata.guest-pull.image=<image>" in str(ei.value)


def test_deploy_guest_pull_files_agree() -> None:
    """deploy/guest-pull: the RuntimeClass's handler is the containerd runtime
    entry, whose ConfigPath is the configuration the README says to make (the
    node's configuration.toml with guest_pull.toml appended), which parses and
    turns the guest pull on; the example pod asks by annotation."""
    import tomllib

    import yaml  # type: ignore[import-untyped,unused-ignore]

    d = Path(__file__).resolve().parents[2] / "deploy"
    rc = yaml.safe_load((d / "guest-pull/runtimeclass.yaml").read_text())
    entry = tomllib.loads((d / "guest-pull/containerd.toml").read_text())[
        "plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][rc["handler"]]
    assert entry["runtime_type"] == "io.containerd.pykata.v2"
    assert "io.pykata.*" in entry["pod_annotations"]
    assert entry["options"]["ConfigPath"].endswith("/configuration-guest-pull.toml")
    text = (d / "pykata-deploy/configuration.toml").read_text().replace("@PREFIX@", "/opt/p")
    cfg = config.parse(text + (d / "guest-pull/guest_pull.toml").read_text(), "guest-pull")
    assert cfg.guest_pull.enabled and cfg.guest_pull.signature_policy_file
    pod = yaml.safe_load((d / "guest-pull/pod.yaml").read_text())
    assert pod["metadata"]["annotations"] == {"io.pykata.guest-pull": "true"}
    assert guest_pull_of({"annotations": {
        **pod["metadata"]["annotations"],
        "io.kubernetes.cri.image-name": pod["spec"]["containers"][0]["image"]}},
        config.Config()) is not None
