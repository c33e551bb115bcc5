"""Issue 4 acceptance: whole pod lifecycles through containerd's CRI plugin with
the runtime handler ``pykata``, driven the way the kubelet drives them."""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pykata.protos import cri_api_pb2 as cri
from pykata.testing.containerd import PrivateContainerd
from pykata.testing.cri import (
    BUSYBOX_REF,
    CNINetwork,
    CRIClient,
    CRIError,
    container_config,
    cri_containerd,
    pod_config,
    resources,
)
from pykata.testing.leaks import pod_leftovers

pytestmark = pytest.mark.timeout(600)

HANDLER = "pykata"
LABEL = {"pykata.test": "cri-pykata"}
MiB = 1 << 20
Env = tuple[PrivateContainerd, CNINetwork, CRIClient]


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def cri_env(default_route: bool = False, pykata_config: str = "") -> Iterator[Env]:
    """A private containerd with the CRI plugin, the bridge CNI and the images;
    ``pykata_config`` is TOML for the shims it starts (through PYKATA_CONFIG)."""
    with cri_containerd(Path(f"/run/pykata-crik-{uuid.uuid4().hex[:6]}"),
                        Path("/var/lib/pykata-crik-test"), LABEL, default_route=default_route,
                        pykata_config=pykata_config) as env:
        yield env


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    yield from cri_env()


class Pod:
    """A pod of the test: its sandbox, containers, and the cleanup check."""

    def __init__(self, env: Env, **pod_kw: object) -> None:
        self.ctd, _, self.c = env
        self.tag = uuid.uuid4().hex[:10]
        self.config = pod_config(f"pk-{self.tag}", "pykata-test", uid=self.tag,
                                 log_directory=self.ctd.base / "pods" / self.tag,
                                 hostname=f"h-{self.tag}", labels=LABEL, **pod_kw)
        self.id = self.c.run_pod_sandbox(self.config, runtime_handler=HANDLER)
        self.cids: list[str] = []

    def container(self, name: str, script: str, **kw: object) -> str:
        cfg = container_config(name, BUSYBOX_REF, ["/bin/sh", "-c"], [script],
                               log_path=f"{name}.log", **kw)
        # The kubelet always sends its default masked and read-only paths.
        sc = cfg.linux.security_context
        sc.masked_paths.extend(KUBELET_MASKED)
        sc.readonly_paths.extend(KUBELET_READONLY)
        cid = self.c.create_container(self.id, cfg, self.config)
        self.cids.append(cid)
        self.c.start_container(cid)
        return cid

    def sh(self, cid: str, script: str, timeout: int = 30) -> tuple[str, int]:
        r = self.c.exec_sync(cid, ["sh", "-c", script], timeout=timeout)
        return r.stdout.decode(), r.exit_code

    def remove(self) -> list[str]:
        self.c.stop_pod_sandbox(self.id)
        self.c.remove_pod_sandbox(self.id)
        needles = [self.id, *self.cids]
        _wait(lambda: not leftovers(needles), 30)
        return leftovers(needles)


def leftovers(needles: list[str]) -> list[str]:
    left = pod_leftovers(needles)
    sbs = Path("/run/pykata/sbs")
    left += [f"state {p}" for n in needles for p in sbs.glob(f"*/{n}")]
    return left


KUBELET_MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                  "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                  "/sys/firmware"]
KUBELET_READONLY = ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                    "/proc/sysrq-trigger"]
SLEEP = "trap 'exit 0' TERM; sleep 3600 & wait"


