"""Issue 17: bad input through the users' tools. Malformed OCI specs (missing
fields, wrong types, huge values, paths with ``..``, unknown namespaces) given
to ``pykata-runtime run`` and to ``ctr run --config``, and bad CRI
RunPodSandbox/CreateContainer requests: each is exactly one readable error line
from the tool (no traceback, no crash text), and leaves nothing behind (no VM,
virtiofsd, shim, mount, netns, shim socket or sandbox state: the counts of
tests/integration/soak_support.py before and after are equal).

The parsers themselves are fuzzed at unit level in tests/fuzz."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pykata.cli.runtime.base import NAMESPACE as RUNTIME_NAMESPACE
from pykata.protos import cri_api_pb2 as cri
from pykata.testing import busybox_rootfs, leftovers
from pykata.testing.bundles import default_spec, make_bundle
from pykata.testing.containerd import RUNTIME_TYPE
from pykata.testing.cri import BUSYBOX_REF, CRIError, container_config
from pykata.testing.leaks import processes_mentioning
from tests.integration import soak_support
from tests.integration.soak_support import (
    CACHE,
    HANDLER,
    LABEL,
    SLEEP_SCRIPT,
    CriEnv,
    CtrEnv,
    Scope,
    count_changes,
    private_config,
)

pytestmark = pytest.mark.timeout(600)
RUNTIME = shutil.which("pykata-runtime") or "/usr/local/bin/pykata-runtime"
NAMES = ("qemu-system", "virtiofsd", "pykata.shim", "pykata.cli.standin")
MAX_LINE = 1024  # a readable line: an error that echoes a huge value must cut it
# What a crash rather than a designed error looks like.
CRASH = re.compile(r"Traceback|NoneType|TypeError|KeyError|AttributeError|IndexError|"
                   r"ValueError|object has no attribute|panic:|not subscriptable|"
                   r"unhashable|invalid literal|Exception")

Spec = dict[str, Any]


def _set(path: str, value: Any) -> Callable[[Spec], None]:
    def f(spec: Spec) -> None:
        obj = spec
        *parents, last = path.split(".")
        for p in parents:
            obj = obj.setdefault(p, {})
        obj[last] = copy.deepcopy(value)
    return f


def _del(path: str) -> Callable[[Spec], None]:
    def f(spec: Spec) -> None:
        obj = spec
        *parents, last = path.split(".")
        for p in parents:
            obj = obj[p]
        del obj[last]
    return f


def _add_mount(m: dict[str, Any]) -> Callable[[Spec], None]:
    return lambda spec: spec["mounts"].append(m)


def _add_ns(ns: dict[str, Any]) -> Callable[[Spec], None]:
    return lambda spec: spec["linux"]["namespaces"].append(ns)


def _big_env(spec: Spec) -> None:
    spec["process"]["env"] = [*spec["process"]["env"], "BIG=" + "x" * (6 << 20)]


# (id, change to a good spec, words the error must have: a regex, case-insensitive)
SPECS: list[tuple[str, Callable[[Spec], None], str]] = [
    # missing fields
    ("no-process", _del("process"), r"process"),
    ("no-root", _del("root"), r"root"),
    ("mount-no-destination", _add_mount({"type": "tmpfs", "source": "tmpfs"}),
     r"mount|destination"),
    # wrong types
    ("args-string", _set("process.args", "sh -c true"), r"args"),
    ("env-string", _set("process.env", "PATH=/bin"), r"env"),
    ("user-string", _set("process.user", "root"), r"user"),
    ("terminal-string", _set("process.terminal", "yes"), r"terminal"),
    ("memory-string", _set("linux.resources.memory", {"limit": "1G"}), r"limit|memory"),
    ("namespaces-string", _set("linux.namespaces", "pid"), r"namespaces"),
    ("hostname-number", _set("hostname", 5), r"hostname"),
    # huge values
    ("memory-huge", _set("linux.resources.memory", {"limit": 1 << 62}), r"memory|limit"),
    ("cpu-huge", _set("linux.resources.cpu", {"quota": 1 << 50, "period": 100000}),
     r"cpu"),
    ("uid-huge", _set("process.user", {"uid": 1 << 40, "gid": 0}), r"uid|user"),
    ("rlimit-huge", _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1 << 70,
                                              "soft": 1 << 70}]), r"rlimit"),
    ("hostname-huge", _set("hostname", "h" * 10000), r"hostname"),
    ("spec-huge", _big_env, r"size|large|exceed|too"),
    # paths with ..
    ("mount-destination-dotdot", _add_mount({"destination": "/../../../etc/evil",
                                             "type": "tmpfs", "source": "tmpfs"}),
     r"\.\.|destination"),
    ("masked-path-dotdot", _set("linux.maskedPaths", ["/proc/../../etc/passwd"]),
     r"\.\.|masked"),
    # unknown namespaces
    ("namespace-unknown", _add_ns({"type": "bogus"}), r"bogus|namespace"),
    ("namespace-path-missing", _set("linux.namespaces", [
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": "/proc/999999999/ns/net"}]), r"namespace|999999999"),
]


def one_error_line(stderr: str, prefix: str, words: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one: {stderr[:3000]!r}"
    line = lines[0]
    assert line.startswith(prefix), line[:MAX_LINE]
    assert len(line) <= MAX_LINE, f"an error line of {len(line)} characters: {line[:300]}..."
    assert not CRASH.search(line), f"a crash, not an error: {line}"
    assert re.search(words, line, re.IGNORECASE), f"the error does not say /{words}/: {line}"
    return line


def _good_spec() -> Spec:
    return default_spec(["true"])


# -- pykata-runtime --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """(the CLI's --root, its environment, the private pykata state directory
    its configuration names)."""
    tag = uuid.uuid4().hex[:6]
    state = Path(f"/run/pykata/badin-{tag}")
    conf = tmp_path_factory.mktemp("badin") / "configuration.toml"
    conf.write_text(private_config(state))
    root = Path(f"/run/pykata-badin-rt-{tag}")
    env = dict(os.environ, PYKATA_CONFIG=str(conf))
    try:
        yield root, env, state
    finally:
        left = leftovers(state)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize(("case", "change", "words"), SPECS, ids=[c[0] for c in SPECS])
def test_runtime_cli_bad_spec(runtime_env: tuple[Path, dict[str, str], Path], tmp_path: Path,
                              case: str, change: Callable[[Spec], None], words: str) -> None:
    root, env, state = runtime_env
    spec = _good_spec()
    change(spec)
    bundle = make_bundle(tmp_path / "b", busybox_rootfs(CACHE / "busybox-rootfs"), spec)
    cid = f"bi{uuid.uuid4().hex[:10]}"
    r = subprocess.run([RUNTIME, "--root", str(root), "run", "--bundle", str(bundle), cid],
                       capture_output=True, text=True, timeout=300, check=False, env=env,
                       stdin=subprocess.DEVNULL)
    try:
        assert r.returncode != 0, f"{case} was accepted: {r.stdout[-300:]} {r.stderr[-300:]}"
        one_error_line(r.stderr, "pykata-runtime: ", words)
    finally:
        left = processes_mentioning(cid, NAMES)
        if (root / cid).exists():
            left.append(f"state dir {root / cid}")
            subprocess.run([RUNTIME, "--root", str(root), "delete", "--force", cid],
                           capture_output=True, timeout=120, check=False, env=env)
    left += leftovers(state, f"{RUNTIME_NAMESPACE}/{cid}")
    assert not left, f"left behind: {left}"


# -- ctr run --config --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctr_env() -> Iterator[CtrEnv]:
    """The private containerd, after one good container: what the first pod
    makes once for all (containerd's namespace directories, pykata's
    accelerator record and uid leases) is in the baseline of every case."""
    with soak_support.ctr_env("badin") as env:
        cid = f"warm{uuid.uuid4().hex[:6]}"
        env.scope.ids.add(cid)
        rc, _, err = env.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, BUSYBOX_REF, cid, "true")
        assert rc == 0, f"a good container failed: {err}"
        yield env


@pytest.mark.parametrize(("case", "change", "words"), SPECS, ids=[c[0] for c in SPECS])
def test_ctr_bad_spec(ctr_env: CtrEnv, tmp_path: Path, case: str,
                      change: Callable[[Spec], None], words: str) -> None:
    """``ctr run --config``: the spec as given (no image, the spec's own root).
    ctr decodes it first (Go types): wrong types and out-of-range numbers are
    ctr's own one error; the rest reaches the shim."""
    env, scope = ctr_env, ctr_env.scope
    spec = _good_spec()
    bundle = make_bundle(tmp_path / "b", busybox_rootfs(CACHE / "busybox-rootfs"), spec)
    spec["root"]["path"] = str(bundle / "rootfs")
    change(spec)
    conf = tmp_path / "spec.json"
    conf.write_text(json.dumps(spec))
    cid = f"bc{uuid.uuid4().hex[:10]}"
    scope.ids.add(cid)
    before = scope.settle()
    try:
        r = env.ctd.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, "--config", str(conf), cid,
                        check=False, timeout=300)
        stderr = r.stderr.decode(errors="replace")
        assert r.returncode != 0, f"{case} was accepted: {stderr[-300:]}"
        one_error_line(stderr, "ctr: ", words)
    finally:
        env.remove(cid)
    _nothing_left(scope, before, [cid])


