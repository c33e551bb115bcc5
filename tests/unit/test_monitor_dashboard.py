"""deploy/grafana/pykata-dashboard.json: a Grafana dashboard whose every query
is valid PromQL (promtool, from Debian's prometheus package) and names only
metrics pykata exports. The exported names are taken from the code itself:
the shim's collector over a fake sandbox (with the agent's real metrics text of
this host's /proc) and pykata-monitor's own exposition."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from prometheus_client.parser import text_string_to_metric_families

from pykata.agent import rpcstats
from pykata.guest import guestops
from pykata.metrics.collector import SandboxCollector, scrape
from pykata.monitor.server import Monitor
from pykata.observe import Phases

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "pykata-dashboard.json"
# What Grafana itself defines; every other $variable must be in the templating list.
BUILTIN_VARS = {"__rate_interval", "__interval", "__range"}
# The sections the issue asks for, each by a word of a panel title.
WANTED = ("overhead", "start-up", "guest memory", "guest cpu", "p50", "p99")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)")


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def sample_names(text: bytes) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text.decode()):
        names |= {s.name for s in fam.samples}
        # a family without samples (no taps, no virtiofsd here) still names its series
        names |= {"counter": {fam.name + "_total"},
                  "histogram": {fam.name + x for x in ("_bucket", "_count", "_sum")}
                  }.get(fam.type, {fam.name})
    return names


async def exported(tmp_path: Path) -> set[str]:
    """Every series name the shim's collector and the monitor write."""
    phases = Phases()
    phases.record("sandbox.create", 2.0)
    rpc = rpcstats.RpcStats()
    rpc.observe("CreateContainer", 0.5, failed=True)

    class Agent:
        async def metrics(self) -> str:
            return guestops.metrics(1)

    sandbox = types.SimpleNamespace(id="sb", namespace="k8s.io", dir=tmp_path,
                                    vm=types.SimpleNamespace(pid=os.getpid()),
                                    virtiofsd=None, network=None, agent=Agent(), phases=phases)
    names = sample_names(await scrape(SandboxCollector(sandbox, {}, rpc=rpc)))
    names |= sample_names(await Monitor(tmp_path / "state").exposition())
    return names


def test_grafana_shape() -> None:
    dash = load()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p["description"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
    titles = " | ".join(p["title"].lower() for p in panels(dash))
    for word in WANTED:
        assert word in titles, f"no panel about {word!r}"


def test_variables_are_defined() -> None:
    dash = load()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name, v in variables.items():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
            # "All" must also match a pod without CRI labels (empty pod_name)
            assert v["includeAll"] and v["allValue"] == ".*", name
    texts = exprs(dash) + [v["definition"] for v in variables.values() if "definition" in v]
    used = {a or b for text in texts for a, b in _VAR.findall(text)}
    assert used - BUILTIN_VARS <= set(variables), used - BUILTIN_VARS - set(variables)


async def test_queries_name_only_exported_metrics(tmp_path: Path) -> None:
    have = await exported(tmp_path)
    dash = load()
    texts = exprs(dash) + [v["definition"] for v in dash["templating"]["list"]
                           if "definition" in v]
    used = set()
    for text in texts:
        selectors = set(_SELECTOR.findall(text))
        assert all(n.startswith("pykata_") for n in selectors), text
        used |= selectors | set(re.findall(r"\bpykata_[a-z0-9_]+", text))
    missing = sorted(used - have)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    # the check can fail: a name the code does not write is caught
    assert "pykata_guest_meminfo_bytes" not in have


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/setup.sh installs Debian's prometheus"
    rules = [{"record": f"pykata:check:{i}", "expr": grafana_to_promql(e)}
             for i, e in enumerate(exprs(load()))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and promtool does refuse a broken one
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [
        {"record": "pykata:bad", "expr": "sum by (x (pykata_guest_meminfo)"}]}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced the way an "All" selection does."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@pytest.mark.parametrize("bad", ["$__rate_interval", "${pod}"])
def test_substitution_leaves_no_variable(bad: str) -> None:
    assert "$" not in grafana_to_promql(f'rate(x{{a=~"{bad}"}}[{bad}])')
