"""Fuzzing `pykata-runtime`'s command line and bundle reading: random argv
through the parser, then whole command lines (runc's commands and flags with
good and bad values) and random config.json contents through ``main``, with
the keeper (the part that would start a VM) replaced by a stop sign.

Properties: the parser returns or raises CLIError (help exits 0); ``main``
returns 0, or 1 with exactly one line on stderr ("pykata-runtime: ..."), or
reached the keeper with a spec it accepted -- never a traceback. The bundle
reader returns a dict or raises InvalidArgument with one line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pykata import errors
from pykata.cli.runtime import args as rtargs
from pykata.cli.runtime import base, entry, hookrun, lifecycle
from pykata.runtime import bundle as bundlemod
from tests.fuzz import support

COMMANDS = ["create", "run", "start", "state", "kill", "delete", "exec", "ps", "list", "pause",
            "resume", "update", "events", "spec", "features"]
FLAGS = ["--bundle", "-b", "--pid-file", "--console-socket", "--no-pivot", "--no-new-keyring",
         "--preserve-fds", "--detach", "-d", "--keep", "--all", "-a", "--force", "-f",
         "--process", "-p", "--tty", "-t", "--cwd", "--env", "-e", "--user", "-u",
         "--additional-gids", "-g", "--cap", "-c", "--ignore-paused", "--format", "--quiet",
         "-q", "--resources", "-r", "--stats", "--interval", "--debug", "-debug",
         "--systemd-cgroup", "--log-format", "-log-format", "--rootless", "--criu",
         "--version", "-v", "-x", "--", "-", "--no-such-flag", "--de"]
argv_words = st.sampled_from(COMMANDS + FLAGS + ["TERM", "9", "0", "SIGKILL", "5s", "json",
                                                 "table", "c1", "", "x" * 300, "-1"]) \
    | st.text(max_size=12)
# Real command lines cannot hold a NUL (execve's strings end at one).
no_nul = st.text(max_size=20).filter(lambda s: "\x00" not in s)


@given(st.lists(argv_words.filter(lambda s: "\x00" not in s), max_size=8))
def test_parser_returns_or_refuses(argv: list[str]) -> None:
    assume(not {"-h", "--help"} & set(argv))
    try:
        rtargs.parse_args(argv)
    except base.CLIError:
        pass  # main prints it as one line


@given(st.sampled_from(["TERM", "SIGKILL", "kill", "9", "64", "65", "0", "-1", " 15 ", "RTMIN",
                        "SIGRTMAX", "\u0663"]) | no_nul)
def test_signal_names_parse_or_refuse(text: str) -> None:
    try:
        n = rtargs.parse_signal(text)
    except base.CLIError:
        return  # main prints it as one line (the whole-command test checks that)
    assert 0 < n < 65


@given(st.sampled_from(["5s", "500ms", "1m", "2.5", "0", "1.s", ".5s", "s", "ms", "5h", "1e3",
                        "5 s"]) | no_nul)
def test_durations_parse_or_refuse(text: str) -> None:
    try:
        seconds = rtargs.parse_duration(text)
    except base.CLIError:
        return
    assert math.isfinite(seconds) and seconds >= 0


# -- the bundle reader ------------------------------------------------------------------

@st.composite
def near_default_specs(draw: st.DrawFn) -> Any:
    """`pykata-runtime spec`'s own spec with a field or two changed (or not)."""
    spec = bundlemod.default_spec(["true"])
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from([
            "ociVersion", "process.args", "process.cwd", "process.terminal", "process.env",
            "root.path", "hostname", "mounts", "linux.namespaces", "linux.resources",
            "linux.devices", "hooks", "annotations", "process.user.uid", "linux.sysctl"]))
        *parents, last = path.split(".")
        obj = spec
        for part in parents:
            obj = obj.setdefault(part, {})
        obj[last] = draw(support.json_values)
    return spec


