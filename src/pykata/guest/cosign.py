"""Cosign-style image signatures, verified in the guest with the stdlib only
(issue 19). NOT YET WIRED: the guest pull that would call it does not exist yet.

A cosign "simple signing" signature is ECDSA P-256 over SHA-256 of a JSON
payload that names the image::

    {"critical": {"identity": {"docker-reference": "registry.example/app"},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "cosign container image signature"},
     "optional": {...}}

:func:`verify_image_signature` checks the signature (base64 of DER) with a PEM
public key (SubjectPublicKeyInfo, id-ecPublicKey on prime256v1), then that the
payload names the manifest digest being pulled and the expected repository.
Everything refused raises :class:`SignatureError` with the reason.

The guest has no ``cryptography`` package, so ECDSA verification is done here
from the published curve (SEC 2 "secp256r1", FIPS 186-4 "P-256") and the
verification equations: Jacobian coordinates, two scalar multiplications.
Verification handles only public data, so constant time does not matter.
There is no signing code here on purpose.

Decisions: a "high-s" signature (s > n/2) is accepted, as cosign's own
verifier (Go's crypto/ecdsa) accepts it; the malleability it allows does not
matter here, where a signature authorises a payload and is never used as an
identifier. DER is parsed strictly (minimal lengths, no leading zero octets
beyond the one a positive integer needs, nothing after the end), r and s must
lie in [1, n-1], the public point must be on the curve and not the point at
infinity; compressed public points are accepted (and checked).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pykata.guest.policy import PermissionDenied

# SEC 2 v2, section 2.4.2, secp256r1 (= NIST P-256); a = -3 mod p.
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A = P - 3
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_P256 = "1.2.840.10045.3.1.7"
SIGNATURE_TYPE = "cosign container image signature"

MAX_PAYLOAD = 64 * 1024
MAX_PEM = 8 * 1024
MAX_SIGNATURE_B64 = 256  # a P-256 DER signature is at most 72 bytes

Jacobian = tuple[int, int, int]  # (X, Y, Z): x = X/Z^2, y = Y/Z^3; Z = 0 is infinity
INFINITY: Jacobian = (1, 1, 0)


class SignatureError(PermissionDenied):
    """An image signature, key or payload is refused (gRPC PERMISSION_DENIED)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"image signature: {reason}")
        self.reason = reason


# -- curve arithmetic -------------------------------------------------------------------


def on_curve(x: int, y: int) -> bool:
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def _double(pt: Jacobian) -> Jacobian:
    x, y, z = pt
    if z == 0 or y == 0:
        return INFINITY
    delta = z * z % P
    gamma = y * y % P
    beta = x * gamma % P
    alpha = 3 * (x - delta) * (x + delta) % P  # a = -3: 3x^2 + a z^4
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y + z) * (y + z) - gamma - delta) % P  # = 2yz
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return (x3, y3, z3)


def _add(p1: Jacobian, p2: Jacobian) -> Jacobian:
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    if z1 == 0:
        return p2
    if z2 == 0:
        return p1
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    h = (u2 - u1) % P
    r = (s2 - s1) % P
    if h == 0:
        return _double(p1) if r == 0 else INFINITY
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - s1 * hhh) % P
    z3 = z1 * z2 * h % P
    return (x3, y3, z3)


def _shamir(k1: int, p1: Jacobian, k2: int, p2: Jacobian) -> Jacobian:
    """k1*p1 + k2*p2 (Straus-Shamir: one pass of doublings over both scalars)."""
    both = _add(p1, p2)
    acc = INFINITY
    for i in range(max(k1.bit_length(), k2.bit_length()) - 1, -1, -1):
        acc = _double(acc)
        b1, b2 = (k1 >> i) & 1, (k2 >> i) & 1
        if b1 and b2:
            acc = _add(acc, both)
        elif b1:
            acc = _add(acc, p1)
        elif b2:
            acc = _add(acc, p2)
    return acc


def _affine_x(pt: Jacobian) -> int | None:
    x, _, z = pt
    if z == 0:
        return None
    zinv = pow(z, -1, P)
    return x * zinv * zinv % P


def multiply(k: int, x: int, y: int) -> tuple[int, int] | None:
    """k*(x, y) in affine coordinates, None for the point at infinity (tests)."""
    pt = _shamir(k, (x, y, 1), 0, INFINITY)
    if pt[2] == 0:
        return None
    zinv = pow(pt[2], -1, P)
    return pt[0] * zinv * zinv % P, pt[1] * zinv * zinv * zinv % P


