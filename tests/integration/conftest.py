"""Integration fixtures: real QEMU, real guest image, real agent.

Layered: ``pykata_config`` (a private state dir) -> ``rootfs`` (busybox, built
offline) -> ``sandbox`` (a booted VM, module-scoped). When a test fails, the
guest console log of the sandbox is printed.

``PYKATA_TEST_ROOTFS=image[:DEVICE]`` runs the tests with the guest root as
the read-only image (`make test` runs a smoke set that way): the session's
configuration says so, and so does the file ``PYKATA_CONFIG`` names for every
shim containerd starts.
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
ROOTFS_MODE = os.environ.get("PYKATA_TEST_ROOTFS", "")  # "" | initrd | image[:device]


def _with_rootfs_mode(cfg: config.Config) -> config.Config:
    if ROOTFS_MODE:
        mode, _, device = ROOTFS_MODE.partition(":")
        cfg.qemu.rootfs = mode
        cfg.qemu.rootfs_device = device or cfg.qemu.rootfs_device
    return cfg


@pytest.fixture(scope="session", autouse=True)
def _rootfs_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Shims started by containerd read the same rootfs mode (PYKATA_CONFIG)."""
    if not ROOTFS_MODE or os.environ.get(config.ENV_VAR):
        yield
        return
    path = tmp_path_factory.mktemp("rootfs-mode") / "configuration.toml"
    path.write_text(config.to_toml(_with_rootfs_mode(config.load())))
    os.environ[config.ENV_VAR] = str(path)
    try:
        yield
    finally:
        os.environ.pop(config.ENV_VAR, None)


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
    cfg = _with_rootfs_mode(config.load())
    cfg.runtime.state_dir = str(state_dir)
    image = cfg.root_image_path()
    for need in (cfg.kernel_path(), cfg.initrd_path(), *([image] if image else [])):
        if not need.exists():
            pytest.fail(f"guest image missing ({need}): run 'make setup'")
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
