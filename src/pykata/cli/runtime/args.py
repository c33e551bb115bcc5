"""The command line of `pykata-runtime`: runc's commands and flags (global
flags accepted before and after the command, ``-flag`` and ``--flag``), signal
names and durations as runc spells them."""

from __future__ import annotations

import argparse
import math
import signal
from typing import Any, NoReturn

from pykata.cli.runtime.base import DEFAULT_ROOT, PROG, CLIError


def parse_signal(text: str) -> int:
    """`TERM`, `SIGTERM`, `sigterm`, `15` -> 15."""
    t = text.strip()
    if t.isascii() and t.isdigit():
        n = int(t)
        if 0 < n < 65:
            return n
        raise CLIError(f"invalid signal: {text}")
    name = t.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CLIError(f"unknown signal \"{text}\"") from None


def parse_duration(text: str) -> float:
    """`5s`, `500ms`, `1m`, `2.5` (seconds) -> seconds: finite, not negative."""
    t = text.strip()
    number, mult = t, 1.0
    for suffix, m in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            number, mult = t[:-len(suffix)], m
            break
    if not (number.isascii() and number.replace(".", "", 1).isdigit()):
        raise CLIError(f"invalid interval {text}")
    value = float(number) * mult
    if not math.isfinite(value):
        raise CLIError(f"invalid interval {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def _global_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    d: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--root", "-root", default=d if suppress else DEFAULT_ROOT)
    p.add_argument("--log", "-log", default=d if suppress else "")
    p.add_argument("--log-format", "-log-format", dest="log_format",
                   choices=("text", "json"), default=d if suppress else "text")
    p.add_argument("--debug", "-debug", action="store_true",
                   default=argparse.SUPPRESS if suppress else False)
    p.add_argument("--systemd-cgroup", "-systemd-cgroup", dest="systemd_cgroup",
                   action="store_true", default=argparse.SUPPRESS if suppress else False)
    p.add_argument("--rootless", default=d if suppress else "")
    p.add_argument("--criu", default=d if suppress else "")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, add_help=True)
    _global_flags(p, suppress=False)
    p.add_argument("--version", "-v", action="store_true")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def cmd(name: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name)
        _global_flags(sp, suppress=True)
        return sp

    def create_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", "-b", default="")
        sp.add_argument("--pid-file", dest="pid_file", default="")
        sp.add_argument("--console-socket", dest="console_socket", default="")
        sp.add_argument("--no-pivot", dest="no_pivot", action="store_true")
        sp.add_argument("--no-new-keyring", dest="no_new_keyring", action="store_true")
        sp.add_argument("--preserve-fds", dest="preserve_fds", type=int, default=0)
        sp.add_argument("id")

    create_flags(cmd("create"))
    sp = cmd("run")
    sp.add_argument("--detach", "-d", action="store_true")
    sp.add_argument("--keep", action="store_true")
    create_flags(sp)
    for name in ("start", "pause", "resume"):
        cmd(name).add_argument("id")
    sp = cmd("state")
    sp.add_argument("id")
    sp = cmd("kill")
    sp.add_argument("--all", "-a", action="store_true")
    sp.add_argument("id")
    sp.add_argument("signal", nargs="?", default="TERM")
    sp = cmd("delete")
    sp.add_argument("--force", "-f", action="store_true")
    sp.add_argument("id")
    sp = cmd("exec")
    sp.add_argument("--process", "-p", default="")
    sp.add_argument("--tty", "-t", action="store_true")
    sp.add_argument("--detach", "-d", action="store_true")
    sp.add_argument("--pid-file", dest="pid_file", default="")
    sp.add_argument("--console-socket", dest="console_socket", default="")
    sp.add_argument("--cwd", default="")
    sp.add_argument("--env", "-e", action="append", default=[])
    sp.add_argument("--user", "-u", default="")
    sp.add_argument("--additional-gids", "-g", dest="additional_gids", action="append",
                    default=[])
    sp.add_argument("--process-label", dest="process_label", default="")
    sp.add_argument("--apparmor", default="")
    sp.add_argument("--no-new-privs", dest="no_new_privs", action="store_true")
    sp.add_argument("--cap", "-c", action="append", default=[])
    sp.add_argument("--preserve-fds", dest="preserve_fds", type=int, default=0)
    sp.add_argument("--ignore-paused", dest="ignore_paused", action="store_true")
    sp.add_argument("id")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = cmd("ps")
    sp.add_argument("--format", "-f", choices=("table", "json"), default="table")
    sp.add_argument("id")
    sp.add_argument("ps_args", nargs=argparse.REMAINDER)
    sp = cmd("list")
    sp.add_argument("--format", "-f", choices=("table", "json"), default="table")
    sp.add_argument("--quiet", "-q", action="store_true")
    sp = cmd("update")
    sp.add_argument("--resources", "-r", default="")
    sp.add_argument("id")
    sp = cmd("events")
    sp.add_argument("--stats", action="store_true")
    sp.add_argument("--interval", default="5s")
    sp.add_argument("id")
    sp = cmd("spec")
    sp.add_argument("--bundle", "-b", default="")
    cmd("features")
    checkpoint_flags(cmd("checkpoint"))
    restore_flags(cmd("restore"))
    return p


def _criu_flags(sp: argparse.ArgumentParser) -> None:
    """runc's checkpoint/restore flags that mean nothing for a VM (it keeps its
    TCP connections, sockets, jobs, locks and cgroups as they are): accepted."""
    sp.add_argument("--image-path", dest="image_path", default="")
    sp.add_argument("--work-path", dest="work_path", default="")
    for flag in ("--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                 "--auto-dedup", "--lazy-pages"):
        sp.add_argument(flag, action="store_true")
    sp.add_argument("--manage-cgroups-mode", dest="manage_cgroups_mode", default="")
    sp.add_argument("--empty-ns", dest="empty_ns", action="append", default=[])


def checkpoint_flags(sp: argparse.ArgumentParser) -> None:
    """runc's ``checkpoint`` (podman 4.3 passes ``--leave-running`` twice)."""
    _criu_flags(sp)
    sp.add_argument("--leave-running", dest="leave_running", action="store_true")
    sp.add_argument("--pre-dump", dest="pre_dump", action="store_true")
    sp.add_argument("--parent-path", dest="parent_path", default="")
    sp.add_argument("--page-server", dest="page_server", default="")
    sp.add_argument("--status-fd", dest="status_fd", default="")
    sp.add_argument("id")


def restore_flags(sp: argparse.ArgumentParser) -> None:
    """runc's ``restore``, as conmon calls it for podman."""
    _criu_flags(sp)
    sp.add_argument("--bundle", "-b", default="")
    sp.add_argument("--pid-file", dest="pid_file", default="")
    sp.add_argument("--console-socket", dest="console_socket", default="")
    sp.add_argument("--detach", "-d", action="store_true")
    sp.add_argument("--no-subreaper", dest="no_subreaper", action="store_true")
    sp.add_argument("--no-pivot", dest="no_pivot", action="store_true")
    sp.add_argument("--no-new-keyring", dest="no_new_keyring", action="store_true")
    sp.add_argument("--lsm-profile", dest="lsm_profile", default="")
    sp.add_argument("--lsm-mount-context", dest="lsm_mount_context", default="")
    sp.add_argument("id")


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)
