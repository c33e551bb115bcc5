"""Shared test setup: a per-file time summary at the end of a run (where the
suite's wall time goes, per module, setup and teardown included), so the
`make test` budget can be kept with figures rather than guesses."""

from __future__ import annotations

from collections import defaultdict

import pytest

_SECONDS: defaultdict[str, float] = defaultdict(float)
_COUNT: defaultdict[str, int] = defaultdict(int)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _SECONDS[path] += report.duration
    if report.when == "call":
        _COUNT[path] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SECONDS:
        return
    total = sum(_SECONDS.values())
    top = sorted(_SECONDS.items(), key=lambda kv: -kv[1])[:25]
    terminalreporter.write_sep("=", f"time per test file (top {len(top)}, {total:.0f} s in all)")
    for path, secs in top:
        terminalreporter.write_line(f"{secs:8.1f} s {_COUNT[path]:5d} tests  {path}")
