"""The OCI runtime contract through `pykata-runtime` on real VMs, beside runc
where runc defines the expected behaviour: spec versions, hooks (the host's four
and the two the guest runs), states and signals (kill, delete, start, pause in
each state), resource fields the guest kernel cannot apply, namespace paths,
bind-mount roots in mountinfo, device entries that are not host disks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import wire
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
    spec = contract_spec(tmp_path, ["sh", "-c", script])
    cid = _cid()
    # The two hooks the guest runs, from the container's root filesystem: they
    # write their state there (createContainer before pivot_root, from the VM's root).
    groot = f"{wire.GUEST_SHARED_DIR}/{cid}/rootfs"
    spec["hooks"]["createContainer"] = [{"path": "/bin/sh",
                                         "args": ["sh", "-c", f"cat > {groot}/cc.state"]}]
    spec["hooks"]["startContainer"] = [{"path": "/bin/sh",
                                        "args": ["sh", "-c", "cat > /sc.state"]}]
    bundle = make_bundle(tmp_path / "b", rootfs, spec)
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
    # The guest's hooks got the same state as the host's (the host's bundle and spec
    # version), with the container process's pid in its own pid namespace (as runc).
    for name, status in (("cc", "creating"), ("sc", "created")):
        assert json.loads((bundle / "rootfs" / f"{name}.state").read_text()) == {
            "ociVersion": "1.3.0", "id": cid, "status": status, "pid": 1,
            "bundle": str(bundle), "annotations": {}}


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
    ("guest-hook", "cannot create container ID: hooks.createContainer[0] (/usr/bin/hook):"
                   " not a file in the container's root filesystem (hooks run in the VM)"),
    ("prestart", "prestart hook failed: hooks.prestart[0] (/bin/sh) exited with status 3:"
                 " no way"),
    ("createRuntime", "createRuntime hook failed: hooks.createRuntime[0] (/bin/sh) exited"
                      " with status 4: nope"),
    ("startContainer", "cannot start container ID: hooks.startContainer[0] (/bin/sh): exited"
                       " with status 5: bad start"),
])
def test_refusals_are_one_line_and_leave_nothing(root: Path, rootfs: Path, tmp_path: Path,
                                                 case: str, message: str) -> None:
    spec = default_spec(["true"])
    ns = spec["linux"]["namespaces"]
    host = subprocess.Popen(["sleep", "120"])  # a host process whose namespaces are named
    cid = _cid()
    message = message.replace("PID", str(host.pid)).replace("ID", cid)
    if case == "version":
        spec["ociVersion"] = "9.0.0"
    elif case == "ns-type":
        ns[5] = {"type": "cgroup", "path": "/proc/self/ns/ipc"}
    elif case == "host-ns":
        ns[2] = {"type": "ipc", "path": f"/proc/{host.pid}/ns/ipc"}
    elif case == "host-net":
        spec["linux"]["namespaces"] = [n for n in ns if n["type"] != "network"]
    elif case == "guest-hook":  # a host binary: not in the VM
        spec["hooks"] = {"createContainer": [{"path": "/usr/bin/hook"}]}
    elif case == "prestart":
        spec["hooks"] = {"prestart": [{"path": "/bin/sh",
                                       "args": ["sh", "-c", "echo no way; exit 3"]}]}
    elif case == "createRuntime":
        spec["hooks"] = {"createRuntime": [{"path": "/bin/sh",
                                            "args": ["sh", "-c", "echo nope; exit 4"]}]}
    else:  # run: create succeeds, start fails, and run removes everything
        spec["hooks"] = {"startContainer": [{"path": "/bin/sh",
                                             "args": ["sh", "-c", "echo bad start; exit 5"]}]}
    bundle = make_bundle(tmp_path / "b", rootfs, spec)
    try:
        r = rt(root, "run", "--bundle", str(bundle), cid)
    finally:
        host.kill()
        host.wait()
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert_clean(root, cid)


# -- states and signals, as the runtime spec says and runc does ------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("runtime", ["pykata-runtime", "runc"])
def test_states_and_signals(root: Path, rootfs: Path, tmp_path: Path, runtime: str) -> None:
    """kill/delete of a created container, start of a running, paused or stopped
    one, pause/resume in each state, and what ``state`` says in each: the same
    outcome and words on pykata (each container in its VM) as on runc."""
    if runtime == "runc":
        if RUNC is None:
            pytest.skip("runc is not installed")
        cmd = [RUNC, "--root", str(tmp_path / "runc")]
    else:
        cmd = [RUNTIME, "--root", str(root)]
    bundle = make_bundle(tmp_path / "b", rootfs, default_spec(["sleep", "300"]))
    made: list[str] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL)

    def fails(words: str, *args: str) -> None:
        r = run(*args)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)

    def state(cid: str) -> dict[str, Any]:
        r = run("state", cid)
        assert r.returncode == 0, r.stderr
        st: dict[str, Any] = json.loads(r.stdout)
        return st

    def create() -> str:
        cid = _cid()
        made.append(cid)
        # The container's stdio is create's and stays held: files, not pipes.
        with (tmp_path / f"{cid}.out").open("w") as o:
            rc = subprocess.run([*cmd, "create", "--bundle", str(bundle), cid],
                                stdin=subprocess.DEVNULL, stdout=o, stderr=o, timeout=300,
                                check=False).returncode
        assert rc == 0, (tmp_path / f"{cid}.out").read_text()
        st = state(cid)
        assert st["status"] == "created" and st["pid"] > 0 and _alive(st["pid"])
        return cid

    def stopped(cid: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        st = state(cid)
        while st["status"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.2)
            st = state(cid)
        assert st["status"] == "stopped" and st["pid"] == 0, st
        return st

    try:
        # A created container: signalled, it ends (its process goes).
        c1 = create()
        pid = state(c1)["pid"]
        fails("container not paused", "resume", c1)
        if runtime == "runc":
            # runc also freezes a created container (pause is no OCI operation).
            assert run("pause", c1).returncode == 0 and state(c1)["status"] == "paused"
            assert run("resume", c1).returncode == 0 and state(c1)["status"] == "created"
        else:
            fails("container not running", "pause", c1)  # pykata pauses running ones only
        assert run("kill", c1, "TERM").returncode == 0
        stopped(c1)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid)
        assert run("delete", c1).returncode == 0
        # A created container can be deleted as it is: it is gone.
        c2 = create()
        assert run("delete", c2).returncode == 0
        fails("does not exist", "state", c2)
        # Running, paused, running again, stopped.
        c3 = create()
        assert run("start", c3).returncode == 0
        assert state(c3)["status"] == "running" and state(c3)["pid"] > 0
        fails("cannot start an already running container", "start", c3)
        fails("container not paused", "resume", c3)
        assert run("pause", c3).returncode == 0
        assert state(c3)["status"] == "paused"
        fails("cannot start a container in the paused state", "start", c3)
        fails("container not running", "pause", c3)
        fails("that is not stopped: paused", "delete", c3)
        assert run("resume", c3).returncode == 0
        assert state(c3)["status"] == "running"
        fails("that is not stopped: running", "delete", c3)
        assert run("kill", c3, "KILL").returncode == 0
        stopped(c3)
        fails("cannot start a container that has stopped", "start", c3)
        fails("container not running", "pause", c3)
        fails("container not running", "kill", c3, "TERM")
        assert run("delete", c3).returncode == 0
        fails("does not exist", "state", c3)
    finally:
        for cid in made:
            run("delete", "--force", cid)
    if runtime == "pykata-runtime":
        for cid in made:
            assert_clean(root, cid)
