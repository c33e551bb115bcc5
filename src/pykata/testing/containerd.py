"""A private containerd (own config, root, state and socket) with the pykata
runtime configured: for tests, the demo and benchmarks. Never touches a
system containerd."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pykata.utils.mounts import umount_all

RUNTIME_TYPE = "io.containerd.pykata.v2"


@dataclass
class PrivateContainerd:
    base: Path  # e.g. /run/pykata-demo
    root: Path  # persistent data (snapshots, content)
    namespace: str = "pykata"
    cri: bool = False
    sandbox_image: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    def config_text(self) -> str:
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.base}/state"',
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.socket}.ttrpc"',
            "[debug]",
            '  level = "info"',
            # Every deletion schedules a garbage collection: a removed container's
            # snapshot goes at once, not whenever the pause-time budget next allows
            # (on a loaded host that was over 30 s later, and a leak check counted it).
            '[plugins."io.containerd.gc.v1.scheduler"]',
            "  deletion_threshold = 1",
        ]
        if not self.cri:
            lines.insert(3, 'disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        else:
            cri = 'plugins."io.containerd.grpc.v1.cri"'
            lines += [
                f"[{cri}]",
                "  restrict_oom_score_adj = true",
                f'  sandbox_image = "{self.sandbox_image}"',
                f"[{cri}.containerd]",
                '  snapshotter = "overlayfs"',
                f"[{cri}.containerd.runtimes.pykata]",
                f'  runtime_type = "{RUNTIME_TYPE}"',
                "  privileged_without_host_devices = true",
                '  pod_annotations = ["io.katacontainers.*", "io.pykata.*"]',
                f"[{cri}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"[{cri}.cni]",
                '  bin_dir = "/usr/lib/cni"',
                f'  conf_dir = "{self.base}/cni"',
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> None:
        if not shutil.which("containerd"):
            raise RuntimeError("containerd is not installed: apt-get install containerd")
        self.base.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.base / "config.toml"
        cfg.write_text(self.config_text())
        env = dict(os.environ)
        # The shim of the checkout whose Python runs this (its venv's bin), then the
        # installed one: a test of one checkout never runs another checkout's shim.
        here = os.path.dirname(sys.executable)
        env["PATH"] = f"{here}:/usr/local/bin:" + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        env.update(self.env)
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log.read_text()[-2000:]}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("containerd did not come up in time")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        argv = ["ctr", "--address", str(self.socket), "--namespace", self.namespace, *args]
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=check,
                              input=input, stdin=None if input is not None else
                              subprocess.DEVNULL)

    def import_image(self, archive: Path) -> None:
        # A full reference name inside the archive: no --base-name (it would import nothing).
        self.ctr("images", "import", str(archive))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        umount_all(self.base)
        umount_all(self.root)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base / "state")


@contextlib.contextmanager
def scratch_containerd(namespace: str, archive: Path | None = None
                       ) -> Iterator[PrivateContainerd]:
    """A private containerd with a state and a root of its own (test runs side by
    side never share one), ``archive`` imported; at the end every task is killed
    and deleted, every container removed, containerd stopped and both
    directories removed."""
    tag = uuid.uuid4().hex[:6]
    c = PrivateContainerd(base=Path(f"/run/pykata-ctd-{tag}"),
                          root=Path(f"/var/lib/pykata-test/containerd-{tag}"),
                          namespace=namespace)
    c.start()
    try:
        if archive is not None:
            c.import_image(archive)
        yield c
    finally:
        for line in c.ctr("tasks", "ls", "-q", check=False).stdout.decode().split():
            c.ctr("tasks", "kill", "-s", "KILL", line, check=False)
            c.ctr("tasks", "delete", "-f", line, check=False)
        for line in c.ctr("containers", "ls", "-q", check=False).stdout.decode().split():
            c.ctr("containers", "delete", line, check=False)
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
        shutil.rmtree(c.base, ignore_errors=True)
