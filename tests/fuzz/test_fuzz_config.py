"""Fuzzing the configuration loader (pykata.config): random TOML text, random
documents of the real sections and keys with random values (of the right type
and not), random file bytes, and the round trip through ``pykata env``'s TOML.

Properties: the loader returns a Config or raises the documented error,
InvalidArgument, as one line starting with the file's name (naming the
section and key when one is wrong); a value it accepted is the value in the
Config; ``to_toml`` of a loaded configuration loads back to the same one.

The bugs found here (deep nesting, a file that is not UTF-8, a control
character in a string that ``pykata env`` printed raw) are fixed; their
reproducers stay as regression tests at the end.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykata import config, errors
from tests.fuzz import support

WHERE = "fuzz.toml"


def _sections(obj: Any = None, prefix: str = "") -> dict[str, dict[str, Any]]:
    """section name -> {key: type} for every dataclass section of Config."""
    obj = obj if obj is not None else config.Config()
    hints = typing.get_type_hints(type(obj))
    out: dict[str, dict[str, Any]] = {prefix: {}}
    for f in dataclasses.fields(obj):
        if f.name == "source":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_sections(value, f"{prefix}.{f.name}" if prefix else f.name))
        else:
            out[prefix][f.name] = hints[f.name]
    return out


SECTIONS = _sections()


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}" if c not in '"\\' else "\\" + c)
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()
    raise AssertionError(type(v))


def toml_doc(doc: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in doc.items():
        if section:
            lines.append(f"[{section}]")
        lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


toml_scalars = (st.booleans() | support.ints.filter(lambda i: -(2**63) <= i < 2**63)
                | st.floats() | support.texts | support.paths
                | st.datetimes(timezones=st.none() | st.just(datetime.UTC)))
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(support.texts, inner, max_size=2), max_leaves=6)


def good_value(tp: Any) -> st.SearchStrategy[Any]:
    if typing.get_origin(tp) is list:
        return st.lists(support.texts, max_size=3)
    return {bool: st.booleans(), int: st.sampled_from([0, 1, 2, 64, 512, 4096, 10**6])
            | st.integers(-5, 10**9), str: st.sampled_from(
                ["auto", "qemu", "tcg", "kvm", "virtio-fs", "none", "initrd", "image", "native",
                 "crun", "tcfilter", "/run/x", "relative", ""]) | support.texts,
            float: st.floats()}.get(tp, toml_values)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    doc: dict[str, dict[str, Any]] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        keys = SECTIONS[section]
        table: dict[str, Any] = {}
        for key in draw(st.lists(st.sampled_from(sorted(keys) or ["x"]), max_size=5,
                                 unique=True)):
            tp = keys.get(key)
            table[key] = draw(support.mostly(good_value(tp), toml_values))
        if draw(st.integers(0, 9)) == 0:
            table[draw(support.texts)] = draw(toml_values)  # an unknown key
        doc[section] = table
    return doc


def check_parse(text: str) -> config.Config | None:
    try:
        with support.cpu_limit():
            return config.parse(text, WHERE)
    except errors.InvalidArgument as exc:
        support.assert_one_line(str(exc))
        assert str(exc).startswith(f"{WHERE}: "), str(exc)
        return None


@given(st.text(max_size=200) | st.lists(st.sampled_from([
    "[runtime]", "[hypervisor]", "[hypervisor.qemu]", "[agent]", "[factory]", "[image]",
    "[[runtime]]", "x = 1", 'driver = "qemu"', "default_vcpus = 0", "a.b.c = 1", "[", "]",
    "= 1", 'k = """', "k = [1, ", "default_memory = -1", "state_dir = '/x'",
    "hypervisor = {}", "qemu = 5"]), max_size=8).map("\n".join))
def test_any_text_is_a_config_or_one_clear_error(text: str) -> None:
    check_parse(text)


@given(documents())
def test_known_keys_with_any_values(doc: dict[str, dict[str, Any]]) -> None:
    text = toml_doc(doc)
    cfg = check_parse(text)
    if cfg is None:
        return
    for section, table in doc.items():  # what was accepted is what the Config holds
        obj: Any = cfg
        for part in filter(None, section.split(".")):
            obj = getattr(obj, part)
        for key, value in table.items():
            if isinstance(value, dict):
                continue
            assert getattr(obj, key) == value, (section, key)


@given(documents())
def test_env_output_reads_back(doc: dict[str, dict[str, Any]]) -> None:
    cfg = check_parse(toml_doc(doc))
    if cfg is None:
        return
    back = config.parse(config.to_toml(cfg), WHERE)
    back.source = cfg.source
    assert back == cfg


@given(st.binary(max_size=200) | st.text(max_size=100).map(lambda t: t.encode()))
def test_any_file_is_a_config_or_one_clear_error(tmp_path_factory: pytest.TempPathFactory,
                                                 data: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "configuration.toml"
    path.write_bytes(data)
    try:
        config.load(path)
    except errors.InvalidArgument as exc:
        support.assert_one_line(str(exc))
        assert str(path) in str(exc)


# -- found by this fuzzer in config.py, fixed: kept as regression tests ------------------

def test_deep_nesting_is_one_clear_error() -> None:
    with pytest.raises(errors.InvalidArgument):
        config.parse("a = " + "[" * 3000 + "]" * 3000, WHERE)


def test_a_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_bytes(b"\xff\xfe[runtime]\n")
    with pytest.raises(errors.InvalidArgument, match="configuration.toml"):
        config.load(path)


def test_env_output_of_a_string_with_a_line_break_reads_back() -> None:
    cfg = config.parse(toml_doc({"runtime": {"state_dir": "/run/a\nb"}}), WHERE)
    assert cfg.runtime.state_dir == "/run/a\nb"
    assert config.parse(config.to_toml(cfg), WHERE).runtime.state_dir == "/run/a\nb"


def test_toml_writer_of_these_tests() -> None:
    doc = {"runtime": {"state_dir": 'a"\\\n\x7f\u00e9'}, "agent": {"kernel_modules": ["x"]}}
    assert config.parse(toml_doc(doc), WHERE).runtime.state_dir == 'a"\\\n\x7f\u00e9'
    assert json.loads(json.dumps(doc)) == doc
