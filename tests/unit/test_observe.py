from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from pykata import observe


def test_phase_records_duration_also_on_error() -> None:
    phases = observe.Phases()
    with observe.phase("a", phases):
        pass
    with pytest.raises(RuntimeError), observe.phase("b", phases):
        raise RuntimeError("x")
    names = [n for n, _ in phases.items()]
    assert names == ["a", "b"] and all(s >= 0 for _, s in phases.items())


def test_phases_are_bounded() -> None:
    phases = observe.Phases()
    for i in range(observe.MAX_PHASES + 10):
        phases.record(f"p{i}", 1.0)
    assert len(phases.items()) == observe.MAX_PHASES
    phases.record("p0", 2.0)  # a known name is still updated
    assert dict(phases.items())["p0"] == 2.0


def test_span_factory_wraps_the_phase() -> None:
    seen: list[Any] = []

    @contextlib.contextmanager
    def span(name: str, attrs: dict[str, str]) -> Iterator[None]:
        seen.append(("open", name, attrs))
        yield
        seen.append(("close", name))

    observe.set_span_factory(span)
    try:
        with observe.phase("vm.boot", None, sandbox="s1"):
            seen.append("work")
    finally:
        observe.set_span_factory(None)
    assert seen == [("open", "vm.boot", {"sandbox": "s1"}), "work", ("close", "vm.boot")]
