"""A small CRI v1 client for tests, demos and benchmarks (there is no crictl here).

It speaks gRPC to containerd's socket (the CRI plugin serves ``runtime.v1`` on
the same socket as the containerd API) using the messages generated from
``pykata/protos/cri_api.proto`` and generic ``unary_unary`` calls, so no
generated gRPC stubs are needed::

    with CRIClient(ctd.socket) as cri:
        pod = pod_config("web", uid="1234", log_directory=logs)
        pod_id = cri.run_pod_sandbox(pod, runtime_handler="runc")
        cid = cri.create_container(pod_id, container_config("c", BUSYBOX_REF,
                                   ["sleep", "60"], log_path="c.log"), pod)
        cri.start_container(cid)
        out, err, code = cri.exec_sync(cid, ["echo", "hi"])

Beside the client: builders for the configs the kubelet sends
(:func:`pod_config`, :func:`container_config`, :func:`resources`), the pod infra
("pause") image built offline (:func:`prepare_images`) and a bridge CNI network
confined to a private subnet (:func:`write_cni_config`).

containerd 1.6.20 traps, each seen while validating this against the ``runc``
handler (tests/integration/test_cri_runc.py); PrivateContainerd needed no change:

* All CRI objects live in the containerd namespace ``k8s.io``: images must be
  imported there (``ctr -n k8s.io images import``), whatever namespace the
  PrivateContainerd uses for its ``ctr``.
* RunPodSandbox needs ``sandbox_image`` present locally, or containerd pulls it.
  The pause image is named under the reserved ``.invalid`` domain so that a
  missing import fails at once instead of reaching a registry. PullImage always
  asks a registry: use one on loopback (containerd speaks plain HTTP to
  localhost/127.0.0.1 without any registry config).
* Without a CNI config RunPodSandbox fails with "cni plugin not initialized",
  and the failed sandbox stays behind, NOTREADY, keeping its name reserved
  ("failed to reserve sandbox name") and its netns. It is stored in the
  metadata under ``root`` and so survives a containerd restart, and
  StopPodSandbox fails the same way until a CNI config exists again. Write the
  CNI config before starting containerd; remove stale pods at start.
* Podman's default CNI network is 10.88.0.0/16 on these machines: the bridge
  here takes a free /24 of 10.244.0.0/16. The bridge plugin never deletes its
  bridge and, with ``isGateway``, switches ``net.ipv4.ip_forward`` on:
  :meth:`CNINetwork.cleanup` undoes both. libcni keeps its result cache in the
  global ``/var/lib/cni/results`` (emptied again on teardown).
* The sandbox netns is ``/var/run/netns/cni-<uuid>``; its path is in the
  verbose PodSandboxStatus (``json.loads(info["info"])["runtimeSpec"]``).
* With an empty ``cgroup_parent`` (cgroupfs driver) pods and containers go to
  ``/k8s.io/<id>`` at the root of every cgroup hierarchy (v1 here, hybrid mode
  is fine for runc); the empty ``k8s.io`` parents stay after removal. Inside a
  runc container the memory limit is ``/sys/fs/cgroup/memory/memory.limit_in_bytes``.
* ExecSync past its ``timeout`` is an error (DEADLINE_EXCEEDED, "timeout 1s
  exceeded"), not an exit code.
* A pod's PID 1 ignores SIGTERM unless it installs a handler: the pause command
  traps TERM/INT so that it exits at once, like the real pause.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]
from google.protobuf.message import Message

from pykata.protos import cri_api_pb2 as cri
from pykata.testing.bundles import busybox_rootfs
from pykata.testing.containerd import PrivateContainerd
from pykata.testing.images import BUSYBOX_REF, oci_archive

__all__ = [
    "BUSYBOX_REF",
    "CRI_NAMESPACE",
    "PAUSE_CMD",
    "PAUSE_REF",
    "CNINetwork",
    "CRIClient",
    "CRIError",
    "ExecResult",
    "container_config",
    "cri_containerd",
    "pod_config",
    "prepare_images",
    "remove_pods",
    "resources",
    "write_cni_config",
]

CRI_NAMESPACE = "k8s.io"
# Under the reserved ``.invalid`` domain: if it is missing, a pull fails at once.
PAUSE_REF = "pykata.invalid/pause:latest"
# PID 1 of the pod: sleeps forever, exits at once on SIGTERM/SIGINT (as pause does).
PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; sleep infinity & wait"]
CACHE = Path("/var/tmp/pykata-test")
DEFAULT_TIMEOUT = 120.0  # seconds per call, like the kubelet's runtime request timeout

_R = TypeVar("_R", bound=Message)


class CRIError(RuntimeError):
    """A CRI call failed: ``code`` is the gRPC status code, ``details`` its message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        one_line = " ".join((details or "").split())
        super().__init__(f"{method}: {code.name}: {one_line}")


