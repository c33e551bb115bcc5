"""Cosign-style image signatures (pykata.guest.cosign): keys and signatures are
made here with the openssl CLI (the host venv has no `cryptography`), then
checked by the guest's pure-Python ECDSA P-256 verifier."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykata import errors
from pykata.guest import cosign
from pykata.guest.cosign import N, SignatureError

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl CLI")

DIGEST = "sha256:" + "3f" * 32
REPO = "registry.example/team/app"


def payload_for(digest: str = DIGEST, ref: str = REPO,
                kind: str = "cosign container image signature") -> bytes:
    return json.dumps({"critical": {"identity": {"docker-reference": ref},
                                    "image": {"docker-manifest-digest": digest},
                                    "type": kind},
                       "optional": {"creator": "test"}}).encode()


def run(*args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run([str(OPENSSL), *args], input=stdin, capture_output=True,
                          check=True).stdout


@dataclass
class Keys:
    dir: Path
    key: Path
    pub: str
    pub_compressed: str
    other_pub: str
    p384_pub: str

    def sign(self, payload: bytes, key: Path | None = None) -> bytes:
        f = self.dir / "payload"
        f.write_bytes(payload)
        return run("dgst", "-sha256", "-sign", str(key or self.key), str(f))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("cosign")

    def genkey(name: str, curve: str) -> Path:
        path = d / name
        path.write_bytes(run("ecparam", "-name", curve, "-genkey", "-noout"))
        return path

    def pub(key: Path, *extra: str) -> str:
        return run("ec", "-in", str(key), "-pubout", *extra).decode()

    key = genkey("key.pem", "prime256v1")
    other = genkey("other.pem", "prime256v1")
    p384 = genkey("p384.pem", "secp384r1")
    return Keys(d, key, pub(key), pub(key, "-conv_form", "compressed"), pub(other), pub(p384))


def der_int(v: int) -> bytes:
    body = v.to_bytes((v.bit_length() + 8) // 8, "big")
    return b"\x02" + bytes([len(body)]) + body


def der_sig(r: int, s: int) -> bytes:
    body = der_int(r) + der_int(s)
    return b"\x30" + bytes([len(body)]) + body


def spki_der(pem: str) -> bytes:
    lines = pem.strip().splitlines()[1:-1]
    return base64.b64decode("".join(lines))


def pem_of(der: bytes) -> str:
    return "-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(der).decode() + \
        "\n-----END PUBLIC KEY-----\n"


def refused(reason: str, payload: bytes, sig: bytes | str, pub: str,
            digest: str = DIGEST, repo: str = REPO) -> None:
    sig_b64 = sig if isinstance(sig, str) else cosign.b64(sig)
    with pytest.raises(SignatureError) as exc:
        cosign.verify_image_signature(payload, sig_b64, pub, digest, repo)
    assert reason in str(exc.value), str(exc.value)
    assert str(exc.value).startswith("image signature: ")
    assert exc.value.code == 7
    assert "\n" not in str(exc.value)


# -- the curve ---------------------------------------------------------------------------


def test_curve_constants() -> None:
    assert cosign.on_curve(cosign.GX, cosign.GY)
    assert cosign.multiply(N, cosign.GX, cosign.GY) is None  # n*G is the point at infinity
    assert cosign.multiply(N + 1, cosign.GX, cosign.GY) == (cosign.GX, cosign.GY)
    two_g = cosign.multiply(2, cosign.GX, cosign.GY)
    assert two_g is not None and cosign.on_curve(*two_g)


# -- good signatures ---------------------------------------------------------------------


def test_good_signature_verifies(keys: Keys) -> None:
    payload = payload_for()
    got = cosign.verify_image_signature(payload, cosign.b64(keys.sign(payload)), keys.pub,
                                        DIGEST, REPO)
    assert got.digest == DIGEST and got.reference == REPO
    assert got.optional == {"creator": "test"}


def test_many_openssl_signatures_verify(keys: Keys) -> None:
    key = cosign.parse_pem_public_key(keys.pub)
    for i in range(8):
        payload = payload_for(digest="sha256:" + f"{i:02x}" * 32)
        cosign.verify(payload, keys.sign(payload), key)


def test_compressed_key_is_the_same_key(keys: Keys) -> None:
    assert cosign.parse_pem_public_key(keys.pub_compressed) == \
        cosign.parse_pem_public_key(keys.pub)
    payload = payload_for()
    cosign.verify_image_signature(payload, cosign.b64(keys.sign(payload)), keys.pub_compressed,
                                  DIGEST, REPO)


def test_high_s_is_accepted(keys: Keys) -> None:
    """Documented choice: s and n-s both verify (as in cosign's Go verifier)."""
    payload = payload_for()
    r, s = cosign.parse_signature(keys.sign(payload))
    key = cosign.parse_pem_public_key(keys.pub)
    cosign.verify(payload, der_sig(r, s), key)
    cosign.verify(payload, der_sig(r, N - s), key)


def test_repository_of() -> None:
    assert cosign.repository_of("registry.example:5000/a/b:1.0") == "registry.example:5000/a/b"
    assert cosign.repository_of("registry.example:5000/a/b") == "registry.example:5000/a/b"
    assert cosign.repository_of(f"r.example/a@{DIGEST}") == "r.example/a"


# -- refusals ----------------------------------------------------------------------------


def test_wrong_key(keys: Keys) -> None:
    payload = payload_for()
    refused("does not verify with the key", payload, keys.sign(payload), keys.other_pub)


def test_tampered_payload(keys: Keys) -> None:
    payload = payload_for()
    sig = keys.sign(payload)
    evil = payload_for(digest="sha256:" + "00" * 32)
    refused("does not verify with the key", evil, sig, keys.pub, digest="sha256:" + "00" * 32)
    refused("does not verify with the key", payload + b" ", sig, keys.pub)


def test_tampered_signature_bytes(keys: Keys) -> None:
    payload = payload_for()
    sig = keys.sign(payload)
    r, s = cosign.parse_signature(sig)
    refused("does not verify", payload, der_sig(r ^ 1, s), keys.pub)
    refused("does not verify", payload, der_sig(r, s ^ (1 << 100)), keys.pub)
    for i in range(len(sig)):  # every single-byte change is refused, cleanly
        bad = bytearray(sig)
        bad[i] ^= 0x01
        with pytest.raises(SignatureError):
            cosign.verify(payload, bytes(bad), cosign.parse_pem_public_key(keys.pub))


@pytest.mark.parametrize(("r", "s", "reason"), [
    (0, 1, "r is outside [1, n-1]"),
    (N, 1, "r is outside [1, n-1]"),
    (1, 0, "s is outside [1, n-1]"),
    (1, N, "s is outside [1, n-1]"),
    (1, N + 5, "s is outside [1, n-1]"),
])
def test_r_and_s_out_of_range(keys: Keys, r: int, s: int, reason: str) -> None:
    refused(reason, payload_for(), der_sig(r, s), keys.pub)


@pytest.mark.parametrize(("der", "reason"), [
    (b"", "truncated DER"),
    (b"\x31\x06\x02\x01\x01\x02\x01\x01", "DER tag 0x31"),
    (b"\x30\x06\x02\x01\x01\x02\x01\x01\x00", "bytes after the DER sequence"),
    (b"\x30\x09\x02\x01\x01\x02\x01\x01\x02\x01\x01", "extra elements"),
    (b"\x30\x81\x06\x02\x01\x01\x02\x01\x01", "non-minimal DER length"),
    (b"\x30\x80\x02\x01\x01\x02\x01\x01\x00\x00", "unsupported DER length form"),
    (b"\x30\x07\x02\x02\x00\x01\x02\x01\x01", "non-minimal DER integer"),
    (b"\x30\x06\x02\x01\x81\x02\x01\x01", "negative DER integer"),
    (b"\x30\x05\x02\x00\x02\x01\x01", "empty DER integer"),
    (b"\x30\x07\x02\x01\x01\x02\x01\x01", "runs past the end"),
    (b"\x30\x06\x02\x01\x01\x04\x01\x01", "DER tag 0x04"),
    (b"\x30\x27\x02\x22" + b"\x01" * 34 + b"\x02\x01\x01", "DER integer too long"),
])
def test_malformed_signature_der(keys: Keys, der: bytes, reason: str) -> None:
    refused(reason, payload_for(), der, keys.pub)


def test_signature_not_base64(keys: Keys) -> None:
    refused("signature: not base64", payload_for(), "MEU*", keys.pub)
    refused("longer than", payload_for(), "A" * 400, keys.pub)


def test_wrong_curve_key(keys: Keys) -> None:
    payload = payload_for()
    refused("curve 1.3.132.0.34 is not P-256", payload, keys.sign(payload), keys.p384_pub)


def test_point_not_on_curve_and_infinity(keys: Keys) -> None:
    der = bytearray(spki_der(keys.pub))
    der[-1] ^= 0x01  # y changed: off the curve
    refused("not on P-256", payload_for(), b"\x30\x00", pem_of(bytes(der)))
    # The point at infinity: a one-octet 0x00 point, in a re-built SubjectPublicKeyInfo.
    alg = spki_der(keys.pub)[2:2 + 21]
    bits = b"\x03\x02\x00\x00"
    refused("point at infinity", payload_for(), b"\x30\x00",
            pem_of(b"\x30" + bytes([len(alg) + len(bits)]) + alg + bits))
    # x beyond p (compressed form).
    bits = b"\x03\x22\x00\x02" + b"\xff" * 32
    refused("not on P-256", payload_for(), b"\x30\x00",
            pem_of(b"\x30" + bytes([len(alg) + len(bits)]) + alg + bits))


def test_bad_pem(keys: Keys) -> None:
    p = payload_for()
    sig = keys.sign(p)
    refused("not one PEM 'PUBLIC KEY' block", p, sig, "hello")
    refused("not one PEM 'PUBLIC KEY' block", p, sig,
            keys.pub.replace("PUBLIC KEY", "EC PRIVATE KEY"))
    refused("PEM body is not base64", p, sig, keys.pub.replace("\n", "\n!", 1))
    refused("not ASCII", p, sig, keys.pub + "é")
    refused("PEM longer than", p, sig, keys.pub + " " * 9000)
    refused("bytes after the DER sequence", p, sig, pem_of(spki_der(keys.pub) + b"\x00"))


def test_payload_checks(keys: Keys) -> None:
    def signed(payload: bytes, **kw: str) -> None:
        sig = keys.sign(payload)
        with pytest.raises(SignatureError) as exc:
            cosign.verify_image_signature(payload, cosign.b64(sig), keys.pub,
                                          kw.get("digest", DIGEST), kw.get("repo", REPO))
        assert kw["reason"] in str(exc.value), str(exc.value)

    signed(payload_for(), digest="sha256:" + "00" * 32, reason="is for manifest sha256:3f3f")
    signed(payload_for(), repo="registry.example/team/other",
           reason="is for 'registry.example/team/app', not 'registry.example/team/other'")
    signed(payload_for(kind="something else"), reason="type is not")
    signed(b"[1, 2]", reason="no 'critical' object")
    signed(b"not json", reason="not JSON")
    signed(json.dumps({"critical": {"type": cosign.SIGNATURE_TYPE}}).encode(),
           reason="lacks the image digest or reference")
    with pytest.raises(SignatureError, match="payload longer than"):
        cosign.verify_image_signature(b"x" * (cosign.MAX_PAYLOAD + 1), "", keys.pub,
                                      DIGEST, REPO)


def test_refusal_is_permission_denied_on_the_wire() -> None:
    assert issubclass(SignatureError, errors.PykataError)
    assert SignatureError("x").code == 7


# -- random bytes never crash the parsers -------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_der_signature(data: bytes) -> None:
    try:
        r, s = cosign.parse_signature(data)
    except SignatureError:
        return
    assert 1 <= r < N and 1 <= s < N


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_spki(data: bytes) -> None:
    try:
        key = cosign.parse_spki(data)
    except SignatureError:
        return
    assert cosign.on_curve(key.x, key.y)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_random_pem_and_base64(data: bytes | str) -> None:
    for parse in (cosign.parse_pem_public_key, cosign.decode_signature):
        try:
            parse(data)
        except SignatureError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_inputs(keys: Keys, data: st.DataObject) -> None:
    spki = bytearray(spki_der(keys.pub))
    i = data.draw(st.integers(0, len(spki) - 1))
    spki[i] = data.draw(st.integers(0, 255))
    try:
        cosign.parse_spki(bytes(spki))
    except SignatureError:
        pass
    sig = bytearray(der_sig(3, 5))
    j = data.draw(st.integers(0, len(sig) - 1))
    sig[j] = data.draw(st.integers(0, 255))
    try:
        cosign.parse_signature(bytes(sig))
    except SignatureError:
        pass
