"""Issue 12, smaller items on a real VM: a Create that fails with AlreadyExists
leaves the existing sandbox alone; the same id in two containerd namespaces is two
sandboxes; `pykata cleanup` leaves a sandbox whose owner still runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pykata import config, errors
from pykata.runtime.sandbox import Sandbox

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_same_id_twice_and_in_two_namespaces(pykata_config: config.Config,
                                                   tmp_path: Path) -> None:
    sid = f"dup-{uuid.uuid4().hex[:6]}"
    first = await Sandbox.create(sid, pykata_config)
    other: Sandbox | None = None
    try:
        with pytest.raises(errors.AlreadyExists):
            await Sandbox.create(sid, pykata_config)
        # The failed Create tore nothing down: same directory, VM, agent.
        assert first.dir.is_dir() and (first.dir / "state.json").is_file()
        await first.agent.check(timeout=10.0)
        other = await Sandbox.create(sid, pykata_config, namespace="k8s.io")
        assert other.dir != first.dir and other.dir.parent.name == "k8s.io"
        assert other.vm is not None and first.vm is not None and other.vm.pid != first.vm.pid
        await other.agent.check(timeout=10.0)

        # `pykata cleanup` (another process) skips both: their owner (us) is alive.
        cfg = tmp_path / "pykata.toml"
        cfg.write_text(f'[runtime]\nstate_dir = "{pykata_config.runtime.state_dir}"\n')
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "pykata.cli.admin", "cleanup"],
            env={**os.environ, "PYKATA_CONFIG": str(cfg)}, capture_output=True, text=True,
            timeout=120)
        assert out.returncode == 0, out.stderr
        assert "cleaned up" not in out.stdout
        assert first.dir.is_dir() and other.dir.is_dir()
        await first.agent.check(timeout=10.0)
    finally:
        if other is not None:
            await other.stop()
        await first.stop()
    assert not first.dir.exists()
    assert other is not None and not other.dir.exists()
    assert not other.dir.parent.exists()  # the namespace's directory went with it
