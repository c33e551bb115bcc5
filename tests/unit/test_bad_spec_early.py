"""A malformed spec is one error before any VM boots: the shim's first Create
never calls the sandbox factory, pykata-runtime create refuses the bundle
before it starts a keeper (the same specs go through the real tools in
tests/integration/test_bad_input.py)."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pykata import config, errors
from pykata.cli.runtime.base import CLIError
from pykata.cli.runtime.lifecycle import read_bundle
from pykata.protos import containerd_shim_pb2 as pb
from pykata.shim import service as svc
from pykata.testing import default_spec
from pykata.testing.fakes import FakePublisher, FakeSandboxFactory


def _spec(path: str, value: Any) -> dict[str, Any]:
    spec = default_spec(["sh"])
    obj = spec
    *parents, last = path.split(".")
    for p in parents:
        obj = obj[p]
    obj[last] = copy.deepcopy(value)
    return spec


BAD = [
    ("process.args", "sh -c true", "process.args"),
    ("process.args", [1, 2], "process.args"),
    ("process.cwd", "../up", "process.cwd"),
    ("root.path", 5, "root.path"),
    ("mounts", [{"destination": "rel/../x", "type": "tmpfs", "source": "t"}], "not absolute"),
    ("mounts", [{"destination": "/../../etc/x", "type": "tmpfs", "source": "t"}], "'..'"),
    ("linux.maskedPaths", ["/proc/../../etc/passwd"], "'..'"),
    ("linux.readonlyPaths", ["relative"], "absolute paths"),
    ("process.terminal", "yes", "process.terminal must be a boolean"),
    ("hostname", 5, "hostname must be a string"),
    ("linux.resources", {"memory": {"limit": "1G"}}, "memory.limit must be an integer"),
    ("linux.resources", {"memory": {"limit": True}}, "memory.limit must be an integer"),
    ("linux.resources", {"cpu": {"quota": 1 << 70}}, "cpu.quota 1180591620717411303424 is"),
    ("process.user", {"uid": 1 << 40, "gid": 0}, "process.user.uid"),
    ("process.user", "root", "process.user must be an object"),
]


def _bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(spec))
    return b


@pytest.mark.parametrize(("field", "value", "words"), BAD)
async def test_shim_refuses_before_the_vm(tmp_path: Path, field: str, value: Any,
                                          words: str) -> None:
    make = FakeSandboxFactory(tmp_path / "state")
    service = svc.TaskService("pod1", "k8s.io", config.Config(), FakePublisher(),
                              asyncio.Event(), make_sandbox=make)
    b = _bundle(tmp_path, _spec(field, value))
    with pytest.raises(errors.InvalidArgument) as ei:
        await service.Create(pb.CreateTaskRequest(id="pod1", bundle=str(b)))
    assert words in str(ei.value) and "\n" not in str(ei.value)
    assert make.made == [] and service.sandbox is None


@pytest.mark.parametrize(("field", "value", "words"), BAD)
def test_runtime_cli_refuses_the_bundle(tmp_path: Path, field: str, value: Any,
                                        words: str) -> None:
    b = _bundle(tmp_path, _spec(field, value))
    with pytest.raises((CLIError, errors.InvalidArgument)) as ei:
        read_bundle(b)
    assert words in str(ei.value) and "\n" not in str(ei.value)
