"""`pykata-runtime`, the runc-compatible CLI: directly, under podman and Docker.

Real VMs, no mocks; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.bundles import default_spec, make_bundle
from pykata.testing.images import BUSYBOX_REF, oci_archive
from pykata.testing.leaks import processes_mentioning

CACHE = Path("/var/tmp/pykata-test")
RUNTIME = shutil.which("pykata-runtime") or "/usr/local/bin/pykata-runtime"
NAMES = ("qemu-system", "virtiofsd", "pykata.shim", "pykata.cli.standin")


def _procs(cid: str) -> list[str]:
    return processes_mentioning(cid, NAMES)


def assert_clean(root: Path, cid: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = _procs(cid) + leftovers(config.load().runtime.state_dir, cid)
        if (root / cid).exists():
            left.append(f"state dir {root / cid}")
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"left behind: {left}"


def rt(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RUNTIME, "--root", str(root), *args], capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@pytest.fixture()
def root() -> Iterator[Path]:
    r = Path(f"/run/pykata-rt-test-{uuid.uuid4().hex[:6]}")
    yield r
    if r.exists():
        for d in r.iterdir():
            rt(r, "delete", "--force", d.name, timeout=120)
        shutil.rmtree(r, ignore_errors=True)


@pytest.fixture(scope="module")
def rootfs() -> Path:
    return busybox_rootfs(CACHE / "busybox-rootfs")


def _cid() -> str:
    return f"rt{uuid.uuid4().hex[:10]}"


def test_run_prints_guest_kernel_and_exit_code(root: Path, rootfs: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", rootfs,
                         default_spec(["sh", "-c", "cat /proc/version; echo oops >&2; exit 4"]))
    cid = _cid()
    r = rt(root, "run", "--bundle", str(bundle), cid)
    assert r.returncode == 4, r.stderr
    assert "Linux version" in r.stdout
    assert os.uname().release not in r.stdout.split()[2]
    assert r.stderr.strip() == "oops"
    assert_clean(root, cid)


def test_lifecycle_create_start_state_kill_delete(root: Path, rootfs: Path,
                                                  tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", rootfs, default_spec(["sleep", "300"]))
    cid = _cid()
    pid_file = tmp_path / "pid"
    # As with runc, the container's stdio is create's: the stand-in keeps it open.
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        rc = subprocess.run([RUNTIME, "--root", str(root), "create", "--bundle", str(bundle),
                             "--pid-file", str(pid_file), cid], stdin=subprocess.DEVNULL,
                            stdout=o, stderr=e, timeout=180, check=False).returncode
    assert rc == 0, err.read_text()
    try:
        pid = int(pid_file.read_text())
        st = json.loads(rt(root, "state", cid).stdout)
        assert st["status"] == "created" and st["pid"] == pid and st["id"] == cid
        assert st["bundle"] == str(bundle)
        assert rt(root, "start", cid).returncode == 0
        assert json.loads(rt(root, "state", cid).stdout)["status"] == "running"
        lst = json.loads(rt(root, "list", "--format", "json").stdout)
        assert [s["id"] for s in lst] == [cid]
        ps = rt(root, "ps", "--format", "json", cid)
        assert ps.returncode == 0 and json.loads(ps.stdout), ps.stderr
        ex = rt(root, "exec", cid, "sh", "-c", "echo from-exec; exit 5")
        assert ex.returncode == 5 and ex.stdout.strip() == "from-exec", ex.stderr
        bad = rt(root, "delete", cid)
        assert bad.returncode != 0 and "not stopped" in bad.stderr
        assert rt(root, "kill", cid, "KILL").returncode == 0
        deadline = time.monotonic() + 30
        status = ""
        while time.monotonic() < deadline:
            status = json.loads(rt(root, "state", cid).stdout)["status"]
            if status == "stopped":
                break
            time.sleep(0.2)
        assert status == "stopped"
        assert rt(root, "kill", cid, "TERM").returncode != 0  # not running any more
    finally:
        d = rt(root, "delete", cid)
    assert d.returncode == 0, d.stderr
    assert_clean(root, cid)
    gone = rt(root, "state", cid)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


@pytest.mark.parametrize("case", ["no-config", "bad-json", "no-rootfs", "no-args",
                                  "unknown-command"])
def test_bad_bundle_one_line_nothing_left(root: Path, rootfs: Path, tmp_path: Path,
                                          case: str) -> None:
    bundle = make_bundle(tmp_path / "b", rootfs, default_spec(["true"]))
    cid = _cid()
    args = ["run", "--bundle", str(bundle), cid]
    if case == "no-config":
        (bundle / "config.json").unlink()
    elif case == "bad-json":
        (bundle / "config.json").write_text("{not json")
    elif case == "no-rootfs":
        shutil.rmtree(bundle / "rootfs")
    elif case == "no-args":
        spec = default_spec(["true"])
        spec["process"]["args"] = []
        (bundle / "config.json").write_text(json.dumps(spec))
    else:
        args = ["frobnicate", cid]
    log = tmp_path / "log.json"
    r = rt(root, "--log", str(log), "--log-format", "json", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykata-runtime: "), r.stderr
    assert json.loads(log.read_text().splitlines()[-1])["level"] == "error"
    assert_clean(root, cid, timeout=2)


def test_signal_and_spec_and_features(tmp_path: Path) -> None:
    from pykata.cli.runtime import parse_signal

    assert parse_signal("TERM") == parse_signal("SIGTERM") == parse_signal("15") == 15
    assert parse_signal("kill") == 9
    r = subprocess.run([RUNTIME, "spec", "--bundle", str(tmp_path)], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0
    assert json.loads((tmp_path / "config.json").read_text())["process"]["args"]
    f = subprocess.run([RUNTIME, "features"], capture_output=True, text=True, timeout=30,
                       check=False)
    assert json.loads(f.stdout)["ociVersionMax"]


# -- podman -----------------------------------------------------------------------------------
PODMAN_ROOT = Path("/var/lib/pykata-podman-test")
PODMAN_RUNROOT = Path("/run/pykata-podman-test")


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    tmp = tmp_path_factory.mktemp("podman")
    conf = tmp / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'[engine.runtimes]\npykata-runtime = ["{RUNTIME}"]\n')
    os.environ["CONTAINERS_CONF"] = str(conf)
    cmd = ["podman", "--root", str(PODMAN_ROOT / "storage"), "--runroot",
           str(PODMAN_RUNROOT / "run"), "--tmpdir", str(PODMAN_RUNROOT / "tmp"),
           "--runtime", "pykata-runtime"]
    archive = oci_archive(CACHE / "busybox-rootfs", tmp / "img.tar")
    subprocess.run([*cmd, "load", "-i", str(archive)], check=True, capture_output=True,
                   timeout=120)
    yield cmd
    subprocess.run([*cmd, "rm", "-a", "-f"], capture_output=True, timeout=180, check=False)
    os.environ.pop("CONTAINERS_CONF", None)


def pm(cmd: list[str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


def test_podman_run_rm(podman: list[str], rootfs: Path) -> None:
    r = pm(podman, "run", "--rm", "--network", "none", BUSYBOX_REF, "sh", "-c",
           "cat /proc/version; exit 4")
    assert r.returncode == 4, r.stderr
    assert "Linux version" in r.stdout and os.uname().release not in r.stdout.split()[2]


def test_podman_detached_exec_logs_stop_rm(podman: list[str]) -> None:
    r = pm(podman, "run", "-d", "--network", "none", BUSYBOX_REF, "sh", "-c",
           "echo hello; trap 'exit 7' TERM; while true; do sleep 1; done")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        ps = pm(podman, "ps", "--format", "{{.ID}} {{.Status}}")
        assert cid[:12] in ps.stdout and "Up" in ps.stdout
        ex = pm(podman, "exec", cid, "sh", "-c", "echo in-exec; exit 3")
        assert ex.returncode == 3 and ex.stdout.strip() == "in-exec", ex.stderr
        tty = subprocess.run(["script", "-qec", " ".join([*podman, "exec", "-it", cid, "tty"]),
                              "/dev/null"], capture_output=True, text=True, timeout=120,
                             check=False, stdin=subprocess.DEVNULL)
        assert "/dev/pts/" in tty.stdout, tty.stdout + tty.stderr
        assert "hello" in pm(podman, "logs", cid).stdout
        st = pm(podman, "stop", "-t", "20", cid)
        assert st.returncode == 0, st.stderr
        insp = pm(podman, "inspect", "--format", "{{.State.ExitCode}}", cid)
        assert insp.stdout.strip() == "7"
    finally:
        rm = pm(podman, "rm", "-f", cid)
    assert rm.returncode == 0, rm.stderr
    assert_clean(Path("/run/pykata-runtime"), cid)


def test_podman_kill(podman: list[str]) -> None:
    r = pm(podman, "run", "-d", "--network", "none", BUSYBOX_REF, "sleep", "300")
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        assert pm(podman, "kill", cid).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "exited" in pm(podman, "inspect", "--format", "{{.State.Status}}", cid).stdout:
                break
            time.sleep(0.3)
        assert "exited" in pm(podman, "inspect", "--format", "{{.State.Status}}", cid).stdout
    finally:
        pm(podman, "rm", "-f", cid)
    assert_clean(Path("/run/pykata-runtime"), cid)
