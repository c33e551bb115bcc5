"""`pykata-runtime`: a runc-compatible OCI runtime command line.

Each container has a state directory ``<root>/<id>/`` and a keeper: the pykata
shim serving containerd.task.v2.Task on ``<root>/<id>/task.sock``, which owns
the VM, so the container outlives every CLI call. A host "stand-in" process
(:mod:`pykata.cli.standin`) carries the container's stdio and exit status; its
pid is what ``--pid-file`` and ``state`` report.

==================  ==========================================================
:mod:`.entry`       entry point: parse, dispatch, one-line errors, ``--log``
:mod:`.args`        the command line (runc's flags), signals, durations
:mod:`.base`        names, defaults, ``CLIError``, the ``--log`` writer
:mod:`.state`       the state directory: meta.json, process refs, OCI state
:mod:`.keeper`      the keeper and stand-in processes; tearing a container down
:mod:`.lifecycle`   create, start, run, kill, delete, pause, resume, update
:mod:`.exec`        exec
:mod:`.checkpoint`  checkpoint, restore (the whole VM; podman's checkpoint/restore)
:mod:`.query`       state, list, ps, events, spec, features
==================  ==========================================================
"""

from pykata.cli.runtime.args import parse_signal
from pykata.cli.runtime.entry import main

__all__ = ["main", "parse_signal"]