def test_two_containers_share_one_vm(env: Env) -> None:
    pod = Pod(env)
    try:
        web = pod.container("web", "mkdir -p /www && echo hello-from-web > /www/index.html && "
                                   "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait")
        cli = pod.container("cli", SLEEP)
        kernels = {cid: pod.sh(cid, "uname -r; cat /proc/sys/kernel/random/boot_id")
                   for cid in (web, cli)}
        (k1, rc1), (k2, rc2) = kernels.values()
        assert rc1 == rc2 == 0
        assert k1 == k2, "the two containers are not in the same VM"
        assert k1.split()[0] != platform.release(), "the containers saw the host kernel"
        # Like any pod: one IPC and one UTS namespace (the sandbox container's).
        ns = {cid: pod.sh(cid, "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts")
              for cid in (web, cli)}
        (n1, rc1), (n2, rc2) = ns.values()
        assert rc1 == rc2 == 0 and n1.startswith("ipc:[")
        assert n1 == n2, f"the pod's containers have different IPC/UTS namespaces: {ns}"
        # Each other's localhost: the pod's containers share the VM's network.
        out, rc = "", 1
        for _ in range(20):
            out, rc = pod.sh(cli, "wget -q -O - http://127.0.0.1:8080/index.html")
            if rc == 0:
                break
            time.sleep(0.5)
        assert (out, rc) == ("hello-from-web\n", 0)
        # ExecSync: output and exit codes, in each container.
        assert pod.sh(web, "echo w; exit 3") == ("w\n", 3)
        assert pod.sh(cli, "hostname; exit 5") == (f"h-{pod.tag}\n", 5)
        # Stats are real figures from the guest's cgroups.
        st = pod.c.container_stats(web)
        assert st.memory.working_set_bytes.value > 0
        assert st.cpu.usage_core_nano_seconds.value > 0
        status = pod.c.container_status(cli).status
        assert status.state == cri.CONTAINER_RUNNING
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_update_resources_grows_the_vm_and_limits(env: Env) -> None:
    pod = Pod(env)
    try:
        # No CPU limit at first: the VM keeps its one base vCPU (on this 2-CPU
        # host, any CPU limit would already take it to its maximum of 2).
        cid = pod.container("app", SLEEP, memory_limit=64 * MiB)
        before, _ = pod.sh(cid, "nproc; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; "
                                "grep MemTotal /proc/meminfo")
        nproc0, mem0, cpu0, total0 = before.splitlines()
        assert mem0 == str(64 * MiB) and cpu0 == "max 100000"
        pod.c.update_container_resources(cid, resources(cpu_period=100000, cpu_quota=200000,
                                                        memory_limit=512 * MiB))
        after, _ = pod.sh(cid, "nproc; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; "
                               "grep MemTotal /proc/meminfo")
        nproc1, mem1, cpu1, total1 = after.splitlines()
        assert mem1 == str(512 * MiB)
        assert cpu1 == "200000 100000"
        assert int(nproc1) > int(nproc0), (before, after)
        assert int(total1.split()[1]) > int(total0.split()[1]), (before, after)
        # Lowering the limits lowers them in the guest (the VM keeps its size).
        pod.c.update_container_resources(cid, resources(cpu_period=100000, cpu_quota=50000,
                                                        memory_limit=96 * MiB))
        low, _ = pod.sh(cid, "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max")
        assert low.splitlines() == [str(96 * MiB), "50000 100000"]
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_oom_kill_is_reported_as_oomkilled(env: Env) -> None:
    pod = Pod(env)
    try:
        cid = pod.container("hog", "exec tail /dev/zero", memory_limit=48 * MiB)
        assert _wait(lambda: pod.c.container_status(cid).status.state == cri.CONTAINER_EXITED,
                     60)
        status = pod.c.container_status(cid).status
        assert status.reason == "OOMKilled", status
        assert status.exit_code == 137
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_invalid_requests_fail_clearly_and_leave_nothing(env: Env) -> None:
    pod = Pod(env)
    try:
        with pytest.raises(CRIError) as ei:
            cfg = container_config("nope", "docker.io/pykata/no-such-image:1", ["true"])
            pod.c.create_container(pod.id, cfg, pod.config)
        assert ei.value.code.name in ("NOT_FOUND", "UNKNOWN", "INVALID_ARGUMENT")
        assert "no-such-image" in str(ei.value)
        with pytest.raises(CRIError) as ei:
            cfg = container_config("seccomp", BUSYBOX_REF, ["true"],
                                   seccomp="localhost/nonexistent/profile.json")
            pod.c.create_container(pod.id, cfg, pod.config)
        assert "profile.json" in str(ei.value)
        with pytest.raises(CRIError) as ei:
            pod.container("huge", SLEEP, cpu_period=100000, cpu_quota=100000 * 512)
        assert "vCPUs" in str(ei.value)
        # The pod still works after the failures.
        ok = pod.container("fine", SLEEP)
        assert pod.sh(ok, "echo ok") == ("ok\n", 0)
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_five_pods_concurrently(env: Env) -> None:
    def lifecycle(_: int) -> list[str]:
        pod = Pod(env)
        try:
            cid = pod.container("c", SLEEP)
            out, rc = pod.sh(cid, "uname -r")
            assert rc == 0 and out.strip() != platform.release()
        finally:
            left = pod.remove()
        return left

    with ThreadPoolExecutor(5) as ex:
        results = list(ex.map(lifecycle, range(5)))
    assert all(not r for r in results), results
    assert not list(Path("/run/pykata/sbs").glob("*/*"))


