"""Host spec -> guest spec rewriting and validation (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pykata import errors
from pykata.guest import spec


def host_spec() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "terminal": False,
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "/run/pykata/shared/c1/rootfs"},
        "hostname": "pod",
        "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "uts"}, {"type": "mount"},
            ],
            "cgroupsPath": "/kubepods/besteffort/pod1/c1",
            "resources": {"memory": {"limit": 1 << 20}, "pids": {"limit": 10}},
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"},
        },
    }


def test_guest_spec_rewrites_only_what_makes_no_sense_in_the_guest() -> None:
    src = host_spec()
    before = copy.deepcopy(src)
    out = spec.guest_spec(src, "c1", "pykata")
    assert src == before, "the input is not modified"
    assert "hooks" not in out
    assert out["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
    assert out["linux"]["cgroupsPath"] == "/pykata/c1"
    for key in ("resources", "seccomp"):
        assert out["linux"][key] == src["linux"][key]
    for key in ("process", "root", "hostname", "mounts"):
        assert out[key] == src[key]


def test_guest_spec_pid_namespace_of_the_sandbox() -> None:
    out = spec.guest_spec(host_spec(), "c2", "/a/b/", pidns_path="/proc/7/ns/pid")
    assert {"type": "pid", "path": "/proc/7/ns/pid"} in out["linux"]["namespaces"]
    assert out["linux"]["cgroupsPath"] == "/a/b/c2"


def test_guest_spec_joins_sandbox_pid_namespace_even_without_own() -> None:
    s = host_spec()
    s["linux"]["namespaces"] = [{"type": "mount"}]
    out = spec.guest_spec(s, "c2", "pykata", pidns_path="/proc/7/ns/pid")
    assert out["linux"]["namespaces"] == [{"type": "mount"},
                                          {"type": "pid", "path": "/proc/7/ns/pid"}]


def test_guest_spec_without_linux_section() -> None:
    s = host_spec()
    del s["linux"]
    out = spec.guest_spec(s, "c3", "")
    assert out["linux"] == {"namespaces": [], "cgroupsPath": "/c3"}


def test_validate_accepts_host_spec() -> None:
    spec.validate(host_spec())


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.pop("process"), "'process' is missing"),
    (lambda s: s["process"].update(args=[]), "process.args"),
    (lambda s: s["process"].update(args=["a", 1]), "process.args"),
    (lambda s: s["process"].update(cwd="relative"), "process.cwd"),
    (lambda s: s["process"].update(env="PATH=/bin"), "process.env"),
    (lambda s: s["process"].update(terminal="yes"), "terminal"),
    (lambda s: s.pop("root"), "root.path"),
    (lambda s: s["root"].update(path="rootfs"), "absolute guest path"),
    (lambda s: s.update(mounts=[{"type": "bind"}]), "bad mount entry"),
    (lambda s: s.update(linux=[]), "linux must be an object"),
])
def test_validate_rejects(mutate: Any, message: str) -> None:
    s = host_spec()
    mutate(s)
    with pytest.raises(errors.InvalidArgument, match=message):
        spec.validate(s)


@pytest.mark.parametrize("value", ["c1", "abc_DEF.1-2", "a" * 128, "0" * 64])
def test_check_id_ok(value: str) -> None:
    assert spec.check_id("container", value) == value


@pytest.mark.parametrize("value", ["", "../x", "a/b", "-x", ".x", "a b", "a" * 129, "é"])
def test_check_id_rejects(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="invalid container id"):
        spec.check_id("container", value)


def test_load_json() -> None:
    assert spec.load_json(b'{"a": 1}', "spec") == {"a": 1}
    with pytest.raises(errors.InvalidArgument, match="not JSON"):
        spec.load_json(b"{", "spec")
    with pytest.raises(errors.InvalidArgument, match="JSON object"):
        spec.load_json(b"[1]", "spec")
    with pytest.raises(errors.InvalidArgument, match="not JSON"):
        spec.load_json(b"\xff", "spec")


def test_guest_spec_joins_the_pods_ipc_and_uts() -> None:
    s = host_spec()
    s["linux"]["namespaces"] = [{"type": "ipc", "path": spec.SANDBOX_NS_MARKER},
                                {"type": "uts", "path": spec.SANDBOX_NS_MARKER},
                                {"type": "mount", "path": "/proc/9/ns/mnt"}]
    pod = {"ipc": "/proc/7/ns/ipc", "uts": "/proc/7/ns/uts"}
    out = spec.guest_spec(s, "c2", "", sandbox_ns=pod)
    assert out["linux"]["namespaces"] == [{"type": "ipc", "path": "/proc/7/ns/ipc"},
                                          {"type": "uts", "path": "/proc/7/ns/uts"},
                                          {"type": "mount"}]
    with pytest.raises(errors.FailedPrecondition, match="pod's ipc namespace"):
        spec.guest_spec(s, "c2", "", sandbox_ns={})
