"""Fuzzing the OCI spec conversion (pykata.runtime.specconv): random specs of the
real schema's shape with wrong types, missing fields, huge values, '..' paths,
unknown namespaces and hook kinds, through what the runtime does with a
container's spec (validate, check_spec, check_namespaces, plan) and the
helpers it calls on the spec (is_pod_sandbox, joins_pid_namespace,
strip_resources). Host paths are answered by a fake probe.

Properties: the only exception is a PykataError (InvalidArgument), its message
one line; plan() leaves its input alone and returns a spec that is JSON.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata import errors
from pykata.runtime import specconv
from tests.fuzz import support


class FakeProbe(specconv.HostProbe):
    """Host facts by path: /dev/sd*, /dev/vd* are disks (8:N), /proc/<n>/ns/<t> are
    namespaces (1 and self: the host's), anything with 'missing' does not exist,
    emptyDir volumes with 'mem' are on tmpfs, '/host/with-sub' has submounts."""

    def block_rdev(self, path: str) -> int | None:
        if "missing" in path:
            raise FileNotFoundError(2, "No such file or directory", path)
        if path.startswith(("/dev/sd", "/dev/vd")):
            return os.makedev(8, len(path) % 16)
        return None

    def block_device(self, major: int, minor: int) -> Path | None:
        return Path(f"/dev/sd{minor}") if major == 8 else None

    def ns_type(self, path: str) -> str | None:
        if "missing" in path:
            raise FileNotFoundError(2, "No such file or directory", path)
        parts = path.split("/")
        if len(parts) == 5 and parts[1] == "proc" and parts[3] == "ns":
            return {"net": "network", "mnt": "mount"}.get(parts[4], parts[4])
        return None

    def is_host_ns(self, path: str, kind: str) -> bool:
        return path.startswith(("/proc/1/", "/proc/self/"))

    def tmpfs_size(self, path: str) -> int | None:
        return 64 << 20 if "mem" in path or path.rstrip("/") == "/dev/shm" else None

    def submounts(self, path: str, limit: int) -> list[tuple[str, frozenset[str]]]:
        if "with-sub" not in path:
            return []
        return [(f"sub{i}", frozenset({"ro", "nosuid"} if i % 2 else {"rw"}))
                for i in range(min(limit, 70))]


PROBE = FakeProbe()
pods = st.builds(specconv.PodNamespaces, vm_pid=st.sampled_from([0, 42, 1]),
                 netns=st.sampled_from(["", "/proc/42/ns/net", "/var/run/netns/x"]),
                 first=st.booleans())

# Crashes found in code that other people own (reported; strict xfail reproducers
# below): (exception type, start of its message) -> where the bug is.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _known(exc: BaseException) -> str:
    for (kind, start), where in KNOWN_BUGS.items():
        if type(exc).__name__ == kind and str(exc).startswith(start):
            return where
    return ""


def convert(spec: Any, bundle: Path, pod: specconv.PodNamespaces, engine: str,
            empty_dir: bool) -> specconv.GuestPlan | None:
    """What runtime.container.Container.create does with a spec, up to the guest."""
    specconv.validate(spec, bundle)
    specconv.check_spec(spec, engine)
    specconv.check_namespaces(spec, pod, PROBE)
    specconv.is_pod_sandbox(spec)
    specconv.joins_pid_namespace(spec)
    linux = spec.get("linux")
    if isinstance(linux, dict):
        specconv.strip_resources(linux.get("resources"), "c1")
    before = copy.deepcopy(spec)
    plan = specconv.plan(spec, "c1", bundle, guest_empty_dir=empty_dir, probe=PROBE)
    assert spec == before, "plan() changed the spec it was given"
    json.dumps(plan.spec, allow_nan=True)
    return plan


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = tmp_path_factory.mktemp("bundle")
    (b / "rootfs").mkdir()
    return b


_OK = {"process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"}}
# Found by this fuzzer (each crashed with TypeError or AttributeError) and fixed.
FOUND = [{**_OK, "linux": {"namespaces": True}},
         {**_OK, "annotations": True}, {**_OK, "mounts": True},
         {**_OK, "linux": {"namespaces": [{"type": ["pid"]}]}},
         {**_OK, "mounts": [{"destination": "/x", "source": 5}]},
         {**_OK, "mounts": [{"destination": "/x", "type": ["bind"]}]},
         {**_OK, "mounts": [{"destination": "/x", "options": 7}]}]


def test_null_namespaces_are_none(bundle: Path) -> None:
    """Found by this fuzzer too: a null linux.namespaces crashed plan() (TypeError)."""
    plan = convert({**_OK, "linux": {"namespaces": None}}, bundle, specconv.PodNamespaces(),
                   "native", True)
    assert plan is not None and plan.spec["linux"]["namespaces"] == [{"type": "cgroup"}]


@pytest.mark.parametrize("spec", FOUND)
def test_found_specs_get_one_clear_line(bundle: Path, spec: Any) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        convert(spec, bundle, specconv.PodNamespaces(), "native", True)
    support.assert_one_line(str(exc.value))


@given(support.oci_spec, pods, st.sampled_from(["native", "crun"]), st.booleans())
def test_spec_conversion_refuses_with_one_clear_line(bundle: Path, spec: Any,
                                                     pod: specconv.PodNamespaces,
                                                     engine: str, empty_dir: bool) -> None:
    try:
        with support.cpu_limit():
            convert(spec, bundle, pod, engine, empty_dir)
    except errors.PykataError as exc:
        assert isinstance(exc, errors.InvalidArgument), repr(exc)
        support.assert_one_line(str(exc))
    except Exception as exc:
        if _known(exc):
            return
        raise AssertionError(f"{type(exc).__name__} escaped the spec conversion: {exc}"
                             ) from exc