def test_pod_files_security_context_and_shared_pid(env: Env, tmp_path: Path) -> None:
    pod = Pod(env, dns_servers=["192.0.2.53"], dns_searches=["pykata.test"], share_pid=True)
    try:
        # /etc/resolv.conf and /etc/hostname come from the pod.
        plain = pod.container("plain", SLEEP, share_pid=True)
        resolv, rc = pod.sh(plain, "cat /etc/resolv.conf; cat /etc/hostname")
        assert rc == 0 and "nameserver 192.0.2.53" in resolv and "search pykata.test" in resolv
        assert resolv.splitlines()[-1] == f"h-{pod.tag}"
        # Shared pid namespace: the pod's infra process is visible.
        ps, _ = pod.sh(plain, "ps -o pid,args")
        assert "sleep infinity" in ps, ps  # the pause container's process
        # User, group, read-only rootfs, no_new_privs, capabilities, seccomp.
        locked = pod.container("locked", SLEEP, run_as_user=1000, run_as_group=2000,
                               readonly_rootfs=True, no_new_privs=True,
                               drop_capabilities=["ALL"], add_capabilities=["NET_RAW"],
                               seccomp="runtime/default")
        ids, _ = pod.sh(locked, "id -u; id -g")
        assert ids.split() == ["1000", "2000"]
        _, rc = pod.sh(locked, "touch /should-fail")
        assert rc != 0
        status, _ = pod.sh(locked, "grep -E '^(NoNewPrivs|Seccomp|CapBnd):' /proc/self/status")
        fields = dict(line.split(":\t") for line in status.splitlines())
        assert fields["NoNewPrivs"] == "1"
        assert fields["Seccomp"] == "2"
        # A non-root process has no effective capabilities; the bounding set
        # shows what the container may ever have: CAP_NET_RAW only.
        assert int(fields["CapBnd"], 16) == 1 << 13
        # Masked paths stay masked in the guest.
        masked, _ = pod.sh(plain, "cat /proc/timer_list | wc -c; ls /sys/firmware | wc -l; "
                                  "echo 1 > /proc/sys/kernel/panic && echo writable")
        assert masked.split() == ["0", "0"], masked
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_stop_container_escalates_to_sigkill(env: Env) -> None:
    pod = Pod(env)
    try:
        cid = pod.container("stubborn", "trap '' TERM; while :; do sleep 1; done")
        t = time.monotonic()
        pod.c.stop_container(cid, timeout=2)
        took = time.monotonic() - t
        status = pod.c.container_status(cid).status
        assert status.state == cri.CONTAINER_EXITED
        assert status.exit_code == 137
        assert took >= 2
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


