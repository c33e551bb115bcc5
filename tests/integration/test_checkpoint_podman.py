"""Issue 20 through podman 4.3: ``podman container checkpoint|restore`` with
``--runtime pykata-runtime``, on real VMs (docs/checkpoint-design.md §2, §6.8
item 6).

The pod's VM has no shared file system (``shared_fs = "none"``,
``[runtime] checkpointable``) and its image is pulled in the guest from a
registry in a network namespace the test made, reached only from the
container's network namespace (``--network ns:<path>``, made by the test):

- podman's /etc/hosts, /etc/hostname and /run/.containerenv binds reach the
  container as copies (the guest has no view of the host's files);
- a shell counting in memory (a token drawn once and a counter) is
  checkpointed with ``--leave-running`` (the same shell runs on), then
  without: it stops (podman says exited, checkpointed) and nothing of its VM
  is left; ``podman container restore`` brings the same shell back (same
  token, the counter goes on from where it was) and ``podman ps`` shows it
  up, although podman deleted the checkpoint directory right after the
  restore; an exported checkpoint (``--export``) of the restored container,
  removed, comes back with ``restore --import`` (imported under another
  name, i.e. another id, it is refused in one line);
- a default (virtio-fs) container's checkpoint is refused in one line and it
  keeps running;
- nothing is left: no keeper, VM, stand-in or state directory.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykata import config
from pykata.runtime.container import GUEST_PULL_IMAGE_ANNOTATION
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.images import BUSYBOX_REF, oci_archive
from pykata.testing.leaks import processes_mentioning
from tests.integration.test_guest_pull import (  # noqa: F401 (fixtures)
    CACHE,
    Net,
    Registry,
    base_layer,
    net,
    registry,
)

pytestmark = pytest.mark.timeout(2400)

RUNTIME = shutil.which("pykata-runtime") or "/usr/local/bin/pykata-runtime"
RT_ROOT = Path("/run/pykata-runtime")  # podman passes no --root
RT_NAMESPACE = "pykata-runtime"
PODMAN_ROOT = Path("/var/lib/pykata-podman-ck")
PODMAN_RUNROOT = Path("/run/pykata-podman-ck")
NAMES = ("qemu-system", "virtiofsd", "pykata.shim", "pykata.cli.standin")
# Counts in memory: a token drawn once at start and a counter, written out every
# 0.2 s. A restarted shell would draw another token and count from 1.
LOOP = ("t=$(cat /proc/sys/kernel/random/uuid); i=0;"
        " while :; do i=$((i+1)); echo \"$t $i\" > /tmp/n; sleep 0.2; done")
READS = 600  # attempts at reading the counter before giving up
SLOW = 1200.0  # seconds a podman command may take (TCG VMs on a shared machine)


@dataclass
class Podman:
    base: list[str]
    conf_dir: Path

    def conf(self, cfg: config.Config, name: str) -> Path:
        """A containers.conf whose conmon (and so the runtime it starts, and
        its keeper) gets PYKATA_CONFIG naming ``cfg``."""
        cfg_file = self.conf_dir / f"{name}.toml"
        cfg_file.write_text(config.to_toml(cfg))
        conf = self.conf_dir / f"{name}.conf"
        conf.write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'conmon_env_vars = ["PYKATA_CONFIG={cfg_file}"]\n'
            f'[engine.runtimes]\npykata-runtime = ["{RUNTIME}"]\n')
        return conf

    def __call__(self, conf: Path, *args: str,
                 timeout: float = SLOW) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        env.pop(config.ENV_VAR, None)  # the runtime gets its configuration from conmon
        return subprocess.run([*self.base, *args], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    for tool in ("podman", "conmon", "criu"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is needed (podman refuses checkpoints without criu):"
                        " run 'make setup'")
    tmp = tmp_path_factory.mktemp("podman-ck")
    pm = Podman(["podman", "--root", str(PODMAN_ROOT / "storage"), "--runroot",
                 str(PODMAN_RUNROOT / "run"), "--tmpdir", str(PODMAN_RUNROOT / "tmp"),
                 "--runtime", RUNTIME], tmp)
    conf = pm.conf(config.load(), "load")
    archive = oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"), tmp / "img.tar")
    r = pm(conf, "load", "-i", str(archive), timeout=300)
    assert r.returncode == 0, r.stderr
    yield pm
    pm(conf, "rm", "-a", "-f")


def count_at_least(pm: Podman, conf: Path, cid: str, least: int) -> tuple[str, int]:
    """(token, counter) of the shell once its counter reached ``least``."""
    last = ""
    for _ in range(READS):
        r = pm(conf, "exec", cid, "cat", "/tmp/n", timeout=300)
        last = r.stdout or r.stderr
        parts = r.stdout.split()
        if r.returncode == 0 and len(parts) == 2 and int(parts[1]) >= least:
            return parts[0], int(parts[1])
        time.sleep(0.2)
    raise AssertionError(f"the counter of {cid} did not reach {least}: {last!r}")


def status(pm: Podman, conf: Path, cid: str, what: str = "{{.State.Status}}") -> str:
    return pm(conf, "inspect", "--format", what, cid, timeout=120).stdout.strip()


def running_ids(pm: Podman, conf: Path) -> list[str]:
    return pm(conf, "ps", "--no-trunc", "--format", "{{.ID}}", timeout=120).stdout.split()


def gone(state_dir: str, cid: str, timeout: float = 60.0) -> list[str]:
    """What is left of container ``cid``'s keeper, VM and state (waits a little
    for processes on their way out)."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(cid, NAMES) + leftovers(state_dir, f"{RT_NAMESPACE}/{cid}")
        if (RT_ROOT / cid).exists():
            left.append(f"runtime state {RT_ROOT / cid}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def checkpointable(cfg: config.Config, registry: Registry) -> config.Config:  # noqa: F811
    out = copy.deepcopy(cfg)
    out.vm.shared_fs = "none"
    out.runtime.checkpointable = True
    out.guest_pull.plain_http_registries = [registry.host]
    out.guest_pull.storage_mib = 128
    out.runtime.create_container_timeout = 600  # a pull under TCG on a busy machine
    return out


def test_podman_checkpoint_and_restore(
        podman: Podman, pykata_config: config.Config, registry: Registry,  # noqa: F811
        base_layer: bytes, net: Net, tmp_path: Path) -> None:  # noqa: F811
    cfg = checkpointable(pykata_config, registry)
    conf = podman.conf(cfg, "ck")
    registry.image("ck/podman", "v1", [base_layer])
    image = f"{registry.host}/ck/podman:v1"
    name = f"pkck{uuid.uuid4().hex[:6]}"
    r = podman(conf, "run", "-d", "--name", name, "--network", f"ns:/run/netns/{net.pod_ns}",
               "--annotation", f"{GUEST_PULL_IMAGE_ANNOTATION}={image}", BUSYBOX_REF,
               "sh", "-c", LOOP)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        token, _ = count_at_least(podman, conf, cid, 3)
        # podman's file binds reached the container as copies.
        userdata = Path(status(podman, conf, cid, "{{.StaticDir}}"))
        hosts = Path(status(podman, conf, cid, "{{.HostsPath}}"))
        for dest, host in (("/etc/hostname", Path(status(podman, conf, cid,
                                                         "{{.HostnamePath}}"))),
                           ("/etc/hosts", hosts),
                           ("/run/.containerenv", hosts.parent / ".containerenv")):
            ex = podman(conf, "exec", cid, "cat", dest, timeout=300)
            assert ex.returncode == 0, ex.stderr
            assert ex.stdout == host.read_text(), dest

        # --leave-running: the same shell runs on.
        _, before = count_at_least(podman, conf, cid, 1)
        r = podman(conf, "container", "checkpoint", "--leave-running", cid)
        assert r.returncode == 0, r.stderr
        assert status(podman, conf, cid) == "running"
        t1, _ = count_at_least(podman, conf, cid, before + 1)
        assert t1 == token

        # Without: the container stops, its VM goes.
        _, before = count_at_least(podman, conf, cid, 1)
        r = podman(conf, "container", "checkpoint", cid)
        assert r.returncode == 0, r.stderr
        assert status(podman, conf, cid) == "exited"
        assert status(podman, conf, cid, "{{.State.Checkpointed}}") == "true"
        assert cid not in running_ids(podman, conf)
        assert gone(cfg.runtime.state_dir, cid) == []

        r = podman(conf, "container", "restore", cid)
        assert r.returncode == 0, r.stderr
        assert status(podman, conf, cid) == "running"
        assert cid in running_ids(podman, conf)
        # podman removed the checkpoint directory (no --keep): the VM does not need it.
        assert not (userdata / "checkpoint").exists()
        t2, n2 = count_at_least(podman, conf, cid, before)
        assert t2 == token, "the shell was started again instead of restored"
        t3, _ = count_at_least(podman, conf, cid, n2 + 1)
        assert t3 == token

        # Exported, removed, imported: the same shell again.
        export = tmp_path / "ck.tar.gz"
        _, before = count_at_least(podman, conf, cid, 1)
        r = podman(conf, "container", "checkpoint", "--export", str(export), cid)
        assert r.returncode == 0, r.stderr
        assert podman(conf, "rm", cid).returncode == 0
        assert gone(cfg.runtime.state_dir, cid) == []
        # Imported under another name, podman gives it another id: refused in one
        # line before any VM starts, nothing left.
        other = f"{name}-other"
        r = podman(conf, "container", "restore", "--import", str(export), "--name", other)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if "cannot restore checkpoint" in ln]
        assert len(lines) == 1, r.stderr
        assert f"cannot restore checkpoint of sandbox {cid} as sandbox " in lines[0]
        assert "restore it under the same id" in lines[0]
        oid = status(podman, conf, other, "{{.Id}}")
        podman(conf, "rm", "-f", other)
        if oid:
            assert gone(cfg.runtime.state_dir, oid) == []
        r = podman(conf, "container", "restore", "--import", str(export))
        assert r.returncode == 0, r.stderr
        assert status(podman, conf, cid) == "running"
        t4, n4 = count_at_least(podman, conf, cid, before)
        assert t4 == token
        count_at_least(podman, conf, cid, n4 + 1)
    finally:
        rm = podman(conf, "rm", "-f", cid)
    assert rm.returncode == 0, rm.stderr
    assert gone(cfg.runtime.state_dir, cid) == []