@dataclass(frozen=True)
class PublicKey:
    x: int
    y: int

    def __post_init__(self) -> None:
        if not on_curve(self.x, self.y):
            raise SignatureError("the public key's point is not on P-256")

    def verify_digest(self, digest: bytes, r: int, s: int) -> bool:
        """ECDSA verification (FIPS 186-4 6.4.2) of a SHA-256 digest."""
        if not (1 <= r < N and 1 <= s < N):
            return False
        e = int.from_bytes(digest, "big")  # 256 bits: as long as n, nothing to truncate
        w = pow(s, -1, N)
        point = _shamir(e * w % N, (GX, GY, 1), r * w % N, (self.x, self.y, 1))
        x = _affine_x(point)
        return x is not None and x % N == r


# -- DER --------------------------------------------------------------------------------


def _der(data: bytes, pos: int, tag: int, what: str) -> tuple[bytes, int]:
    """The content of the DER element with ``tag`` at ``pos``, and the position
    after it; strict: definite, minimal lengths within ``data``."""
    if pos + 2 > len(data):
        raise SignatureError(f"{what}: truncated DER")
    if data[pos] != tag:
        raise SignatureError(f"{what}: DER tag {data[pos]:#04x}, expected {tag:#04x}")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 2:
            raise SignatureError(f"{what}: unsupported DER length form")
        if pos + count > len(data):
            raise SignatureError(f"{what}: truncated DER")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80 or (count == 2 and length < 0x100):
            raise SignatureError(f"{what}: non-minimal DER length")
        pos += count
    if pos + length > len(data):
        raise SignatureError(f"{what}: DER length {length} runs past the end")
    return data[pos:pos + length], pos + length


def _der_uint(content: bytes, what: str) -> int:
    if not content:
        raise SignatureError(f"{what}: empty DER integer")
    if content[0] & 0x80:
        raise SignatureError(f"{what}: negative DER integer")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise SignatureError(f"{what}: non-minimal DER integer")
    if len(content) > 33:
        raise SignatureError(f"{what}: DER integer too long")
    return int.from_bytes(content, "big")


def parse_signature(der: bytes) -> tuple[int, int]:
    """(r, s) from an ECDSA-Sig-Value (SEQUENCE of two INTEGERs), range-checked."""
    body, end = _der(der, 0, 0x30, "signature")
    if end != len(der):
        raise SignatureError("signature: bytes after the DER sequence")
    rc, pos = _der(body, 0, 0x02, "signature r")
    sc, pos = _der(body, pos, 0x02, "signature s")
    if pos != len(body):
        raise SignatureError("signature: extra elements in the DER sequence")
    r, s = _der_uint(rc, "signature r"), _der_uint(sc, "signature s")
    if not 1 <= r < N:
        raise SignatureError("signature: r is outside [1, n-1]")
    if not 1 <= s < N:
        raise SignatureError("signature: s is outside [1, n-1]")
    return r, s


