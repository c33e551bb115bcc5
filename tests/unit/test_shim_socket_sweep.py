"""A shim killed before containerd dialled it leaves its socket; the next
``shim start`` removes such sockets (shim/main.py sweep_stale_sockets), and
nothing else: not a live one, not a young one, not a link or a file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pykata.shim import main


def _bound(path: Path, listen: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    if listen:
        s.listen(1)
    return s


def _age(path: Path, seconds: float) -> None:
    t = os.lstat(path).st_mtime - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_only_old_sockets_nobody_serves_are_removed(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    live = _bound(d / "live", listen=True)
    _bound(d / "dead", listen=False).close()
    _bound(d / "young", listen=False).close()
    (d / "file").write_text("x")
    os.symlink(d / "dead", d / "link")
    for name in ("live", "dead", "file"):
        _age(d / name, 60)
    try:
        assert main.sweep_stale_sockets(d, min_age=10) == ["dead"]
        assert sorted(os.listdir(d)) == ["file", "link", "live", "young"]
        assert main.sweep_stale_sockets(d, min_age=10) == []
    finally:
        live.close()


def test_a_missing_directory_is_nothing_to_do(tmp_path: Path) -> None:
    assert main.sweep_stale_sockets(tmp_path / "none") == []
