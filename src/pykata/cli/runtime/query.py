"""The commands that only report: state, list, ps, events, and the two that
need no container, spec (a default config.json) and features."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from pykata import errors
from pykata.cli.rtclient import call
from pykata.cli.runtime.args import parse_duration
from pykata.cli.runtime.base import CLIError
from pykata.cli.runtime.state import existing, load_meta, oci_state, task_status
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import hooks
from pykata.runtime.bundle import default_spec
from pykata.runtime.specconv import SPEC_VERSION_MAX, SPEC_VERSION_MIN


def do_state(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    print(json.dumps(oci_state(d, load_meta(d)), indent=2))
    return 0


def do_ps(a: argparse.Namespace) -> int:
    d = existing(a.root, a.id)
    resp = call(d, "Pids", pb.PidsRequest(id=a.id), pb.PidsResponse, timeout=30)
    pids = [p.pid for p in resp.processes]
    if a.format == "json":
        print(json.dumps(pids))
    else:
        print("PID")
        for p in pids:
            print(p)
    return 0


def do_list(a: argparse.Namespace) -> int:
    root = Path(a.root)
    items = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "meta.json").exists():
                with contextlib.suppress(CLIError):
                    items.append(oci_state(d, load_meta(d)))
    if a.quiet:
        for s in items:
            print(s["id"])
    elif a.format == "json":
        print(json.dumps(items))
    else:
        print(f"{'ID':<24}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}{'CREATED':<32}OWNER")
        for s in items:
            print(f"{s['id']:<24}{s['pid']:<10}{s['status']:<10}{s['bundle']:<40}"
                  f"{s['created']:<32}root")
    return 0


def do_events(a: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from pykata.protos import cgroups_v2_metrics_pb2 as m2

    d = existing(a.root, a.id)
    interval = max(0.05, parse_duration(a.interval))
    while task_status(d, a.id) != "stopped":
        if a.stats:
            try:
                resp = call(d, "Stats", pb.StatsRequest(id=a.id), pb.StatsResponse, timeout=30)
            except errors.PykataError:
                break
            metrics = m2.Metrics()
            resp.stats.Unpack(metrics)
            data = json_format.MessageToDict(metrics, preserving_proto_field_name=True)
            print(json.dumps({"type": "stats", "id": a.id, "data": data}), flush=True)
            if not getattr(a, "_loop", True):
                break
        time.sleep(interval)
    return 0


def do_spec(a: argparse.Namespace) -> int:
    path = Path(a.bundle or ".") / "config.json"
    if path.exists():
        raise CLIError(f"File {path} exists. Remove it first")
    spec = default_spec(["sh"], hostname="pykata", terminal=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return 0


def do_features(_a: argparse.Namespace) -> int:
    from pykata import __version__

    print(json.dumps({
        "ociVersionMin": SPEC_VERSION_MIN, "ociVersionMax": SPEC_VERSION_MAX,
        # Hooks pykata runs: four on the host, createContainer/startContainer in the VM.
        "hooks": list(hooks.KINDS),
        "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
        "linux": {"namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
                  "cgroup": {"v1": True, "v2": True, "systemd": False},
                  "seccomp": {"enabled": False}},
        "annotations": {"io.github.pykata.version": __version__,
                        "io.github.pykata.isolation": "vm"},
    }, indent=2))
    return 0
