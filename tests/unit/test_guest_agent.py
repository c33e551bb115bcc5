"""Agent command line, channels and crun error lines (pure), and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pykata.guest import agent, channel
from pykata.guest.crun import crun_error


@pytest.mark.parametrize(("text", "kind", "address"), [
    ("unix:/tmp/a.sock", "unix", "/tmp/a.sock"),
    ("vsock:1024", "vsock", "1024"),
    ("vsock:3:1024", "vsock", "1024"),
    ("serial:agent.channel.0", "serial", "agent.channel.0"),
    ("auto", "auto", ""),
])
def test_parse_channel(text: str, kind: str, address: str) -> None:
    ch = channel.parse_channel(text)
    assert (ch.kind, ch.address) == (kind, address)


@pytest.mark.parametrize("text", ["unix:", "tcp:1", "vsock:x", "vsock:0", "nothing"])
def test_parse_channel_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        channel.parse_channel(text)


def test_find_serial_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for entry, name in (("vport0p0", "other"), ("vport1p1", "agent.channel.0")):
        (tmp_path / entry).mkdir()
        (tmp_path / entry / "name").write_text(name + "\n")
    monkeypatch.setattr(channel.os.path, "exists",  # type: ignore[attr-defined]
                        lambda p: p == "/dev/vport1p1")
    assert channel.find_serial_port("agent.channel.0", str(tmp_path)) == "/dev/vport1p1"
    assert channel.find_serial_port("missing", str(tmp_path)) is None
    assert channel.find_serial_port("x", str(tmp_path / "nope")) is None


def test_options_without_and_with_arguments() -> None:
    bare = agent.parse_args([])
    assert (bare.listen, bare.state_dir, bare.cgroup_parent, bare.no_pivot) == (
        None, "/run/pykata", "pykata", None)
    opts = agent.parse_args(["--listen", "unix:/x", "--state-dir", "/s", "--no-pivot",
                             "--crun-timeout", "5", "--manage-network"])
    assert (opts.listen, opts.state_dir, opts.no_pivot, opts.crun_timeout) == (
        "unix:/x", "/s", True, 5.0)
    assert opts.manage_network
    assert agent.parse_args(["--pivot"]).no_pivot is False
    assert agent.parse_args(["--cgroup-root", "/x"]).cgroup_root == "/x"


def test_guest_boot_imports_are_few() -> None:
    """Before the modules load only a few modules are imported (boot time under TCG)."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import pykata.guest.agent\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)}).stdout.split()
    for heavy in ("asyncio", "logging", "argparse", "pathlib", "google.protobuf", "typing",
                  "threading", "signal", "enum", "functools"):
        assert heavy not in out, f"pykata.guest.agent imports {heavy} at the top"


def _frame(stream: int, service: str, method: str, type_: int = 1) -> bytes:
    from pykata.protos import ttrpc_pb2
    from pykata.ttrpc import frames

    req = ttrpc_pb2.Request(service=service, method=method, payload=b"\x0a\x00",
                            timeout_nano=5_000_000_000,
                            metadata=[ttrpc_pb2.KeyValue(key="k", value="v")])
    return frames.encode(stream, type_, req.SerializeToString())


def test_early_check_reply_matches_the_full_service() -> None:
    from pykata import wire
    from pykata.protos import agent_pb2, ttrpc_pb2
    from pykata.ttrpc import frames

    check = _frame(7, wire.HEALTH_SERVICE, "Check")
    assert channel.request_method(check[10:]) == (wire.HEALTH_SERVICE, "Check")
    reply = channel.check_reply(check + b"\x00\x00")
    assert reply is not None and reply[1] == len(check)
    length, stream, type_, flags = frames.HEADER.unpack(reply[0][:10])
    assert (length, stream, type_, flags) == (len(reply[0]) - 10, 7, frames.TYPE_RESPONSE, 0)
    full = ttrpc_pb2.Response(payload=agent_pb2.HealthCheckResponse(
        status=agent_pb2.HealthCheckResponse.SERVING).SerializeToString())
    assert reply[0][10:] == full.SerializeToString() == channel.CHECK_RESPONSE
    # anything else is the full server's: other methods, services, types, partial frames
    assert channel.check_reply(_frame(7, wire.HEALTH_SERVICE, "Version")) is None
    assert channel.check_reply(_frame(7, wire.AGENT_SERVICE, "Check")) is None
    assert channel.check_reply(_frame(7, wire.HEALTH_SERVICE, "Check", type_=3)) is None
    assert channel.check_reply(_frame(8, wire.HEALTH_SERVICE, "Check")) is None
    assert channel.check_reply(check[:-1]) is None and channel.check_reply(b"") is None
    with pytest.raises(ValueError):
        channel.request_method(b"\x0a\x05ab")


