#!/usr/bin/env python3
"""Render the panels of deploy/grafana/pykata-dashboard.json to a PNG with
matplotlib, from a Prometheus HTTP API (Grafana is not packaged for Debian, so
this draws the same queries, laid out on the same grid, instead).

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --minutes 15 --out docs/dashboard.png

Each panel's PromQL is evaluated as Grafana would with every variable on "All":
time series panels over the range (``/api/v1/query_range``), bar gauges at its
end (``/api/v1/query``). Legends follow each target's legendFormat. Needs
matplotlib (the 'bench' extra).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "pykata-dashboard.json"
UNIT_INCHES = 0.42  # height of one grid unit of the dashboard
UNITS = {"bytes": (1 << 20, "MiB"), "s": (1.0, "s"), "short": (1.0, ""), "reqps": (1.0, "/s")}


def substitute(expr: str, rate_interval: str) -> str:
    """Grafana's variables as an "All" selection (and a fixed rate interval)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", "15s")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text if text.strip("/ ") else ",".join(f"{k}={v}" for k, v in sorted(labels.items())
                                                   if k not in ("job", "instance"))


def api(base: str, path: str, **params: str) -> list[dict[str, Any]]:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=60) as r:
        data = json.loads(r.read())
    if data.get("status") != "success":
        raise SystemExit(f"render_dashboard: {path} {params.get('query', '')}: {data}")
    return list(data["data"]["result"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--minutes", type=float, default=15.0, help="range ending now (or --end)")
    ap.add_argument("--end", type=float, default=0.0, help="unix time of the range's end")
    ap.add_argument("--step", type=float, default=5.0, help="seconds between points")
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--note", default="", help="a line under the title (what ran)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from datetime import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dash = json.loads(args.dashboard.read_text())
    end = args.end or time.time()
    start = end - args.minutes * 60
    panels = [p for p in dash["panels"]]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * UNIT_INCHES + 1.2
    fig = plt.figure(figsize=(20, height), dpi=80)
    gs = fig.add_gridspec(rows, 24, hspace=6.0, wspace=3.0, top=1 - 1.2 / height,
                          bottom=0.02, left=0.04, right=0.99)
    when = datetime.fromtimestamp(end).strftime("%Y-%m-%d %H:%M")
    fig.suptitle(f"{dash['title']}: rendered from the Prometheus API with matplotlib "
                 f"(Grafana is not packaged here), {args.minutes:g} min to {when}"
                 + (f"\n{args.note}" if args.note else ""), fontsize=14, y=0.997)
    empty = []
    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            ax = fig.add_subplot(gs[g["y"]:g["y"] + 1, :])
            ax.axis("off")
            ax.text(0, 0.0, p["title"], fontsize=14, weight="bold", va="bottom")
            continue
        ax = fig.add_subplot(gs[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=10, loc="left")
        scale, unit = UNITS.get(p["fieldConfig"]["defaults"].get("unit", "short"), (1.0, ""))
        drawn = 0
        if p["type"] == "bargauge":
            bars: list[tuple[str, float]] = []
            for t in p["targets"]:
                for r in api(args.prometheus, "/api/v1/query",
                             query=substitute(t["expr"], args.rate_interval), time=str(end)):
                    bars.append((legend(t.get("legendFormat", ""), r["metric"]),
                                 float(r["value"][1]) / scale))
            bars.sort(key=lambda b: b[1])
            ax.barh(range(len(bars)), [b[1] for b in bars], color="tab:blue", alpha=0.45)
            ax.set_yticks([])
            ax.set_xlabel(unit, fontsize=8)
            for i, (label, v) in enumerate(bars):  # the names inside the bars, then the value
                ax.text(0, i, f" {label}", va="center", ha="left", fontsize=8)
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
            if bars:
                ax.set_xlim(0, max(b[1] for b in bars) * 1.12 or 1)
            drawn = len(bars)
        else:
            for t in p["targets"]:
                for r in api(args.prometheus, "/api/v1/query_range",
                             query=substitute(t["expr"], args.rate_interval), start=str(start),
                             end=str(end), step=str(args.step)):
                    xs = [datetime.fromtimestamp(float(ts)) for ts, _ in r["values"]]
                    ys = [float(v) / scale for _, v in r["values"]]
                    ax.plot(xs, ys, linewidth=1, label=legend(t.get("legendFormat", ""),
                                                              r["metric"]))
                    drawn += 1
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
            ax.set_ylabel(unit, fontsize=8)
            ax.set_ylim(bottom=0)
            if drawn:
                ax.legend(fontsize=6, ncol=2 if drawn > 6 else 1, loc="upper left",
                          framealpha=0.6)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not drawn:
            empty.append(p["title"])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    from PIL import Image  # matplotlib's own dependency: a 256-colour PNG is a third the size

    with Image.open(args.out) as img:
        img.convert("RGB").quantize(colors=256).save(args.out, optimize=True)
    print(f"render_dashboard: {args.out} ({len(panels)} panels"
          + (f"; no data: {', '.join(empty)}" if empty else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
