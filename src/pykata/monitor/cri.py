"""Pod names from containerd's CRI API, when it is there.

The monitor asks ``runtime.v1.RuntimeService/ListPodSandbox`` on the CRI
endpoint (containerd serves it on its own socket) for each pod's name,
namespace and uid, keyed by sandbox id. This is optional: grpcio is not a
runtime dependency of pykata, and a node may have no CRI at all. Without
grpcio, without the socket, or when the call fails, the pod labels come from the
shims' own pykata_shim_sandbox_info (the pod's CRI annotations)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from pathlib import Path
from typing import Any

from pykata.monitor.scrape import MAX_LABEL_VALUE, PodLabels

log = logging.getLogger("pykata.monitor")

CRI_NAMESPACE = "k8s.io"  # containerd's CRI keeps every pod in this namespace
DEFAULT_ENDPOINT = "/run/containerd/containerd.sock"
MAX_MESSAGE = 16 << 20


def _grpc() -> Any:
    """The grpc module, or None if grpcio is not installed."""
    try:
        return importlib.import_module("grpc")
    except ImportError:
        return None


class CriLookup:
    """ListPodSandbox on ``endpoint`` (a unix socket path), each call bounded by
    ``timeout`` seconds. ``enabled`` is False when there is no endpoint or no grpcio."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._grpc: Any = _grpc() if endpoint else None
        self._channel: Any = None
        self._call: Any = None
        self.last_error = ""
        if endpoint and self._grpc is None:
            log.warning("CRI lookup off: grpcio is not installed; pod labels come from"
                        " the shims (the pods' CRI annotations)")

    @property
    def enabled(self) -> bool:
        return self._grpc is not None

    def _list(self) -> dict[str, PodLabels]:
        from pykata.protos import cri_api_pb2 as cri

        grpc = self._grpc
        if self._call is None:
            self._channel = grpc.insecure_channel(
                f"unix://{Path(self.endpoint).absolute()}",
                options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                         ("grpc.enable_http_proxy", 0)])
            self._call = self._channel.unary_unary(
                "/runtime.v1.RuntimeService/ListPodSandbox",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=cri.ListPodSandboxResponse.FromString)
        resp = self._call(cri.ListPodSandboxRequest(), timeout=self.timeout)
        return {item.id: PodLabels(item.metadata.name[:MAX_LABEL_VALUE],
                                   item.metadata.namespace[:MAX_LABEL_VALUE],
                                   item.metadata.uid[:MAX_LABEL_VALUE])
                for item in resp.items}

    async def pods(self) -> dict[str, PodLabels] | None:
        """Sandbox id -> pod labels, or None when CRI cannot say (off, no socket,
        the call failed: ``last_error`` says why, logged once per new reason)."""
        if not self.enabled:
            return None
        if not os.path.exists(self.endpoint):
            self._failed(f"no CRI socket at {self.endpoint}")
            return None
        try:
            pods = await asyncio.wait_for(asyncio.to_thread(self._list), self.timeout + 1)
        except Exception as exc:
            detail = getattr(exc, "details", None)
            why = detail() if callable(detail) else str(exc) or type(exc).__name__
            self._failed(f"CRI ListPodSandbox failed: {' '.join(str(why).split())[:200]}")
            return None
        if self.last_error:
            log.info("CRI lookup works again on %s", self.endpoint)
        self.last_error = ""
        return pods

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            log.info("%s: pod labels come from the shims", why)
        self.last_error = why

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._call = None