def test_early_health_answers_checks_then_hands_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a raw pty standing for the virtio-serial port: Checks are answered; the
    first other request and everything after it are left for the full server."""
    import os
    import select
    import tty

    from pykata import wire

    master, slave = os.openpty()
    tty.setraw(slave)
    monkeypatch.setattr(channel, "find_serial_port", lambda name, d=None: os.ttyname(slave))
    early = channel.EarlyHealth("agent.channel.0")
    early.start()
    try:
        def read_reply() -> bytes:
            got = b""
            while len(got) < 14:
                assert select.select([master], [], [], 10.0)[0], "no early answer"
                got += os.read(master, 64)
            return got

        os.write(master, _frame(1, wire.HEALTH_SERVICE, "Check"))
        assert read_reply()[:10] == b"\x00\x00\x00\x04\x00\x00\x00\x01\x02\x00"
        rest = _frame(3, wire.AGENT_SERVICE, "CreateSandbox") + _frame(5, wire.HEALTH_SERVICE,
                                                                        "Check")
        os.write(master, rest)
        deadline = 100
        while early._blocked is False and deadline:
            select.select([], [], [], 0.02)
            deadline -= 1
        handed = early.handover()
        assert handed is not None and early.answered == 1 and not early.error
        dev, fd, pending = handed
        assert dev == os.ttyname(slave) and pending == rest
        assert not select.select([master], [], [], 0.1)[0]  # the later Check: not answered
        os.close(fd)
    finally:
        early.handover()
        os.close(master)
        os.close(slave)


def test_early_health_without_a_port_hands_over_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "find_serial_port", lambda name, d=None: None)
    early = channel.EarlyHealth("agent.channel.0")
    early.start()
    assert early.handover() is None and not early.error


def test_boot_stamps_are_kept_once() -> None:
    first = channel.stamp("test-step")
    assert channel.stamp("test-step") == first == channel.BOOT_STAMPS["test-step"]
    from pykata.guest import logs

    assert "test-step=" in logs.boot_summary()


def test_crun_error_prefers_json_log() -> None:
    log = "\n".join([
        json.dumps({"msg": "some warning", "level": "warning"}),
        json.dumps({"msg": "executable file `x` not found", "level": "error"}),
        "",
    ])
    assert crun_error(log, b"noise\n", 1) == "executable file `x` not found"
    assert crun_error("", b"chdir `/b` failed: No such file or directory\n\n", 1) == \
        "chdir `/b` failed: No such file or directory"
    assert crun_error("", b"", 2) == "crun exited with status 2"
    assert crun_error("not json\n", b"", 1) == "not json"


ALLOWED_PYKATA = ("pykata", "pykata.errors", "pykata.wire", "pykata.ttrpc", "pykata.protos",
                  "pykata.guest")


def test_guest_imports_only_what_the_guest_has() -> None:
    """The guest has the stdlib, google.protobuf and these pykata packages only."""
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        "import pkgutil, importlib, pykata.guest\n"
        "for m in pkgutil.iter_modules(pykata.guest.__path__):\n"
        "    importlib.import_module('pykata.guest.' + m.name)\n"
        "import pykata.ttrpc.streams\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)}).stdout
    loaded = json.loads(out)
    bad = []
    for name in loaded:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("google", "_cffi_backend"):
            continue
        if top == "pykata":
            if any(name == a or name.startswith(a + ".") for a in ALLOWED_PYKATA):
                continue
        bad.append(name)
    assert not bad, f"the guest agent imports modules the guest does not have: {bad}"


def _guest_imports() -> dict[str, set[str]]:
    """guest module -> the guest modules it imports (anywhere in it, lazily too)."""
    import ast

    import pykata.guest

    pkg = Path(pykata.guest.__file__).parent
    names = {p.stem for p in pkg.glob("*.py")} - {"__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for t in targets:
                parts = t.split(".")
                if parts[:2] == ["pykata", "guest"] and len(parts) > 2 and parts[2] in names:
                    deps.add(parts[2])
        graph[name] = deps - {name}
    return graph


def test_guest_modules_have_no_import_cycles() -> None:
    graph = _guest_imports()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):],
                                                                 name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    # Channels are parsed before the serving code loads: channel.py stays light.
    assert graph["channel"] == set()
