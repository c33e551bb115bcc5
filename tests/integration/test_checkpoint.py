"""Issue 20 acceptance: checkpoint and restore a pod through containerd 1.6 (ctr),
on real VMs (docs/checkpoint-design.md §6.8).

- A pod whose VM has a virtio-fs device (the default) is refused: ``ctr c
  checkpoint --task`` fails with the one-line virtio-fs message, no checkpoint
  image appears, and the task keeps running (its counter goes on).
- A pod with ``shared_fs = "none"``, ``[runtime] checkpointable`` and its image
  pulled in the guest (from a registry in a namespace the test made, reached
  only from the pod's netns): a shell counting in memory is checkpointed (the
  original runs on), killed and removed, then restored with ``ctr c restore
  --live``: the same shell (the token it drew at start, kept only in its
  memory) goes on counting from where it was, and a file written in the
  writable layer is still there; a TCP connection between two processes of the
  pod carries on (the numbers the server received stay consecutive and go on
  growing); the pod keeps its IP in the same network namespace and answers a
  ping from the registry's; the content store holds the checkpoint blob of
  containerd's criu media type; the restored pod can be checkpointed again;
  nothing is left. The first checkpoint, its
  manifest made to name another guest image, is refused in one line and
  leaves nothing.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pykata import config
from pykata.runtime.container import GUEST_PULL_IMAGE_ANNOTATION
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd, scratch_containerd
from pykata.testing.images import oci_archive
from tests.integration.test_guest_pull import (  # noqa: F401 (fixtures)
    CACHE,
    Net,
    Registry,
    base_layer,
    net,
    registry,
)

pytestmark = pytest.mark.timeout(1500)

NS = "ck"
REF = "docker.io/pykata/busybox-ck:v1"  # containerd's image of the container (ctr needs one)
CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
# Counts in memory: a token drawn once at start and a counter, written out every
# 0.2 s. A restarted shell would draw another token and count from 1.
LOOP = ("t=$(cat /proc/sys/kernel/random/uuid); i=0;"
        " while :; do i=$((i+1)); echo \"$t $i\" > /tmp/n; sleep 0.2; done")
# The counting shell, and a TCP connection inside the pod: nc's server writes
# the consecutive numbers its client sends, one every 0.2 s, to /tmp/tcp (its
# stdin never ends: busybox nc stops at the end of its input).
POD = ("sleep 1000000 | nc -l -p 7000 > /tmp/tcp &"
       " while ! netstat -ltn | grep -q :7000; do sleep 0.1; done;"
       " (j=0; while :; do j=$((j+1)); echo $j; sleep 0.2; done) | nc 127.0.0.1 7000 & "
       + LOOP)
READS = 600  # attempts at reading the counter before giving up


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return oci_archive(busybox_rootfs(CACHE / "busybox-rootfs"), tmp_path / "bb.tar", ref=REF)


def execute(ctd: PrivateContainerd, cid: str, *argv: str) -> tuple[int, str, str]:
    r = ctd.ctr("tasks", "exec", "--exec-id", f"x{uuid.uuid4().hex[:8]}", cid, *argv,
                check=False, timeout=600)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def count_at_least(ctd: PrivateContainerd, cid: str, least: int) -> tuple[str, int]:
    """(token, counter) of the shell once its counter reached ``least``."""
    last = ""
    for _ in range(READS):
        rc, out, err = execute(ctd, cid, "cat", "/tmp/n")
        last = out or err
        parts = out.split()
        if rc == 0 and len(parts) == 2 and int(parts[1]) >= least:
            return parts[0], int(parts[1])
        time.sleep(0.2)
    raise AssertionError(f"the counter of {cid} did not reach {least}: {last!r}")


def tcp_at_least(ctd: PrivateContainerd, cid: str, least: int) -> int:
    """The last number the pod's TCP server received, once at least ``least``;
    every number before it arrived, once and in order."""
    last = ""
    for _ in range(READS):
        rc, out, err = execute(ctd, cid, "cat", "/tmp/tcp")
        last = (out or err)[-200:]
        got = out[:out.rfind("\n") + 1].split()  # whole lines only
        if rc == 0 and got and int(got[-1]) >= least:
            assert got == [str(i) for i in range(1, len(got) + 1)], \
                f"numbers lost or repeated: {out[-200:]!r}"
            return len(got)
        time.sleep(0.2)
    raise AssertionError(f"the TCP server of {cid} did not reach {least}: {last!r}")


def status(ctd: PrivateContainerd, cid: str) -> str:
    for line in ctd.ctr("tasks", "ls").stdout.decode().splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return f[-1]
    return ""


def write_config(cfg: config.Config, path: Path) -> Path:
    path.write_text(config.to_toml(cfg))
    return path


def test_a_virtio_fs_pod_is_refused_and_keeps_running(pykata_config: config.Config,
                                                      archive: Path, tmp_path: Path) -> None:
    assert pykata_config.vm.shared_fs == "virtio-fs"
    cfg_file = write_config(pykata_config, tmp_path / "configuration.toml")
    cid = f"ckv{uuid.uuid4().hex[:6]}"
    with scratch_containerd(NS, archive) as ctd:
        ctd.ctr("run", "-d", "--runtime", RUNTIME_TYPE, "--runtime-config-path",
                str(cfg_file), REF, cid, "sh", "-c", LOOP, timeout=600)
        token, n0 = count_at_least(ctd, cid, 1)
        r = ctd.ctr("containers", "checkpoint", "--task", cid, f"ck/{cid}:1", check=False,
                    timeout=600)
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0, err
        lines = [ln for ln in err.splitlines() if "cannot checkpoint" in ln]
        assert len(lines) == 1, err
        assert (f"cannot checkpoint sandbox {cid}: its VM has a virtio-fs device (QEMU 7.2"
                " cannot save vhost-user-fs); use shared_fs = \"none\" with guest-pulled"
                " images") in lines[0]
        # ctr paused the task around the attempt: it runs again, the same shell counting.
        assert status(ctd, cid) == "RUNNING"
        token2, _ = count_at_least(ctd, cid, n0 + 1)
        assert token2 == token
        assert f"ck/{cid}" not in ctd.ctr("images", "ls", "-q").stdout.decode()
        ctd.ctr("tasks", "kill", "-s", "KILL", cid)
    assert not leftovers(pykata_config.runtime.state_dir, f"{NS}/{cid}")


def checkpoint_index(ctd: PrivateContainerd, ref: str) -> list[dict[str, str]]:
    """The descriptors the checkpoint image ``ref`` (an OCI index) holds."""
    for line in ctd.ctr("images", "ls").stdout.decode().splitlines()[1:]:
        f = line.split()
        if f and f[0] == ref:
            return list(json.loads(ctd.ctr("content", "get", f[2]).stdout)["manifests"])
    raise AssertionError(f"no image {ref}: {ctd.ctr('images', 'ls').stdout.decode()}")


def checkpoint_media_types(ctd: PrivateContainerd, ref: str) -> list[str]:
    return [str(d.get("mediaType")) for d in checkpoint_index(ctd, ref)]


def tamper_guest_image(ctd: PrivateContainerd, ref: str, fake: str) -> str:
    """Rewrite, in place and at the same length, the guest image digest in the
    manifest inside the checkpoint's tar blob (containerd reads blobs back
    without checking them): the digest it had."""
    (desc,) = [d for d in checkpoint_index(ctd, ref) if d["mediaType"] == CRIU_TAR]
    blob = ctd.root / "io.containerd.content.v1.content/blobs/sha256" / desc["digest"][7:]
    data = blob.read_bytes()
    m = re.search(rb'"guest_image": \{\s*"digest": "([0-9a-f]{16})"', data)
    assert m, "no guest image digest in the checkpoint's manifest"
    real = m.group(1)
    blob.write_bytes(data[:m.start(1)] + fake.encode() + data[m.end(1):])
    return real.decode()


def test_a_counting_shell_survives_checkpoint_and_restore(
        pykata_config: config.Config, registry: Registry, base_layer: bytes,  # noqa: F811
        net: Net, archive: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = copy.deepcopy(pykata_config)
    cfg.vm.shared_fs = "none"
    cfg.runtime.checkpointable = True
    cfg.guest_pull.plain_http_registries = [registry.host]
    cfg.guest_pull.storage_mib = 128
    cfg.runtime.create_container_timeout = 600  # a pull under TCG on a busy machine
    cfg_file = write_config(cfg, tmp_path / "configuration.toml")
    registry.image("ck/count", "v1", [base_layer])
    image = f"{registry.host}/ck/count:v1"
    cid = f"ckc{uuid.uuid4().hex[:6]}"
    ck = f"ck/{cid}:1"
    with scratch_containerd(NS, archive) as ctd:
        ctd.ctr("run", "-d", "--runtime", RUNTIME_TYPE, "--runtime-config-path",
                str(cfg_file), "--with-ns", f"network:/run/netns/{net.pod_ns}",
                "--annotation", f"{GUEST_PULL_IMAGE_ANNOTATION}={image}", REF, cid,
                "sh", "-c", POD, timeout=900)
        token, _ = count_at_least(ctd, cid, 3)
        tcp_at_least(ctd, cid, 1)
        rc, _, err = execute(ctd, cid, "sh", "-c", "echo kept > /etc/written")
        assert rc == 0, err
        _, before = count_at_least(ctd, cid, 1)
        tcp_before = tcp_at_least(ctd, cid, 1)

        r = ctd.ctr("containers", "checkpoint", "--task", cid, ck, check=False, timeout=900)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        # Left running: the same shell goes on.
        assert status(ctd, cid) == "RUNNING"
        t1, _ = count_at_least(ctd, cid, before + 1)
        assert t1 == token
        assert CRIU_TAR in checkpoint_media_types(ctd, ck)

        remove(ctd, cid)
        assert not leftovers(cfg.runtime.state_dir, f"{NS}/{cid}")

        r = ctd.ctr("containers", "restore", "--live", cid, ck, check=False, timeout=900)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert status(ctd, cid) == "RUNNING"
        t2, n2 = count_at_least(ctd, cid, before)
        assert t2 == token, "the shell was started again instead of restored"
        assert n2 >= before
        rc, out, err = execute(ctd, cid, "cat", "/etc/written")
        assert (rc, out) == (0, "kept\n"), err
        # The same TCP connection carries on: numbers after the checkpoint's arrive,
        # consecutive (a new connection would need a new server: nc -l takes one).
        tcp_after = tcp_at_least(ctd, cid, tcp_before + 1)
        tcp_at_least(ctd, cid, tcp_after + 1)
        # Same IP in the same network namespace, reachable from the registry's.
        rc, out, err = execute(ctd, cid, "ip", "-4", "-o", "addr", "show")
        assert rc == 0 and f" {net.pod_ip}/" in out, out + err
        ping = subprocess.run(["ip", "netns", "exec", net.reg_ns, "busybox", "ping", "-c", "1",
                               "-W", "30", net.pod_ip], capture_output=True, timeout=120)
        assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()
        # The restored pod can be checkpointed again, and runs on.
        _, again = count_at_least(ctd, cid, n2)
        r = ctd.ctr("containers", "checkpoint", "--task", cid, f"ck/{cid}:2", check=False,
                    timeout=900)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        t3, _ = count_at_least(ctd, cid, again + 1)
        assert t3 == token and status(ctd, cid) == "RUNNING"
        remove(ctd, cid)
        assert not leftovers(cfg.runtime.state_dir, f"{NS}/{cid}")

        # A checkpoint from another guest image is refused in one line before any
        # VM starts, and nothing is left.
        real = tamper_guest_image(ctd, ck, "0123456789abcdef")
        r = ctd.ctr("containers", "restore", "--live", cid, ck, check=False, timeout=900)
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0, err
        lines = [ln for ln in err.splitlines() if "cannot restore checkpoint" in ln]
        assert len(lines) == 1, err
        assert (f'guest_image.digest is "0123456789abcdef" in the checkpoint, "{real}" on'
                " this host") in lines[0]
        assert status(ctd, cid) == ""
        assert not leftovers(cfg.runtime.state_dir, f"{NS}/{cid}")
    assert not leftovers(cfg.runtime.state_dir, f"{NS}/{cid}")


def remove(ctd: PrivateContainerd, cid: str) -> None:
    """Kill the task, wait for it to stop, delete it and its container."""
    ctd.ctr("tasks", "kill", "-s", "KILL", cid)
    for _ in range(READS):
        if status(ctd, cid) == "STOPPED":
            break
        time.sleep(0.2)
    ctd.ctr("tasks", "rm", cid)
    ctd.ctr("containers", "rm", cid)
