"""Network: pod <-> peer throughput and latency through pykata's tcfilter path
(CNI veth -> tc mirred -> tap -> QEMU virtio-net -> guest) vs the same pod
with runc (CNI veth straight into the container).

A private containerd with the CRI plugin and a bridge CNI network on a free
10.244.x.0/24 runs one pod per runtime handler (`pykata`, `runc`), each with a
busybox container running an echo server (`nc -ll -p 9000 -e cat`) and a
source (`nc -ll -p 9001 -e dd if=/dev/zero bs=1M count=N`: dd writes straight
into the socket). A peer
network namespace made here is attached to the same bridge and runs
bench/netpeer.py. Traffic stays between that namespace and the pods'.

- latency: `ping -c N -i 0.2 PEER` in the pod (ICMP RTT); TCP connect time and
  1-byte request/response round trips (TCP_RR) from the peer to the pod's echo
  server;
- throughput: pod -> peer, the peer reads the N MiB the pod's source sends
  (timed first to last byte); peer -> pod, the pod downloads N MiB with
  `wget -O /dev/null http://PEER:9101/` (timed at the peer, from the request
  to the client's close).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import Series, arg_parser, log, run_section, runs, save_series, sigterm_as_interrupt

from pykata.testing.cri import (
    BUSYBOX_REF,
    CNINetwork,
    CRIClient,
    container_config,
    cri_containerd,
    pod_config,
)

HERE = Path(__file__).parent
LABEL = {"pykata.bench": "network"}
SERVERS = ("trap 'exit 0' TERM; nc -ll -p 9000 -e cat & "
           "nc -ll -p 9001 -e dd if=/dev/zero bs=1M count={mib} 2>/dev/null & "
           "sleep 3600 & wait")
PING_RE = re.compile(r"time=([\d.]+) ms")


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check,
                          timeout=60).stdout


class Peer:
    """A netns on the CNI bridge with an address of its subnet, and the server."""

    def __init__(self, net: CNINetwork, nbytes: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_end, self.ns_end = f"pkbench-{tag}", f"pkb{tag}", f"pkc{tag}"
        self.ip = str(net.subnet.network_address + 250)
        self.net, self.nbytes = net, nbytes
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()

    def __enter__(self) -> Peer:
        sh("ip", "netns", "add", self.ns)
        try:
            sh("ip", "link", "add", self.host_end, "type", "veth", "peer", "name", self.ns_end)
            sh("ip", "link", "set", self.ns_end, "netns", self.ns)
            sh("ip", "link", "set", self.host_end, "master", self.net.bridge, "up")
            ex = ("ip", "netns", "exec", self.ns)
            sh(*ex, "ip", "addr", "add", f"{self.ip}/{self.net.subnet.prefixlen}", "dev",
               self.ns_end)
            sh(*ex, "ip", "link", "set", self.ns_end, "up")
            sh(*ex, "ip", "link", "set", "lo", "up")
            self.proc = subprocess.Popen(
                [*ex, sys.executable, str(HERE / "netpeer.py"), "serve", "--bytes",
                 str(self.nbytes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
            if json.loads(self.next_line(30)).get("kind") != "ready":
                raise RuntimeError("peer server did not start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_line(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def transfer(self, ok: bool) -> dict[str, float]:
        """The peer's record of the transfer just done (empty if there is none)."""
        try:
            d: dict[str, float] = json.loads(self.next_line(30 if ok else 3))
        except queue.Empty:
            return {}
        return d

    def run(self, *args: str) -> Any:
        """netpeer.py ARGS in the peer namespace; its JSON line."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable,
                              str(HERE / "netpeer.py"), *args],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        return json.loads(out.splitlines()[-1])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        sh("ip", "link", "del", self.host_end, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def measure(c: CRIClient, peer: Peer, name: str, cid: str, pod_ip: str, n: int, mib: int,
            pings: int, rr_count: int) -> list[Series]:
    out: list[Series] = []
    r = c.exec_sync(cid, ["ping", "-c", str(pings), "-i", "0.2", peer.ip], timeout=60)
    rtt = [float(x) / 1000 for x in PING_RE.findall(r.stdout.decode())]
    out.append(Series(f"{name} ping RTT", f"ping -c {pings} -i 0.2 PEER (in the pod)", "s",
                      rtt, failures=pings - len(rtt)))
    d = peer.run("rr", pod_ip, "--count", str(rr_count), "--connects", "20", "--budget", "30")
    out.append(Series(f"{name} TCP connect", "connect() from the peer to the pod's :9000",
                      "s", list(d["connect"])))
    out.append(Series(f"{name} TCP_RR", "1-byte request/response, one connection, "
                      "peer -> pod echo (nc -e cat)", "s", list(d["rr"])))
    up: list[float] = []
    down: list[float] = []
    fails = [0, 0]
    pulled = peer.run("pull", pod_ip, "--times", str(n))["results"]
    for t in pulled:
        if t["bytes"] == mib << 20 and t["seconds"] > 0:
            up.append(mib / t["seconds"])
        else:
            fails[0] += 1
    for _ in range(n):
        r = c.exec_sync(cid, ["wget", "-q", "-O", "/dev/null", f"http://{peer.ip}:9101/blob"],
                        timeout=180)
        t = peer.transfer(r.exit_code == 0)
        if r.exit_code == 0 and t.get("seconds", 0) > 0:
            down.append(mib / t["seconds"])
        else:
            fails[1] += 1
    out.append(Series(f"{name} pod->peer", f"peer reads {mib} MiB from the pod's nc -e dd "
                      "if=/dev/zero bs=1M", "MiB/s", up, fails[0]))
    out.append(Series(f"{name} peer->pod", f"wget -O /dev/null http://PEER:9101/ "
                      f"({mib} MiB)", "MiB/s", down, fails[1]))
    return out


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--mib", type=int, default=0, help="MiB per transfer (default 64)")
    args = ap.parse_args()
    sigterm_as_interrupt()
    n = runs(args, 3, 1)
    mib = args.mib or (16 if args.quick else 64)
    pings = 10 if args.quick else 30
    rr_count = 200 if args.quick else 2000
    series: list[Series] = []
    info: dict[str, object] = {"mib": mib}
    base = Path(f"/run/pykata-bench/net-{uuid.uuid4().hex[:6]}")
    with cri_containerd(base, Path("/var/lib/pykata-bench/cri"), LABEL) as (_, net, c):
        pods: dict[str, tuple[str, str]] = {}
        for handler in ("pykata", "runc"):
            log(f"network: {handler} pod")
            tag = uuid.uuid4().hex[:8]
            pc = pod_config(f"bench-{handler}-{tag}", "pykata-bench", uid=tag,
                            log_directory=base / "pods" / tag, labels=LABEL)
            pid = c.run_pod_sandbox(pc, runtime_handler=handler)
            cid = c.create_container(pid, container_config(
                "servers", BUSYBOX_REF, ["/bin/sh", "-c"], [SERVERS.format(mib=mib)],
                log_path="servers.log"), pc)
            c.start_container(cid)
            ip = c.pod_sandbox_status(pid).status.network.ip
            pods[handler] = (cid, ip)
        info["subnet"] = str(net.subnet)
        with Peer(net, mib << 20) as peer:
            info["peer"] = peer.ip
            for handler, (cid, ip) in pods.items():
                log(f"network: {handler} x{n} ({mib} MiB transfers)")
                series += measure(c, peer, handler, cid, ip, n, mib, pings, rr_count)
    save_series("network", series, info=info)
    return 0


if __name__ == "__main__":
    run_section(main)
