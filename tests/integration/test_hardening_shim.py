"""Issue 12, shim side, through a real containerd and `ctr`: shim sockets are
root-only, sandboxes are keyed by containerd's namespace, a signal-killed task's
status reaches containerd, and `shim delete` refuses ids it cannot trust."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

from pykata import config
from pykata.runtime.state import sandbox_dir
from pykata.shim.main import SOCKET_DIR
from pykata.testing.containerd import PrivateContainerd
from tests.integration.test_containerd import IMG, RT, cid, clean, ctd  # noqa: F401

SHIM = "containerd-shim-pykata-v2"


def test_shim_socket_is_root_only_and_state_is_keyed_by_namespace(
        ctd: PrivateContainerd, clean: None) -> None:  # noqa: F811
    c = cid()
    ctd.ctr("run", "-d", *RT, IMG, c, "sleep", "600")
    try:
        bundle = ctd.base / "state" / "io.containerd.runtime.v2.task" / ctd.namespace / c
        address = (bundle / "address").read_text().removeprefix("unix://")
        sock = Path(address)
        assert sock.parent == SOCKET_DIR
        d = os.lstat(SOCKET_DIR)
        assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == 0
        s = os.lstat(sock)
        assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == 0
        state = config.load().runtime.state_dir
        sb = sandbox_dir(state, c, ctd.namespace)
        assert sb.parent.name == ctd.namespace and (sb / "state.json").is_file()
        assert not sandbox_dir(state, c).exists()  # not in "default"
        # A signal-killed task: 128+9 in TaskExit and Delete (as with runc).
        ctd.ctr("task", "kill", "-s", "KILL", c)
        deadline = time.monotonic() + 60
        while "STOPPED" not in ctd.ctr("task", "ls").stdout.decode():
            assert time.monotonic() < deadline, "task did not stop on SIGKILL"
            time.sleep(0.2)
        r = ctd.ctr("task", "delete", c, check=False)
        assert r.returncode == 0 and b"exit code 137" in r.stderr, r
    finally:
        ctd.ctr("task", "delete", "-f", c, check=False)
        ctd.ctr("container", "delete", c, check=False)
    assert not sandbox_dir(config.load().runtime.state_dir, c, ctd.namespace).exists()


def _bundle(tmp_path: Path, sandbox_id: str) -> Path:
    b = tmp_path / f"b-{uuid.uuid4().hex[:6]}"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": sandbox_id}}))
    return b


def test_shim_delete_refuses_an_annotation_pointing_elsewhere(tmp_path: Path) -> None:
    """What containerd runs when a shim is gone, with a bundle whose sandbox-id
    annotation climbs out of the state directory: refused, nothing touched."""
    shim = shutil.which(SHIM) or SHIM
    victim = tmp_path / "victim"
    (victim / "shared" / "c1").mkdir(parents=True)
    (victim / "shared" / "c1" / "keep").write_text("x")
    state = Path(config.load().runtime.state_dir)
    climb = os.path.relpath(victim, state / "sbs" / "pktest")
    for bad in (climb, "x\n", "a/b", "\x1b[2Jforged"):
        r = subprocess.run([shim, "-namespace", "pktest", "-address", "/nonexistent.sock",
                            "-id", "c1", "-bundle", str(_bundle(tmp_path, bad)), "delete"],
                           capture_output=True, timeout=60, check=False)
        assert r.returncode != 0 and r.stdout == b"", r
        err = r.stderr.decode()
        assert err.count("\n") == 1 and "invalid sandbox id" in err and "\x1b" not in err
    assert (victim / "shared" / "c1" / "keep").read_text() == "x"
    # A namespace that climbs is refused too; a sound request still answers.
    r = subprocess.run([shim, "-namespace", "../..", "-address", "/nonexistent.sock",
                        "-id", "c1", "-bundle", str(_bundle(tmp_path, "pod1")), "delete"],
                       capture_output=True, timeout=60, check=False)
    assert r.returncode != 0 and b"invalid namespace id" in r.stderr
    r = subprocess.run([shim, "-namespace", "pktest", "-address", "/nonexistent.sock",
                        "-id", "c1", "-bundle", str(_bundle(tmp_path, "pod1")), "delete"],
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout, r.stderr
