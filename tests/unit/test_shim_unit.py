"""Shim pieces that need no containerd: pod grouping, socket paths, mount options."""

from __future__ import annotations

from pykata.shim.main import parse_args, pod_of, socket_path
from pykata.shim.rootfs import parse_options


def test_plain_container_is_its_own_sandbox() -> None:
    assert pod_of({}, "c1") == ("c1", True)


def test_cri_sandbox_and_container() -> None:
    sb = {"annotations": {"io.kubernetes.cri.container-type": "sandbox",
                          "io.kubernetes.cri.sandbox-id": "s1"}}
    c = {"annotations": {"io.kubernetes.cri.container-type": "container",
                         "io.kubernetes.cri.sandbox-id": "s1"}}
    assert pod_of(sb, "s1") == ("s1", True)
    assert pod_of(c, "c2") == ("s1", False)


def test_crio_annotations() -> None:
    c = {"annotations": {"io.kubernetes.cri-o.ContainerType": "container",
                         "io.kubernetes.cri-o.SandboxID": "podx"}}
    assert pod_of(c, "c3") == ("podx", False)


def test_socket_path_is_stable_short_and_per_pod() -> None:
    a = socket_path("/run/containerd/containerd.sock", "k8s.io", "s1")
    assert a == socket_path("/run/containerd/containerd.sock", "k8s.io", "s1")
    assert a != socket_path("/run/containerd/containerd.sock", "default", "s1")
    assert len(str(a)) < 100


def test_containerd_flags() -> None:
    a = parse_args(["-namespace", "ns", "-address", "/a.sock", "-publish-binary", "/bin/ctd",
                    "-id", "c1", "-debug", "start"])
    assert (a.namespace, a.address, a.id, a.debug, a.action) == ("ns", "/a.sock", "c1", True,
                                                                 "start")
    d = parse_args(["-namespace", "ns", "-address", "/a", "-id", "c1", "-bundle", "/b",
                    "delete"])
    assert (d.bundle, d.action) == ("/b", "delete")


def test_mount_options_split_into_flags_and_data() -> None:
    flags, data = parse_options(("ro", "nosuid", "lowerdir=/a:/b", "upperdir=/u",
                                 "workdir=/w"))
    assert flags == 0x1 | 0x2
    assert data == "lowerdir=/a:/b,upperdir=/u,workdir=/w"
    flags, data = parse_options(("rbind", "rw"))
    assert flags == 0x1000 | 0x4000 and data == ""
