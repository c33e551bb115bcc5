"""The node's image signature policy: which images the guest pull accepts
unsigned, which need a cosign signature by which keys, which it refuses
(issue 19; docs/guest-pull.md). Stdlib only.

The document comes from the host at CreateSandbox (``[guest_pull]
signature_policy_file``) and is fixed for the sandbox's life::

    {
      "version": 1,
      "default": "accept",                  # or "reject": images no rule matches
      "images": [                           # the first rule that matches decides
        {"match": "10.0.0.1:5000/app/*", "require": "signed",
         "keys": ["-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----"]},
        {"match": "docker.io/library/busybox", "require": "none"},
        {"match": "docker.io/*", "require": "reject"}
      ]
    }

``match`` is compared with the image's repository, ``registry/name`` without
tag or digest and with Docker's short forms expanded (``busybox`` is
``docker.io/library/busybox``): exactly, or, ending in ``*``, as a prefix.
``require``: ``signed`` (a cosign signature of the manifest digest by one of
``keys``, ECDSA P-256 PEM public keys), ``none`` (no signature needed) or
``reject``. Parsing is strict: an unknown key, a wrong type, a duplicate key,
NaN, a key that is not a P-256 public key, more than 256 rules or 16 keys per
rule, or a document over 256 KiB makes the document invalid, with one line
naming the place. An empty document accepts every image unsigned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pykata import errors
from pykata.guest import cosign

VERSION = 1
MAX_DOCUMENT = 256 * 1024
MAX_RULES = 256
MAX_KEYS = 16
MAX_PATTERN = 512
REQUIRE = ("signed", "none", "reject")


def _invalid(where: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"invalid image signature policy: {where}: {why}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _invalid("document", f"duplicate key {k[:60]!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _invalid("document", f"{name} is not allowed")


def _object(value: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(where, "must be an object")
    for k in value:
        if k not in allowed:
            raise _invalid(where, f"unknown key {k[:60]!r} (known: {', '.join(sorted(allowed))})")
    for k in sorted(required):
        if k not in value:
            raise _invalid(where, f"{k!r} is required")
    return value


@dataclass(frozen=True)
class Rule:
    where: str  # "images[3]", or "default"
    match: str
    require: str  # signed | none | reject
    keys: tuple[str, ...] = ()  # PEM public keys (validated)

    def matches(self, repository: str) -> bool:
        if self.match.endswith("*"):
            return repository.startswith(self.match[:-1])
        return repository == self.match


@dataclass(frozen=True)
class ImagePolicy:
    default: str = "accept"  # accept | reject
    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, data: bytes | str) -> ImagePolicy:
        """A validated policy (an empty document: accept everything), or
        InvalidArgument with one line."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if not raw.strip():
            return cls()
        if len(raw) > MAX_DOCUMENT:
            raise _invalid("document", f"{len(raw)} bytes, more than {MAX_DOCUMENT}")
        try:
            doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
        except RecursionError:
            raise _invalid("document", "nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, errors.PykataError):
                raise
            raise _invalid("document", f"not JSON ({str(exc)[:100]})") from None
        doc = _object(doc, "document", {"version", "default", "images"}, {"version"})
        if type(doc["version"]) is not int or doc["version"] != VERSION:
            raise _invalid("version", f"must be {VERSION}")
        default = doc.get("default", "accept")
        if default not in ("accept", "reject"):
            raise _invalid("default", "must be one of accept, reject")
        images = doc.get("images", [])
        if not isinstance(images, list):
            raise _invalid("images", "must be a list")
        if len(images) > MAX_RULES:
            raise _invalid("images", f"more than {MAX_RULES} rules")
        return cls(default, tuple(_rule(r, f"images[{i}]") for i, r in enumerate(images)))

    def decide(self, repository: str) -> Rule:
        """The rule for ``repository`` (the first that matches, else the default)."""
        for rule in self.rules:
            if rule.matches(repository):
                return rule
        return Rule("default", "*", "none" if self.default == "accept" else "reject")

    @property
    def empty(self) -> bool:
        return not self.rules and self.default == "accept"


def _rule(value: Any, where: str) -> Rule:
    r = _object(value, where, {"match", "require", "keys"}, {"match", "require"})
    match = r["match"]
    if not isinstance(match, str) or not match or len(match) > MAX_PATTERN:
        raise _invalid(f"{where}.match", f"must be a string of 1 to {MAX_PATTERN} characters")
    if any(c.isspace() or not c.isprintable() for c in match) or "*" in match[:-1] \
            or "@" in match:
        raise _invalid(f"{where}.match", "a repository (registry/name), '*' only at the end,"
                       " no tag or digest")
    require = r["require"]
    if require not in REQUIRE:
        raise _invalid(f"{where}.require", f"must be one of {', '.join(REQUIRE)}")
    keys = r.get("keys", [])
    if not isinstance(keys, list):
        raise _invalid(f"{where}.keys", "must be a list")
    if require == "signed" and not keys:
        raise _invalid(f"{where}.keys", "a rule requiring a signature needs at least one key")
    if require != "signed" and keys:
        raise _invalid(f"{where}.keys", f"keys mean nothing with require {require!r}")
    if len(keys) > MAX_KEYS:
        raise _invalid(f"{where}.keys", f"more than {MAX_KEYS} keys")
    for i, k in enumerate(keys):
        if not isinstance(k, str):
            raise _invalid(f"{where}.keys[{i}]", "must be a PEM string")
        try:
            cosign.parse_pem_public_key(k)
        except cosign.SignatureError as exc:
            raise _invalid(f"{where}.keys[{i}]", exc.reason) from None
    return Rule(where, match, require, tuple(keys))


def repository(registry: str, name: str) -> str:
    """What rules match: ``registry/name`` (Docker Hub as ``docker.io``)."""
    return f"{registry}/{name}"


def signed_reference(registry: str, name: str) -> str:
    """The docker-reference cosign writes in a signature payload: Docker Hub
    images as ``index.docker.io/<name>``, others as ``registry/name``."""
    return f"{'index.docker.io' if registry == 'docker.io' else registry}/{name}"
