"""Issue 3 acceptance: containerd 1.6 (private instance) drives pykata's shim
through `ctr`, exactly as a user would."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd, scratch_containerd
from pykata.testing.images import BUSYBOX_REF, oci_archive
from pykata.testing.leaks import host_leftovers

IMG = BUSYBOX_REF
RT = ["--runtime", RUNTIME_TYPE]


def wait_clean(address: str, timeout: float = 30.0) -> list[str]:
    """What this module's containerd (``address``) left, waited for up to ``timeout``;
    pods of other containerds on the host (a soak beside the suite) do not count."""
    deadline = time.monotonic() + timeout
    left = host_leftovers(address=address)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = host_leftovers(address=address)
    return left


@pytest.fixture(scope="module")
def ctd(rootfs: Path) -> Iterator[PrivateContainerd]:
    with scratch_containerd("pktest", oci_archive(
            rootfs, Path("/var/tmp/pykata-test/busybox.oci.tar"))) as c:
        yield c


@pytest.fixture
def clean(ctd: PrivateContainerd) -> Iterator[None]:
    yield
    left = wait_clean(str(ctd.socket))
    assert not left, f"left behind: {left}"


def run_in_pty(argv: list[str], timeout: float = 120) -> tuple[int, bytes]:
    """Run a command with a pseudo-terminal as its stdio (ctr -t needs a real tty)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.2)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    return rc, out


def cid() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def test_run_rm_output_exit_code_and_guest_kernel(ctd: PrivateContainerd, clean: None) -> None:
    r = ctd.ctr("run", "--rm", *RT, IMG, cid(), "sh", "-c",
                "echo out; echo err >&2; cat /proc/version; exit 3", check=False)
    out = r.stdout.decode()
    assert r.returncode == 3, r.stderr.decode()
    # ctr without a tty gives stdout and stderr separately.
    assert out.splitlines()[0] == "out"
    assert b"err" in r.stderr
    version = out.splitlines()[1]
    assert version.startswith("Linux version") and platform.release() not in version


def test_large_output_is_complete(ctd: PrivateContainerd, clean: None) -> None:
    r = ctd.ctr("run", "--rm", *RT, IMG, cid(), "sh", "-c",
                "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done", check=False)
    lines = r.stdout.decode().splitlines()
    assert r.returncode == 0
    assert len(lines) == 20000 and lines[-1] == "line-19999"


def test_stdin_eof_propagates(ctd: PrivateContainerd, clean: None) -> None:
    r = ctd.ctr("run", "--rm", *RT, IMG, cid(), "sh", "-c", "cat; echo done",
                input=b"piped in\n", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"piped in\ndone\n"


def test_detached_exec_ps_pause_resume_metrics_kill_delete(
        ctd: PrivateContainerd, clean: None) -> None:
    c = cid()
    # As with runc, PID 1 of the container only sees SIGTERM if it handles it.
    ctd.ctr("run", "-d", *RT, IMG, c, "sh", "-c", "trap 'exit 143' TERM; sleep 600 & wait")
    try:
        r = ctd.ctr("task", "exec", "--exec-id", "e1", c, "sh", "-c", "echo exec-out; exit 5",
                    check=False)
        assert r.returncode == 5 and r.stdout == b"exec-out\n"
        # With a terminal (ctr allocates a pty locally when -t is given).
        rc, out = run_in_pty(["ctr", "--address", str(ctd.socket), "--namespace",
                              ctd.namespace, "task", "exec", "-t", "--exec-id", "e2", c, "sh",
                              "-c", "tty && echo has-tty"])
        assert rc == 0 and b"has-tty" in out and b"/dev/pts/" in out, out
        ps = ctd.ctr("task", "ps", c).stdout.decode()
        assert "PID" in ps and len(ps.strip().splitlines()) >= 2
        ctd.ctr("task", "pause", c)
        assert "PAUSED" in ctd.ctr("task", "ls").stdout.decode()
        ctd.ctr("task", "resume", c)
        assert "RUNNING" in ctd.ctr("task", "ls").stdout.decode()
        metrics = ctd.ctr("task", "metrics", "--format", "json", c).stdout.decode()
        data = json.loads(metrics)
        assert data["memory"]["usage"] > 0
        ctd.ctr("task", "kill", "-s", "SIGTERM", c)
        deadline = time.monotonic() + 60
        while "STOPPED" not in ctd.ctr("task", "ls").stdout.decode():
            assert time.monotonic() < deadline, "task did not stop on SIGTERM"
            time.sleep(0.2)
        ctd.ctr("task", "delete", c)
    finally:
        ctd.ctr("task", "delete", "-f", c, check=False)
        ctd.ctr("container", "delete", c, check=False)


def test_missing_binary_is_one_clear_error(ctd: PrivateContainerd, clean: None) -> None:
    c = cid()
    r = ctd.ctr("run", "--rm", *RT, IMG, c, "/no/such/binary", check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "/no/such/binary" in err
    ctd.ctr("container", "delete", c, check=False)


def test_missing_guest_image_names_file_and_fix(ctd: PrivateContainerd, clean: None,
                                                tmp_path: Path) -> None:
    cfg = tmp_path / "configuration.toml"
    cfg.write_text('[hypervisor.qemu]\nkernel = "/nonexistent/vmlinux"\n')
    c = cid()
    r = ctd.ctr("run", "--rm", *RT, "--runtime-config-path", str(cfg), IMG, c, "true",
                check=False)
    ctd.ctr("container", "delete", c, check=False)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "/nonexistent/vmlinux" in err and "pykata image build" in err


def test_shim_killed_then_delete_cleans_up(ctd: PrivateContainerd, clean: None) -> None:
    c = cid()
    ctd.ctr("run", "-d", *RT, IMG, c, "sleep", "600")
    shims = subprocess.run(["pgrep", "-f", f"pykata.shim .*-id {c}"], capture_output=True,
                           text=True, check=False).stdout.split()
    assert shims, "no shim process found"
    for pid in shims:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(1)
    ctd.ctr("task", "delete", "-f", c, check=False)
    ctd.ctr("container", "delete", c, check=False)
