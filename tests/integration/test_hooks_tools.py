"""OCI hooks written by a test, run through the tools that hand them to a runtime:
podman (an OCI hooks directory, ``--hooks-dir``) and containerd (``ctr run
--config``: the spec's own ``hooks``), on pykata and on runc, which defines the
expected behaviour. A prestart hook writes the state it reads (its id and pid
are the container's), a poststop hook gets the state on stdin; nothing is left
after."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata import config
from pykata.testing import leftovers
from pykata.testing.bundles import default_spec, make_bundle
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd, scratch_containerd
from pykata.testing.images import BUSYBOX_REF
from tests.integration.test_runtime_cli import assert_clean, pm, podman, rootfs

__all__ = ["podman", "rootfs"]  # fixtures
pytestmark = pytest.mark.timeout(600)
RUNC = shutil.which("runc")


def _wait_for(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The JSON state a hook wrote to ``path`` (bounded wait: poststop runs after
    the tool deleted the container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = None  # still being written
            if isinstance(data, dict):
                return data
        time.sleep(0.2)
    raise AssertionError(f"no hook state in {path}")


def _record(out: Path, name: str) -> dict[str, Any]:
    """A hook entry that writes its state (stdin) and its pid's liveness to
    ``out``/``name``.json and ``name``.alive."""
    script = (f"cat > {out}/{name}.tmp; pid=$(sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p'"
              f" {out}/{name}.tmp); [ -n \"$pid\" ] && [ -d /proc/$pid ] &&"
              f" echo yes > {out}/{name}.alive; mv {out}/{name}.tmp {out}/{name}.json")
    return {"path": "/bin/sh", "args": ["sh", "-c", script]}


# -- podman ----------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["pykata-runtime", "runc"])
def test_podman_runs_hooks_from_a_hooks_dir(podman: list[str], tmp_path: Path,
                                            runtime: str) -> None:
    if runtime == "runc" and RUNC is None:
        pytest.skip("runc is not installed")
    hooks_dir, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks_dir.mkdir()
    out.mkdir()
    for stage in ("prestart", "poststop"):
        (hooks_dir / f"{stage}.json").write_text(json.dumps({
            "version": "1.0.0", "hook": _record(out, stage), "when": {"always": True},
            "stages": [stage]}))
    cmd = [*podman[:-1], runtime, "--hooks-dir", str(hooks_dir)]
    name = f"hk{uuid.uuid4().hex[:8]}"
    r = pm(cmd, "run", "-d", "--name", name, "--network", "none", BUSYBOX_REF, "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        pid = int(pm(cmd, "inspect", "--format", "{{.State.Pid}}", cid).stdout)
        pre = _wait_for(out / "prestart.json")
        assert pre["id"] == cid and pre["status"] == "creating" and pre["pid"] == pid
        assert (out / "prestart.alive").read_text() == "yes\n"  # the pid was a live process
        assert not (out / "poststop.json").exists()
    finally:
        rm = pm(cmd, "rm", "-f", "-t", "0", cid)
    assert rm.returncode == 0, rm.stderr
    post = _wait_for(out / "poststop.json")
    assert post["id"] == cid and post["status"] == "stopped"
    if runtime == "pykata-runtime":
        assert_clean(Path("/run/pykata-runtime"), cid)


# -- containerd ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctd() -> Iterator[PrivateContainerd]:
    with scratch_containerd("pkhooks") as c:
        yield c


@pytest.mark.parametrize("runtime", [RUNTIME_TYPE, "io.containerd.runc.v2"])
def test_containerd_runs_the_spec_hooks(ctd: PrivateContainerd, rootfs: Path, tmp_path: Path,
                                        runtime: str) -> None:
    if "runc" in runtime and RUNC is None:
        pytest.skip("runc is not installed")
    out = tmp_path / "out"
    out.mkdir()
    spec = default_spec(["sh", "-c", "echo from-the-container"])
    spec["hooks"] = {"prestart": [_record(out, "prestart")],
                     "poststop": [_record(out, "poststop")]}
    bundle = make_bundle(tmp_path / "b", rootfs, spec)
    spec["root"]["path"] = str(bundle / "rootfs")  # ctr --config: no snapshot, the spec's root
    conf = tmp_path / "spec.json"
    conf.write_text(json.dumps(spec))
    cid = f"hk{uuid.uuid4().hex[:8]}"
    try:
        r = ctd.ctr("run", "--rm", "--runtime", runtime, "--config", str(conf), cid,
                    check=False)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().strip() == "from-the-container"
    finally:
        ctd.ctr("tasks", "delete", "-f", cid, check=False)
        ctd.ctr("containers", "delete", cid, check=False)
    pre = _wait_for(out / "prestart.json")
    assert pre["id"] == cid and pre["status"] == "creating" and pre["pid"] > 0
    assert pre["bundle"].endswith(f"/{ctd.namespace}/{cid}")  # containerd's bundle
    assert (out / "prestart.alive").read_text() == "yes\n"
    post = _wait_for(out / "poststop.json")
    assert post["id"] == cid and post["status"] == "stopped" and post["bundle"] == pre["bundle"]
    if runtime == RUNTIME_TYPE:
        deadline = time.monotonic() + 15
        left = leftovers(config.load().runtime.state_dir, f"{ctd.namespace}/{cid}")
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = leftovers(config.load().runtime.state_dir, f"{ctd.namespace}/{cid}")
        assert not left, f"left behind: {left}"
    assert not os.path.exists(pre["bundle"])
