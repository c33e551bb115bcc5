"""virtio-fs settings from the configuration reach virtiofsd and QEMU; a DAX
window this QEMU cannot provide is one clear error that leaves nothing."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import pytest

from pykata import config, errors
from pykata.hypervisor.qemu.caps import dax_supported
from pykata.runtime.sandbox import Sandbox
from pykata.testing import leftovers

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


async def test_cache_mode_reaches_virtiofsd(pykata_config: config.Config) -> None:
    """cache, sandbox and xattr settings reach virtiofsd (the defaults, namespace
    and no xattr, are checked in test_confinement)."""
    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.virtio_fs_cache = "none"
    cfg.qemu.virtio_fs_sandbox = "chroot"
    cfg.qemu.virtio_fs_xattr = True
    sb = await Sandbox.create(f"vfs-{uuid.uuid4().hex[:6]}", cfg)
    try:
        assert sb.virtiofsd is not None and sb.virtiofsd.ref is not None
        argv = Path(f"/proc/{sb.virtiofsd.ref.pid}/cmdline").read_bytes().split(b"\0")
        assert b"cache=none" in argv, argv
        assert b"sandbox=chroot" in argv and b"xattr" in argv, argv
    finally:
        await sb.stop()


async def test_dax_window_without_qemu_support_is_a_clear_error(
        pykata_config: config.Config) -> None:
    if dax_supported(pykata_config.qemu.path):
        pytest.skip("this QEMU supports virtio-fs DAX")
    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.virtio_fs_cache_size = 256
    sid = f"dax-{uuid.uuid4().hex[:6]}"
    with pytest.raises(errors.InvalidArgument, match="virtio_fs_cache_size = 256.*DAX"):
        await Sandbox.create(sid, cfg)
    assert not leftovers(cfg.runtime.state_dir, sid)