class ExecResult(NamedTuple):
    stdout: bytes
    stderr: bytes
    exit_code: int


class CRIClient:
    """Synchronous client of ``runtime.v1.RuntimeService`` and ``ImageService``.

    Every call has a deadline (``timeout`` seconds, per call overridable), and
    every gRPC failure is raised as :class:`CRIError`.
    """

    def __init__(self, socket: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        target = str(socket)
        if "://" not in target and not target.startswith("unix:"):
            target = f"unix://{Path(target).absolute()}"
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.enable_http_proxy", 0),
        ])
        self._stubs: dict[str, Callable[..., Any]] = {}

    # -- plumbing ---------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the CRI server answers (bounded by ``timeout``).

        A connected channel is not enough: right after containerd starts, its CRI
        plugin serves the socket but answers every call with "server is not
        initialized yet" until it has loaded its state. So this also waits for one
        ListPodSandbox to succeed."""
        deadline = time.monotonic() + timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise CRIError("connect", grpc.StatusCode.UNAVAILABLE,
                           f"{self.target} not ready after {timeout}s") from None
        while True:
            try:
                self._rt("ListPodSandbox", cri.ListPodSandboxRequest(),
                         cri.ListPodSandboxResponse, timeout=5)
                return
            except CRIError as e:
                if "not initialized" not in e.details or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def _call(self, service: Literal["RuntimeService", "ImageService"], method: str,
              request: Message, response_type: type[_R], timeout: float | None = None) -> _R:
        path = f"/runtime.v1.{service}/{method}"
        stub = self._stubs.get(path)
        if stub is None:
            stub = self._channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString)
            self._stubs[path] = stub
        try:
            response: _R = stub(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise CRIError(method, e.code(), e.details() or "") from None
        return response

    def _rt(self, method: str, request: Message, response_type: type[_R],
            timeout: float | None = None) -> _R:
        return self._call("RuntimeService", method, request, response_type, timeout)

    def _img(self, method: str, request: Message, response_type: type[_R],
             timeout: float | None = None) -> _R:
        return self._call("ImageService", method, request, response_type, timeout)

    # -- runtime ----------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self._rt("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def status(self, verbose: bool = False) -> cri.StatusResponse:
        return self._rt("Status", cri.StatusRequest(verbose=verbose), cri.StatusResponse)

    # -- pod sandboxes ----------------------------------------------------------

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, runtime_handler: str = "",
                        timeout: float | None = None) -> str:
        """Start a pod; returns its sandbox id."""
        req = cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self._rt("RunPodSandbox", req, cri.RunPodSandboxResponse, timeout).pod_sandbox_id

    def stop_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._rt("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                 cri.StopPodSandboxResponse, timeout)

    def remove_pod_sandbox(self, pod_id: str, timeout: float | None = None) -> None:
        self._rt("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                 cri.RemovePodSandboxResponse, timeout)

    def pod_sandbox_status(self, pod_id: str,
                           verbose: bool = False) -> cri.PodSandboxStatusResponse:
        """The status; with ``verbose`` also ``info`` (JSON strings, e.g. ``info["info"]``)."""
        req = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._rt("PodSandboxStatus", req, cri.PodSandboxStatusResponse)

    def list_pod_sandbox(self, pod_id: str = "", labels: Mapping[str, str] | None = None,
                         state: int | None = None) -> list[cri.PodSandbox]:
        """Pods, optionally filtered by id (prefix), labels and ``cri.SANDBOX_READY`` etc."""
        f = cri.PodSandboxFilter(id=pod_id, label_selector=dict(labels or {}))
        if state is not None:
            f.state.state = state  # type: ignore[assignment]
        resp = self._rt("ListPodSandbox", cri.ListPodSandboxRequest(filter=f),
                        cri.ListPodSandboxResponse)
        return list(resp.items)

    def pod_sandbox_stats(self, pod_id: str) -> cri.PodSandboxStats:
        req = cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id)
        return self._rt("PodSandboxStats", req, cri.PodSandboxStatsResponse).stats

    def port_forward(self, pod_id: str, port: int) -> str:
        """The streaming URL for a port forward (the client does not drive it)."""
        req = cri.PortForwardRequest(pod_sandbox_id=pod_id, port=[port])
        return self._rt("PortForward", req, cri.PortForwardResponse).url

    # -- containers -------------------------------------------------------------

    def create_container(self, pod_id: str, config: cri.ContainerConfig,
                         sandbox_config: cri.PodSandboxConfig,
                         timeout: float | None = None) -> str:
        """Create a container in a pod; returns its id."""
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                         sandbox_config=sandbox_config)
        return self._rt("CreateContainer", req, cri.CreateContainerResponse,
                        timeout).container_id

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        self._rt("StartContainer", cri.StartContainerRequest(container_id=container_id),
                 cri.StartContainerResponse, timeout)

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (0: SIGKILL at once)."""
        req = cri.StopContainerRequest(container_id=container_id, timeout=timeout)
        self._rt("StopContainer", req, cri.StopContainerResponse,
                 max(self.timeout, timeout + 30.0))

    def remove_container(self, container_id: str) -> None:
        self._rt("RemoveContainer", cri.RemoveContainerRequest(container_id=container_id),
                 cri.RemoveContainerResponse)

    def list_containers(self, pod_id: str = "", container_id: str = "",
                        labels: Mapping[str, str] | None = None,
                        state: int | None = None) -> list[cri.Container]:
        f = cri.ContainerFilter(id=container_id, pod_sandbox_id=pod_id,
                                label_selector=dict(labels or {}))
        if state is not None:
            f.state.state = state  # type: ignore[assignment]
        resp = self._rt("ListContainers", cri.ListContainersRequest(filter=f),
                        cri.ListContainersResponse)
        return list(resp.containers)

    def container_status(self, container_id: str,
                         verbose: bool = False) -> cri.ContainerStatusResponse:
        req = cri.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._rt("ContainerStatus", req, cri.ContainerStatusResponse)

    def container_stats(self, container_id: str) -> cri.ContainerStats:
        req = cri.ContainerStatsRequest(container_id=container_id)
        return self._rt("ContainerStats", req, cri.ContainerStatsResponse).stats

    def list_container_stats(self, pod_id: str = "", container_id: str = "",
                             labels: Mapping[str, str] | None = None,
                             ) -> list[cri.ContainerStats]:
        f = cri.ContainerStatsFilter(id=container_id, pod_sandbox_id=pod_id,
                                     label_selector=dict(labels or {}))
        resp = self._rt("ListContainerStats", cri.ListContainerStatsRequest(filter=f),
                        cri.ListContainerStatsResponse)
        return list(resp.stats)

    def update_container_resources(self, container_id: str,
                                   linux: cri.LinuxContainerResources,
                                   annotations: Mapping[str, str] | None = None) -> None:
        req = cri.UpdateContainerResourcesRequest(container_id=container_id, linux=linux,
                                                  annotations=dict(annotations or {}))
        self._rt("UpdateContainerResources", req, cri.UpdateContainerResourcesResponse)

    def reopen_container_log(self, container_id: str) -> None:
        self._rt("ReopenContainerLog", cri.ReopenContainerLogRequest(container_id=container_id),
                 cri.ReopenContainerLogResponse)

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 10) -> ExecResult:
        """Run ``cmd`` in the container. Past ``timeout`` seconds containerd raises
        (CRIError with code DEADLINE_EXCEEDED); 0: no runtime-side limit (the
        call's own deadline, the client's ``timeout``, still applies)."""
        req = cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        deadline = (timeout + 30.0) if timeout > 0 else self.timeout
        resp = self._rt("ExecSync", req, cri.ExecSyncResponse, deadline)
        return ExecResult(resp.stdout, resp.stderr, resp.exit_code)

    def exec(self, container_id: str, cmd: Sequence[str], *, tty: bool = False,
             stdin: bool = False, stdout: bool = True, stderr: bool = True) -> str:
        """The streaming URL of an exec session (the client does not drive it)."""
        req = cri.ExecRequest(container_id=container_id, cmd=list(cmd), tty=tty, stdin=stdin,
                              stdout=stdout, stderr=stderr and not tty)
        return self._rt("Exec", req, cri.ExecResponse).url

    def attach(self, container_id: str, *, tty: bool = False, stdin: bool = False,
               stdout: bool = True, stderr: bool = True) -> str:
        """The streaming URL to attach to the container's stdio."""
        req = cri.AttachRequest(container_id=container_id, tty=tty, stdin=stdin,
                                stdout=stdout, stderr=stderr and not tty)
        return self._rt("Attach", req, cri.AttachResponse).url

    # -- images -----------------------------------------------------------------

    def image_status(self, image: str, verbose: bool = False) -> cri.Image | None:
        """The image, or None if it is not present."""
        req = cri.ImageStatusRequest(image=cri.ImageSpec(image=image), verbose=verbose)
        resp = self._img("ImageStatus", req, cri.ImageStatusResponse)
        return resp.image if resp.HasField("image") else None

    def pull_image(self, image: str, sandbox_config: cri.PodSandboxConfig | None = None,
                   timeout: float | None = None) -> str:
        """Pull ``image`` (containerd always asks the registry); returns the image ref."""
        req = cri.PullImageRequest(image=cri.ImageSpec(image=image))
        if sandbox_config is not None:
            req.sandbox_config.CopyFrom(sandbox_config)
        return self._img("PullImage", req, cri.PullImageResponse, timeout).image_ref

    def list_images(self, image: str = "") -> list[cri.Image]:
        req = cri.ListImagesRequest()
        if image:
            req.filter.image.image = image
        return list(self._img("ListImages", req, cri.ListImagesResponse).images)

    def remove_image(self, image: str) -> None:
        self._img("RemoveImage", cri.RemoveImageRequest(image=cri.ImageSpec(image=image)),
                  cri.RemoveImageResponse)

    def image_fs_info(self) -> cri.ImageFsInfoResponse:
        return self._img("ImageFsInfo", cri.ImageFsInfoRequest(), cri.ImageFsInfoResponse)


