"""OCI hooks with the runtime spec's semantics, run as real processes: state on
stdin, exactly their env and args, timeout, failures; through the shim's Task
service (fakes for the VM) and pykata-runtime's host side; what the guest gets
of them (createContainer, startContainer and their state)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import errors, wire
from pykata.cli.runtime import hookrun
from pykata.cli.runtime.base import CLIError
from pykata.runtime import hooks
from tests.unit.test_shim_service import Shim


def script(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return str(p)


def test_parse_names_bad_fields_and_takes_guest_hooks() -> None:
    assert hooks.parse({}) == {}
    got = hooks.parse({"hooks": {"prestart": [{"path": "/bin/true", "args": ["true", "x"],
                                               "env": ["A=1"], "timeout": 3}],
                                 "createContainer": [{"path": "/bin/cc"}],
                                 "startContainer": [{"path": "/bin/sc", "timeout": 2}]}})
    assert got["prestart"] == [hooks.Hook("/bin/true", ("true", "x"), ("A=1",), 3.0,
                                          "hooks.prestart[0]")]
    assert got["createContainer"] == [hooks.Hook("/bin/cc", name="hooks.createContainer[0]")]
    assert got["startContainer"][0].timeout == 2.0
    for bad, message in [
        ({"prestart": [{"path": "true"}]}, r"hooks\.prestart\[0\]\.path must be an absolute"),
        ({"poststop": [{"path": "/x", "timeout": 0}]}, r"hooks\.poststop\[0\]\.timeout"),
        ({"poststart": [{"path": "/x", "env": "A=1"}]}, r"hooks\.poststart\[0\]\.env"),
        ({"createContainer": [{"path": "x"}]}, r"hooks\.createContainer\[0\]\.path"),
        ({"startContainer": {"path": "/x"}}, r"hooks\.startContainer must be a list"),
    ]:
        with pytest.raises(errors.InvalidArgument, match=message):
            hooks.parse({"hooks": bad})


def test_to_guest_keeps_the_guest_kinds_and_the_state_the_guest_cannot_know() -> None:
    spec: dict[str, Any] = {"annotations": {"a": "b"}, "hooks": {
        "prestart": [{"path": "/bin/p"}], "poststop": [{"path": "/bin/q"}],
        "createContainer": [{"path": "/bin/cc", "args": ["cc", "-x"], "env": ["A=1"],
                             "timeout": 5}],
        "startContainer": [{"path": "/bin/sc"}]}}
    hooks.to_guest(spec, "/bundles/c1", "1.3.0")
    assert spec["hooks"] == {
        "createContainer": [{"path": "/bin/cc", "args": ["cc", "-x"], "env": ["A=1"],
                             "timeout": 5}],
        "startContainer": [{"path": "/bin/sc", "args": [], "env": []}]}
    assert spec["annotations"]["a"] == "b"
    assert json.loads(spec["annotations"][wire.HOOK_STATE_ANNOTATION]) == {
        "bundle": "/bundles/c1", "ociVersion": "1.3.0"}
    host_only: dict[str, Any] = {"hooks": {"prestart": [{"path": "/bin/p"}]}}
    hooks.to_guest(host_only, "/b", "1.0.2")
    assert host_only == {}  # nothing for the guest: no hooks, no annotation


def test_the_guest_spec_has_only_the_guest_hooks(tmp_path: Path) -> None:
    from pykata.runtime import specconv
    from pykata.testing import default_spec, make_bundle

    spec = default_spec(["true"])
    spec["ociVersion"] = "1.2.0"
    spec["hooks"] = {"prestart": [{"path": "/bin/p"}],
                     "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"]}]}
    bundle = tmp_path / "b"
    (bundle / "rootfs").mkdir(parents=True)
    make_bundle(bundle, bundle / "rootfs", spec)
    p = specconv.plan(spec, "c1", bundle)
    assert list(p.spec["hooks"]) == ["startContainer"]
    assert json.loads(p.spec["annotations"][wire.HOOK_STATE_ANNOTATION]) == {
        "bundle": str(bundle), "ociVersion": "1.2.0"}
    assert p.spec["ociVersion"] == specconv.GUEST_SPEC_VERSION
    assert "hooks" in spec and wire.HOOK_STATE_ANNOTATION not in (spec.get("annotations") or {})
    specconv.check_spec(spec)  # guest kinds are no longer refused


async def test_a_hook_gets_the_state_on_stdin_its_env_and_args(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = f"cat > {out}.state; tr '\\0' ' ' < /proc/$$/cmdline > {out}; echo [$A] [$HOME] >> {out}"
    hook = hooks.Hook("/bin/sh", ("argv0", "-c", cmd), ("A=set",), None, "hooks.prestart[0]")
    st = hooks.state("c1", "creating", 77, "/b", {"k": "v"}, "1.2.0")
    await hooks.run(hook, st)
    words = out.read_text().split()
    assert words[:2] == ["argv0", "-c"] and words[-2:] == ["[set]", "[]"]  # only its env
    assert json.loads(Path(f"{out}.state").read_text()) == {
        "ociVersion": "1.2.0", "id": "c1", "status": "creating", "pid": 77, "bundle": "/b",
        "annotations": {"k": "v"}}
    # Without args, argv[0] is the path.
    path = script(tmp_path, "h", f"tr '\\0' ' ' < /proc/$$/cmdline > {out}")
    await hooks.run(hooks.Hook(path, (), (), None, "h"), st)
    assert out.read_text().split() == ["/bin/sh", path]


async def test_failures_and_timeouts_name_the_hook(tmp_path: Path) -> None:
    st = hooks.state("c1", "creating", 1, "/b", {}, "1.0.2")
    bad = hooks.Hook(script(tmp_path, "bad", "echo broken >&2; exit 3"), (), (), None,
                     "hooks.prestart[1]")
    with pytest.raises(hooks.HookError, match=r"hooks\.prestart\[1\] \(.*bad\) exited with"
                                              r" status 3: broken"):
        await hooks.run(bad, st)
    slow = hooks.Hook(script(tmp_path, "slow", "sleep 30"), (), (), 1, "hooks.poststart[0]")
    t0 = time.monotonic()
    with pytest.raises(hooks.HookError, match=r"hooks\.poststart\[0\] .* timed out after 1s"):
        await hooks.run(slow, st)
    assert time.monotonic() - t0 < 10
    with pytest.raises(hooks.HookError, match="cannot run"):
        await hooks.run(hooks.Hook("/nonexistent/hook", (), (), None, "h"), st)


async def test_run_kind_stops_at_the_first_failure_or_logs_and_goes_on(tmp_path: Path) -> None:
    mark = tmp_path / "ran"
    parsed = {"poststop": [hooks.Hook("/bin/false", (), (), None, "hooks.poststop[0]"),
                           hooks.Hook(script(tmp_path, "m", f"touch {mark}"), (), (), None,
                                      "hooks.poststop[1]")]}
    st = hooks.state("c1", "stopped", 0, "/b", {}, "1.0.2")
    assert "pid" not in st
    with pytest.raises(hooks.HookError):
        await hooks.run_kind(parsed, "poststop", st, fail=True)
    assert not mark.exists()
    await hooks.run_kind(parsed, "poststop", st, fail=False)
    assert mark.exists()


# -- through the shim (containerd) ------------------------------------------------------------
def _hooks_spec(tmp_path: Path, **kinds: str) -> dict[str, Any]:
    return {"hooks": {k: [{"path": script(tmp_path, k, body)}] for k, body in kinds.items()}}


async def test_shim_runs_host_hooks_with_the_task_state(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    log = tmp_path / "log"
    body = f'cat >> {log}; echo >> {log}'
    await shim.create("c1", spec=_hooks_spec(tmp_path, prestart=body, createRuntime=body,
                                             poststart=body, poststop=body))
    states = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["status"] for s in states] == ["creating", "creating"]
    assert states[0]["id"] == "c1" and states[0]["pid"] == shim.svc._pid
    await shim.start("c1")
    await shim.kill("c1", 9)
    await shim.wait("c1")
    await shim.delete("c1")
    states = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["status"] for s in states] == ["creating", "creating", "running", "stopped"]


async def test_a_failing_prestart_fails_create_and_leaves_nothing(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with pytest.raises(errors.FailedPrecondition, match=r"hooks\.prestart\[0\] .* exited with"
                                                        r" status 2: no network"):
        await shim.create("c1", spec=_hooks_spec(tmp_path,
                                                 prestart="echo no network; exit 2"))
    assert shim.svc.sandbox is None
    assert shim.factory.made[-1].containers == {} and shim.agent.containers == {}


async def test_a_failing_poststop_is_logged_not_raised(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    shim = Shim(tmp_path)
    await shim.create("c1", spec=_hooks_spec(tmp_path, poststop="exit 1"))
    await shim.kill("c1", 9)
    await shim.delete("c1")
    assert "hooks.poststop[0]" in caplog.text and "exited with status 1" in caplog.text


async def test_a_failed_start_ends_the_container(tmp_path: Path) -> None:
    """A startContainer hook that fails in the guest fails start; the container is
    removed from the guest and stops (its exit published), waiting for delete."""
    shim = Shim(tmp_path)
    await shim.create("c1")
    shim.agent.fail("start_container", errors.InvalidArgument(
        "cannot start container c1: hooks.startContainer[0] (/bin/sh): exited with status 4"))
    with pytest.raises(errors.InvalidArgument, match=r"hooks\.startContainer\[0\]"):
        await shim.start("c1")
    assert "c1" not in shim.agent.containers
    resp = await shim.state("c1")
    assert resp.exit_status == 137
    assert (await shim.wait("c1")).exit_status == 137
    await shim.delete("c1")
    assert shim.svc.sandbox is None


async def test_keeper_of_pykata_runtime_leaves_hooks_to_it(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv(hookrun.HOOKS_ENV, "caller")
    shim = Shim(tmp_path)
    await shim.create("c1", spec=_hooks_spec(tmp_path, prestart="exit 1"))  # not run


# -- pykata-runtime's side ---------------------------------------------------------------------
def test_cli_hooks_get_the_stand_in_pid_and_fail_create(tmp_path: Path) -> None:
    out = tmp_path / "state"
    spec = {"ociVersion": "1.3.0", "annotations": {"a": "b"},
            **_hooks_spec(tmp_path, prestart=f"cat > {out}", createRuntime="exit 0",
                          poststop="exit 7")}
    meta = hookrun.create_meta("c9", tmp_path, spec)
    hookrun.run(meta, ("prestart", "createRuntime"), os.getpid(), fail=True)
    st = json.loads(out.read_text())
    assert (st["id"], st["pid"], st["status"], st["ociVersion"]) == ("c9", os.getpid(),
                                                                     "creating", "1.3.0")
    assert st["annotations"] == {"a": "b"} and st["bundle"] == str(tmp_path)
    hookrun.run(meta, ("poststop",), 0, fail=False)  # logged only
    meta["hooks"]["prestart"][0]["path"] = "/bin/false"
    with pytest.raises(CLIError, match=r"^prestart hook failed: hooks\.prestart\[0\]"):
        hookrun.run(meta, ("prestart",), 1, fail=True)


def test_new_netns_only_when_the_spec_asks_one() -> None:
    assert hookrun.wants_new_netns({"linux": {"namespaces": [{"type": "network"}]}})
    assert not hookrun.wants_new_netns(
        {"linux": {"namespaces": [{"type": "network", "path": "/run/netns/x"}]}})
    assert not hookrun.wants_new_netns({"linux": {"namespaces": [{"type": "pid"}]}})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_netns_is_made_entered_and_removed(tmp_path: Path) -> None:
    import subprocess

    path = hookrun.make_netns(tmp_path)
    try:
        enter, fds = hookrun.enter_netns(path)
        try:
            child = subprocess.run([sys.executable, "-c", "import os;"
                                    "print(os.stat('/proc/self/ns/net').st_ino)"],
                                   preexec_fn=enter, pass_fds=fds, capture_output=True,
                                   text=True, timeout=30, check=True)
        finally:
            for fd in fds:
                os.close(fd)
        assert int(child.stdout) == os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
    finally:
        hookrun.remove_netns(tmp_path)
    assert not path.exists()