def _nothing_left(scope: Scope, before: soak_support.Snapshot, ids: list[str]) -> None:
    linger = scope.wait_shims_gone(ids, 60)
    assert all(s < 60 for s in linger.values()), f"shims still running: {linger}"
    changes = count_changes(before, scope.settle())
    assert not changes, f"left behind: {changes}"


# -- CRI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    """The private containerd with CRI, after one good pod (see ctr_env)."""
    with soak_support.cri_env("badin") as env:
        pod_id, _, logs = env.pod("warm")
        env.remove_pod(pod_id, logs)
        yield env


@pytest.fixture(scope="module")
def good_pod(cri_env: CriEnv) -> Iterator[tuple[str, cri.PodSandboxConfig]]:
    pod_id, cfg, logs = cri_env.pod("good")
    try:
        # One container first: what a pod makes for its first container only is
        # in the baseline of every case.
        warm = cri_env.container(pod_id, cfg, "warm")
        cri_env.exec_ok(warm, "warm")
        cri_env.c.stop_container(warm, timeout=0)
        cri_env.c.remove_container(warm)
        yield pod_id, cfg
    finally:
        cri_env.remove_pod(pod_id, logs)


def _pod_change(**kw: Any) -> Callable[[CriEnv], cri.PodSandboxConfig]:
    def f(env: CriEnv) -> cri.PodSandboxConfig:
        return env.pod_config("bad", **kw)[0]
    return f