config_bytes = st.one_of(
    near_default_specs().map(lambda s: json.dumps(s).encode()),
    near_default_specs().map(lambda s: json.dumps(s).encode()),
    support.oci_spec.map(lambda s: json.dumps(s).encode()),
    support.json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"[" * 100_000, b'{"a":' * 100_000, b"\xff\xfe{}", b"null",
                     b'"\\ud800"', b"1" * 5000, b"{}" * 2, b'{"process": NaN}']),
    st.binary(max_size=40))


@given(config_bytes)
def test_bundle_reader_returns_a_spec_or_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                  data: bytes) -> None:
    b = tmp_path_factory.mktemp("bundle")
    (b / "config.json").write_bytes(data)
    try:
        with support.cpu_limit():
            spec = bundlemod.load_spec(b)
    except errors.InvalidArgument as exc:
        support.assert_one_line(str(exc))
        return
    assert isinstance(spec, dict)
    bundlemod.spec_annotations(spec)


# -- whole command lines ----------------------------------------------------------------

class WouldStart(BaseException):
    """The command got as far as starting the container's keeper."""


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def stop(*args: Any, **kwargs: Any) -> Any:
        raise WouldStart

    monkeypatch.setattr(lifecycle, "spawn_keeper", stop)
    monkeypatch.setattr(hookrun, "make_netns", stop)
    monkeypatch.setattr(lifecycle, "destroy",
                        lambda d, cid: shutil.rmtree(d, ignore_errors=True))
    monkeypatch.chdir(tmp_path)  # whatever a relative path names stays in here
    return tmp_path


def _paths(root: Path) -> dict[str, str]:
    return {"bundle": str(root / "bundle"), "missing": str(root / "nope"),
            "file": str(root / "file"), "log": str(root / "log"), "pid": str(root / "pid"),
            "proc": str(root / "proc.json"), "res": str(root / "res.json")}


CREATE_FLAGS = [("--bundle", "{bundle}"), ("-b", "{bundle}"), ("--pid-file", "{pid}"),
                ("--console-socket", "{file}"), ("--no-pivot",), ("--no-new-keyring",),
                ("--preserve-fds", "0"), ("--preserve-fds", "-3"), ("--preserve-fds", "x")]
COMMAND_FLAGS: dict[str, list[tuple[str, ...]]] = {
    "create": CREATE_FLAGS, "run": [*CREATE_FLAGS, ("--detach",), ("--keep",)],
    "kill": [("--all",)], "delete": [("--force",)],
    "exec": [("--process", "{proc}"), ("--tty",), ("--detach",), ("--cwd", "/"),
             ("--cwd", "rel"), ("--env", "A=1"), ("--user", "0:0"), ("--user", "x"),
             ("--cap", "CAP_KILL"), ("--pid-file", "{pid}"), ("--preserve-fds", "1")],
    "ps": [("--format", "json"), ("--format", "table")],
    "list": [("--format", "json"), ("--quiet",)], "update": [("--resources", "{res}")],
    "events": [("--stats",), ("--interval", "1s"), ("--interval", "inf")],
    "spec": [("--bundle", "{specdir}")],
}
GLOBAL_FLAGS: list[tuple[str, ...]] = [("--debug",), ("--log-format", "json"),
                                       ("--systemd-cgroup",), ("--log", "{log}")]


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """argv for main(): one of runc's commands with its own flags (good and bad
    values), now and then a word that does not belong. Paths only inside the test's
    directory (a placeholder {name} each); the state root is always that one."""
    junk = st.sampled_from([*FLAGS, "abc", "", "-1", "{missing}"]) | no_nul.filter(
        lambda s: not s.startswith(("/", "-log", "--log", "--root", "-root")))
    command = draw(st.sampled_from([*sorted(COMMAND_FLAGS), "start", "state", "pause",
                                    "resume", "features"]))
    out = ["--root", "{root}"]
    pool = COMMAND_FLAGS.get(command, []) + GLOBAL_FLAGS
    out.append(command)
    for flag in draw(st.lists(st.sampled_from(pool), max_size=4, unique=True)):
        out += list(flag)
    if command not in ("list", "spec", "features"):
        out.append(draw(support.mostly(st.sampled_from(["c1", "c2"]), st.sampled_from(
            ["", ".", "..", "a/b", "x" * 300, "-x"]) | no_nul)))
    if command == "kill":
        out += draw(st.lists(st.sampled_from(["TERM", "9", "0", "SIGKILL", "x"]), max_size=1))
    if command == "exec":
        out += draw(st.lists(st.sampled_from(["sh", "-c", "true"]), max_size=2))
    if draw(st.integers(0, 5)) == 0:
        out.insert(draw(st.integers(2, len(out))), draw(junk))
    return out


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str, str]:
    capsys.readouterr()
    try:
        with support.cpu_limit():
            rc: int | str = entry.main(argv)
    except WouldStart:
        rc = "keeper"
    except SystemExit as exc:  # --help
        assert exc.code == 0, exc
        rc = 0
    finally:
        base.LOG.path, base.LOG.fmt, base.LOG.debug_on = "", "text", False
    return rc, capsys.readouterr().err


