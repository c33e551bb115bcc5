"""pykata.runtime.bundle: one reader for a bundle's config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pykata import errors
from pykata.runtime.bundle import load_spec, load_spec_or_empty, spec_annotations


def _bundle(tmp_path: Path, content: bytes | str | None) -> Path:
    b = tmp_path / "b"
    b.mkdir()
    if content is not None:
        (b / "config.json").write_bytes(content.encode() if isinstance(content, str)
                                        else content)
    return b


def test_reads_the_spec(tmp_path: Path) -> None:
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"]}}
    b = _bundle(tmp_path, json.dumps(spec))
    assert load_spec(b) == spec
    assert load_spec(str(b)) == spec
    assert load_spec_or_empty(b) == spec


@pytest.mark.parametrize(("content", "message"), [
    (None, "has no config.json"),
    ("{not json", "is not JSON: Expecting property name"),
    (b"\xff\xfe\xfa{", "is not JSON"),
    ("[1, 2]", "is not a JSON object (a list)"),
    ('"spec"', "is not a JSON object (a str)"),
])
def test_bad_specs_are_one_line_invalid_arguments(tmp_path: Path, content: str | bytes | None,
                                                  message: str) -> None:
    b = _bundle(tmp_path, content)
    with pytest.raises(errors.InvalidArgument, match="config.json|bundle") as info:
        load_spec(b)
    assert message in str(info.value)
    assert str(b) in str(info.value)
    assert "\n" not in str(info.value)
    assert load_spec_or_empty(b) == {}


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"bundle .*/nope does not exist$"):
        load_spec(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file")
def test_unreadable(tmp_path: Path) -> None:
    b = _bundle(tmp_path, "{}")
    (b / "config.json").chmod(0)
    with pytest.raises(errors.InvalidArgument, match="cannot read .*config.json: Permission"):
        load_spec(b)


def test_unreadable_directory_in_place_of_the_file(tmp_path: Path) -> None:
    b = _bundle(tmp_path, None)
    (b / "config.json").mkdir()
    with pytest.raises(errors.InvalidArgument, match="cannot read .*config.json: Is a directory"):
        load_spec(b)


def test_spec_annotations() -> None:
    assert spec_annotations({}) == {}
    assert spec_annotations({"annotations": None}) == {}
    assert spec_annotations({"annotations": ["a"]}) == {}
    assert spec_annotations({"annotations": {"a": "1", "b": 2}}) == {"a": "1"}


def test_default_spec_is_the_one_the_test_bundles_use() -> None:
    from pykata.runtime.bundle import default_spec
    from pykata.testing import bundles

    assert bundles.default_spec is default_spec  # one copy, not two to keep in step
    spec = default_spec(["sh"], memory_limit=1 << 28, cwd="/tmp", env=["A=1"])
    assert spec["process"]["cwd"] == "/tmp" and spec["process"]["env"] == ["A=1"]
    assert spec["linux"]["resources"]["memory"] == {"limit": 1 << 28, "swap": 1 << 28}
    spec = default_spec(["sh"], hostname="pykata", terminal=True)
    assert spec["process"]["terminal"] and spec["root"] == {"path": "rootfs", "readonly": False}
