"""Issue 19, the agent policy on real VMs (docs/confidential.md).

Through a private containerd: a pod whose shim was started with ``[agent]
policy_file`` (given with ``--runtime-config-path``) runs the listed command
with `ctr task exec` and refuses another with a PERMISSION_DENIED line naming
the rule, while its container runs on; a policy that cannot be read or parsed
fails `ctr run` before a VM boots, leaving nothing. In this process (the test
owns the agent connection, as `pykata run` does): SetPolicy refused by a fixed
policy and accepted by one that allows it, CopyFile outside the allowed paths
refused. Through containerd's CRI API: the policy as a pod annotation, ExecSync
refused, the container's output kept in the guest (``stdio: own-exec-only``)
while the pod runs."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pykata import config, errors
from pykata.protos import agent_pb2 as pb
from pykata.runtime.state import sandbox_dir
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd, scratch_containerd
from pykata.testing.images import BUSYBOX_REF, oci_archive

IMG = BUSYBOX_REF
RT = ["--runtime", RUNTIME_TYPE]
ALLOWED = ["cat", "/etc/passwd"]
POLICY = {"version": 1, "exec": {"commands": [{"argv": ALLOWED}]}}
ANNOTATION = "io.katacontainers.config.agent.policy"


def write_config(base: config.Config, path: Path, policy: dict[str, Any] | bytes | None,
                 **agent: Any) -> Path:
    cfg = copy.deepcopy(base)
    if policy is not None:
        doc = policy if isinstance(policy, bytes) else json.dumps(policy).encode()
        (path.parent / f"{path.stem}.policy.json").write_bytes(doc)
        cfg.agent.policy_file = str(path.parent / f"{path.stem}.policy.json")
    for k, v in agent.items():
        setattr(cfg.agent, k, v)
    path.write_text(config.to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def ctd(rootfs: Path) -> Iterator[PrivateContainerd]:
    with scratch_containerd("pkpolicy", oci_archive(
            rootfs, Path("/var/tmp/pykata-test/busybox.oci.tar"))) as c:
        yield c


def _wait(cond: Any, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


@contextlib.contextmanager
def pod(ctd: PrivateContainerd, cfg: Path, pykata_config: config.Config) -> Iterator[str]:
    c = f"p{uuid.uuid4().hex[:8]}"
    ctd.ctr("run", "-d", *RT, "--runtime-config-path", str(cfg), IMG, c, "sleep", "600")
    d = sandbox_dir(pykata_config.runtime.state_dir, c, ctd.namespace)
    try:
        yield c
    finally:
        ctd.ctr("task", "kill", "-s", "KILL", c, check=False)
        _wait(lambda: c.encode() not in ctd.ctr("task", "ls", check=False).stdout
              or b"STOPPED" in ctd.ctr("task", "ls", check=False).stdout)
        ctd.ctr("task", "delete", "-f", c, check=False)
        ctd.ctr("container", "delete", c, check=False)
    _wait(lambda: not d.exists())
    assert not d.exists(), f"left behind: {sorted(os.listdir(d))}"


def _status(ctd: PrivateContainerd, c: str) -> str:
    for line in ctd.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == c:
            return fields[-1]
    return ""


def test_exec_allowed_and_refused_by_the_policy(
        ctd: PrivateContainerd, pykata_config: config.Config, tmp_path: Path) -> None:
    cfg = write_config(pykata_config, tmp_path / "exec.toml", POLICY)
    with pod(ctd, cfg, pykata_config) as c:
        r = ctd.ctr("task", "exec", "--exec-id", "ok1", c, *ALLOWED, check=False)
        assert r.returncode == 0 and r.stdout.startswith(b"root:"), r.stderr
        r = ctd.ctr("task", "exec", "--exec-id", "no1", c, "sh", "-c", "echo escaped",
                    check=False)
        assert r.returncode != 0 and b"escaped" not in r.stdout
        # containerd 1.6 has no "permission denied" error kind: the shim's code 7
        # reaches ctr as "unknown", the agent's one line intact.
        err = r.stderr.decode()
        assert 'agent policy: ExecProcess denied by rule exec.commands: ["sh", "-c",' \
               ' "echo escaped"] in container' in err, err
        assert len(err.strip().splitlines()) == 1, err
        # Almost the allowed command is not the allowed command.
        r = ctd.ctr("task", "exec", "--exec-id", "no2", c, "cat", "/etc/group", check=False)
        assert r.returncode != 0 and b"rule exec.commands" in r.stderr, r.stderr
        # The container runs on, the refused execs left nothing, an allowed one still runs.
        assert _status(ctd, c) == "RUNNING"
        r = ctd.ctr("task", "ps", c)
        assert b"no1" not in r.stdout and b"no2" not in r.stdout, r.stdout
        r = ctd.ctr("task", "exec", "--exec-id", "ok2", c, *ALLOWED, check=False)
        assert r.returncode == 0 and b"root:" in r.stdout, r.stderr


def test_without_a_policy_everything_runs_as_before(
        ctd: PrivateContainerd, pykata_config: config.Config, tmp_path: Path) -> None:
    cfg = write_config(pykata_config, tmp_path / "none.toml", None)
    with pod(ctd, cfg, pykata_config) as c:
        r = ctd.ctr("task", "exec", "--exec-id", "sh1", c, "sh", "-c", "echo free",
                    check=False)
        assert (r.returncode, r.stdout) == (0, b"free\n"), r.stderr


@pytest.mark.parametrize(("doc", "words"), [
    (b'{"version": 1, "exec": {"commands": [{"argv": []}]}}',
     "invalid agent policy: exec.commands[0].argv: must not be empty"),
    (None, "No such file or directory"),
])
def test_a_policy_that_cannot_be_used_fails_the_pod_before_it_boots(
        ctd: PrivateContainerd, pykata_config: config.Config, tmp_path: Path,
        doc: bytes | None, words: str) -> None:
    cfg = write_config(pykata_config, tmp_path / "bad.toml", doc or b"{}")
    if doc is None:
        (tmp_path / "bad.policy.json").unlink()
    c = f"b{uuid.uuid4().hex[:8]}"
    try:
        r = ctd.ctr("run", "-d", *RT, "--runtime-config-path", str(cfg), IMG, c, "true",
                    check=False)
        assert r.returncode != 0 and words in r.stderr.decode(), r.stderr
    finally:
        ctd.ctr("task", "delete", "-f", c, check=False)
        ctd.ctr("container", "delete", c, check=False)
    d = sandbox_dir(pykata_config.runtime.state_dir, c, ctd.namespace)
    assert _wait(lambda: not d.exists()), f"left behind: {d}"


# -- SetPolicy and CopyFile, with the agent connection in this process ------------------


@pytest_asyncio.fixture(loop_scope="function")
async def make_sandbox(pykata_config: config.Config, tmp_path: Path
                       ) -> AsyncIterator[Any]:
    from pykata.runtime.sandbox import Sandbox

    made: list[Sandbox] = []

    async def make(policy: dict[str, Any]) -> Sandbox:
        cfg = copy.deepcopy(pykata_config)
        path = tmp_path / f"policy-{len(made)}.json"
        path.write_text(json.dumps(policy))
        cfg.agent.policy_file = str(path)
        sb = await Sandbox.create(f"pol-{uuid.uuid4().hex[:8]}", cfg)
        made.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in made:
            await sb.stop()
            assert not sb.dir.exists()


async def _metrics(sb: Any) -> str:
    resp = await sb.agent._call("GetMetrics", pb.GetMetricsRequest(), pb.Metrics)
    return str(resp.metrics)


async def test_set_policy_only_when_the_policy_allows_it(make_sandbox: Any) -> None:
    fixed = await make_sandbox({"version": 1, "methods": {"GetMetrics": "deny"},
                                "set_policy": "deny"})
    with pytest.raises(errors.PermissionDenied) as ei:
        await _metrics(fixed)
    assert str(ei.value) == "agent policy: GetMetrics denied by rule methods.GetMetrics: denied"
    with pytest.raises(errors.PermissionDenied) as ei:
        await fixed.agent.set_policy(b'{"version": 1}')
    assert str(ei.value) == ("agent policy: SetPolicy denied by rule set_policy: the policy"
                             " in force cannot be replaced")
    with pytest.raises(errors.PermissionDenied):  # still the first policy
        await _metrics(fixed)

    open_ = await make_sandbox({"version": 1, "methods": {"GetMetrics": "deny"},
                                "set_policy": "allow"})
    with pytest.raises(errors.InvalidArgument, match="invalid agent policy"):
        await open_.agent.set_policy(b'{"version": 1, "stdio": 3}')
    with pytest.raises(errors.PermissionDenied):  # an invalid one changed nothing
        await _metrics(open_)
    await open_.agent.set_policy(b'{"version": 1}')  # fixed from now on
    assert "pykata_agent_containers" in await _metrics(open_)
    with pytest.raises(errors.PermissionDenied, match="rule set_policy"):
        await open_.agent.set_policy(b'{"version": 1, "set_policy": "allow"}')


async def test_copy_file_outside_the_allowed_paths_is_refused(make_sandbox: Any) -> None:
    sb = await make_sandbox({"version": 1, "copy_file": {"paths": ["/run/allowed/"]}})

    async def copy_to(path: str) -> None:
        await sb.agent._call("CopyFile", pb.CopyFileRequest(
            path=path, data=b"x", file_size=1, file_mode=0o644), pb.Empty)

    await copy_to("/run/allowed/f")
    for path, words in (("/etc/passwd", "is outside the allowed paths"),
                        ("/run/allowed/../../etc/passwd", "is not an absolute canonical path"),
                        ("/run/allowedX", "is outside the allowed paths")):
        with pytest.raises(errors.PermissionDenied) as ei:
            await copy_to(path)
        assert str(ei.value).startswith("agent policy: CopyFile denied by rule copy_file.paths:")
        assert words in str(ei.value)


# -- CRI: the policy as a pod annotation --------------------------------------------------


def test_cri_pod_annotation_policy(pykata_config: config.Config, tmp_path: Path) -> None:
    """A node that accepts policies from pods ([agent] policy_annotation): the
    pod's policy refuses ExecSync of a shell and keeps the container's output in
    the guest (stdio own-exec-only), while the pod and its container run on."""
    from pykata.testing.cri import CRIError
    from tests.integration.test_cri_pykata import Pod, cri_env

    policy = {"version": 1, "stdio": "own-exec-only",
              "exec": {"commands": [{"argv": ["cat", "/tmp/done"]}]}}
    cfg = write_config(pykata_config, tmp_path / "cri.toml", None, policy_annotation=True)
    ann = {ANNOTATION: base64.b64encode(json.dumps(policy).encode()).decode()}
    with contextlib.contextmanager(cri_env)(pykata_config=cfg.read_text()) as env:
        p = Pod(env, annotations=ann)
        try:
            cid = p.container("app", "echo secret-output; echo done > /tmp/done;"
                                     " trap 'exit 0' TERM; sleep 3600 & wait")
            # The allowed exec (its own stdio is readable): the container wrote its line.
            assert _wait(lambda: p.c.exec_sync(cid, ["cat", "/tmp/done"]).stdout == b"done\n",
                         120)
            with pytest.raises(CRIError) as ei:
                p.c.exec_sync(cid, ["sh", "-c", "echo escaped"])
            assert "agent policy: ExecProcess denied by rule exec.commands" in str(ei.value)
            st = p.c.container_status(cid)
            assert st.status.state == 1, st  # CONTAINER_RUNNING
            p.c.stop_container(cid, timeout=10)
            st = p.c.container_status(cid)
            assert st.status.exit_code == 0, st  # its exit, not a failure of its stdio
            log = Path(st.status.log_path)
            assert b"secret-output" not in (log.read_bytes() if log.exists() else b"")
            # The shim ended the relay on the refusal, once per stream, at info level.
            ctd_log = env[0].log.read_text(errors="replace")
            assert f"output of {cid}/init relayed no further: agent policy: ReadStdout" \
                " denied by rule stdio" in ctd_log, ctd_log[-3000:]
        finally:
            left = p.remove()
        assert not left, f"left behind: {left}"
