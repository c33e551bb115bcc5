"""Issue 12: a guest that owns its kernel cannot reach the host through the
shared tree. The attack runs on a real VM (hostile_scenario.py), inside a private
mount namespace so that a regression cannot unmount or write the machine's files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykata import config

HERE = Path(__file__).parent



def test_hostile_guest_cannot_reshape_the_shared_tree(
        pykata_config: config.Config, rootfs: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable,
         str(HERE / "hostile_scenario.py"), pykata_config.runtime.state_dir, str(rootfs),
         str(tmp_path)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(
            Path(config.__file__).parents[1])})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    guest = r["guest"].splitlines()
    assert guest[-1] == "DONE", r["guest"]
    assert "MOUNTFAIL" not in r["guest"]
    verdicts = [ln for ln in guest if ln.startswith(("ALLOWED", "denied"))]
    assert len(verdicts) == 12, r["guest"]
    # Every attempt on the tree the host walks, or on a read-only volume, failed.
    denied = [ln for ln in verdicts if ln.startswith("denied")]
    assert len(denied) == 9, r["guest"]
    assert all(ln.startswith("ALLOWED") for ln in verdicts[-3:]), r["guest"]
    # The host: read-only volume intact, nothing mounted or written elsewhere,
    # the container trees and then the whole sandbox directory gone.
    assert r["secret"] == "host secret" and r["ro_listing"] == ["secret"]
    assert r["mounts_changed"] == []
    assert {d: ch for d, ch in r["files_changed"].items() if d != str(tmp_path)} == {
        d: [] for d in r["files_changed"] if d != str(tmp_path)}
    assert r["tree_after_delete"] == []
    assert all(p.endswith(("/mounts", "/shared")) for p in r["host_mounts_after_delete"])
    assert r["sandbox_dir_left"] is False


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "-x", "x" * 129, "a\nb", "abc\n", ".."])
def test_bad_ids_and_namespaces_are_refused(pykata_config: config.Config, bad: str) -> None:
    from pykata import errors
    from pykata.runtime.sandbox import Sandbox

    with pytest.raises(errors.InvalidArgument):
        Sandbox(bad, pykata_config)
    with pytest.raises(errors.InvalidArgument):
        Sandbox("ok", pykata_config, namespace=bad)