def _no_metadata(env: CriEnv) -> cri.PodSandboxConfig:
    cfg = env.pod_config("bad")[0]
    cfg.ClearField("metadata")
    return cfg


POD_CASES: list[tuple[str, Callable[[CriEnv], cri.PodSandboxConfig], str]] = [
    ("no-metadata", _no_metadata, r"metadata"),
    ("hostname-huge", _pod_change(hostname="h" * 300), r"hostname"),
    ("host-network", _pod_change(host_network=True), r"network"),
    ("sysctl-unknown", _pod_change(sysctls={"kernel.no_such_sysctl": "1"}),
     r"no_such_sysctl"),
    ("sysctl-dotdot", _pod_change(sysctls={"kernel/../../../etc/hostname": "x"}),
     r"sysctl|\.\."),
]


def _cri_nothing_left(env: CriEnv, before: soak_support.Snapshot) -> None:
    pods = [p for p in env.c.list_pod_sandbox(labels=LABEL) if p.metadata.name != "good"
            and not p.metadata.name.startswith("good-")]
    for p in pods:  # what containerd keeps of a failed pod: it must go cleanly
        env.remove_pod(p.id)
    assert not pods, f"failed pods still listed: {[p.metadata.name for p in pods]}"
    _nothing_left(env.scope, before, [])


@pytest.mark.parametrize(("case", "make", "words"), POD_CASES, ids=[c[0] for c in POD_CASES])
def test_cri_bad_pod(cri_env: CriEnv, case: str,
                     make: Callable[[CriEnv], cri.PodSandboxConfig], words: str) -> None:
    env = cri_env
    cfg = make(env)
    before = env.scope.settle()
    try:
        pod_id = env.c.run_pod_sandbox(cfg, runtime_handler=HANDLER)
    except CRIError as exc:
        assert "\n" not in exc.details, f"a multi-line error: {exc.details[:2000]!r}"
        one_error_line(str(exc), "RunPodSandbox: ", words)
    else:
        env.remove_pod(pod_id)
        pytest.fail(f"{case}: RunPodSandbox accepted it")
    _cri_nothing_left(env, before)


