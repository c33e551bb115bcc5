"""The documents a sandbox brings to its agent at creation (issue 19,
docs/confidential.md): the agent policy and the node's image signature policy.

Both are read on the host when the sandbox is created, before anything is
started, so a missing, unreadable, oversized or invalid document fails the
create with one line and leaves nothing behind:

* the agent policy: ``[agent] policy_file``, or, when ``[agent]
  policy_annotation`` is true, the pod's annotation
  ``io.katacontainers.config.agent.policy`` (base64 of the document, as Kata),
  which then takes precedence. The annotation on a node that does not accept
  it is refused, not ignored: the pod owner asked for a confinement the node
  would silently not give. The document is validated here with the agent's
  own parser, so a bad one fails before a VM boots, with the parser's error.
* the image signature policy: ``[guest_pull] signature_policy_file``, only
  checked to be a JSON object here; the guest interprets it.

Files are opened with O_NOFOLLOW (a symlink as the last component is refused)
and must be regular files; at most :data:`MAX_DOCUMENT` bytes are read.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
from collections.abc import Mapping

from pykata import errors
from pykata.config import Config
from pykata.guest import imagepolicy
from pykata.guest.imagepolicy import ImagePolicy
from pykata.guest.policy import MAX_DOCUMENT, Policy
from pykata.utils.files import read_capped

POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
MAX_ANNOTATION = (MAX_DOCUMENT + 2) // 3 * 4 + 4  # base64 of MAX_DOCUMENT, some slack


def read_document(path: str, what: str, limit: int = MAX_DOCUMENT) -> bytes:
    """The bytes of the regular file ``path`` (``what`` names it in errors):
    the last component never followed, at most ``limit`` bytes; one-line
    InvalidArgument otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        why = "a symlink (not followed)" if exc.errno == errno.ELOOP else exc.strerror
        raise errors.InvalidArgument(f"{what} {path}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.InvalidArgument(f"{what} {path}: not a regular file")
        data = read_capped(fd, limit)
    except OSError as exc:
        raise errors.InvalidArgument(f"{what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise errors.InvalidArgument(f"{what} {path}: larger than {limit} bytes")
    return data


def agent_policy(config: Config, annotations: Mapping[str, str] | None = None) -> bytes:
    """The agent policy document for a new sandbox (b"": none, allow all),
    validated; InvalidArgument with one line if it cannot be used."""
    value = (annotations or {}).get(POLICY_ANNOTATION)
    if value is not None:
        if not config.agent.policy_annotation:
            raise errors.InvalidArgument(
                f"the pod annotation {POLICY_ANNOTATION} asks for an agent policy, but this"
                f" node does not accept policies from pods ([agent] policy_annotation ="
                f" false in {config.source or 'the built-in configuration'}): refused"
                " rather than run the pod without it")
        doc = _from_annotation(value)
        where = f"the pod annotation {POLICY_ANNOTATION}"
    elif config.agent.policy_file:
        doc = read_document(config.agent.policy_file, "[agent] policy_file")
        where = config.agent.policy_file
    else:
        return b""
    try:
        Policy.parse(doc)
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(f"{where}: {exc}") from None
    return doc


def _from_annotation(value: str) -> bytes:
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"the pod annotation {POLICY_ANNOTATION} is not a string")
    if len(value) > MAX_ANNOTATION:
        raise errors.InvalidArgument(
            f"the pod annotation {POLICY_ANNOTATION} is larger than {MAX_ANNOTATION}"
            f" characters (a policy is at most {MAX_DOCUMENT} bytes)")
    try:
        doc = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidArgument(
            f"the pod annotation {POLICY_ANNOTATION} is not base64") from None
    if not doc:
        raise errors.InvalidArgument(f"the pod annotation {POLICY_ANNOTATION} is empty")
    return doc


def image_policy(config: Config) -> bytes:
    """The node's image signature policy for a new sandbox (b"": none),
    validated with the guest's own parser before any VM boots."""
    path = config.guest_pull.signature_policy_file
    if not path:
        return b""
    doc = read_document(path, "[guest_pull] signature_policy_file", imagepolicy.MAX_DOCUMENT)
    try:
        ImagePolicy.parse(doc)
    except errors.InvalidArgument as exc:
        raise errors.InvalidArgument(
            f"[guest_pull] signature_policy_file {path}: {exc}") from None
    return doc