def _setup(cli: Path, config: bytes) -> dict[str, str]:
    shutil.rmtree(cli / "root", ignore_errors=True)
    shutil.rmtree(cli / "specdir", ignore_errors=True)
    (cli / "specdir").mkdir()
    (cli / "bundle" / "rootfs").mkdir(parents=True, exist_ok=True)
    (cli / "bundle" / "config.json").write_bytes(config)
    (cli / "file").write_text("x")
    for name in ("proc.json", "res.json"):
        (cli / name).write_bytes(config)
    return {**_paths(cli), "root": str(cli / "root"), "specdir": str(cli / "specdir")}


def _check_main(rc: int | str, err: str) -> None:
    if rc == 1:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pykata-runtime: "), err
    else:
        assert rc in (0, "keeper"), rc


@given(command_lines(), config_bytes)
def test_main_ends_with_one_line_or_an_accepted_spec(cli: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     argv: list[str], config: bytes) -> None:
    names = _setup(cli, config)
    argv = [names[a[1:-1]] if a[1:-1] in names and a[0] + a[-1] == "{}" else a
            for a in argv]
    rc, err = _run_main(argv, capsys)
    _check_main(rc, err)


@given(st.sampled_from(["create", "run"]),
       st.lists(st.sampled_from(CREATE_FLAGS[2:]), max_size=2, unique=True), config_bytes)
def test_create_reads_any_bundle_to_one_line_or_the_keeper(
        cli: Path, capsys: pytest.CaptureFixture[str], command: str,
        flags: list[tuple[str, ...]], config: bytes) -> None:
    names = _setup(cli, config)
    argv = ["--root", names["root"], command, "--bundle", names["bundle"]]
    for flag in flags:
        argv += [names.get(a[1:-1], a) for a in flag]
    rc, err = _run_main([*argv, "c1"], capsys)
    _check_main(rc, err)


# -- found by this fuzzer ----------------------------------------------------------------

def test_deep_config_json_is_one_line(cli: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was a RecursionError traceback (bundle.load_spec); fixed."""
    (cli / "bundle").mkdir()
    (cli / "bundle" / "config.json").write_bytes(b"[" * 100_000)
    rc, err = _run_main(["--root", str(cli / "root"), "create", "-b", str(cli / "bundle"),
                         "c1"], capsys)
    _check_main(rc, err)
    assert rc == 1 and "nested too deeply" in err


def test_root_path_not_a_string_is_one_line(cli: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Was a TypeError traceback (lifecycle.read_bundle); fixed there meanwhile."""
    (cli / "bundle").mkdir()
    (cli / "bundle" / "config.json").write_text(json.dumps(
        {"process": {"args": ["true"]}, "root": {"path": 5}}))
    rc, err = _run_main(["--root", str(cli / "root"), "create", "-b", str(cli / "bundle"),
                         "c1"], capsys)
    _check_main(rc, err)


def test_superscript_digit_signal_is_refused() -> None:
    with pytest.raises(base.CLIError):
        rtargs.parse_signal("\u00b2")


@pytest.mark.parametrize("text", ["inf", "nan", "1e400"])
def test_infinite_durations_are_refused(text: str) -> None:
    with pytest.raises(base.CLIError):
        rtargs.parse_duration(text)