def _ctr_cfg(**kw: Any) -> Callable[[], cri.ContainerConfig]:
    def f() -> cri.ContainerConfig:
        image = kw.pop("image", BUSYBOX_REF)
        return container_config("bad", image, ["/bin/sh", "-c"], [SLEEP_SCRIPT],
                                log_path="bad.log", **kw)
    return f


def _pid_target() -> cri.ContainerConfig:
    cfg = _ctr_cfg()()
    ns = cfg.linux.security_context.namespace_options
    ns.pid = cri.TARGET
    ns.target_id = "no-such-container"
    return cfg


CONTAINER_CASES: list[tuple[str, Callable[[], cri.ContainerConfig], str]] = [
    ("no-image", _ctr_cfg(image=""), r"image"),
    ("memory-huge", _ctr_cfg(memory_limit=1 << 62), r"memory"),
    ("cpu-huge", _ctr_cfg(cpu_quota=1 << 40, cpu_period=100000), r"cpu"),
    ("env-huge", _ctr_cfg(envs={"BIG": "x" * (6 << 20)}), r"size|large|exceed|too"),
    ("workdir-relative", _ctr_cfg(working_dir="../up"), r"cwd|working|absolute"),
    ("pid-target-unknown", _pid_target, r"no-such-container|target"),
]


@pytest.mark.parametrize(("case", "make", "words"), CONTAINER_CASES,
                         ids=[c[0] for c in CONTAINER_CASES])
def test_cri_bad_container(cri_env: CriEnv, good_pod: tuple[str, cri.PodSandboxConfig],
                           case: str, make: Callable[[], cri.ContainerConfig],
                           words: str) -> None:
    env = cri_env
    pod_id, pod_cfg = good_pod
    before = env.scope.settle(pod_id)
    cid = ""
    try:
        cid = env.c.create_container(pod_id, make(), pod_cfg)
        env.c.start_container(cid)
    except CRIError as exc:
        assert "\n" not in exc.details, f"a multi-line error: {exc.details[:2000]!r}"
        one_error_line(str(exc), f"{exc.method}: ", words)
    else:
        pytest.fail(f"{case}: the container was created and started")
    finally:
        if cid:
            env.c.remove_container(cid)
    listed = [c.metadata.name for c in env.c.list_containers(pod_id=pod_id)]
    assert listed == [], f"containers left in the pod: {listed}"
    # The pod still works, and nothing of the failed container is left.
    probe = env.container(pod_id, pod_cfg, f"probe{uuid.uuid4().hex[:4]}")
    env.exec_ok(probe, "still-fine")
    env.c.stop_container(probe, timeout=0)
    env.c.remove_container(probe)
    after = env.scope.settle(pod_id)
    changes = count_changes(before, after)
    assert not changes, f"left behind: {changes}"


def test_cri_mount_destination_dotdot_is_refused(
        cri_env: CriEnv, good_pod: tuple[str, cri.PodSandboxConfig]) -> None:
    """containerd passes a container_path with ``..`` on as it is; pykata
    refuses it (Kubernetes refuses such a mountPath too) with one line, and the
    pod goes on."""
    env = cri_env
    pod_id, pod_cfg = good_pod
    src = Path(tempfile.mkdtemp(prefix="pykata-badin-vol-"))
    try:
        (src / "marker").write_text("from-the-host\n")
        cfg = container_config("dotdot", BUSYBOX_REF, ["/bin/sh", "-c"], [SLEEP_SCRIPT],
                               log_path="dotdot.log",
                               mounts=[(str(src), "/../../../data/../vol", True)])
        cid = env.c.create_container(pod_id, cfg, pod_cfg)
        try:
            with pytest.raises(CRIError) as ei:
                env.c.start_container(cid)
            one_error_line(str(ei.value), "StartContainer: ", r"'\.\.'.*component")
        finally:
            env.c.remove_container(cid)
        assert (src / "marker").read_text() == "from-the-host\n"
    finally:
        shutil.rmtree(src, ignore_errors=True)
    probe = env.container(pod_id, pod_cfg, f"probe{uuid.uuid4().hex[:4]}")
    env.exec_ok(probe, "still-fine")
    env.c.stop_container(probe, timeout=0)
    env.c.remove_container(probe)