# -- config builders ------------------------------------------------------------------


def resources(*, cpu_period: int = 0, cpu_quota: int = 0, cpu_shares: int = 0,
              memory_limit: int = 0, cpuset_cpus: str = "", oom_score_adj: int = 0,
              ) -> cri.LinuxContainerResources:
    """Linux resources as the kubelet computes them (0: unset). For ``cpu: 500m``
    the kubelet sends period 100000, quota 50000, shares 512."""
    return cri.LinuxContainerResources(
        cpu_period=cpu_period, cpu_quota=cpu_quota, cpu_shares=cpu_shares,
        memory_limit_in_bytes=memory_limit, cpuset_cpus=cpuset_cpus,
        oom_score_adj=oom_score_adj)


def _profile(kind: str | None) -> cri.SecurityProfile | None:
    if kind is None:
        return None
    if kind == "runtime/default":
        return cri.SecurityProfile(profile_type=cri.SecurityProfile.RuntimeDefault)
    if kind == "unconfined":
        return cri.SecurityProfile(profile_type=cri.SecurityProfile.Unconfined)
    if kind.startswith("localhost/"):
        return cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost,
                                   localhost_ref=kind.removeprefix("localhost/"))
    raise ValueError(f"seccomp profile {kind!r}: runtime/default, unconfined, localhost/<path>")