def test_podman_checkpoint_of_a_virtio_fs_container_is_refused(
        podman: Podman, pykata_config: config.Config) -> None:
    assert pykata_config.vm.shared_fs == "virtio-fs"
    conf = podman.conf(pykata_config, "vfs")
    r = podman(conf, "run", "-d", "--network", "none", BUSYBOX_REF, "sh", "-c", LOOP)
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    try:
        token, n0 = count_at_least(podman, conf, cid, 1)
        r = podman(conf, "container", "checkpoint", cid)
        assert r.returncode != 0
        lines = [ln for ln in r.stderr.splitlines() if "cannot checkpoint" in ln]
        assert len(lines) == 1, r.stderr
        assert (f"cannot checkpoint sandbox {cid}: its VM has a virtio-fs device (QEMU 7.2"
                " cannot save vhost-user-fs)") in lines[0]
        assert status(podman, conf, cid) == "running"
        t1, _ = count_at_least(podman, conf, cid, n0 + 1)
        assert t1 == token
        ckdir = Path(status(podman, conf, cid, "{{.StaticDir}}"))
        assert not (ckdir / "checkpoint" / "inventory.img").exists()
    finally:
        rm = podman(conf, "rm", "-f", cid)
    assert rm.returncode == 0, rm.stderr
    assert gone(pykata_config.runtime.state_dir, cid) == []


def test_podman_probe_sees_checkpoint_support() -> None:
    """podman's CRRuntimeSupportsCheckpointRestore: ``checkpoint --help`` exits 0."""
    r = subprocess.run([RUNTIME, "checkpoint", "--help"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0 and "--leave-running" in r.stdout, r.stderr
    assert json.loads(subprocess.run([RUNTIME, "features"], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)["ociVersionMax"]
