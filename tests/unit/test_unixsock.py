"""Unix sockets at paths longer than sockaddr_un holds (a long state_dir)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pykata.utils.unixsock import MAX_PATH, addressable


def _long_dir(tmp_path: Path) -> Path:
    d = tmp_path
    while len(os.fsencode(d)) <= MAX_PATH + 20:
        d = d / ("d" * 40)
    d.mkdir(parents=True)
    return d


def test_a_short_path_is_used_as_is(tmp_path: Path) -> None:
    with addressable(tmp_path / "s.sock") as where:
        assert where == str(tmp_path / "s.sock")


def test_bind_and_connect_past_the_sun_path_limit(tmp_path: Path) -> None:
    path = _long_dir(tmp_path) / "vfs.sock"
    with pytest.raises(OSError):  # what the plain path does
        socket.socket(socket.AF_UNIX).bind(str(path))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with addressable(path) as where:
            srv.bind(where)
        srv.listen(1)
        assert path.is_socket()  # the socket is at the long path itself
        with addressable(path) as where:
            cli.connect(where)
        conn, _ = srv.accept()
        cli.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.close()
    finally:
        srv.close()
        cli.close()


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = _long_dir(tmp_path)
    link = real.parent / "link"
    link.symlink_to(real)
    assert len(os.fsencode(link / "s.sock")) > MAX_PATH  # the long-path branch
    with pytest.raises(OSError), addressable(link / "s.sock"):
        pass