def pod_config(name: str, namespace: str = "default", uid: str | None = None, *,
               attempt: int = 0, hostname: str | None = None,
               log_directory: str | Path | None = None,
               labels: Mapping[str, str] | None = None,
               annotations: Mapping[str, str] | None = None,
               dns_servers: Iterable[str] = (), dns_searches: Iterable[str] = (),
               dns_options: Iterable[str] = (), cgroup_parent: str = "",
               host_network: bool = False, host_pid: bool = False, host_ipc: bool = False,
               share_pid: bool = False, privileged: bool = False,
               run_as_user: int | None = None, run_as_group: int | None = None,
               supplemental_groups: Iterable[int] = (), readonly_rootfs: bool = False,
               seccomp: str | None = None, sysctls: Mapping[str, str] | None = None,
               overhead: cri.LinuxContainerResources | None = None,
               pod_resources: cri.LinuxContainerResources | None = None,
               ) -> cri.PodSandboxConfig:
    """A PodSandboxConfig shaped like the kubelet's (with its ``io.kubernetes.pod.*``
    labels). ``uid`` defaults to a hash of namespace/name."""
    uid = uid or hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32]
    all_labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid, **(labels or {})}
    sc = cri.LinuxSandboxSecurityContext(
        namespace_options=cri.NamespaceOption(
            network=cri.NODE if host_network else cri.POD,
            pid=cri.NODE if host_pid else (cri.POD if share_pid else cri.CONTAINER),
            ipc=cri.NODE if host_ipc else cri.POD),
        privileged=privileged, readonly_rootfs=readonly_rootfs,
        supplemental_groups=list(supplemental_groups))
    if run_as_user is not None:
        sc.run_as_user.value = run_as_user
    if run_as_group is not None:
        sc.run_as_group.value = run_as_group
    prof = _profile(seccomp)
    if prof is not None:
        sc.seccomp.CopyFrom(prof)
    linux = cri.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent, security_context=sc,
                                      sysctls=dict(sysctls or {}))
    if overhead is not None:
        linux.overhead.CopyFrom(overhead)
    if pod_resources is not None:
        linux.resources.CopyFrom(pod_resources)
    cfg = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace,
                                        attempt=attempt),
        hostname="" if host_network else (hostname or name),
        log_directory=str(log_directory) if log_directory is not None else "",
        labels=all_labels, annotations=dict(annotations or {}), linux=linux)
    servers, searches, options = list(dns_servers), list(dns_searches), list(dns_options)
    if servers or searches or options:
        cfg.dns_config.CopyFrom(cri.DNSConfig(servers=servers, searches=searches,
                                              options=options))
    return cfg


