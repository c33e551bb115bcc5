"""The OCI runtime contract through `pykata-runtime` on real VMs, beside runc
where runc defines the expected behaviour: spec versions, hooks, kill of a
stopped container, resource fields the guest kernel cannot apply, namespace
paths, bind-mount roots in mountinfo, device entries that are not host disks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pykata.testing.bundles import default_spec, make_bundle
from tests.integration.test_runtime_cli import RUNTIME, _cid, assert_clean, root, rootfs, rt

__all__ = ["root", "rootfs"]  # fixtures
pytestmark = pytest.mark.timeout(600)
RUNC = shutil.which("runc")


def _wait_stopped(runtime: list[str], cid: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        r = subprocess.run([*runtime, "state", cid], capture_output=True, text=True,
                           timeout=60, check=False)
        status = json.loads(r.stdout)["status"] if r.returncode == 0 else "gone"
        if status in ("stopped", "gone"):
            break
        time.sleep(0.2)
    return status


def contract_spec(tmp_path: Path, args: list[str]) -> dict[str, Any]:
    """ociVersion 1.3.0, v1-only resources, a bind of a directory, a device entry
    that is no host disk, and the four host hooks writing what they read."""
    spec = default_spec(args)
    spec["ociVersion"] = "1.3.0"
    spec["linux"]["resources"].update({
        "memory": {"limit": 128 << 20, "kernel": 64 << 20, "kernelTCP": 16 << 20},
        "blockIO": {"leafWeight": 300},
        "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]},
        "devices": [{"allow": True, "access": "rwm"}]})
    spec["linux"]["devices"] = [{"path": "/dev/test2", "type": "b", "major": 8, "minor": 666,
                                 "fileMode": 0o640, "uid": 5, "gid": 6}]
    data = tmp_path / "data-dir"
    data.mkdir(exist_ok=True)
    (data / "f").write_text("shared\n")
    spec["mounts"].append({"destination": "/mnt/data", "type": "bind", "source": str(data),
                           "options": ["rbind", "ro"]})
    log = tmp_path / "hooks.log"
    record = f"{{ echo \"$0\"; cat; echo; }} >> {log}"
    spec["hooks"] = {k: [{"path": "/bin/sh", "args": [k, "-c", record], "timeout": 30}]
                     for k in ("prestart", "createRuntime", "poststart", "poststop")}
    return spec


def _hook_log(tmp_path: Path) -> list[tuple[str, dict[str, Any]]]:
    lines = (tmp_path / "hooks.log").read_text().splitlines() \
        if (tmp_path / "hooks.log").exists() else []
    return [(lines[i], json.loads(lines[i + 1])) for i in range(0, len(lines) - 1, 2)]


def test_contract_on_pykata(root: Path, rootfs: Path, tmp_path: Path) -> None:
    script = ("stat -c '%t:%T %a %u:%g' /dev/test2; grep ' /mnt/data ' /proc/self/mountinfo;"
              " cat /mnt/data/f; sleep 300")
    bundle = make_bundle(tmp_path / "b", rootfs, contract_spec(tmp_path, ["sh", "-c", script]))
    cid = _cid()
    out, err = tmp_path / "out", tmp_path / "err"
    # The container's stdio is create's (the stand-in keeps it): files, not pipes.
    with out.open("w") as o, err.open("w") as e:
        rc = subprocess.run([RUNTIME, "--root", str(root), "create", "--bundle", str(bundle),
                             cid], stdin=subprocess.DEVNULL, stdout=o, stderr=e, timeout=300,
                            check=False).returncode
    assert rc == 0, err.read_text()
    try:
        st = json.loads(rt(root, "state", cid).stdout)
        hooks = _hook_log(tmp_path)
        assert [h for h, _ in hooks] == ["prestart", "createRuntime"]
        assert all(s["status"] == "creating" and s["id"] == cid and s["pid"] == st["pid"]
                   and s["bundle"] == str(bundle) for _, s in hooks)
        assert rt(root, "start", cid).returncode == 0
        assert [h for h, _ in _hook_log(tmp_path)][-1] == "poststart"
        deadline = time.monotonic() + 60
        while len(out.read_text().splitlines()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = out.read_text().splitlines()
        # The device node as given (8:666 is 8:29a in hex), mode 640, owner 5:6.
        assert lines[0] == "8:29a 640 5:6", lines
        # The bind's root in mountinfo ends with the source's name, as runc's does.
        assert lines[1].split()[3].endswith("/data-dir"), lines[1]
        assert lines[2] == "shared"
        assert rt(root, "kill", cid, "KILL").returncode == 0
        assert _wait_stopped([RUNTIME, "--root", str(root)], cid) == "stopped"
        again = rt(root, "kill", cid, "KILL")
        assert again.returncode == 1 and "container not running" in again.stderr
        assert rt(root, "kill", "--all", cid, "KILL").returncode == 0
        assert "cannot start a container that has stopped" in rt(root, "start", cid).stderr
    finally:
        d = rt(root, "delete", "--force", cid)
    assert d.returncode == 0, d.stderr
    name, st = _hook_log(tmp_path)[-1]
    assert name == "poststop" and st["status"] == "stopped" and st["id"] == cid
    assert_clean(root, cid)


@pytest.mark.skipif(RUNC is None, reason="runc is not installed")
def test_runc_defines_kill_of_a_stopped_container_and_device_nodes(rootfs: Path,
                                                                   tmp_path: Path) -> None:
    assert RUNC is not None
    spec = contract_spec(tmp_path, ["sh", "-c", "stat -c '%t:%T %a %u:%g' /dev/test2"])
    spec["ociVersion"] = "1.0.2"
    for v1 in ("blockIO", "network"):  # this host's v1 hierarchy has neither controller
        del spec["linux"]["resources"][v1]
    bundle = make_bundle(tmp_path / "b", rootfs, spec)
    runc = [RUNC, "--root", str(tmp_path / "runc")]
    cid = _cid()
    r = subprocess.run([*runc, "run", "--bundle", str(bundle), "--keep", cid],
                       capture_output=True, text=True, timeout=60, check=False)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "8:29a 640 5:6"
        k = subprocess.run([*runc, "kill", cid, "KILL"], capture_output=True, text=True,
                           timeout=30, check=False)
        assert k.returncode == 1 and "container not running" in k.stderr
    finally:
        subprocess.run([*runc, "delete", "--force", cid], capture_output=True, timeout=30,
                       check=False)
    assert [h for h, _ in _hook_log(tmp_path)] == ["prestart", "createRuntime", "poststart",
                                                   "poststop"]


@pytest.mark.parametrize("case,message", [
    ("version", "unsupported OCI spec version 9.0.0 (ociVersion)"),
    ("ns-type", "linux.namespaces[5].path /proc/self/ns/ipc is a ipc namespace, not cgroup"),
    ("host-ns", "joining a host namespace is not supported: linux.namespaces[2].path"
                " /proc/PID/ns/ipc (ipc)"),
    ("host-net", "the host's network namespace is not supported: linux.namespaces has no"
                 " network entry"),
    ("guest-hook", "hooks.createContainer runs in the container's namespaces"),
    ("prestart", "prestart hook failed: hooks.prestart[0] (/bin/sh) exited with status 3:"
                 " no way"),
])
def test_refusals_are_one_line_and_leave_nothing(root: Path, rootfs: Path, tmp_path: Path,
                                                 case: str, message: str) -> None:
    spec = default_spec(["true"])
    ns = spec["linux"]["namespaces"]
    host = subprocess.Popen(["sleep", "120"])  # a host process whose namespaces are named
    message = message.replace("PID", str(host.pid))
    if case == "version":
        spec["ociVersion"] = "9.0.0"
    elif case == "ns-type":
        ns[5] = {"type": "cgroup", "path": "/proc/self/ns/ipc"}
    elif case == "host-ns":
        ns[2] = {"type": "ipc", "path": f"/proc/{host.pid}/ns/ipc"}
    elif case == "host-net":
        spec["linux"]["namespaces"] = [n for n in ns if n["type"] != "network"]
    elif case == "guest-hook":
        spec["hooks"] = {"createContainer": [{"path": "/bin/true"}]}
    else:
        spec["hooks"] = {"prestart": [{"path": "/bin/sh",
                                       "args": ["sh", "-c", "echo no way; exit 3"]}]}
    bundle = make_bundle(tmp_path / "b", rootfs, spec)
    cid = _cid()
    try:
        r = rt(root, "run", "--bundle", str(bundle), cid)
    finally:
        host.kill()
        host.wait()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert_clean(root, cid)
