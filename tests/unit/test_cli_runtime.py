"""`pykata-runtime` without a VM: the command line, the state directory, bundle
checks, exec specs and the one-line errors (the keeper is never reached)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import errors
from pykata.cli import runtime as rt
from pykata.cli.runtime import args, entry, exec, keeper, lifecycle, query, state
from pykata.runtime.bundle import default_spec
from pykata.utils.process import ProcRef


# -- command line ------------------------------------------------------------------------
def test_signals() -> None:
    assert rt.parse_signal("TERM") == rt.parse_signal("SIGTERM") == rt.parse_signal("15") == 15
    assert rt.parse_signal("sigkill") == 9
    for bad in ("0", "65", "NOPE"):
        with pytest.raises(rt.base.CLIError):
            rt.parse_signal(bad)


def test_durations() -> None:
    assert args.parse_duration("5s") == 5.0
    assert args.parse_duration("250ms") == 0.25
    assert args.parse_duration("2m") == 120.0
    assert args.parse_duration("1.5") == 1.5
    with pytest.raises(rt.base.CLIError, match="invalid interval"):
        args.parse_duration("soon")


def test_global_flags_before_and_after_the_command() -> None:
    a = args.parse_args(["--root", "/r1", "kill", "--all", "c1", "KILL"])
    assert (a.root, a.command, a.all, a.id, a.signal) == ("/r1", "kill", True, "c1", "KILL")
    b = args.parse_args(["delete", "-root", "/r2", "--force", "c2"])
    assert (b.root, b.force, b.id) == ("/r2", True, "c2")
    c = args.parse_args(["exec", "-e", "A=1", "c3", "--", "sh", "-c", "x"])
    assert c.env == ["A=1"] and c.args[-3:] == ["sh", "-c", "x"]
    assert args.parse_args(["state", "c4"]).root == rt.base.DEFAULT_ROOT


def test_main_errors_are_one_line_and_logged(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.json"
    assert entry.main(["--log", str(log), "--log-format", "json", "frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pykata-runtime: ") and "unknown command" in err
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["level"] == "error" and "frobnicate" in rec["msg"]
    assert entry.main(["--root", str(tmp_path), "state", "nope"]) == 1
    assert capsys.readouterr().err == 'pykata-runtime: container "nope" does not exist\n'
    assert entry.main([]) == 1
    assert "no command given" in capsys.readouterr().err
    assert entry.main(["--version"]) == 0
    assert "spec: 1.0.2" in capsys.readouterr().out


def test_entry_point_module() -> None:
    r = subprocess.run([sys.executable, "-m", "pykata.cli.runtime", "--version"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and r.stdout.startswith("pykata-runtime version ")


# -- spec, features ------------------------------------------------------------------------
def test_spec_writes_a_default_config_once(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["spec", "--bundle", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec == default_spec(["sh"], hostname="pykata", terminal=True)
    assert entry.main(["spec", "--bundle", str(tmp_path)]) == 1
    assert "exists. Remove it first" in capsys.readouterr().err


def test_features(capsys: pytest.CaptureFixture[str]) -> None:
    assert query.do_features(argparse.Namespace()) == 0
    f = json.loads(capsys.readouterr().out)
    assert (f["ociVersionMin"], f["ociVersionMax"]) == ("1.0.0", "1.3.0")
    assert f["hooks"] == ["prestart", "createRuntime", "poststart", "poststop",
                          "createContainer", "startContainer"]
    assert "user" not in f["linux"]["namespaces"]


def test_version_names_the_accepted_spec_versions(capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["--version"]) == 0
    assert "accepted: 1.0.0 to 1.3.x" in capsys.readouterr().out


def _status(monkeypatch: pytest.MonkeyPatch, status: str) -> list[Any]:
    calls: list[Any] = []
    monkeypatch.setattr(lifecycle, "existing", lambda root, cid: Path("/nonexistent") / cid)
    monkeypatch.setattr(lifecycle, "task_status", lambda d, cid: status)
    monkeypatch.setattr(lifecycle, "call", lambda *a, **k: calls.append(a[2]))
    return calls


@pytest.mark.parametrize("signame", ["TERM", "KILL"])
def test_kill_of_a_stopped_container_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                 signame: str) -> None:
    calls = _status(monkeypatch, "stopped")
    a = args.parse_args(["kill", "c1", signame])
    with pytest.raises(rt.base.CLIError, match="^container not running$"):
        lifecycle.do_kill(a)
    # --all signals whatever is left in the container: nothing, and no error (runc).
    assert lifecycle.do_kill(args.parse_args(["kill", "--all", "c1", signame])) == 0
    assert calls == []


@pytest.mark.parametrize("status", ["created", "running", "paused"])
def test_kill_of_a_live_container_reaches_the_keeper(monkeypatch: pytest.MonkeyPatch,
                                                     status: str) -> None:
    calls = _status(monkeypatch, status)
    assert lifecycle.do_kill(args.parse_args(["kill", "c1", "USR1"])) == 0
    assert [c.signal for c in calls] == [10]


def test_kill_racing_the_exit_is_not_running(monkeypatch: pytest.MonkeyPatch) -> None:
    _status(monkeypatch, "running")

    def gone(*_a: Any, **_k: Any) -> None:
        raise errors.NotFound("process already finished")

    monkeypatch.setattr(lifecycle, "call", gone)
    with pytest.raises(rt.base.CLIError, match="container not running"):
        lifecycle.do_kill(args.parse_args(["kill", "c1", "KILL"]))


@pytest.mark.parametrize("status,message", [
    ("running", "cannot start an already running container"),
    ("paused", "cannot start a container in the paused state"),
    ("stopped", "cannot start a container that has stopped")])
def test_start_only_from_created(monkeypatch: pytest.MonkeyPatch, status: str,
                                 message: str) -> None:
    calls = _status(monkeypatch, status)
    with pytest.raises(rt.base.CLIError, match=message):
        lifecycle.do_start(args.parse_args(["start", "c1"]))
    assert calls == []


@pytest.mark.parametrize("command,status,message", [
    ("pause", "created", "container not running"), ("pause", "paused", "container not running"),
    ("pause", "stopped", "container not running"), ("resume", "running", "container not paused"),
    ("resume", "created", "container not paused")])
def test_pause_and_resume_need_their_state(monkeypatch: pytest.MonkeyPatch, command: str,
                                           status: str, message: str) -> None:
    calls = _status(monkeypatch, status)
    do = lifecycle.do_pause if command == "pause" else lifecycle.do_resume
    with pytest.raises(rt.base.CLIError, match=f"^{message}$"):
        do(args.parse_args([command, "c1"]))
    assert calls == []


# -- bundle checks --------------------------------------------------------------------------
def _bundle(tmp_path: Path, spec: dict[str, Any] | None, rootfs: bool = True) -> Path:
    b = tmp_path / "b"
    b.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        (b / "config.json").write_text(json.dumps(spec))
    if rootfs:
        (b / "rootfs").mkdir(exist_ok=True)
    return b


def test_read_bundle(tmp_path: Path) -> None:
    spec = default_spec(["true"])
    assert lifecycle.read_bundle(_bundle(tmp_path, spec)) == spec
    with pytest.raises(errors.InvalidArgument, match="has no config.json"):
        lifecycle.read_bundle(_bundle(tmp_path / "x", None))
    spec["process"]["args"] = []
    with pytest.raises(rt.base.CLIError, match="no process.args"):
        lifecycle.read_bundle(_bundle(tmp_path, spec))
    spec = default_spec(["true"])
    del spec["root"]
    with pytest.raises(rt.base.CLIError, match="no root.path"):
        lifecycle.read_bundle(_bundle(tmp_path, spec))
    with pytest.raises(rt.base.CLIError, match="root filesystem .* does not exist"):
        lifecycle.read_bundle(_bundle(tmp_path / "y", default_spec(["true"]), rootfs=False))


def test_bad_bundle_fails_before_any_state(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    b = _bundle(tmp_path, None)
    (b / "config.json").write_text("{not json")
    assert entry.main(["--root", str(root), "run", "--bundle", str(b), "c1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json is not JSON" in err
    assert not root.exists()


# -- state -------------------------------------------------------------------------------
def test_state_dir_refuses_bad_ids(tmp_path: Path) -> None:
    for bad in ("", "a/b", ".", ".."):
        with pytest.raises(rt.base.CLIError, match="invalid container id"):
            state.state_dir(str(tmp_path), bad)
    assert state.state_dir(str(tmp_path), "c1") == tmp_path / "c1"


def test_refs_survive_a_round_trip_and_old_bare_pids(tmp_path: Path) -> None:
    me = state.ref_of(os.getpid())
    assert me.alive()
    state.save_ref(tmp_path, state.KEEPER, me)
    assert state.load_ref(tmp_path, state.KEEPER) == me
    (tmp_path / state.STANDIN).write_text(str(me.pid))  # written by an older version
    assert state.load_ref(tmp_path, state.STANDIN) == me
    assert state.load_ref(tmp_path, "missing.pid") is None
    recycled = ProcRef(me.pid, me.start_time + 1)  # same pid, another process
    assert not recycled.alive()
    assert state.standin_ref(tmp_path, {"standin": recycled.to_json(), "pid": me.pid}) == recycled
    assert state.standin_ref(tmp_path, {"pid": me.pid}) == me
    assert state.standin_ref(tmp_path / "nothing", {}) is None


def _meta(d: Path, standin: ProcRef) -> dict[str, Any]:
    d.mkdir(parents=True, exist_ok=True)
    meta = {"id": d.name, "bundle": "/b", "pid": standin.pid, "standin": standin.to_json(),
            "rootfs": "/b/rootfs", "created": "2024-01-01T00:00:00Z",
            "annotations": {"a": "1"}}
    state.save_meta(d, meta)
    return meta


def test_oci_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        live = state.ref_of(proc.pid)
        status = {"now": "running"}
        monkeypatch.setattr(state, "task_status", lambda d, cid: status["now"])
        meta = _meta(tmp_path / "c1", live)
        st = state.oci_state(tmp_path / "c1", state.load_meta(tmp_path / "c1"))
        assert st == {"ociVersion": "1.0.2", "id": "c1", "pid": proc.pid, "status": "running",
                      "bundle": "/b", "rootfs": "/b/rootfs",
                      "created": "2024-01-01T00:00:00Z", "owner": "",
                      "annotations": {"a": "1"}}
        status["now"] = "stopped"
        assert state.oci_state(tmp_path / "c1", meta)["pid"] == 0
        # The keeper says running but the stand-in (a recycled pid here) is gone.
        status["now"] = "running"
        gone = ProcRef(proc.pid, live.start_time + 1)
        st = state.oci_state(tmp_path / "c2", _meta(tmp_path / "c2", gone))
        assert (st["status"], st["pid"]) == ("stopped", 0)
    finally:
        proc.kill()
        proc.wait()


def test_list_and_state_without_a_keeper(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _meta(tmp_path / "c1", ProcRef(1, -1))
    (tmp_path / "junk").mkdir()
    assert entry.main(["--root", str(tmp_path), "list", "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["status"], s["pid"]) for s in items] == [("c1", "stopped", 0)]
    assert entry.main(["--root", str(tmp_path), "list", "-q"]) == 0
    assert capsys.readouterr().out == "c1\n"


def test_pid_file_is_replaced_atomically(tmp_path: Path) -> None:
    state.write_pid_file(str(tmp_path / "pid"), 42)
    assert (tmp_path / "pid").read_text() == "42"
    assert [p.name for p in tmp_path.iterdir()] == ["pid"]
    state.write_pid_file("", 1)  # no --pid-file: nothing


# -- keeper side: processes ----------------------------------------------------------------
def test_terminate_and_reap_a_child() -> None:
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " time.sleep(60)"])
    ref = state.ref_of(proc.pid)
    time.sleep(0.3)
    assert not keeper.wait_gone(ref, 0.2)
    t0 = time.monotonic()
    keeper.terminate(ref, 0.3)  # ignores SIGTERM: killed after the grace time
    assert time.monotonic() - t0 < 5
    assert not ref.alive()
    with pytest.raises(ChildProcessError):  # reaped already
        os.waitpid(proc.pid, 0)
    proc.returncode = -9


def test_destroy_removes_the_state_dir_without_a_keeper(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cleaned: list[str] = []

    async def fake_cleanup(state_dir: str, cid: str, ns: str, *, force: bool) -> bool:
        cleaned.append(f"{cid} {ns} {force}")
        return True

    import pykata.runtime.cleanup as sandbox

    monkeypatch.setattr(sandbox, "cleanup", fake_cleanup)
    proc = subprocess.Popen(["sleep", "30"])
    d = tmp_path / "c1"
    _meta(d, state.ref_of(proc.pid))
    keeper.destroy(d, "c1")
    assert not d.exists()
    assert proc.poll() is not None or proc.wait(5) is not None  # the stand-in was stopped
    assert cleaned == ["c1 pykata-runtime True"]


# -- exec ------------------------------------------------------------------------------------
def _exec_args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"process": "", "tty": False, "args": [], "cwd": "", "env": [],
                            "user": "", "additional_gids": []}
    base.update(kw)
    return argparse.Namespace(**base)


def test_exec_spec_from_the_command_line(tmp_path: Path) -> None:
    b = _bundle(tmp_path, default_spec(["sleep", "1"], env=["PATH=/bin", "A=0"], cwd="/w"))
    meta = {"bundle": str(b)}
    p = exec.exec_spec(_exec_args(args=["--", "sh", "-c", "x"], env=["A=1"]), meta)
    assert p == {"terminal": False, "args": ["sh", "-c", "x"], "env": ["PATH=/bin", "A=1"],
                 "cwd": "/w", "user": {"uid": 0, "gid": 0}}
    p = exec.exec_spec(_exec_args(args=["id"], user="1000:100", additional_gids=["5"],
                                  tty=True, cwd="/tmp"), {"bundle": str(tmp_path / "gone")})
    assert p["user"] == {"uid": 1000, "gid": 100, "additionalGids": [5]}
    assert p["terminal"] and p["cwd"] == "/tmp" and p["env"] == []
    with pytest.raises(rt.base.CLIError, match="no command given"):
        exec.exec_spec(_exec_args(args=["--"]), meta)
    with pytest.raises(rt.base.CLIError, match="invalid --user"):
        exec.exec_spec(_exec_args(args=["id"], user="bob"), meta)


def test_exec_spec_from_a_process_file(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"args": ["true"], "cwd": "/"}))
    assert exec.exec_spec(_exec_args(process=str(f), tty=True), {}) == {
        "args": ["true"], "cwd": "/", "terminal": True}
    f.write_text("{nope")
    with pytest.raises(rt.base.CLIError, match="invalid --process"):
        exec.exec_spec(_exec_args(process=str(f)), {})