def container_config(name: str, image: str, command: Sequence[str] = (),
                     args: Sequence[str] = (), *, attempt: int = 0, log_path: str = "",
                     working_dir: str = "", envs: Mapping[str, str] | None = None,
                     labels: Mapping[str, str] | None = None,
                     annotations: Mapping[str, str] | None = None,
                     mounts: Iterable[tuple[str, str, bool]] = (),
                     tty: bool = False, stdin: bool = False, stdin_once: bool = False,
                     cpu_period: int = 0, cpu_quota: int = 0, cpu_shares: int = 0,
                     memory_limit: int = 0,
                     linux_resources: cri.LinuxContainerResources | None = None,
                     privileged: bool = False, run_as_user: int | None = None,
                     run_as_group: int | None = None, run_as_username: str = "",
                     readonly_rootfs: bool = False, no_new_privs: bool = False,
                     add_capabilities: Iterable[str] = (),
                     drop_capabilities: Iterable[str] = (),
                     seccomp: str | None = None, share_pid: bool = False,
                     ) -> cri.ContainerConfig:
    """A ContainerConfig; ``log_path`` is relative to the pod's ``log_directory``;
    ``mounts`` are (host_path, container_path, readonly). Resources come from the
    cpu_*/memory_limit arguments, or whole from ``linux_resources``."""
    res = linux_resources if linux_resources is not None else resources(
        cpu_period=cpu_period, cpu_quota=cpu_quota, cpu_shares=cpu_shares,
        memory_limit=memory_limit)
    sc = cri.LinuxContainerSecurityContext(
        capabilities=cri.Capability(add_capabilities=list(add_capabilities),
                                    drop_capabilities=list(drop_capabilities)),
        privileged=privileged, run_as_username=run_as_username,
        readonly_rootfs=readonly_rootfs, no_new_privs=no_new_privs,
        namespace_options=cri.NamespaceOption(
            network=cri.POD, ipc=cri.POD, pid=cri.POD if share_pid else cri.CONTAINER))
    if run_as_user is not None:
        sc.run_as_user.value = run_as_user
    if run_as_group is not None:
        sc.run_as_group.value = run_as_group
    prof = _profile(seccomp)
    if prof is not None:
        sc.seccomp.CopyFrom(prof)
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=attempt),
        image=cri.ImageSpec(image=image), command=list(command), args=list(args),
        working_dir=working_dir,
        envs=[cri.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        mounts=[cri.Mount(host_path=h, container_path=c, readonly=ro) for h, c, ro in mounts],
        labels={"io.kubernetes.container.name": name, **(labels or {})},
        annotations=dict(annotations or {}), log_path=log_path,
        stdin=stdin, stdin_once=stdin_once, tty=tty,
        linux=cri.LinuxContainerConfig(resources=res, security_context=sc))


