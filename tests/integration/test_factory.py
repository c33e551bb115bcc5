"""VM templating: a template VM is built once and sandboxes start as copies of
it (real QEMU: save with x-ignore-shared, restore with -incoming), getting
virtio-fs and their own entropy after the restore; through containerd too."""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.runtime import factory
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle
from pykata.testing.containerd import PrivateContainerd
from tests.integration.test_containerd import IMG, RT, cid, clean, ctd  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tpl_config(pykata_config: config.Config) -> Iterator[config.Config]:
    cfg = copy.deepcopy(pykata_config)
    base = Path(f"/dev/shm/pykata-test-{uuid.uuid4().hex[:6]}")
    cfg.factory.enable_template = True
    cfg.factory.template_path = str(base / "template")
    yield cfg
    assert factory.Factory(cfg).destroy()
    shutil.rmtree(base, ignore_errors=True)


async def run_in(sb: Sandbox, bundle_dir: Path, rootfs: Path, script: str,
                 mounts: list[dict[str, Any]] | None = None) -> str:
    cid_ = f"c{uuid.uuid4().hex[:6]}"
    spec: dict[str, Any] = default_spec(["sh", "-c", script])
    spec["mounts"] += mounts or []
    c = await sb.create_container(cid_, make_bundle(bundle_dir / cid_, rootfs, spec))
    await c.start()
    out = b""
    async with asyncio.timeout(120):
        while chunk := await c.init.read_stdout():
            out += chunk
    status = await c.wait()
    await c.delete()
    assert status.code == 0, out
    return out.decode()


