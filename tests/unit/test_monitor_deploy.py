"""deploy/monitor/: the pykata-monitor DaemonSet and systemd unit run the
monitor with arguments its own parser accepts, from where pykata is installed,
with the least they need (test_deploy.py validates the DaemonSet against the
Kubernetes schemas)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from pykata.monitor import main as monitor_main

REPO = Path(__file__).resolve().parents[2]
MONITOR = REPO / "deploy" / "monitor"


def _daemonset() -> dict[str, Any]:
    (ds,) = [d for d in yaml.safe_load_all((MONITOR / "daemonset.yaml").read_text()) if d]
    assert ds["kind"] == "DaemonSet"
    return dict(ds)


def test_daemonset_runs_the_nodes_monitor_unprivileged() -> None:
    ds = _daemonset()
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    # the node's /opt/pykata (bundle.sh: entry points in venv/bin), mounted read-only
    assert c["command"] == ["/opt/pykata/venv/bin/pykata-monitor"]
    args = monitor_main.build_parser().parse_args(c["args"])
    assert args.state_dir == "/run/pykata" and args.cri_endpoint == "" and args.no_logs
    host, port = args.listen
    assert host == "0.0.0.0"
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    vols = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounts = {vols[m["name"]]: (m["mountPath"], m.get("readOnly")) for m in c["volumeMounts"]}
    assert mounts == {"/run/pykata": ("/run/pykata", True), "/opt/pykata": ("/opt/pykata", True)}
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert not sc.get("privileged") and not spec.get("hostPID") and not spec.get("hostNetwork")
    assert spec["automountServiceAccountToken"] is False
    # the nodes pykata-deploy labelled (the RuntimeClass selects the same label)
    runtimeclass = yaml.safe_load((REPO / "deploy" / "runtimeclass.yaml").read_text())
    assert spec["nodeSelector"] == runtimeclass["scheduling"]["nodeSelector"]


def test_systemd_unit_serves_loopback() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((MONITOR / "pykata-monitor.service").read_text())
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert argv[0] == "/usr/local/bin/pykata-monitor"  # where scripts/setup.sh links it
    args = monitor_main.build_parser().parse_args(argv[1:])
    assert args.listen == ("127.0.0.1", 8090)
    assert unit["Service"]["CapabilityBoundingSet"] == ""
    assert unit["Service"]["NoNewPrivileges"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
