"""containerd shuts a shim down when it gives up on the pod's first Create (its
client went away or timed out: Delete finds no task, then Shutdown). The boot
in progress is cancelled at once and torn down, instead of going on to a VM
that would only be stopped afterwards (a shim lingering for a whole boot)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.protos import containerd_shim_pb2 as pb
from pykata.shim import service as svc
from pykata.testing import default_spec
from pykata.testing.fakes import FakePublisher, FakeSandboxFactory


def _bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(json.dumps(default_spec(["sh"])))
    return b


async def test_shutdown_while_booting_cancels_the_boot(tmp_path: Path) -> None:
    entered = asyncio.Event()
    cancelled: list[str] = []

    async def slow_boot(sandbox_id: str, cfg: config.Config, **kw: Any) -> Any:
        entered.set()
        try:
            await asyncio.Event().wait()  # a boot that takes forever
        except asyncio.CancelledError:
            cancelled.append(sandbox_id)
            raise

    shutdown = asyncio.Event()
    service = svc.TaskService("pod1", "k8s.io", config.Config(), FakePublisher(), shutdown,
                              make_sandbox=slow_boot)
    create = asyncio.ensure_future(service.Create(pb.CreateTaskRequest(
        id="pod1", bundle=str(_bundle(tmp_path)))))
    await asyncio.wait_for(entered.wait(), 5)
    await service.Shutdown(pb.ShutdownRequest(id="pod1"))
    assert shutdown.is_set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(create, 5)
    assert cancelled == ["pod1"]
    await asyncio.wait_for(service.close(), 5)  # the lock is free again
    assert service.sandbox is None


async def test_shutdown_of_a_running_pod_cancels_nothing(tmp_path: Path) -> None:
    make = FakeSandboxFactory(tmp_path / "state")
    shutdown = asyncio.Event()
    service = svc.TaskService("pod1", "k8s.io", config.Config(), FakePublisher(), shutdown,
                              make_sandbox=make)
    await service.Create(pb.CreateTaskRequest(id="pod1", bundle=str(_bundle(tmp_path))))
    assert service.sandbox is not None
    await service.Shutdown(pb.ShutdownRequest(id="pod1"))
    assert not shutdown.is_set() and service.sandbox is not None
    await service.close()
    assert service.sandbox is None