@pytest.mark.asyncio(loop_scope="module")
async def test_sandboxes_start_from_one_template(tpl_config: config.Config, tmp_path: Path,
                                                 rootfs: Path) -> None:
    assert factory.Factory(tpl_config).current() is None
    shared = tmp_path / "shared"
    shared.mkdir()
    bind = [{"destination": "/mnt", "type": "bind", "source": str(shared),
             "options": ["rbind", "rw"]}]
    seen: list[str] = []
    for n in range(2):
        sb = await Sandbox.create(f"tpl-{uuid.uuid4().hex[:6]}", tpl_config)
        try:
            t = factory.Factory(tpl_config).current()
            assert t is not None, "no template was built"
            if n == 0:
                first = t
            else:
                assert (t.key, t.created) == (first.key, first.created), "template was rebuilt"
            # The VM is a clone: started with -incoming, RAM in its own file.
            assert sb.vm is not None and sb.vm.pid is not None
            argv = Path(f"/proc/{sb.vm.pid}/cmdline").read_bytes().split(b"\0")
            assert b"-incoming" in argv
            mem = factory.clone_memory_path(tpl_config.runtime.state_dir, sb.id)
            assert mem.is_file() and mem.stat().st_blocks > 0
            # Its RAM file: root-only directory, 0600, lent to QEMU's user; QEMU got
            # it (and the saved state) as fds, not paths.
            assert stat.S_IMODE(mem.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(mem.stat().st_mode) == 0o600
            assert mem.stat().st_uid == int(Path(f"/proc/{sb.vm.pid}/status").read_text()
                                            .split("Uid:")[1].split()[0]) != 0
            assert not any(d in a.decode() for a in argv for d in (
                tpl_config.runtime.state_dir, tpl_config.factory.template_path))
            # virtio-fs (hot-plugged after the restore) carries the rootfs and a bind mount.
            out = await run_in(sb, tmp_path, rootfs,
                               f"echo from-clone-{n} > /mnt/f{n}; uname -r; "
                               "head -c 16 /dev/urandom | od -An -tx1", bind)
            assert (shared / f"f{n}").read_text() == f"from-clone-{n}\n"
            kernel, rand = out.splitlines()[0], out.splitlines()[1]
            assert kernel != os.uname().release
            seen.append(rand)
        finally:
            await sb.stop()
        assert not mem.exists(), f"{mem} left behind"
    # Reseeded per sandbox: clones of one template do not share random output.
    assert seen[0] != seen[1]


def test_ctr_run_from_a_template(ctd: PrivateContainerd, clean: None,  # noqa: F811
                                 tpl_config: config.Config, tmp_path: Path) -> None:
    cfg = tmp_path / "configuration.toml"
    cfg.write_text(f'[factory]\nenable_template = true\n'
                   f'template_path = "{tpl_config.factory.template_path}"\n')
    for _ in range(2):
        c = cid()
        r = ctd.ctr("run", "--rm", *RT, "--runtime-config-path", str(cfg), IMG, c,
                    "sh", "-c", "echo out; echo err >&2; exit 4", check=False)
        ctd.ctr("container", "delete", c, check=False)
        assert (r.returncode, r.stdout, r.stderr) == (4, b"out\n", b"err\n")
    assert factory.Factory(tpl_config).current() is not None
    assert not factory.clone_memory_files("/run/pykata")
    # A clone whose shim was killed: `ctr task delete` still removes its RAM file
    # (and everything else: the `clean` fixture checks).
    c = cid()
    ctd.ctr("run", "-d", *RT, "--runtime-config-path", str(cfg), IMG, c, "sleep", "600")
    assert len(factory.clone_memory_files("/run/pykata")) == 1
    shims = subprocess.run(["pgrep", "-f", f"pykata.shim .*-id {c}"], capture_output=True,
                           text=True, check=False).stdout.split()
    assert shims, "no shim process found"
    for pid in shims:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(1)  # containerd notices the dead shim
    ctd.ctr("task", "delete", "-f", c, check=False)
    ctd.ctr("container", "delete", c, check=False)
    # containerd runs the shim's `delete` (our cleanup) for a dead shim on its own time.
    deadline = time.monotonic() + 30
    while factory.clone_memory_files("/run/pykata") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not factory.clone_memory_files("/run/pykata")


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_first_sandboxes_build_one_template(
        pykata_config: config.Config, tmp_path: Path, rootfs: Path) -> None:
    """Three sandboxes asked for at once with no template yet: one builds it (under
    the lock), all three start from it; `pykata factory destroy` then removes it."""
    cfg = copy.deepcopy(pykata_config)
    base = Path(f"/dev/shm/pykata-test-{uuid.uuid4().hex[:6]}")
    cfg.factory.enable_template = True
    cfg.factory.template_path = str(base / "template")
    sbs: list[Sandbox] = []
    try:
        results = await asyncio.gather(
            *(Sandbox.create(f"tc{i}-{uuid.uuid4().hex[:6]}", cfg) for i in range(3)),
            return_exceptions=True)
        sbs = [r for r in results if isinstance(r, Sandbox)]
        assert len(sbs) == 3, results
        t = factory.Factory(cfg).current()
        assert t is not None
        # Only the finished template is there: no half-built or replaced copies,
        # in a root-only directory, its files 0600 and root's.
        assert sorted(p.name for p in base.iterdir()) == ["template"]
        root = base / "template"
        assert sorted(p.name for p in root.iterdir()) == ["current", "lock"]
        assert (root.stat().st_uid, stat.S_IMODE(root.stat().st_mode)) == (0, 0o700)
        for f in (t.memory, t.state, t.dir / "template.json"):
            st = f.lstat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), f
        for sb in sbs:
            assert sb.vm is not None and sb.vm.pid is not None
            argv = Path(f"/proc/{sb.vm.pid}/cmdline").read_bytes().split(b"\0")
            assert b"-incoming" in argv
        assert "pykata" in await run_in(sbs[0], tmp_path, rootfs, "hostname")
        # The admin CLI sees it and removes it.
        toml = tmp_path / "tpl.toml"
        toml.write_text(f'[factory]\nenable_template = true\ntemplate_path = "{base}/template"\n')
        assert f"template:   {t.key}" in await pykata_cli("--config", str(toml), "factory",
                                                          "status")
        assert "template removed" in await pykata_cli("--config", str(toml), "factory",
                                                      "destroy")
        assert factory.Factory(cfg).current() is None
    finally:
        for sb in sbs:
            await sb.stop()
        factory.Factory(cfg).destroy()
        shutil.rmtree(base, ignore_errors=True)


async def pykata_cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "pykata", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    return out.decode()
