"""A container's image pulled and verified by the agent itself (issue 19,
docs/guest-pull.md), instead of the root filesystem the host shares.

For CreateContainer with ``guest_pull.image`` set, :meth:`GuestPulls.pull`:

1. mounts a tmpfs of ``storage_bytes`` at ``<state>/images/<container>``
   (the compressed blobs and the unpacked root both count against it);
2. decides the image by the node's signature policy (pykata.guest.imagepolicy):
   ``reject`` refuses it at once;
3. resolves and verifies the manifest (against the reference's digest, if it
   names one), then, before the config or any layer is fetched: a ``signed``
   rule fetches the cosign signature artifact and verifies it with the rule's
   keys (pykata.guest.imagepull.signature), and the caller's ``check`` (the
   agent policy, with the digest now known) may refuse;
4. fetches every blob, checks each against its digest, unpacks the layers into
   ``<...>/rootfs``, which becomes the container's ``root.path``.

Any failure unmounts and removes it all (:meth:`release`, also called when
the container is removed). The process, env and cwd stay as the host's spec
says: containerd/CRI merged the image config into it already.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from pykata import errors
from pykata.guest import cosign, imagepolicy, storage, sysutil
from pykata.guest.imagepull import (
    Credentials,
    Manifest,
    PulledImage,
    PullLimits,
    Registry,
    UnpackOptions,
    parse,
    pull_image,
)
from pykata.guest.imagepull.signature import verify_signed
from pykata.protos import agent_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_STORAGE = 1 << 30  # when the host gives no cap
MIN_STORAGE = 1 << 20


def credentials(gp: pb.GuestPull) -> Credentials | None:
    """Username/password, or ``auth`` (base64 "user:password"); None without."""
    if gp.identity_token:
        raise errors.Unimplemented(
            "guest pull: identity tokens (OAuth2 refresh tokens) are not supported;"
            " give a username and password or a registry token")
    if gp.username or gp.password:
        return Credentials(gp.username, gp.password)
    if gp.auth:
        try:
            user, sep, password = base64.b64decode(gp.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise errors.InvalidArgument("guest pull: auth is not base64 of user:password") \
                from None
        if not sep:
            raise errors.InvalidArgument("guest pull: auth is not base64 of user:password")
        return Credentials(user, password)
    return None


class GuestPulls:
    """The guest-pulled images of a sandbox's containers, one tmpfs each."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounts: dict[str, Path] = {}  # container id -> its tmpfs

    def root(self, cid: str) -> str:
        return str(self.base / cid / "rootfs")

    async def pull(self, cid: str, gp: pb.GuestPull, image_policy: bytes,
                   check: Callable[[str], None]) -> PulledImage:
        """Pull ``gp.image`` for container ``cid`` (see the module docstring); the
        container's root is then :meth:`root`. On failure nothing is left."""
        started = time.monotonic()
        policy = imagepolicy.ImagePolicy.parse(image_policy)
        ref = parse(gp.image)
        repo = imagepolicy.repository(ref.registry, ref.name)
        rule = policy.decide(repo)
        if rule.require == "reject":
            raise cosign.SignatureError(f"{ref}: refused by the signature policy's rule"
                                        f" {rule.where} ({rule.match[:200]!r})")
        plain = {ref.registry, ref.endpoint} & set(gp.plain_http_registries)
        creds = credentials(gp)
        size = gp.storage_bytes or DEFAULT_STORAGE
        if size < MIN_STORAGE:
            raise errors.InvalidArgument(f"guest pull: storage of {size} bytes is too small")
        mnt = self.base / cid
        try:
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
            mnt.mkdir(mode=0o755)
        except FileExistsError:
            raise errors.AlreadyExists(f"guest pull: {mnt} already exists") from None
        self.mounts[cid] = mnt
        try:
            try:
                sysutil.mount_with_options("tmpfs", str(mnt), "tmpfs",
                                           [f"size={size}", "mode=0755", "nodev"])
            except OSError as exc:
                raise errors.Internal(f"guest pull: cannot mount a tmpfs at {mnt}:"
                                      f" {exc.strerror or exc}") from None
            root, work = mnt / "rootfs", mnt / "work"
            root.mkdir(mode=0o755)
            work.mkdir(mode=0o700)

            async def before_layers(reg: Registry, manifest: Manifest) -> None:
                digest = manifest.index_digest or manifest.digest
                if rule.require == "signed":
                    t = time.monotonic()
                    signed = await verify_signed(
                        reg, digest, rule.keys,
                        imagepolicy.signed_reference(ref.registry, ref.name), rule.where)
                    log.info("container %s: %s@%s signed (%s, rule %s), checked in %.2fs",
                             cid, repo, digest, signed.reference, rule.where,
                             time.monotonic() - t)
                check(digest)

            pulled = await pull_image(
                gp.image, str(root), str(work), credentials=creds, plain_http=bool(plain),
                limits=PullLimits(max_total=min(PullLimits().max_total, size)),
                options=UnpackOptions(max_bytes=size, keep_setuid=True),
                token=gp.registry_token, before_layers=before_layers)
            work.rmdir()
        except BaseException:
            for failure in self.release(cid):
                log.warning("%s", failure)
            raise
        log.info("container %s: pulled %s (%s, %d layers) in %.2fs", cid, ref, pulled.digest,
                 len(pulled.layers), time.monotonic() - started)
        return pulled

    def release(self, cid: str) -> list[str]:
        """Unmount and remove container ``cid``'s image storage (if any); what failed."""
        mnt = self.mounts.pop(cid, None)
        if mnt is None:
            return []
        try:
            storage.unmount(str(mnt))
        except errors.PykataError as exc:
            return [str(exc)]
        try:
            os.rmdir(mnt)
        except FileNotFoundError:
            pass
        except OSError as exc:
            return [f"guest pull: cannot remove {mnt}: {exc.strerror}"]
        return []
