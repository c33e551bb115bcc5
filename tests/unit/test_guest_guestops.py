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
    for bad in ("/a/../b", "/a/./b", "/", "/a/.."):
        with pytest.raises(errors.InvalidArgument, match="no '.' or '..' components"):
            guestops.copy_file(bad, b"", 0, 0, 0o644, 0o755, 0, 0)


def _copy(path: Path, data: bytes = b"new") -> None:
    guestops.copy_file(str(path), data, 0, len(data), 0o644, 0o755, os.getuid(), os.getgid())


def test_copy_file_never_follows_a_symlink(tmp_path: Path) -> None:
    """The agent policy allows CopyFile paths by their text: a symlink a
    container planted anywhere on the way must not lead the write elsewhere."""
    root = tmp_path.resolve()
    outside = root / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"old")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "dir").symlink_to(outside)  # a directory component
    with pytest.raises(errors.InvalidArgument, match="a symlink is never followed"):
        _copy(allowed / "dir" / "f")
    with pytest.raises(errors.InvalidArgument, match="a symlink is never followed"):
        _copy(allowed / "dir" / "new" / "f")
    assert (outside / "f").read_bytes() == b"old" and sorted(os.listdir(outside)) == ["f"]
    # The last component: the link itself is replaced, its target untouched.
    (allowed / "file").symlink_to(outside / "f")
    _copy(allowed / "file")
    assert not (allowed / "file").is_symlink() and (allowed / "file").read_bytes() == b"new"
    assert (outside / "f").read_bytes() == b"old"
    # The temporary name is not followed either (a chunked copy in progress).
    (allowed / ".g.pykata-copy").symlink_to(outside / "f")
    with pytest.raises(errors.Internal, match="cannot write"):
        guestops.copy_file(str(allowed / "g"), b"abc", 0, 6, 0o644, 0o755, 0, 0)
    assert (outside / "f").read_bytes() == b"old"
    # A file where a directory is expected.
    with pytest.raises(errors.InvalidArgument, match="not a directory"):
        _copy(outside / "f" / "x")


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

