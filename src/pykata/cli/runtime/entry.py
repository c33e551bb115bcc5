"""Entry point of `pykata-runtime`: parse the command line, run the command,
turn every error into one line on stderr (and in ``--log``), exit 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pykata import errors
from pykata.cli.runtime.args import parse_args
from pykata.cli.runtime.base import LOG, OCI_VERSION, PROG, CLIError
from pykata.cli.runtime.checkpoint import do_checkpoint, do_restore
from pykata.cli.runtime.exec import do_exec
from pykata.cli.runtime.lifecycle import (
    do_create,
    do_delete,
    do_kill,
    do_pause,
    do_resume,
    do_run,
    do_start,
    do_update,
)
from pykata.cli.runtime.query import do_events, do_features, do_list, do_ps, do_spec, do_state
from pykata.runtime.specconv import SPEC_VERSION_MAX, SPEC_VERSION_MIN

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "create": do_create, "start": do_start, "run": do_run, "state": do_state,
    "kill": do_kill, "delete": do_delete, "exec": do_exec, "ps": do_ps, "list": do_list,
    "pause": do_pause, "resume": do_resume, "update": do_update, "events": do_events,
    "spec": do_spec, "features": do_features, "checkpoint": do_checkpoint,
    "restore": do_restore,
}


def _fail(msg: str) -> int:
    line = " ".join(msg.split()) or "unknown error"
    print(f"{PROG}: {line}", file=sys.stderr)
    LOG.write("error", line)
    return 1


def _prescan_log(args: list[str]) -> None:
    """--log and --log-format even when the command line does not parse."""
    for i, arg in enumerate(args):
        for flag in ("log", "log-format"):
            for prefix in (f"--{flag}", f"-{flag}"):
                value = ""
                if arg == prefix and i + 1 < len(args):
                    value = args[i + 1]
                elif arg.startswith(prefix + "="):
                    value = arg.split("=", 1)[1]
                if value and flag == "log":
                    LOG.path = value
                elif value:
                    LOG.fmt = value


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(args)
    except CLIError as exc:
        _prescan_log(args)
        return _fail(str(exc).replace("invalid choice", "unknown command"))
    LOG.path, LOG.fmt, LOG.debug_on = a.log, a.log_format, a.debug
    if a.version:
        from pykata import __version__

        print(f"{PROG} version {__version__}\nspec: {OCI_VERSION} (accepted:"
              f" {SPEC_VERSION_MIN} to {SPEC_VERSION_MAX[:-1]}x)")
        return 0
    if not a.command:
        return _fail("no command given (see --help)")
    LOG.debug(f"{a.command}: {' '.join(args)}")
    try:
        return COMMANDS[a.command](a)
    except CLIError as exc:
        return _fail(str(exc))
    except errors.PykataError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
