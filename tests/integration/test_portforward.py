"""Issue 22: ``kubectl port-forward`` to a pod in a VM, through containerd's CRI
PortForward and its streaming server (the websocket port-forward protocol,
pykata.testing.portforward), with busybox httpd and nc in the pod. Also the
dial containerd makes, made by hand in the pod's netns on the host (half-close,
reset, IPv6), and that nothing of ours is left in that netns after teardown.

Traffic stays on loopback and in the namespaces the test's containerd made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pykata.resources import portforward as pf
from pykata.resources.network import in_netns
from pykata.testing.portforward import ForwardedConnection
from tests.integration.test_cri_pykata import SLEEP, Env, Pod, cri_env

pytestmark = pytest.mark.timeout(600)

WEB = ("mkdir -p /www && echo hello-pf > /www/index.html && "
       "dd if=/dev/urandom of=/www/big bs=1M count=8 2>/dev/null && "
       "sha256sum /www/big | cut -d' ' -f1 > /www/big.sha && "
       "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & httpd -f -p '[::1]:8081' -h /www & wait")


def _extra_config() -> str:
    """The shims' configuration as the caller's PYKATA_CONFIG has it (the guest image)."""
    path = os.environ.get("PYKATA_CONFIG")
    return Path(path).read_text() if path else ""


@pytest.fixture(scope="module", params=["cold", "template"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    text = _extra_config()
    tpl = Path(f"/dev/shm/pykata-pf-{uuid.uuid4().hex[:6]}")
    if request.param == "template":
        text += f'\n[factory]\nenable_template = true\ntemplate_path = "{tpl}/template"\n'
    try:
        yield from cri_env(pykata_config=text)
    finally:
        shutil.rmtree(tpl, ignore_errors=True)


@pytest.fixture(scope="module")
def web(env: Env) -> Iterator[tuple[Pod, str]]:
    pod = Pod(env)
    try:
        cid = pod.container("web", WEB)
        deadline = time.monotonic() + 60
        ready = "test -s /www/big.sha && wget -q -O - http://127.0.0.1:8080/index.html 2>&1"
        while (out := pod.sh(cid, ready))[1] != 0:
            assert time.monotonic() < deadline, f"httpd did not start: {out}"
            time.sleep(0.3)
        yield pod, cid
    finally:
        assert not pod.remove()


def netns_of(pod: Pod) -> str:
    info = json.loads(pod.c.pod_sandbox_status(pod.id, verbose=True).info["info"])
    return str(next(n["path"] for n in info["runtimeSpec"]["linux"]["namespaces"]
                    if n["type"] == "network"))


def wait_listening(pod: Pod, cid: str, port: int) -> None:
    """Until something in the pod listens on TCP ``port`` (bounded): a fixed sleep
    lost the race on a busy CI host, and the forward then met a refusal."""
    def listening() -> bool:
        rows = [line.split() for line in pod.sh(
            cid, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null")[0].splitlines()]
        return any(len(r) > 3 and r[1].endswith(f":{port:04X}") and r[3] == "0A"
                   for r in rows)
    deadline = time.monotonic() + 60
    while not listening():
        assert time.monotonic() < deadline, f"nothing listens on port {port} in the pod"
        time.sleep(0.3)


def forward(pod: Pod, port: int) -> ForwardedConnection:
    return ForwardedConnection(pod.c.port_forward(pod.id, port), port)


def http_get(pod: Pod, port: int, path: str) -> bytes:
    with forward(pod, port) as conn:
        conn.send(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return conn.recv_all()


def body(response: bytes) -> bytes:
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head[:200]
    return rest


def test_http_through_port_forward(web: tuple[Pod, str]) -> None:
    pod, _ = web
    assert body(http_get(pod, 8080, "/index.html")) == b"hello-pf\n"


def test_concurrent_connections(web: tuple[Pod, str]) -> None:
    pod, _ = web
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda _: body(http_get(pod, 8080, "/index.html")), range(16)))
    assert got == [b"hello-pf\n"] * 16


def test_large_download(web: tuple[Pod, str]) -> None:
    pod, cid = web
    data = body(http_get(pod, 8080, "/big"))
    want = pod.sh(cid, "cat /www/big.sha")[0].strip()
    assert len(data) == 8 << 20 and hashlib.sha256(data).hexdigest() == want


def test_large_upload(web: tuple[Pod, str]) -> None:
    """6 MiB up through the streaming server arrive whole. containerd 1.6 ends a
    forwarded connection one second after either direction ends, whatever is
    still in flight (runc too): so the stream stays open until the pod has every
    byte, and busybox nc's stdin stays open (at EOF on stdin nc half-closes at
    once, and containerd would cut the upload a second later)."""
    pod, cid = web
    pod.sh(cid, "rm -f /tmp/up; (sleep 3600 | nc -l -p 9000 > /tmp/up) >/dev/null 2>&1 &")
    wait_listening(pod, cid, 9000)
    payload = os.urandom(6 << 20)
    with forward(pod, 9000) as conn:
        conn.send(payload)
        deadline = time.monotonic() + 120
        while (got := pod.sh(cid, "wc -c < /tmp/up 2>/dev/null")[0].strip()) != str(
                len(payload)):
            assert time.monotonic() < deadline, f"only {got or 0} bytes reached the pod"
            time.sleep(0.3)
    sha = pod.sh(cid, "sha256sum /tmp/up; rm -f /tmp/up")[0].split()[0]
    assert sha == hashlib.sha256(payload).hexdigest()


def test_nothing_listening_is_a_clean_refusal(web: tuple[Pod, str]) -> None:
    pod, _ = web
    with forward(pod, 9) as conn:
        conn.send(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.recv_all() == b""
        assert b"error forwarding port 9" in conn.error, conn.error


def test_ipv6_only_listener(web: tuple[Pod, str]) -> None:
    """httpd on [::1]:8081 only: containerd's tcp4 dial reaches it (the guest
    falls back to ::1, as containerd's own tcp6 fallback would), and a dial of
    ::1 in the pod netns on the host reaches it directly."""
    pod, _ = web
    assert body(http_get(pod, 8081, "/index.html")) == b"hello-pf\n"

    def dial6() -> bytes:
        with socket.create_connection(("::1", 8081), timeout=20) as s:
            s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            return _read_all(s)
    assert body(in_netns(netns_of(pod), dial6)) == b"hello-pf\n"


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_half_close_and_reset_in_the_pod_netns(web: tuple[Pod, str]) -> None:
    """What containerd's dial carries, made by hand: a client's half-close
    reaches the guest's server (which answers after EOF), and a client reset
    reaches it as a reset."""
    pod, cid = web
    pod.sh(cid, "printf '#!/bin/sh\\nwc -c\\n' > /tmp/count && chmod +x /tmp/count && "
                "(nc -ll -p 9002 -e /tmp/count >/dev/null 2>&1 &)")
    wait_listening(pod, cid, 9002)
    netns = netns_of(pod)

    def half_close() -> bytes:
        with socket.create_connection(("127.0.0.1", 9002), timeout=20) as s:
            s.sendall(b"x" * 300_000)
            s.shutdown(socket.SHUT_WR)
            return _read_all(s)
    assert in_netns(netns, half_close).strip() == b"300000"

    def refused() -> str:
        with socket.create_connection(("127.0.0.1", 9), timeout=20) as s:
            try:
                s.sendall(b"x")
                return "data" if s.recv(10) else "eof"
            except ConnectionResetError:
                return "reset"
    assert in_netns(netns, refused) == "reset"


def test_teardown_leaves_nothing_in_the_pod_netns(env: Env) -> None:
    pod = Pod(env)
    removed = False
    try:
        cid = pod.container("c", SLEEP)
        assert pod.sh(cid, "true")[1] == 0
        netns = netns_of(pod)
        assert pf.TABLE in pf.nft_tables(netns)
        fd = os.open(netns, os.O_RDONLY)  # keeps the netns after CNI removed its name
        try:
            assert not pod.remove()
            removed = True
            held = f"/proc/{os.getpid()}/fd/{fd}"
            assert pf.TABLE not in pf.nft_tables(held)
            assert in_netns(held, _listeners) == []
        finally:
            os.close(fd)
    finally:
        if not removed:
            pod.remove()


def _listeners() -> list[str]:
    out = []
    for name in ("tcp", "tcp6"):
        with open(f"/proc/thread-self/net/{name}") as f:
            out += [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    return out


def test_many_connections_at_once_in_the_pod_netns(web: tuple[Pod, str]) -> None:
    """64 connections open together (containerd dials one per stream)."""
    pod, _ = web
    netns = netns_of(pod)
    results: list[bytes] = []
    lock = threading.Lock()

    def many() -> None:
        socks = [socket.create_connection(("127.0.0.1", 8080), timeout=30) for _ in range(64)]
        for s in socks:
            s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        for s in socks:
            r = _read_all(s)
            s.close()
            with lock:
                results.append(body(r))
    in_netns(netns, many)
    assert results == [b"hello-pf\n"] * 64
