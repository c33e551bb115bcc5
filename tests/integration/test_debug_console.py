"""Issue 18: the debug console (`pykata exec`) and the guest's log on the host
(the shim's log, `pykata logs`), on real VMs through a private containerd.

One pod runs with ``[agent] debug_console = true`` (given with
``--runtime-config-path``), one without: there the agent refuses DebugExec."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.runtime.state import sandbox_dir
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd, scratch_containerd
from pykata.testing.images import BUSYBOX_REF, oci_archive

IMG = BUSYBOX_REF
RT = ["--runtime", RUNTIME_TYPE]
PYKATA = [sys.executable, "-m", "pykata.cli.admin"]


@pytest.fixture(scope="module")
def ctd(rootfs: Path) -> Iterator[PrivateContainerd]:
    with scratch_containerd("pkdebug", oci_archive(
            rootfs, Path("/var/tmp/pykata-test/busybox.oci.tar"))) as c:
        yield c


def write_config(cfg: config.Config, path: Path, debug_console: bool) -> Path:
    cfg.agent.debug_console = debug_console
    try:
        path.write_text(config.to_toml(cfg))
    finally:
        cfg.agent.debug_console = False
    return path


@pytest.fixture(scope="module")
def configs(pykata_config: config.Config, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("debug-console")
    return (write_config(pykata_config, d / "on.toml", True),
            write_config(pykata_config, d / "off.toml", False))


@pytest.fixture(scope="module")
def pod_on(ctd: PrivateContainerd, configs: tuple[Path, Path],
           pykata_config: config.Config) -> Iterator[str]:
    yield from running(ctd, configs[0], pykata_config)


@pytest.fixture(scope="module")
def pod_off(ctd: PrivateContainerd, configs: tuple[Path, Path],
            pykata_config: config.Config) -> Iterator[str]:
    yield from running(ctd, configs[1], pykata_config)


def running(ctd: PrivateContainerd, cfg: Path, pykata_config: config.Config) -> Iterator[str]:
    c = f"d{uuid.uuid4().hex[:8]}"
    ctd.ctr("run", "-d", *RT, "--runtime-config-path", str(cfg), IMG, c, "sleep", "600")
    d = sandbox_dir(pykata_config.runtime.state_dir, c, ctd.namespace)
    try:
        yield c
    finally:
        ctd.ctr("task", "kill", "-s", "KILL", c, check=False)
        for _ in range(300):
            if b"STOPPED" in ctd.ctr("task", "ls", check=False).stdout or \
                    c.encode() not in ctd.ctr("task", "ls", check=False).stdout:
                break
            time.sleep(0.1)
        ctd.ctr("task", "delete", "-f", c, check=False)
        ctd.ctr("container", "delete", c, check=False)
    for _ in range(300):  # the sandbox directory (and its debug.sock) goes with the pod
        if not d.exists():
            break
        time.sleep(0.1)
    assert not d.exists(), f"left behind: {sorted(os.listdir(d))}"


def pykata(cfg: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PYKATA, "--config", str(cfg), *args], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


def test_exec_with_pipes_prints_and_exits_with_its_code(
        pod_on: str, configs: tuple[Path, Path]) -> None:
    r = pykata(configs[0], "exec", pod_on, "sh", "-c", "echo hi; echo oops >&2; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"hi\n" and r.stderr == b"oops\n"
    # Outside any container: the guest's own root (the agent is PID 1 there).
    r = pykata(configs[0], "exec", pod_on, "cat", "/proc/1/cmdline")
    assert r.returncode == 0 and b"python" in r.stdout, r


def test_exec_with_a_terminal_follows_resize(pod_on: str, configs: tuple[Path, Path]) -> None:
    """`pykata exec` in a local pty: raw mode, the guest pty is its terminal, a
    local resize (SIGWINCH) reaches the guest, the exit code comes back."""
    pid, master = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.execv(sys.executable, [*PYKATA, "--config", str(configs[0]), "exec", pod_on])
    try:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        out = b""

        def until(marker: bytes, limit: float = 120) -> None:
            nonlocal out
            deadline = time.monotonic() + limit
            while marker not in out and time.monotonic() < deadline:
                r, _, _ = select.select([master], [], [], 0.2)
                if r:
                    try:
                        out += os.read(master, 65536)
                    except OSError:
                        return
            assert marker in out, out[-2000:]

        until(b"# ")  # the guest shell's prompt
        # Markers the shell computes: a local echo (before raw mode) never matches.
        os.write(master, b"tty; stty size; echo M$((40+2))K\r")
        until(b"M42K\r\n")
        assert b"/dev/pts/" in out and b"30 100" in out, out
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 41, 123, 0, 0))
        # The SIGWINCH arrives asynchronously: ask until the guest has the new size.
        for i in range(50):
            os.write(master, b"stty size; echo R$((%d+1000))K\r" % i)
            until(b"R%dK\r\n" % (i + 1000))
            if b"41 123" in out:
                break
        assert b"41 123" in out, out
        os.write(master, b"exit 5\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 5, out
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(master)


def test_exec_is_refused_by_the_agent_without_debug_console(
        pod_off: str, configs: tuple[Path, Path]) -> None:
    # Asked with the configuration that says "on": the sandbox started without it,
    # and the agent (which was told at CreateSandbox) refuses.
    r = pykata(configs[0], "exec", pod_off, "sh", "-c", "echo should-not-run")
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b""
    assert err.count("\n") == 1 and "[agent] debug_console = true" in err, err


def test_guest_log_lines_reach_the_shim_log_and_pykata_logs(
        ctd: PrivateContainerd, pod_on: str, configs: tuple[Path, Path]) -> None:
    marker = f"guest-log-{uuid.uuid4().hex[:8]}"
    # A line on the guest console, written from inside the guest.
    r = pykata(configs[0], "exec", pod_on, "sh", "-c", f"echo {marker} > /dev/console")
    assert r.returncode == 0, r.stderr
    # The shim's log is containerd's (containerd copies the shim's log fifo).
    want = f"guest sandbox={pod_on}: "
    text = ""
    for _ in range(600):
        text = ctd.log.read_text(errors="replace")
        if f"{want}{marker}" in text:
            break
        time.sleep(0.1)
    lines = [ln for ln in text.splitlines() if want in ln]
    assert any(marker in ln for ln in lines), lines[-20:]
    assert any("pykata-agent" in ln for ln in lines), lines[:20]  # the agent's own lines
    r = pykata(configs[0], "logs", pod_on)
    out = r.stdout.decode()
    assert r.returncode == 0 and marker in out
    assert "pykata-agent" in out and "container engine:" in out, out[:3000]
    r = pykata(configs[0], "logs", "--tail", "1", f"{ctd.namespace}/{pod_on}")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    r = pykata(configs[0], "logs", "no-such-sandbox")
    assert r.returncode == 1 and b"no sandbox no-such-sandbox" in r.stderr


def test_cri_pod_debug_console_and_logs(pykata_config: config.Config, tmp_path: Path) -> None:
    """The same through containerd's CRI API: a pod whose shims were started with
    ``[agent] debug_console = true`` (PYKATA_CONFIG) answers `pykata exec` in its
    guest, and `pykata logs` prints its console; the sandbox directory goes with
    the pod."""
    from tests.integration.test_cri_pykata import Pod, cri_env

    cfg = write_config(pykata_config, tmp_path / "on.toml", True)
    with contextlib.contextmanager(cri_env)(pykata_config=cfg.read_text()) as env:
        pod = Pod(env)
        d = sandbox_dir(pykata_config.runtime.state_dir, pod.id, "k8s.io")
        try:
            r = pykata(cfg, "exec", f"k8s.io/{pod.id}", "sh", "-c", "echo in-guest; exit 4")
            assert (r.returncode, r.stdout) == (4, b"in-guest\n"), r.stderr
            r = pykata(cfg, "logs", "-n", "400", f"k8s.io/{pod.id}")
            assert r.returncode == 0 and b"pykata-agent" in r.stdout, r.stderr
        finally:
            left = pod.remove()
        assert not left, f"left behind: {left}"
        assert not d.exists()
