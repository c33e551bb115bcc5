"""Issue 22 (Kubernetes conformance): read-only volumes and mount propagation
through containerd's CRI plugin, each case beside the same on runc.

- ``readOnly: true`` (``ro``) makes the volume's top mount read-only; a
  writable mount the host has below it stays writable, as runc leaves it;
- ``rro`` (containerd 2.x writes it for CRI ``recursive_read_only``; this
  containerd 1.6 has no such CRI field, so ``ctr run`` asks for it through the
  OCI spec) makes every mount below read-only too, with either guest engine;
- ``HostToContainer`` (``rslave``): a file system the host mounts below the
  volume after the pod started shows up in the container;
- ``Bidirectional`` (``rshared``) is refused with one error naming the mount:
  a mount made in the container is made in the VM and cannot reach the host.

The host volume is a tmpfs of the test's own (shared, as containerd requires
for propagation) with a tmpfs below it; every mount is undone afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.protos import cri_api_pb2 as cri
from pykata.testing.containerd import RUNTIME_TYPE
from pykata.testing.cri import BUSYBOX_REF, CRIError, container_config, cri_containerd, pod_config
from pykata.utils import mounts
from tests.integration.test_cri_pykata import SLEEP, Env, leftovers

pytestmark = pytest.mark.timeout(900)

LABEL = {"pykata.test": "cri-mounts"}
RUNTIMES = {"runc": "io.containerd.runc.v2", "pykata": RUNTIME_TYPE}


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with cri_containerd(Path(f"/run/pykata-crim-{uuid.uuid4().hex[:6]}"),
                        Path("/var/lib/pykata-crim-test"), LABEL) as env:
        yield env


@pytest.fixture
def vol() -> Iterator[Path]:
    """A host volume: its own tmpfs, a shared mount (a peer group of its own), with
    ``top.txt`` and a writable tmpfs at ``sub``. Unmounted and removed afterwards."""
    d = Path(f"/run/pykata-crim-vol-{uuid.uuid4().hex[:6]}")
    d.mkdir(mode=0o755)
    try:
        mounts.mount("tmpfs", d, "tmpfs", data="mode=0755")
        mounts.mount("none", d, flags=mounts.MS_PRIVATE)
        mounts.mount("none", d, flags=mounts.MS_SHARED)
        (d / "top.txt").write_text("top\n")
        (d / "sub").mkdir()
        mounts.mount("tmpfs", d / "sub", "tmpfs", data="mode=0777")
        yield d
    finally:
        assert mounts.umount_all(d) == []
        d.rmdir()


class Pod:
    """A CRI pod on ``handler``, its containers, and the check that nothing is left."""

    def __init__(self, env: Env, handler: str) -> None:
        self.ctd, _, self.c = env
        self.handler = handler
        self.tag = uuid.uuid4().hex[:10]
        self.config = pod_config(f"pm-{self.tag}", "pykata-test", uid=self.tag,
                                 log_directory=self.ctd.base / "pods" / self.tag,
                                 labels=LABEL)
        self.id = self.c.run_pod_sandbox(self.config, runtime_handler=handler)
        self.cids: list[str] = []

    def create(self, *volumes: cri.Mount) -> str:
        cfg = container_config(f"c{len(self.cids)}", BUSYBOX_REF, ["/bin/sh", "-c"], [SLEEP],
                               log_path=f"c{len(self.cids)}.log")
        cfg.mounts.extend(volumes)
        cid = self.c.create_container(self.id, cfg, self.config)
        self.cids.append(cid)
        self.c.start_container(cid)
        return cid

    def sh(self, cid: str, script: str) -> str:
        r = self.c.exec_sync(cid, ["sh", "-c", script], timeout=60)
        return r.stdout.decode() + r.stderr.decode()

    def remove(self) -> None:
        self.c.stop_pod_sandbox(self.id)
        self.c.remove_pod_sandbox(self.id)
        needles = [self.id, *self.cids]
        deadline = time.monotonic() + 30
        while leftovers(needles) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers(needles), leftovers(needles)


# What a container reports about /data: writes at the top and in the submount, and
# the read-only state of both in its mount table.
PROBE = ("touch /data/new 2>&1 || echo top-refused; echo hi > /data/sub/f && echo sub-ok;"
         " cat /data/top.txt; awk '$2==\"/data\"||$2==\"/data/sub\""
         " {split($4, o, \",\"); print \"mount\", $2, o[1]}' /proc/mounts")


@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_ro_volume_keeps_a_writable_submount_writable(env: Env, vol: Path,
                                                      handler: str) -> None:
    pod = Pod(env, handler)
    try:
        cid = pod.create(cri.Mount(host_path=str(vol), container_path="/data", readonly=True))
        out = pod.sh(cid, PROBE)
    finally:
        pod.remove()
    assert "Read-only file system" in out and "top-refused" in out, out
    assert "sub-ok" in out and "top\n" in out, out
    assert "mount /data ro\n" in out and "mount /data/sub rw\n" in out, out
    assert (vol / "sub/f").read_text() == "hi\n"
    assert not (vol / "new").exists()


@pytest.mark.parametrize(("runtime", "engine"),
                         [("runc", ""), ("pykata", "native"), ("pykata", "crun")])
@pytest.mark.parametrize("mode", ["ro", "rro"])
def test_rro_makes_submounts_read_only_too(env: Env, vol: Path, tmp_path: Path, mode: str,
                                           runtime: str, engine: str) -> None:
    """Through the OCI spec (ctr): ``rro`` read-only all the way down, ``ro`` the
    top only, on runc and on both guest engines."""
    ctd = env[0]
    extra = []
    if engine:
        conf = tmp_path / "pykata.toml"
        conf.write_text(f'[agent]\ncontainer_engine = "{engine}"\n')
        extra = ["--runtime-config-path", str(conf)]
    cid = f"rro-{uuid.uuid4().hex[:8]}"
    r = ctd.ctr("run", "--rm", "--runtime", RUNTIMES[runtime], *extra, "--mount",
                f"type=bind,src={vol},dst=/data,options=rbind:{mode}", BUSYBOX_REF, cid,
                "sh", "-c", PROBE, check=False, timeout=600)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0, out
    assert "top-refused" in out and "top\n" in out and "mount /data ro\n" in out, out
    if mode == "rro":
        assert "sub-ok" not in out and "mount /data/sub ro\n" in out, out
        assert not (vol / "sub/f").exists()
    else:
        assert "sub-ok" in out and "mount /data/sub rw\n" in out, out
        assert (vol / "sub/f").read_text() == "hi\n"
    assert not leftovers([cid])


@pytest.mark.parametrize("handler", ["runc", "pykata"])
def test_host_to_container_sees_a_later_host_mount(env: Env, vol: Path, handler: str) -> None:
    pod = Pod(env, handler)
    late = vol / "late"
    late.mkdir()
    try:
        cid = pod.create(cri.Mount(host_path=str(vol), container_path="/data",
                                   propagation=cri.PROPAGATION_HOST_TO_CONTAINER))
        assert pod.sh(cid, "ls -A /data/late; echo listed") == "listed\n"
        mounts.mount("tmpfs", late, "tmpfs")
        (late / "marker").write_text("mounted-late\n")
        seen = ""
        for _ in range(40):  # guest cache lifetime (virtio_fs_cache=auto): about 1 s
            seen = pod.sh(cid, "cat /data/late/marker 2>/dev/null || echo not-yet")
            if seen == "mounted-late\n":
                break
            time.sleep(0.25)
        assert seen == "mounted-late\n"
        # The container writes into the new file system; the host reads it.
        assert pod.sh(cid, "echo from-c > /data/late/c && echo ok") == "ok\n"
        assert (late / "c").read_text() == "from-c\n"
    finally:
        pod.remove()
        if mounts.is_mount_point(late):
            mounts.umount(late)


def test_bidirectional_is_refused_naming_the_mount(env: Env, vol: Path) -> None:
    pod = Pod(env, "pykata")
    try:
        with pytest.raises(CRIError) as exc:
            pod.create(cri.Mount(host_path=str(vol), container_path="/data",
                                 propagation=cri.PROPAGATION_BIDIRECTIONAL))
        msg = " ".join(exc.value.details.split())
        assert f"mount /data (source {vol}): rshared propagation (Kubernetes" \
               " mountPropagation Bidirectional) is not supported" in msg, msg
        # The pod is unharmed: a container with HostToContainer on the same volume runs.
        cid = pod.create(cri.Mount(host_path=str(vol), container_path="/data",
                                   propagation=cri.PROPAGATION_HOST_TO_CONTAINER))
        assert pod.sh(cid, "cat /data/top.txt") == "top\n"
    finally:
        pod.remove()
    assert not any(str(vol) in p and "/run/pykata/" in p for p in mounts.mount_points())

