"""Pull an OCI image from a registry and unpack it, verifying everything.

Issue 19 (images pulled inside the guest): the agent calls ``pull_image``
for a container's image instead of using the host's snapshot (see
pykata.guest.pull). Python stdlib only (the parts the guest image keeps: no
``http``, ``email``, ``tarfile``, ``ssl``), asyncio.

| module | job |
|---|---|
| `reference.py` | image references (`registry/name:tag@sha256:...`) |
| `http.py` | an HTTP/1.1 client on asyncio streams (bounded head and bodies, chunked) |
| `registry.py` | registry v2: token/basic auth, manifests (index -> linux/amd64), blobs |
| `decompress.py` | gzip (zlib), zstd (libzstd via ctypes, or a zstd binary), plain tar |
| `tar.py` | a streaming tar reader (ustar, GNU long names, PAX) |
| `unpack.py` | applying layers to a root: fd walks from the root, whiteouts, caps |
| `signature.py` | cosign signatures of a digest: the `sha256-<hex>.sig` artifact |

Order of a pull: manifest (verified against the reference's digest, or its
digest recorded), config blob (verified), every layer blob streamed to a file
under ``work_dir`` and verified, and only then the layers are unpacked, in
order, in a thread; each layer's uncompressed sha256 must equal the config's
``diff_id``. On any error nothing is left in ``work_dir``; ``root`` may hold
part of the image, and the caller removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pykata import errors
from pykata.guest.imagepull.decompress import LayerStream, drain
from pykata.guest.imagepull.reference import Reference, parse
from pykata.guest.imagepull.registry import Credentials, Manifest, PullLimits, Registry
from pykata.guest.imagepull.unpack import Applier, UnpackOptions

__all__ = ["Credentials", "Manifest", "PullLimits", "PulledImage", "Reference", "Registry",
           "UnpackOptions", "parse", "pull_image", "unpack_layers"]


@dataclass(frozen=True)
class PulledImage:
    reference: Reference
    manifest_digest: str  # the image manifest's (for linux/amd64)
    index_digest: str | None  # the index the reference resolved to, if any
    config_digest: str
    config: dict[str, Any]  # the image config (config.Entrypoint, Cmd, Env, WorkingDir, User)
    layers: tuple[str, ...]  # layer digests, bottom first

    @property
    def digest(self) -> str:
        """What the reference resolved to: the index's digest if there was one."""
        return self.index_digest or self.manifest_digest


def _check_config(ref: Reference, config: Any, manifest: Manifest) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise errors.InvalidArgument(f"image {ref}: config is not a JSON object")
    arch, os_ = config.get("architecture"), config.get("os")
    if (arch, os_) != ("amd64", "linux"):
        raise errors.InvalidArgument(
            f"image {ref}: built for {os_}/{arch}, this guest runs linux/amd64")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise errors.InvalidArgument(
            f"image {ref}: config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'}"
            f" diff_ids for {len(manifest.layers)} layers")
    return config


def unpack_layers(ref: str, root: str, blobs: list[tuple[str, str, str]], *,
                  options: UnpackOptions | None = None, max_layer_bytes: int = 8 << 30) -> None:
    """Apply verified layer blobs ``(path, digest, diff_id)`` to ``root`` in order
    (blocking: call it in a thread)."""
    with Applier(root, options) as applier:
        for path, digest, diff_id in blobs:
            what = f"image {ref}: layer {digest}"
            stream = LayerStream(path, max_layer_bytes, what)
            try:
                applier.apply(stream, what)
                drain(stream)
            finally:
                stream.close()
            if stream.diff_id() != diff_id:
                raise errors.InvalidArgument(
                    f"{what}: uncompressed digest mismatch: expected {diff_id},"
                    f" found {stream.diff_id()}")


async def pull_image(reference: str, root: str, work_dir: str, *,
                     credentials: Credentials | None = None, plain_http: bool = False,
                     ssl_context: Any = None, limits: PullLimits | None = None,
                     options: UnpackOptions | None = None, token: str = "",
                     before_layers: Callable[[Registry, Manifest], Awaitable[None]] | None = None,
                     ) -> PulledImage:
    """Pull ``reference`` and unpack it into the existing directory ``root``.

    ``work_dir`` holds the compressed blobs while the pull runs (a private
    directory is made in it and removed). ``plain_http`` talks http to the
    registry (tests, a registry on the pod network); otherwise https, which
    needs ``ssl`` in the image (see http.py). ``token`` is a registry bearer
    token sent as is. ``before_layers(registry, manifest)`` runs once the
    manifest is resolved and verified, before the config or any layer is
    fetched (signature checks, the agent policy): raising refuses the pull."""
    ref = parse(reference)
    limits = limits or PullLimits()
    options = options or UnpackOptions()
    reg = Registry(ref, credentials=credentials, plain_http=plain_http,
                   ssl_context=ssl_context, limits=limits, token=token)
    manifest = await reg.manifest()
    if before_layers is not None:
        await before_layers(reg, manifest)
    try:
        config = json.loads(await reg.blob_bytes(manifest.config, limits.max_config))
    except ValueError:
        raise errors.InvalidArgument(f"image {ref}: config is not JSON") from None
    config = _check_config(ref, config, manifest)
    diff_ids = [str(d) for d in config["rootfs"]["diff_ids"]]
    tmp = tempfile.mkdtemp(prefix="pull-", dir=work_dir)
    try:
        blobs: list[tuple[str, str, str]] = []
        for i, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
            path = os.path.join(tmp, f"{i:04d}")
            await reg.blob_to_file(layer, path)
            blobs.append((path, layer.digest, diff_id))
        await asyncio.to_thread(unpack_layers, str(ref), root, blobs, options=options,
                                max_layer_bytes=options.max_bytes + (1 << 30))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PulledImage(ref, manifest.digest, manifest.index_digest, manifest.config.digest,
                       config, tuple(d.digest for d in manifest.layers))