def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise SignatureError("public key: malformed object identifier")
    parts: list[int] = []
    value = 0
    for i, byte in enumerate(content):
        if value == 0 and byte == 0x80 and (i == 0 or not content[i - 1] & 0x80):
            raise SignatureError("public key: non-minimal object identifier")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = parts[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return ".".join(str(n) for n in head + parts[1:])


def _point(data: bytes) -> PublicKey:
    if len(data) == 65 and data[0] == 0x04:
        return PublicKey(int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:], "big"))
    if len(data) == 33 and data[0] in (0x02, 0x03):
        x = int.from_bytes(data[1:], "big")
        if x >= P:
            raise SignatureError("the public key's point is not on P-256")
        rhs = (x * x * x + A * x + B) % P
        y = pow(rhs, (P + 1) // 4, P)  # p = 3 mod 4: the square root, if there is one
        if y * y % P != rhs:
            raise SignatureError("the public key's point is not on P-256")
        if y & 1 != data[0] & 1:
            y = P - y
        return PublicKey(x, y)
    if data == b"\x00":
        raise SignatureError("public key: the point at infinity")
    raise SignatureError("public key: not an uncompressed or compressed P-256 point")


def parse_spki(der: bytes) -> PublicKey:
    """A P-256 public key from a DER SubjectPublicKeyInfo."""
    body, end = _der(der, 0, 0x30, "public key")
    if end != len(der):
        raise SignatureError("public key: bytes after the DER sequence")
    alg, pos = _der(body, 0, 0x30, "public key algorithm")
    bits, pos = _der(body, pos, 0x03, "public key bits")
    if pos != len(body):
        raise SignatureError("public key: extra elements in SubjectPublicKeyInfo")
    oid, apos = _der(alg, 0, 0x06, "public key algorithm")
    if _oid(oid) != OID_EC_PUBLIC_KEY:
        raise SignatureError(f"public key: algorithm {_oid(oid)} is not id-ecPublicKey")
    if apos == len(alg) or alg[apos] != 0x06:
        raise SignatureError("public key: the curve is not named (explicit parameters"
                             " are refused)")
    curve, apos = _der(alg, apos, 0x06, "public key curve")
    if apos != len(alg):
        raise SignatureError("public key: extra algorithm parameters")
    if _oid(curve) != OID_P256:
        raise SignatureError(f"public key: curve {_oid(curve)} is not P-256 (prime256v1)")
    if not bits or bits[0] != 0:
        raise SignatureError("public key: the bit string has unused bits")
    return _point(bits[1:])


def parse_pem_public_key(pem: bytes | str) -> PublicKey:
    """The one ``PUBLIC KEY`` block of a PEM text (strict base64 inside)."""
    raw = pem.encode() if isinstance(pem, str) else bytes(pem)
    if len(raw) > MAX_PEM:
        raise SignatureError(f"public key: PEM longer than {MAX_PEM} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise SignatureError("public key: PEM is not ASCII") from None
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != begin or lines[-1] != end:
        raise SignatureError("public key: not one PEM 'PUBLIC KEY' block")
    body = "".join(lines[1:-1])
    try:
        der = binascii.a2b_base64(body.encode(), strict_mode=True)
    except binascii.Error:
        raise SignatureError("public key: PEM body is not base64") from None
    return parse_spki(der)


def decode_signature(signature_b64: bytes | str) -> bytes:
    raw = signature_b64.encode() if isinstance(signature_b64, str) else bytes(signature_b64)
    raw = raw.strip()
    if len(raw) > MAX_SIGNATURE_B64:
        raise SignatureError(f"signature: longer than {MAX_SIGNATURE_B64} base64 characters")
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        raise SignatureError("signature: not base64") from None


# -- cosign simple signing --------------------------------------------------------------


@dataclass(frozen=True)
class SignedImage:
    """What a verified payload says: the repository and the manifest digest."""

    reference: str
    digest: str
    optional: Any


def verify(payload: bytes, signature_der: bytes, key: PublicKey) -> None:
    """ECDSA P-256/SHA-256 of ``payload``; SignatureError if it does not verify."""
    r, s = parse_signature(signature_der)
    if not key.verify_digest(hashlib.sha256(payload).digest(), r, s):
        raise SignatureError("the signature does not verify with the key (wrong key or"
                             " tampered payload)")


def repository_of(reference: str) -> str:
    """``registry/ns/app:tag`` or ``...@sha256:...`` -> ``registry/ns/app`` (the
    form cosign writes as docker-reference)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def verify_image_signature(payload: bytes, signature_b64: bytes | str,
                           public_key_pem: bytes | str, manifest_digest: str,
                           repository: str) -> SignedImage:
    """Verify a cosign signature of the image ``repository``@``manifest_digest``.

    The signature is checked first, the payload parsed only once it is known to
    come from the key holder. ``repository`` is compared exactly with the
    payload's docker-reference (see :func:`repository_of`)."""
    if len(payload) > MAX_PAYLOAD:
        raise SignatureError(f"payload longer than {MAX_PAYLOAD} bytes")
    key = parse_pem_public_key(public_key_pem)
    verify(payload, decode_signature(signature_b64), key)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SignatureError("the signed payload is not JSON") from None
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        raise SignatureError("the signed payload has no 'critical' object")
    if critical.get("type") != SIGNATURE_TYPE:
        raise SignatureError(f"the signed payload's type is not {SIGNATURE_TYPE!r}")
    image = critical.get("image")
    identity = critical.get("identity")
    digest = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    ref = identity.get("docker-reference") if isinstance(identity, dict) else None
    if not isinstance(digest, str) or not isinstance(ref, str):
        raise SignatureError("the signed payload lacks the image digest or reference")
    if digest != manifest_digest:
        raise SignatureError(f"the signature is for manifest {digest[:80]}, not"
                             f" {manifest_digest[:80]}")
    if ref != repository:
        raise SignatureError(f"the signature is for {ref[:200]!r}, not {repository[:200]!r}")
    return SignedImage(ref, digest, doc.get("optional"))


def b64(data: bytes) -> str:
    """Standard base64 text (the form cosign stores signatures in)."""
    return base64.b64encode(data).decode()
