"""Port forwarding (CRI PortForward, what `kubectl port-forward` uses): pykata vs runc.

One private containerd with the CRI plugin; one pod per runtime handler
(`pykata`, `runc`) running busybox httpd (a 16 MiB file) and a counting
server (`nc -ll -e`, answers the byte count after the client's EOF).

1. Through containerd's streaming server, as the kubelet hands it to kubectl
   (websocket port-forward protocol, pykata.testing.portforward): a request
   = PortForward call + upgrade + containerd's dial + GET of a small file;
   download of 16 MiB.
2. The dial containerd makes, made in the pod's netns on the host (no
   streaming server): connect + GET of a small file (connect latency),
   16 MiB download, 16 MiB upload (half-close, then the count).

Loopback and the pods' own namespaces only.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import Series, arg_parser, log, run_section, runs, save_series, sigterm_as_interrupt

from pykata.resources.network import in_netns
from pykata.testing.cri import BUSYBOX_REF, CRIClient, container_config, cri_containerd, pod_config
from pykata.testing.portforward import ForwardedConnection

LABEL = {"pykata.bench": "portforward"}
MiB = 1 << 20
SERVE = ("mkdir -p /www && echo hello > /www/small && "
         "dd if=/dev/zero of=/www/big bs=1M count=16 2>/dev/null && "
         "printf '#!/bin/sh\\nwc -c\\n' > /count && chmod +x /count && "
         "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & nc -ll -p 9000 -e /count & wait")


def _read_all(s: socket.socket) -> int:
    n = 0
    while chunk := s.recv(1 << 20):
        n += len(chunk)
    return n


def _get(path: str) -> Callable[[], int]:
    def fn() -> int:
        with socket.create_connection(("127.0.0.1", 8080), timeout=60) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            return _read_all(s)
    return fn


def _upload(size: int) -> Callable[[], int]:
    def fn() -> int:
        with socket.create_connection(("127.0.0.1", 9000), timeout=60) as s:
            block = b"\0" * MiB
            for _ in range(size // MiB):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(100):
                reply += chunk
            return int(reply.strip() or b"0")
    return fn


class PodUnderTest:
    def __init__(self, c: CRIClient, handler: str) -> None:
        self.c = c
        self.handler = handler
        tag = uuid.uuid4().hex[:8]
        self.config = pod_config(f"pf-{handler}-{tag}", "bench", uid=tag, labels=LABEL,
                                 hostname=f"pf-{tag}")
        self.id = c.run_pod_sandbox(self.config, runtime_handler=handler)
        cfg = container_config("web", BUSYBOX_REF, ["/bin/sh", "-c"], [SERVE])
        self.cid = c.create_container(self.id, cfg, self.config)
        c.start_container(self.cid)
        deadline = time.monotonic() + 120
        while c.exec_sync(self.cid, ["sh", "-c", "test -s /www/big && wget -q -O /dev/null "
                                     "http://127.0.0.1:8080/small"], 30).exit_code:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{handler}: httpd did not start")
            time.sleep(0.3)
        status = c.pod_sandbox_status(self.id, verbose=True)
        spec = json.loads(status.info["info"])["runtimeSpec"]
        self.netns = str(next(n["path"] for n in spec["linux"]["namespaces"]
                              if n["type"] == "network"))

    def _cri_get(self, path: str) -> int:
        """Body bytes of GET ``path``, read up to its Content-Length: waiting for
        the end of the stream would time containerd's one-second close grace."""
        with ForwardedConnection(self.c.port_forward(self.id, 8080), 8080) as conn:
            conn.send(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            got = b""
            while b"\r\n\r\n" not in got:
                data = conn.recv()
                if not data:
                    return 0
                got += data
            head, _, rest = got.partition(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            n = len(rest)
            while n < length:
                data = conn.recv()
                if not data:
                    break
                n += len(data)
            return n

    def cri_request(self) -> int:
        return self._cri_get("/small")

    def cri_download(self) -> int:
        return self._cri_get("/big")

    def netns_fn(self, fn: Callable[[], int]) -> Callable[[], int]:
        """``fn`` run in a thread in the pod's netns (where containerd dials)."""
        netns = self.netns
        return lambda: in_netns(netns, fn)

    def remove(self) -> None:
        self.c.stop_pod_sandbox(self.id)
        self.c.remove_pod_sandbox(self.id)


def _measure(name: str, command: str, unit: str, n: int, fn: Callable[[], int],
             size: int = 0, expect: int = 0) -> Series:
    s = Series(name, command, unit)
    fn()  # warm-up
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            got = fn()
        except OSError as exc:
            log(f"{name}: {exc}")
            s.failures += 1
            continue
        dt = time.perf_counter() - t0
        if expect and got < expect:
            log(f"{name}: {got} bytes, expected {expect}")
            s.failures += 1
            continue
        s.samples.append(size / MiB / dt if size else dt * 1000)
    return s


def main() -> int:
    sigterm_as_interrupt()
    args = arg_parser(__doc__).parse_args()
    n_lat = runs(args, 15, 3)
    n_bulk = runs(args, 5, 2)
    series: list[Series] = []
    base = Path(f"/run/pykata-bench-pf-{uuid.uuid4().hex[:6]}")
    with cri_containerd(base, Path("/var/lib/pykata-bench"), LABEL) as (_, _, c):
        for handler in ("pykata", "runc"):
            log(f"{handler}: starting the pod")
            pod = PodUnderTest(c, handler)
            try:
                series += [
                    _measure(f"{handler} CRI port-forward request", "PortForward + websocket + "
                             "GET /small (6 B), to the end of the body", "ms", n_lat,
                             pod.cri_request),
                    _measure(f"{handler} CRI port-forward download", "GET 16 MiB over the "
                             "streaming server", "MiB/s", n_bulk, pod.cri_download,
                             16 * MiB, 16 * MiB),
                    _measure(f"{handler} pod-netns connect+request", "connect 127.0.0.1:8080 "
                             "in the pod netns + GET /small", "ms", n_lat,
                             pod.netns_fn(_get("/small"))),
                    _measure(f"{handler} pod-netns download", "GET 16 MiB in the pod netns",
                             "MiB/s", n_bulk, pod.netns_fn(_get("/big")),
                             16 * MiB, 16 * MiB),
                    _measure(f"{handler} pod-netns upload", "16 MiB, half-close, count back",
                             "MiB/s", n_bulk, pod.netns_fn(_upload(16 * MiB)),
                             16 * MiB, 16 * MiB),
                ]
            finally:
                pod.remove()
    save_series("portforward", series, containerd="1.6 (CRI streaming server, websocket)")
    return 0


if __name__ == "__main__":
    run_section(main)
