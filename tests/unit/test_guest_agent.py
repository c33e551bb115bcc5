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
    monkeypatch.setattr(channel.os.path, "exists", lambda p: p == "/dev/vport1p1")
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
    for heavy in ("asyncio", "logging", "argparse", "pathlib", "google.protobuf", "typing"):
        assert heavy not in out, f"pykata.guest.agent imports {heavy} at the top"


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
