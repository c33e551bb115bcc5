"""Integration fixtures: real QEMU, real guest image, real agent.

Layered: ``pykata_config`` (a private state dir) -> ``rootfs`` (busybox, built
offline) -> ``sandbox`` (a booted VM, module-scoped). When a test fails, the
guest console log of the sandbox is printed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from pykata import config
from pykata.testing import busybox_rootfs, leftovers

CACHE = Path("/var/tmp/pykata-test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run them through 'make test')")


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    d = Path(f"/run/pykata/t{uuid.uuid4().hex[:6]}")
    d.mkdir(parents=True)
    yield d
    left = leftovers(d)
    shutil.rmtree(d, ignore_errors=True)
    assert not left, f"left behind by the integration tests: {left}"


@pytest.fixture(scope="session")
def pykata_config(state_dir: Path) -> config.Config:
    cfg = config.load()
    cfg.runtime.state_dir = str(state_dir)
    if not cfg.kernel_path().exists() or not cfg.initrd_path().exists():
        pytest.fail(f"guest image missing ({cfg.kernel_path()}): run 'make setup'")
    return cfg


@pytest.fixture(scope="session")
def rootfs() -> Path:
    return busybox_rootfs(CACHE / "busybox-rootfs")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(pykata_config: config.Config,
                  request: pytest.FixtureRequest) -> AsyncIterator[object]:
    """A booted sandbox shared by a module's tests; its guest console is shown
    if any of them failed."""
    from pykata.runtime.sandbox import Sandbox

    failed_before = request.session.testsfailed
    sb = await Sandbox.create(f"it-{uuid.uuid4().hex[:8]}", pykata_config)
    console = sb.dir / "console.log"
    try:
        yield sb
    finally:
        if request.session.testsfailed > failed_before and console.exists():
            print("\n---- guest console ----\n" + console.read_text(errors="replace")[-6000:])
        await sb.stop()
