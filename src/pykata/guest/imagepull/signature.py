"""Fetch an image's cosign signatures from its registry (the verification is
pykata.guest.cosign's).

cosign stores the signatures of ``repo@sha256:<hex>`` in the same repository,
as the manifest tagged ``sha256-<hex>.sig``: each of its layers is one
signature, the layer blob the signed payload (media type
``application/vnd.dev.cosign.simplesigning.v1+json``) and the layer's
annotation ``dev.cosignproject.cosign/signature`` the base64 DER signature.

Nothing here is trusted yet: the tag is mutable, the manifest unverified. Each
payload blob is checked against its descriptor's digest, and it is the
signature over the payload, by a key the policy names, that makes it count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pykata import errors
from pykata.guest import cosign
from pykata.guest.imagepull.reference import check_digest
from pykata.guest.imagepull.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Registry,
    _descriptor,
)

PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
MAX_SIGNATURES = 16
MAX_SIGNATURE_MANIFEST = 256 * 1024


@dataclass(frozen=True)
class Signature:
    payload: bytes
    signature_b64: str
    layer: str  # the payload's digest, for messages


def signature_tag(digest: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>.sig``."""
    check_digest(digest, "signed digest")
    return digest.replace(":", "-", 1) + ".sig"


async def fetch_signatures(reg: Registry, digest: str) -> list[Signature]:
    """The signatures stored for ``digest`` in ``reg``'s repository ([] when the
    registry has none: 404 on the tag). Payloads are verified against their
    descriptors; at most MAX_SIGNATURES are read."""
    ref = reg.ref
    tag = signature_tag(digest)
    try:
        raw, _ = await reg.fetch(f"/v2/{ref.name}/manifests/{tag}",
                                 f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", MAX_SIGNATURE_MANIFEST)
    except errors.NotFound:
        return []
    what = f"image {ref}: signature manifest {tag}"
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise errors.InvalidArgument(f"{what} is not JSON") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise errors.InvalidArgument(f"{what} has no layers list")
    out: list[Signature] = []
    for i, layer in enumerate(layers[:MAX_SIGNATURES]):
        desc = _descriptor(layer, f"{what}: layer {i}", None)
        annotations = layer.get("annotations") if isinstance(layer, dict) else None
        sig = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
        if desc.media_type != PAYLOAD_TYPE or not isinstance(sig, str):
            continue
        if desc.size > cosign.MAX_PAYLOAD:
            raise errors.InvalidArgument(f"{what}: payload {desc.digest} of {desc.size} bytes,"
                                         f" more than {cosign.MAX_PAYLOAD}")
        payload = await reg.blob_bytes(desc, cosign.MAX_PAYLOAD)
        out.append(Signature(payload, sig, desc.digest))
    return out


async def verify_signed(reg: Registry, digest: str, keys: tuple[str, ...],
                        signed_reference: str, rule: str) -> cosign.SignedImage:
    """A stored signature of ``digest`` that verifies with one of ``keys`` and
    names ``signed_reference``; else cosign.SignatureError with the reason (no
    signature at all, or why the first one failed)."""
    sigs = await fetch_signatures(reg, digest)
    if not sigs:
        raise cosign.SignatureError(
            f"{reg.ref}: unsigned (no {signature_tag(digest)} in the registry), and rule"
            f" {rule} requires a signature")
    first = ""
    for sig in sigs:
        for key in keys:
            try:
                return cosign.verify_image_signature(sig.payload, sig.signature_b64, key,
                                                     digest, signed_reference)
            except cosign.SignatureError as exc:
                first = first or exc.reason
    raise cosign.SignatureError(
        f"{reg.ref}: none of {len(sigs)} signature(s) verifies with the {len(keys)} key(s) of"
        f" rule {rule}: {first}")
