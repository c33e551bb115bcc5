"""``shim start`` for a container joining a running pod writes the shim's
address into that container's bundle too, as for the pod's sandbox: a
containerd restarted later reconnects every task through its own bundle's
``address`` file, and a task without one is taken for dead (its container is
cleaned up and reported exited 255, while the pod runs on)."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest

from pykata.shim import main


def _bundle(d: Path, annotations: dict[str, str]) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"ociVersion": "1.1.0",
                                               "annotations": annotations}))
    return d


def test_a_joining_container_gets_the_address(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "shim.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(4)
    monkeypatch.setattr(main, "socket_path", lambda address, ns, sandbox: sock_path)
    monkeypatch.setattr(main, "private_dir", lambda path, tighten=False: None)
    bundle = _bundle(tmp_path / "work", {"io.kubernetes.cri.container-type": "container",
                                         "io.kubernetes.cri.sandbox-id": "pod1"})
    monkeypatch.chdir(bundle)
    args = argparse.Namespace(address="/run/containerd/containerd.sock", namespace="k8s.io",
                              id="work", publish_binary="", debug=False)
    try:
        assert main.cmd_start(args) == 0
    finally:
        srv.close()
    assert (bundle / "address").read_text() == f"unix://{sock_path}"
    assert not (bundle / "address.tmp").exists()


def test_no_running_pod_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "socket_path", lambda address, ns, sandbox: tmp_path / "none")
    monkeypatch.setattr(main, "private_dir", lambda path, tighten=False: None)
    bundle = _bundle(tmp_path / "work", {"io.kubernetes.cri.container-type": "container",
                                         "io.kubernetes.cri.sandbox-id": "pod1"})
    monkeypatch.chdir(bundle)
    args = argparse.Namespace(address="/a", namespace="k8s.io", id="work", publish_binary="",
                              debug=False)
    assert main.cmd_start(args) == 1
    assert not (bundle / "address").exists()
