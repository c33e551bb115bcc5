"""ttRPC and the agent channel.

1. pykata.ttrpc over a unix socket, server and client in two processes (as the
   shim and a peer are): round trip of a small unary call, pipelined small
   calls (64 in flight on one connection), and 1 MiB messages (request only,
   response only, echo).
2. The guest agent over the VM channel (virtio-serial here, vsock where
   /dev/vhost-vsock exists), through a sandbox created in-process with
   `Sandbox.create`: `Health/Check`, `GetGuestDetails` and `GetMetrics` round
   trips, and the agent's own RSS (`pykata_agent_rss_bytes` from GetMetrics)
   in an idle sandbox and with one idle container.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
    Series,
    arg_parser,
    atimed,
    log,
    private_sandbox,
    run_section,
    save_series,
    sigterm_as_interrupt,
)

from pykata.protos import agent_pb2 as pb
from pykata.ttrpc import Client, Server

SVC = "pykata.bench.v1.Bench"
MiB = 1 << 20


# -- the server process ---------------------------------------------------------------


async def serve(path: str) -> None:
    server = Server()

    async def small(req: pb.CheckRequest) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def sink(req: pb.WriteStreamRequest) -> pb.WriteStreamResponse:
        return pb.WriteStreamResponse(len=len(req.data))

    async def source(req: pb.ReadStreamRequest) -> pb.ReadStreamResponse:
        return pb.ReadStreamResponse(data=bytes(req.len))

    async def echo(req: pb.WriteStreamRequest) -> pb.ReadStreamResponse:
        return pb.ReadStreamResponse(data=req.data)

    server.register(SVC, "Small", pb.CheckRequest, small)
    server.register(SVC, "Sink", pb.WriteStreamRequest, sink)
    server.register(SVC, "Source", pb.ReadStreamRequest, source)
    server.register(SVC, "Echo", pb.WriteStreamRequest, echo)
    await server.serve_unix(path)
    print("ready", flush=True)
    # Serve until the parent closes our stdin (bounded by the parent's timeout).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    # The client has closed its connection: let the server side of it finish
    # (Server.close() cancels connections still closing, and asyncio logs that).
    await asyncio.sleep(0.5)
    await server.close()


# -- ttRPC over a unix socket -------------------------------------------------------------


async def ttrpc_bench(n_small: int, n_big: int) -> list[Series]:
    tmp = Path(tempfile.mkdtemp(prefix="pykata-bench-ttrpc-"))
    sock = tmp / "bench.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve", str(sock), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    out: list[Series] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("ttRPC bench server did not start")
        client = await Client.connect_unix(sock)
        try:
            out += await _ttrpc_series(client, n_small, n_big)
        finally:
            await client.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


async def _ttrpc_series(client: Client, n_small: int, n_big: int) -> list[Series]:
    out: list[Series] = []

    async def small() -> None:
        await client.call(SVC, "Small", pb.CheckRequest(), pb.HealthCheckResponse, timeout=10)

    s = await atimed(small, n_small, warmup=20, budget=30)
    out.append(Series("ttRPC small call round trip", "Client.call (unary, empty message), "
                      "sequential", "s", s))
    # Pipelined: 64 calls in flight on one connection.
    inflight, total = 64, max(n_small, 64)
    rates: list[float] = []
    for _ in range(3):
        sem = asyncio.Semaphore(inflight)

        async def one(sem: asyncio.Semaphore = sem) -> None:
            async with sem:
                await small()

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        rates.append(total / (time.perf_counter() - t0))
    out.append(Series("ttRPC small calls, 64 in flight", f"{total} calls x3, one connection",
                      "calls/s", rates))
    big = bytes(MiB)

    async def sink() -> None:
        await client.call(SVC, "Sink", pb.WriteStreamRequest(data=big), pb.WriteStreamResponse,
                          timeout=30)

    async def source() -> None:
        await client.call(SVC, "Source", pb.ReadStreamRequest(len=MiB), pb.ReadStreamResponse,
                          timeout=30)

    async def echo() -> None:
        await client.call(SVC, "Echo", pb.WriteStreamRequest(data=big), pb.ReadStreamResponse,
                          timeout=30)

    for name, fn, cmd in (("1 MiB request", sink, "1 MiB request, 4-byte response"),
                          ("1 MiB response", source, "tiny request, 1 MiB response"),
                          ("1 MiB echo", echo, "1 MiB request, 1 MiB response")):
        t = await atimed(fn, n_big, warmup=2, budget=30)
        out.append(Series(f"ttRPC {name} round trip", cmd, "s", t))
        out.append(Series(f"ttRPC {name} throughput", cmd + " (payload MiB / call time, "
                          "one direction)", "MiB/s", [1 / x for x in t]))
    return out


# -- the agent over the VM channel -------------------------------------------------------


def parse_metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            with contextlib.suppress(ValueError):
                return float(line.rsplit(None, 1)[1])
    return None


async def agent_bench(n: int) -> tuple[list[Series], dict[str, object]]:
    from pykata.testing import busybox_rootfs, default_spec, make_bundle

    work = Path(tempfile.mkdtemp(prefix="pykata-bench-rpc-"))
    out: list[Series] = []
    info: dict[str, object] = {}
    try:
        t0 = time.perf_counter()
        async with private_sandbox("rpc") as sb:
            info["sandbox_create_s"] = time.perf_counter() - t0
            info["channel"] = sb.vm.spec.agent_channel if sb.vm is not None else "?"
            info["accel"] = sb.accel
            agent = sb.agent
            text = await agent.metrics()
            info["agent_rss_idle_bytes"] = parse_metric(text, "pykata_agent_rss_bytes")

            async def check() -> None:
                await agent.check()

            async def details() -> None:
                await agent.guest_details()

            async def metrics() -> None:
                await agent.metrics()

            ch = info["channel"]
            out.append(Series("agent Health/Check", f"AgentClient.check() over {ch}", "s",
                              await atimed(check, n, warmup=5, budget=60)))
            out.append(Series("agent GetGuestDetails", f"AgentClient.guest_details() over {ch}",
                              "s", await atimed(details, max(n // 4, 5), warmup=2, budget=60)))
            out.append(Series("agent GetMetrics", f"AgentClient.metrics() over {ch}", "s",
                              await atimed(metrics, max(n // 10, 5), warmup=1, budget=60)))
            rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
            bundle = make_bundle(work / "c1", rootfs, default_spec(["sleep", "3600"]))
            c = await sb.create_container("c1", bundle)
            await c.start()
            await asyncio.sleep(1)
            text = await agent.metrics()
            info["agent_rss_one_container_bytes"] = parse_metric(text, "pykata_agent_rss_bytes")
            info["agent_rss_metric"] = "pykata_agent_rss_bytes (GetMetrics, /proc/self/statm)"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, info


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    sigterm_as_interrupt()
    n_small = args.runs or (300 if args.quick else 3000)
    n_big = 10 if args.quick else 50
    n_agent = 50 if args.quick else 200
    log("rpc: ttRPC over a unix socket")
    series = asyncio.run(ttrpc_bench(n_small, n_big))
    log("rpc: agent over the VM channel")
    agent_series, info = asyncio.run(agent_bench(n_agent))
    series += agent_series
    save_series("rpc", series, agent=info)
    print(info)
    return 0


if __name__ == "__main__":
    run_section(main)
