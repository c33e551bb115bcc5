"""pykata-monitor [--listen HOST:PORT] [--config FILE | --state-dir DIR] ...

Serves, on loopback unless told otherwise:

    /metrics                  every running sandbox's metrics (scraped on demand)
                              labelled with sandbox and pod, and the monitor's own
    /sandboxes                the sandboxes as JSON
    /sandboxes/<id>/logs      one sandbox's console log (?lines=N, ?namespace=NS)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from pykata import config
from pykata.errors import PykataError
from pykata.monitor.cri import DEFAULT_ENDPOINT, CriLookup
from pykata.monitor.server import DEFAULT_MAX_PARALLEL, DEFAULT_SCRAPE_TIMEOUT, Monitor

log = logging.getLogger("pykata.monitor")

DEFAULT_LISTEN = "127.0.0.1:8090"


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT ([V6]:PORT for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--listen {value!r}: use HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise argparse.ArgumentTypeError(
                f"--listen {value!r}: HOST must be an IP address or localhost") from None
    return host, int(port)


def positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = 0.0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pykata-monitor", description="Per-node metrics of pykata sandboxes for Prometheus.",
        epilog="Endpoints: /metrics, /sandboxes, /sandboxes/<id>/logs.")
    ap.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN),
                    metavar="HOST:PORT", help=f"where to serve (default {DEFAULT_LISTEN})")
    ap.add_argument("--config", metavar="FILE",
                    help="pykata configuration whose [runtime] state_dir holds the sandboxes"
                         " (default: PYKATA_CONFIG or /etc/pykata/configuration.toml)")
    ap.add_argument("--state-dir", metavar="DIR", help="the state directory itself")
    ap.add_argument("--cri-endpoint", default=DEFAULT_ENDPOINT, metavar="SOCKET",
                    help="containerd's socket, for pod names through CRI (needs grpcio);"
                         " '' for none (default %(default)s)")
    ap.add_argument("--scrape-timeout", type=positive, default=DEFAULT_SCRAPE_TIMEOUT,
                    metavar="SECONDS", help="per sandbox (default %(default)s)")
    ap.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL, metavar="N",
                    help="shims scraped at once (default %(default)s)")
    ap.add_argument("--no-logs", action="store_true",
                    help="do not serve /sandboxes/<id>/logs (guest consoles)")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    return ap


async def serve(monitor: Monitor, host: str, port: int,
                ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or cancelled)."""
    runner = web.AppRunner(monitor.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("pykata-monitor on http://%s:%d (state %s)", host, port, monitor.state_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()
        if monitor.cri is not None:
            monitor.cri.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s pykata-monitor %(levelname)s %(message)s")
    if args.max_parallel < 1:
        print("pykata-monitor: --max-parallel must be at least 1", file=sys.stderr)
        return 2
    try:
        state_dir = args.state_dir or config.load(
            Path(args.config) if args.config else None).runtime.state_dir
    except PykataError as exc:
        print(f"pykata-monitor: {exc}", file=sys.stderr)
        return 2
    from prometheus_client import disable_created_metrics
    disable_created_metrics()  # type: ignore[no-untyped-call]
    cri = CriLookup(args.cri_endpoint, args.scrape_timeout) if args.cri_endpoint else None
    monitor = Monitor(state_dir, cri=cri, scrape_timeout=args.scrape_timeout,
                      max_parallel=args.max_parallel, serve_logs=not args.no_logs)
    host, port = args.listen
    try:
        asyncio.run(serve(monitor, host, port))
    except OSError as exc:
        print(f"pykata-monitor: cannot serve on {host}:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
