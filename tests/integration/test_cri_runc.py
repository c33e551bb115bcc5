"""The CRI test client against a real containerd 1.6 CRI plugin, with the
``runc`` handler: the kubelet's flow for a pod of two containers, and what it
must leave behind (nothing).

Traps met here are recorded in pykata/testing/cri.py's docstring.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykata.protos import cri_api_pb2 as cri
from pykata.testing.containerd import PrivateContainerd
from pykata.testing.cri import (
    BUSYBOX_REF,
    CACHE,
    PAUSE_REF,
    CNINetwork,
    CRIClient,
    CRIError,
    container_config,
    cri_containerd,
    pod_config,
    resources,
)
from pykata.testing.images import oci_archive
from pykata.testing.leaks import pod_leftovers, procs_mentioning

pytestmark = pytest.mark.timeout(300)

ROOT = Path("/var/lib/pykata-cri-test")
HANDLER = "runc"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[PrivateContainerd, CNINetwork, CRIClient]]:
    if shutil.which("containerd") is None or shutil.which("runc") is None:
        pytest.skip("containerd and runc are needed (apt-get install containerd runc)")
    with cri_containerd(Path(f"/run/pykata-cri-{uuid.uuid4().hex[:6]}"), ROOT,
                        {"pykata.test": "cri-runc"}, timeout=60) as env:
        yield env



def _wait(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_version_and_images(env: tuple[PrivateContainerd, CNINetwork, CRIClient]) -> None:
    _, _, c = env
    v = c.version()
    assert v.runtime_name == "containerd"
    assert v.runtime_api_version == "v1"
    assert v.runtime_version.startswith(("1.", "v1.", "2.", "v2."))
    st = c.status()
    assert {cond.type: cond.status for cond in st.status.conditions}.get("RuntimeReady")
    for ref in (BUSYBOX_REF, PAUSE_REF):
        img = c.image_status(ref)
        assert img is not None, ref
        assert ref in img.repo_tags and img.size > 0
    assert c.image_status("pykata.invalid/absent:1") is None
    tags = {t for i in c.list_images() for t in i.repo_tags}
    assert {BUSYBOX_REF, PAUSE_REF} <= tags
    assert c.image_fs_info().image_filesystems


def test_errors_carry_code_and_one_line(
        env: tuple[PrivateContainerd, CNINetwork, CRIClient]) -> None:
    _, _, c = env
    with pytest.raises(CRIError) as ei:
        c.container_status("no-such-container")
    assert ei.value.code.name == "NOT_FOUND"
    assert ei.value.method == "ContainerStatus"
    assert "\n" not in str(ei.value) and "NOT_FOUND" in str(ei.value)
    with pytest.raises(CRIError) as ei:
        c.run_pod_sandbox(pod_config("bad", uid="x"), runtime_handler="no-such-handler")
    assert "no-such-handler" in ei.value.details


def test_pod_with_two_containers(env: tuple[PrivateContainerd, CNINetwork, CRIClient]) -> None:
    ctd, net, c = env
    tag = uuid.uuid4().hex[:10]
    logdir = ctd.base / "pods" / tag
    pod = pod_config(f"cri-{tag}", "pykata-test", uid=tag, log_directory=logdir,
                     hostname=f"h-{tag}", labels={"pykata.test": "cri-runc"},
                     dns_servers=["192.0.2.53"], dns_searches=["pykata.test"],
                     dns_options=["ndots:2"])
    t0 = time.monotonic()
    pod_id = c.run_pod_sandbox(pod, runtime_handler=HANDLER)
    run_s = time.monotonic() - t0
    needles = [pod_id, tag]
    netns = ""
    cids: list[str] = []
    try:
        st = c.pod_sandbox_status(pod_id, verbose=True)
        assert st.status.state == cri.SANDBOX_READY
        assert st.status.runtime_handler == HANDLER
        assert st.status.metadata.uid == tag
        ip = st.status.network.ip
        assert ip and ipaddress.ip_address(ip) in net.subnet, ip
        info = json.loads(st.info["info"])
        netns = next(n["path"] for n in info["runtimeSpec"]["linux"]["namespaces"]
                     if n["type"] == "network")
        assert Path(netns).exists(), netns
        assert [p.id for p in c.list_pod_sandbox(pod_id)] == [pod_id]

        # Two containers, each trapping TERM so StopContainer returns at once.
        for name, mem in (("c1", 64 * MiB), ("c2", 48 * MiB)):
            cfg = container_config(
                name, BUSYBOX_REF, ["/bin/sh", "-c"],
                [f"trap 'exit 0' TERM; echo started-{name}; m={tag}; sleep 600 & wait"],
                log_path=f"{name}.log", envs={"WHO": name},
                cpu_period=100000, cpu_quota=50000, cpu_shares=512, memory_limit=mem)
            cid = c.create_container(pod_id, cfg, pod)
            cids.append(cid)
            needles.append(cid)
            c.start_container(cid)
        c1, c2 = cids
        for cid in cids:
            s = c.container_status(cid).status
            assert s.state == cri.CONTAINER_RUNNING, s
            assert s.log_path == str(logdir / f"{s.metadata.name}.log")
        assert {x.id for x in c.list_containers(pod_id=pod_id)} == set(cids)
        # The leak check below sees this pod's processes while they live.
        assert len(procs_mentioning([tag])) >= 2
        assert procs_mentioning([pod_id]) and procs_mentioning([c1]) and procs_mentioning([c2])
        assert list(Path("/sys/fs/cgroup").glob(f"memory/*/{c1}"))

        # ExecSync in both: output, error output and exit code.
        r = c.exec_sync(c1, ["sh", "-c", "echo out-$WHO-$(hostname); echo err >&2; exit 3"])
        assert r == (f"out-c1-h-{tag}\n".encode(), b"err\n", 3)
        r = c.exec_sync(c2, ["cat", "/etc/resolv.conf"])
        assert r.exit_code == 0 and r.stderr == b""
        assert b"nameserver 192.0.2.53" in r.stdout and b"search pykata.test" in r.stdout
        assert b"options ndots:2" in r.stdout
        # Both containers are in the pod's network namespace, with the pod IP.
        for cid in cids:
            r = c.exec_sync(cid, ["ip", "-4", "-o", "addr", "show", "eth0"])
            assert r.exit_code == 0 and f"inet {ip}/".encode() in r.stdout, r
        r = c.exec_sync(c2, ["ping", "-c", "1", "-W", "3", str(net.gateway)], timeout=10)
        assert r.exit_code == 0, r
        r = c.exec_sync(c1, ["false"])
        assert r.exit_code == 1
        # The runtime's exec timeout: containerd answers DEADLINE_EXCEEDED (as the
        # kubelet expects for a probe timeout), not an exit code.
        # (sleep 600: a timeout that were not honoured would hang the test until
        # its own timeout instead of passing late.)
        with pytest.raises(CRIError) as ei:
            c.exec_sync(c1, ["sleep", "600"], timeout=1)
        assert ei.value.code.name == "DEADLINE_EXCEEDED" and "timeout" in ei.value.details

        # Resources reach the cgroup (cgroup v1 here), and can be updated.
        lim = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || " \
              "cat /sys/fs/cgroup/memory.max"
        assert c.exec_sync(c1, ["sh", "-c", lim]).stdout.strip() == str(64 * MiB).encode()
        c.update_container_resources(c1, resources(cpu_period=100000, cpu_quota=100000,
                                                   cpu_shares=1024, memory_limit=96 * MiB))
        assert c.exec_sync(c1, ["sh", "-c", lim]).stdout.strip() == str(96 * MiB).encode()

        # Stats: memory in use, CPU counted.
        stats = c.container_stats(c1)
        assert stats.attributes.id == c1
        assert stats.memory.working_set_bytes.value > 0, stats
        assert stats.cpu.usage_core_nano_seconds.value > 0, stats
        listed = c.list_container_stats(pod_id=pod_id)
        assert {s.attributes.id for s in listed} == set(cids)
        assert all(s.memory.working_set_bytes.value > 0 for s in listed)

        # Logs in the CRI format, reopen, streaming URLs.
        log1 = logdir / "c1.log"
        _wait(lambda: log1.exists() and "started-c1" in log1.read_text())
        line = log1.read_text().splitlines()[0].split(" ", 3)
        assert line[1:] == ["stdout", "F", "started-c1"], line
        c.reopen_container_log(c1)
        for url in (c.exec(c1, ["sh"], stdin=True, tty=True), c.attach(c1)):
            assert url.startswith("http://127.0.0.1:"), url
        assert c.port_forward(pod_id, 80).startswith("http://127.0.0.1:")

        # Stop one container (it exits on SIGTERM), then the whole pod.
        c.stop_container(c2, timeout=10)
        s = c.container_status(c2).status  # exit code 0: SIGTERM did it, not SIGKILL
        assert s.state == cri.CONTAINER_EXITED and s.exit_code == 0, s
        c.remove_container(c2)
        cids.remove(c2)
        with pytest.raises(CRIError) as ei:
            c.container_status(c2)
        assert ei.value.code.name == "NOT_FOUND"

        c.stop_pod_sandbox(pod_id)
        assert c.pod_sandbox_status(pod_id).status.state == cri.SANDBOX_NOTREADY
        assert c.container_status(c1).status.state == cri.CONTAINER_EXITED
        c.remove_pod_sandbox(pod_id)
        assert c.list_pod_sandbox(pod_id) == []
        assert c.list_containers(pod_id=pod_id) == []
    finally:
        with contextlib.suppress(CRIError):
            c.stop_pod_sandbox(pod_id)
            c.remove_pod_sandbox(pod_id)
    _wait(lambda: not pod_leftovers(needles, netns))
    left = pod_leftovers(needles, netns)
    assert not left, f"left behind by pod {pod_id}: {left}"
    print(f"RunPodSandbox with {HANDLER}: {run_s:.2f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pull_image_from_loopback_registry(
        env: tuple[PrivateContainerd, CNINetwork, CRIClient], tmp_path: Path) -> None:
    """PullImage always asks a registry: one on 127.0.0.1 (plain HTTP for
    localhost is containerd's default), fed offline with skopeo."""
    if not (shutil.which("docker-registry") and shutil.which("skopeo")):
        pytest.skip("docker-registry and skopeo are needed")
    _, _, c = env
    port = _free_port()
    (tmp_path / "registry.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path}/data\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    reg = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    ref = f"127.0.0.1:{port}/pykata/pulled:{uuid.uuid4().hex[:6]}"
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        archive = oci_archive(CACHE / "busybox-rootfs", tmp_path / "img.tar",
                              ref=ref, cmd=["sh"])
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false",
                        f"oci-archive:{archive}", f"docker://{ref}"],
                       check=True, capture_output=True, timeout=120)
        image_ref = c.pull_image(ref, timeout=120)
        assert image_ref.startswith("sha256:")
        img = c.image_status(ref)
        assert img is not None and img.id == image_ref
        c.remove_image(ref)
        assert c.image_status(ref) is None
    finally:
        reg.terminate()
        try:
            reg.wait(10)
        except subprocess.TimeoutExpired:
            reg.kill()
            reg.wait()
