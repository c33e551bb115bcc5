"""The peer side of bench/network.py, run inside the peer network namespace
(`ip netns exec NS python netpeer.py ...`). Standard library only.

    serve --bytes N   a minimal HTTP server on 9101 (the pod downloads N bytes
                      with wget); one JSON line per transfer on stdout, timed
                      here. Runs until stdin closes (bounded by --max-seconds).
    pull HOST         read everything HOST:9001 sends (the pod's `nc -ll -e dd
                      if=/dev/zero ...`), --times times; one JSON line.
    rr HOST           TCP connect time (--connects) and 1-byte request/response
                      round trips over one connection (--count), to HOST:9000
                      (an echo server in the pod); one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

HTTP_PORT, ECHO_PORT, SOURCE_PORT = 9101, 9000, 9001


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def http(conn: socket.socket, n: int, blob: bytes) -> None:
    conn.settimeout(120)
    with conn:
        req = b""
        while b"\r\n\r\n" not in req and len(req) < 65536:
            d = conn.recv(4096)
            if not d:
                return
            req += d
        t0 = time.perf_counter()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % n)
        sent = 0
        while sent < n:
            k = min(len(blob), n - sent)
            conn.sendall(blob[:k])
            sent += k
        # The client closes once it has everything: that is the end of the transfer.
        while conn.recv(65536):
            pass
        end = time.perf_counter()
    emit({"kind": "download", "bytes": n, "seconds": end - t0})


def listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(8)
    return s


def serve(n: int, max_seconds: float) -> None:
    blob = bytes(1 << 20)

    def loop(srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=http, args=(conn, n, blob), daemon=True).start()

    threading.Thread(target=loop, args=(listen(HTTP_PORT),), daemon=True).start()
    emit({"kind": "ready"})
    # Until the parent closes our stdin, or at most max_seconds.
    t = threading.Thread(target=sys.stdin.read, daemon=True)
    t.start()
    t.join(max_seconds)


def pull(host: str, times: int) -> None:
    results: list[dict[str, float]] = []
    for _ in range(times):
        got, first = 0, 0.0
        with socket.create_connection((host, SOURCE_PORT), timeout=120) as s:
            while True:
                d = s.recv(1 << 20)
                if not d:
                    break
                if not got:
                    first = time.perf_counter()
                got += len(d)
            end = time.perf_counter()
        results.append({"bytes": got, "seconds": end - first if got else 0.0})
        time.sleep(0.2)  # the pod's nc forks a handler per connection
    emit({"kind": "pull", "results": results})


def rr(host: str, count: int, connects: int, budget: float) -> None:
    conn_times: list[float] = []
    for _ in range(connects):
        t0 = time.perf_counter()
        s = socket.create_connection((host, ECHO_PORT), timeout=10)
        conn_times.append(time.perf_counter() - t0)
        s.close()
        time.sleep(0.05)  # the pod's nc forks a handler per connection
    rtts: list[float] = []
    s = socket.create_connection((host, ECHO_PORT), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with s:
        # The echo handler (nc -e cat) is started per connection: wait for the first echo.
        s.sendall(b"x")
        s.recv(1)
        start = time.monotonic()
        for _ in range(count):
            if time.monotonic() - start > budget:
                break
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                break
            rtts.append(time.perf_counter() - t0)
    emit({"kind": "rr", "connect": conn_times, "rr": rtts})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--max-seconds", type=float, default=1800)
    p = sub.add_parser("pull")
    p.add_argument("host")
    p.add_argument("--times", type=int, default=1)
    r = sub.add_parser("rr")
    r.add_argument("host")
    r.add_argument("--count", type=int, default=1000)
    r.add_argument("--connects", type=int, default=20)
    r.add_argument("--budget", type=float, default=30)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.bytes, a.max_seconds)
    elif a.cmd == "pull":
        pull(a.host, a.times)
    else:
        rr(a.host, a.count, a.connects, a.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
