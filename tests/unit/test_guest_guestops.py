"""Guest operations that need no root: files, fake sysfs, metrics text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pykata import errors
from pykata.guest import guestops


def test_copy_file_in_chunks(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f"
    guestops.copy_file(str(target), b"abc", 0, 6, 0o600, 0o750, os.getuid(), os.getgid())
    assert not target.exists(), "the file appears only once complete"
    guestops.copy_file(str(target), b"def", 3, 6, 0o600, 0o750, os.getuid(), os.getgid())
    assert target.read_bytes() == b"abcdef"
    assert target.stat().st_mode & 0o777 == 0o600
    assert not list(target.parent.glob(".*pykata-copy"))


def test_copy_file_rejects_relative() -> None:
    with pytest.raises(errors.InvalidArgument):
        guestops.copy_file("rel/path", b"", 0, 0, 0o644, 0o755, 0, 0)


def test_cpu_ids() -> None:
    assert guestops._cpu_ids("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert guestops._cpu_ids("0") == [0]


def test_online_cpu_mem_fake_sysfs(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "present").write_text("0-3\n")
    (cpu / "online").write_text("0\n")
    for n in range(1, 4):
        (cpu / f"cpu{n}").mkdir()
        (cpu / f"cpu{n}" / "online").write_text("0\n")
    mem = tmp_path / "memory"
    for n, state in ((0, "online"), (1, "offline")):
        (mem / f"memory{n}").mkdir(parents=True)
        (mem / f"memory{n}" / "state").write_text(state + "\n")
    (mem / "block_size_bytes").write_text("8000000\n")
    guestops.online_cpu_mem(2, False, str(tmp_path))
    assert [(cpu / f"cpu{n}" / "online").read_text() for n in (1, 2, 3)] == ["1", "1", "0\n"]
    assert (mem / "memory1" / "state").read_text() == "online"
    assert guestops.mem_block_size(str(mem)) == 0x8000000


def test_metrics_exposition() -> None:
    text = guestops.metrics(containers=2)
    assert text.endswith("\n")
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        float(value)
        assert name_labels.split("{")[0] in names
    assert {"pykata_guest_meminfo", "pykata_guest_load1", "pykata_guest_cpu_seconds_total",
            "pykata_agent_rss_bytes", "pykata_agent_containers"} <= names
    assert "pykata_agent_containers 2" in text


def test_write_etc(tmp_path: Path) -> None:
    guestops.write_etc(["nameserver 10.0.0.1", "search svc.local\n"], "127.0.0.1 localhost",
                       str(tmp_path))
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 10.0.0.1\nsearch svc.local\n"
    assert (tmp_path / "hosts").read_text() == "127.0.0.1 localhost\n"