def test_block_volume_empty_dir_and_shm(env: Env, tmp_path: Path) -> None:
    """Issue 5 through CRI: a loop device given as a mount's host_path is a block
    device in the container holding the file system (its ext4 label is readable);
    an emptyDir volume is shared by the pod's containers inside the guest; the
    pod's /dev/shm is a guest tmpfs of containerd's size. No loop device is held
    after the pod is removed."""
    import subprocess

    img = tmp_path / "cri-disk.img"
    subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "cridisk", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    empty = tmp_path / "kubelet/pods/u1/volumes/kubernetes.io~empty-dir/scratch"
    empty.mkdir(parents=True)
    try:
        pod = Pod(env)
        try:
            one = pod.container("one", SLEEP, mounts=[(dev, "/dev/xvdb", False),
                                                      (str(empty), "/scratch", False)])
            two = pod.container("two", SLEEP, mounts=[(str(empty), "/scratch", False)])
            out, rc = pod.sh(one, "stat -c %F /dev/xvdb;"
                                  " dd if=/dev/xvdb bs=1 skip=1144 count=7 2>/dev/null; echo;"
                                  " echo from-one > /scratch/f; df -k /dev/shm | tail -n 1;"
                                  " grep -E ' /(scratch|dev/shm) ' /proc/mounts")
            assert rc == 0, out
            lines = out.splitlines()
            assert lines[:2] == ["block special file", "cridisk"], out
            assert lines[2].split()[1] == "65536", out  # containerd's 64 MiB shm
            assert "virtiofs" not in " ".join(lines[3:]), out
            assert pod.sh(two, "cat /scratch/f") == ("from-one\n", 0)
            assert list(empty.iterdir()) == []  # in the guest, not on the host
        finally:
            left = pod.remove()
        assert not left, f"left behind: {left}"
        held = subprocess.run(["fuser", "-s", dev], check=False).returncode == 0
        assert not held, f"{dev} is still held after the pod was removed"
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_host_directory_rw_and_ro_through_cri(env: Env, tmp_path: Path) -> None:
    """Issue 5 through CRI: a host directory mounted rw takes the container's
    writes (seen on the host); the same directory mounted ro refuses them (EROFS)."""
    shared = tmp_path / "hostdir"
    shared.mkdir()
    (shared / "from-host").write_text("host-data\n")
    pod = Pod(env)
    try:
        cid = pod.container("vol", SLEEP, mounts=[(str(shared), "/data", False),
                                                  (str(shared), "/ro", True)])
        assert pod.sh(cid, "cat /ro/from-host; echo written > /data/from-pod") == (
            "host-data\n", 0)
        assert (shared / "from-pod").read_text() == "written\n"
        out, rc = pod.sh(cid, "{ echo x > /ro/nope; } 2>&1")
        assert rc != 0 and "Read-only file system" in out, out
        assert not (shared / "nope").exists()
    finally:
        left = pod.remove()
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("option,kind,field", [
    ("host_network", "network", "hostNetwork"), ("host_ipc", "ipc", "hostIPC"),
    ("host_pid", "pid", "hostPID")])
def test_host_namespaces_are_refused_at_run_pod_sandbox(env: Env, option: str, kind: str,
                                                        field: str) -> None:
    # containerd 1.6 leaves the namespace out of the sandbox spec (the host's, for
    # runc); a VM cannot share it: one clear error, no pod silently isolated.
    ctd, _, c = env
    tag = uuid.uuid4().hex[:10]
    cfg = pod_config(f"pk-{tag}", "pykata-test", uid=tag, labels=LABEL,
                     log_directory=ctd.base / "pods" / tag, **{option: True})
    with pytest.raises(CRIError) as ei:
        c.run_pod_sandbox(cfg, runtime_handler=HANDLER)
    text = str(ei.value)
    assert f"the host's {kind} namespace is not supported (the pod's {field}: true)" in text
    assert "a pod in a VM has its own kernel, which cannot share the host's" in text
    pods = [p for p in c.list_pod_sandbox(labels=LABEL) if p.metadata.uid == tag]
    assert all(p.state != 0 for p in pods), pods  # none ready
    for p in pods:
        c.remove_pod_sandbox(p.id)
    assert _wait(lambda: not leftovers([tag, *(p.id for p in pods)]), 30), \
        leftovers([tag, *(p.id for p in pods)])