# -- images and network for a private CRI containerd ----------------------------------


def _ctr_k8s(socket: Path, *args: str, timeout: float = 300) -> None:
    argv = ["ctr", "--address", str(socket), "--namespace", CRI_NAMESPACE, *args]
    r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.decode(errors='replace').strip()}")


def prepare_images(ctd: Any, *, cache: Path = CACHE, pause_ref: str = PAUSE_REF,
                   image_ref: str = BUSYBOX_REF) -> tuple[str, str]:
    """Build (offline) and import into ``k8s.io`` the pod infra image ``pause_ref``
    (busybox running :data:`PAUSE_CMD`) and a busybox image ``image_ref`` for the
    containers. ``ctd`` is a started :class:`PrivateContainerd` (anything with a
    ``socket``); pass ``pause_ref`` as its ``sandbox_image``. Returns both refs."""
    rootfs = busybox_rootfs(cache / "busybox-rootfs")
    sock = Path(ctd.socket)
    for ref, cmd, fname in ((pause_ref, PAUSE_CMD, "pause.oci.tar"),
                            (image_ref, ["sh"], "busybox-cri.oci.tar")):
        archive = oci_archive(rootfs, cache / fname, ref=ref, cmd=cmd)
        # A full ref name inside the archive: no --base-name (it would import nothing).
        _ctr_k8s(sock, "images", "import", str(archive))
    return pause_ref, image_ref


@dataclass
class CNINetwork:
    """A bridge network written by :func:`write_cni_config`."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    conflist: Path
    data_dir: Path
    ip_forward_before: str | None

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    def cleanup(self) -> None:
        """Delete the bridge, the IPAM state and the config; restore ip_forward."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True,
                           check=False, timeout=30)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.conflist.unlink()
        if self.ip_forward_before is not None:
            fwd = Path("/proc/sys/net/ipv4/ip_forward")
            with contextlib.suppress(OSError):
                if fwd.read_text().strip() != self.ip_forward_before:
                    fwd.write_text(self.ip_forward_before + "\n")


def _host_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             timeout=30).stdout
        for word in out.split():
            if "/" in word or word[:1].isdigit():
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets


def write_cni_config(base: Path, *, name: str | None = None, bridge: str | None = None,
                     subnet: str | None = None, default_route: bool = False) -> CNINetwork:
    """Write ``<base>/cni/10-pykata.conflist``: bridge + host-local IPAM on a /24
    of 10.244.0.0/16 that no host interface or route uses yet, ``isGateway``,
    ``ipMasq: false``, IPAM state under ``<base>/cni-ipam``. Pods get no default
    route unless ``default_route`` (tests only talk inside the subnet)."""
    tag = hashlib.sha256(str(base).encode()).hexdigest()
    name = name or f"pykata-{tag[:6]}"
    bridge = bridge or f"pkcri{tag[:6]}"
    if len(bridge) > 15:
        raise ValueError(f"bridge name {bridge!r} is longer than 15 characters")
    if subnet is not None:
        net = ipaddress.IPv4Network(subnet)
    else:
        used = _host_networks()
        start = int(tag[6:10], 16) % 256
        for i in range(256):
            cand = ipaddress.IPv4Network(f"10.244.{(start + i) % 256}.0/24")
            if not any(cand.overlaps(u) for u in used if u.prefixlen > 0):
                net = cand
                break
        else:
            raise RuntimeError("no free /24 in 10.244.0.0/16")
    data_dir = base / "cni-ipam"
    ipam: dict[str, Any] = {
        "type": "host-local",
        "ranges": [[{"subnet": str(net), "gateway": str(net.network_address + 1)}]],
        "dataDir": str(data_dir),
    }
    if default_route:
        ipam["routes"] = [{"dst": "0.0.0.0/0"}]
    conf = {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "hairpinMode": True, "ipam": ipam}],
    }
    conflist = base / "cni" / "10-pykata.conflist"
    conflist.parent.mkdir(parents=True, exist_ok=True)
    conflist.write_text(json.dumps(conf, indent=2) + "\n")
    try:
        fwd: str | None = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    except OSError:
        fwd = None
    return CNINetwork(name=name, bridge=bridge, subnet=net, conflist=conflist,
                      data_dir=data_dir, ip_forward_before=fwd)


def remove_pods(client: CRIClient, labels: Mapping[str, str]) -> None:
    """Stop and remove every pod carrying ``labels`` (errors ignored)."""
    for pod in client.list_pod_sandbox(labels=dict(labels)):
        with contextlib.suppress(CRIError):
            client.stop_pod_sandbox(pod.id)
            client.remove_pod_sandbox(pod.id)


def _netns_mount_point() -> None:
    """The first ``ip netns add`` on a host bind-mounts /run/netns over itself;
    done after CNI made a pod's netns it would shadow that mount, and containerd
    could not remove the netns. Make /run/netns a mount point before any pod."""
    probe = f"pkinit-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False, timeout=30)


@contextlib.contextmanager
def cri_containerd(base: Path, root: Path, labels: Mapping[str, str], *,
                   default_route: bool = False, pykata_config: str = "",
                   timeout: float = 180.0
                   ) -> Iterator[tuple[PrivateContainerd, CNINetwork, CRIClient]]:
    """A private containerd with the CRI plugin (state under ``base``, metadata
    under ``root``), the bridge CNI and the busybox and pause images; a client.
    Pods carrying ``labels`` (left by an interrupted earlier run, or by the
    caller) are removed before and after. ``pykata_config`` is TOML for the
    pykata shims it starts (through PYKATA_CONFIG). Everything made is undone."""
    _netns_mount_point()
    env: dict[str, str] = {}
    if pykata_config:
        base.mkdir(parents=True, exist_ok=True)
        (base / "pykata.toml").write_text(pykata_config)
        env["PYKATA_CONFIG"] = str(base / "pykata.toml")
    ctd = PrivateContainerd(base=base, root=root, namespace=CRI_NAMESPACE, cri=True,
                            sandbox_image=PAUSE_REF, env=env)
    net = write_cni_config(base, default_route=default_route)  # before containerd starts
    try:
        ctd.start()
        prepare_images(ctd)
        with CRIClient(ctd.socket, timeout=timeout) as client:
            client.wait_ready(30)
            remove_pods(client, labels)
            try:
                yield ctd, net, client
            finally:
                remove_pods(client, labels)
    finally:
        ctd.stop()
        net.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        # containerd puts pods at /k8s.io/<id> in every cgroup hierarchy and leaves
        # the (then empty) k8s.io parents; rmdir fails while others still use them.
        for d in Path("/sys/fs/cgroup").glob("*/k8s.io"):
            with contextlib.suppress(OSError):
                d.rmdir()
