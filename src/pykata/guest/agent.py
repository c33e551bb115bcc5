"""pykata-agent: the in-guest agent (PID 1 of the VM, or a process on the host
for development).

As PID 1 it mounts the basic file systems, loads the kernel modules listed in
/etc/pykata/modules, brings ``lo`` up, then serves the agent protocol on the
host channel forever: a failing serve loop is logged and retried, because a
PID 1 that exits panics the guest. Elsewhere it becomes a child subreaper and
serves on ``--listen`` until SIGTERM/SIGINT, removing its containers on exit.

Channels: ``unix:/path`` (development), ``vsock:PORT`` (any CID),
``serial:NAME`` (the virtio-serial port named NAME; re-opened whenever the
host disconnects). Kernel parameters (PID 1 only): ``pykata.agent.log=debug``
and ``pykata.agent.channel=CHANNEL``.

Boot time matters (the guest may run under TCG, where every import is slow):
this module imports little at the top, the kernel modules load in a thread
while the serving code (asyncio, protobuf, services) is imported, and
argparse is only loaded when there are arguments to parse.
"""

from __future__ import annotations

import os
import sys

from pykata import __version__
from pykata.guest import sysutil

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import logging

    from pykata.guest.container import Settings

DEFAULT_SERIAL = "agent.channel.0"
DEFAULT_VSOCK_PORT = 1024
VIRTIO_PORTS = "/sys/class/virtio-ports"


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("pykata.guest.agent")


class Channel:
    """Where the agent listens: kind "unix", "vsock", "serial" or "auto"."""

    __slots__ = ("address", "kind")

    def __init__(self, kind: str, address: str = "") -> None:
        self.kind = kind
        self.address = address

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channel) and (self.kind, self.address) == (
            other.kind, other.address)

    def __hash__(self) -> int:
        return hash((self.kind, self.address))

    def __repr__(self) -> str:
        return f"Channel({self.kind!r}, {self.address!r})"

    def __str__(self) -> str:
        return f"{self.kind}:{self.address}" if self.address else self.kind


def parse_channel(text: str) -> Channel:
    """``unix:/path``, ``vsock:PORT``, ``serial:NAME`` or ``auto``."""
    if text == "auto":
        return Channel("auto")
    kind, sep, addr = text.partition(":")
    if not sep or not addr:
        raise ValueError(f"invalid channel {text!r}: expected unix:PATH, vsock:PORT or "
                         "serial:NAME")
    if kind == "unix":
        return Channel("unix", addr)
    if kind == "vsock":
        port = addr.rpartition(":")[2]  # accept vsock:CID:PORT too; the CID is ignored
        if not port.isdigit() or not 0 < int(port) < 2**32:
            raise ValueError(f"invalid vsock port {addr!r}")
        return Channel("vsock", port)
    if kind == "serial":
        return Channel("serial", addr)
    raise ValueError(f"unknown channel kind {kind!r} (unix, vsock or serial)")


def find_serial_port(name: str, ports_dir: str = VIRTIO_PORTS) -> str | None:
    """/dev/vportNpM of the virtio-serial port called ``name``, if present."""
    try:
        entries = sorted(os.listdir(ports_dir))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(ports_dir, entry, "name")) as f:
                port_name = f.read().strip()
        except OSError:
            continue
        if port_name == name:
            dev = f"/dev/{entry}"
            return dev if os.path.exists(dev) else None
    return None


# -- options ------------------------------------------------------------------------------


class Options:
    """Command line options with their defaults (what PID 1 gets without arguments)."""

    def __init__(self) -> None:
        self.listen: str | None = None
        self.state_dir = "/run/pykata"
        self.crun: str | None = None
        self.crun_root: str | None = None
        self.cgroup_parent = "pykata"
        self.cgroup_root = "/sys/fs/cgroup"
        self.no_pivot: bool | None = None
        self.crun_timeout = 60.0
        self.manage_network = False
        self.log_level: str | None = None


def build_parser() -> argparse.ArgumentParser:
    import argparse

    d = Options()
    p = argparse.ArgumentParser(prog="pykata-agent", description="pykata in-guest agent")
    p.add_argument("--listen", metavar="CHANNEL",
                   help="unix:PATH, vsock:PORT or serial:NAME (PID 1 default: the serial"
                        f" port {DEFAULT_SERIAL} if present, else vsock:{DEFAULT_VSOCK_PORT})")
    p.add_argument("--state-dir", default=d.state_dir,
                   help="bundles, console sockets (default %(default)s)")
    p.add_argument("--crun", default=None, help="crun binary (default /usr/bin/crun)")
    p.add_argument("--crun-root", default=None, help="crun --root (default STATE_DIR/crun)")
    p.add_argument("--cgroup-parent", default=d.cgroup_parent,
                   help="cgroup under which containers get theirs (default %(default)s)")
    p.add_argument("--cgroup-root", default=d.cgroup_root,
                   help="cgroup v2 mount read for stats and process lists"
                        " (default %(default)s)")
    pivot = p.add_mutually_exclusive_group()
    pivot.add_argument("--no-pivot", dest="no_pivot", action="store_true", default=None,
                       help="crun create --no-pivot (default: when / is an initramfs)")
    pivot.add_argument("--pivot", dest="no_pivot", action="store_false")
    p.add_argument("--crun-timeout", type=float, default=d.crun_timeout,
                   help="seconds a crun call may take (default %(default)s)")
    p.add_argument("--manage-network", action="store_true",
                   help="allow network changes when not PID 1 (e.g. in a test netns)")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--version", action="version", version=f"pykata-agent {__version__}")
    return p


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    if argv:
        build_parser().parse_args(argv, namespace=opts)
    return opts


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    if os.getpid() != 1:
        _main(argv)
        return
    try:
        _main(argv)
    except BaseException:
        _last_resort()


def _last_resort() -> None:
    """PID 1 could not even start serving: say why, then only reap, forever."""
    import time
    import traceback

    try:
        traceback.print_exc()
        print("pykata-agent: cannot serve; the guest stays up without an agent",
              file=sys.stderr, flush=True)
    except BaseException:
        pass
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except BaseException:
            pass
        try:
            time.sleep(1.0)
        except BaseException:
            pass


def _main(argv: list[str] | None) -> None:
    init_mode = os.getpid() == 1
    loader: sysutil.ModuleLoader | None = None
    if init_mode:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The kernel starts init without PATH.
        os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                      "/sbin:/bin")
        sysutil.init_filesystems()
        loader = sysutil.ModuleLoader()
        loader.start()

    import logging

    from pykata.guest import logs

    opts = parse_args(sys.argv[1:] if argv is None else argv)
    params = sysutil.kernel_params() if init_mode else {}
    level_name = opts.log_level or params.get("pykata.agent.log") or "info"
    logs.setup(getattr(logging, level_name.upper(), logging.INFO), guest=init_mode)
    log = _log()
    channel_text = opts.listen or params.get("pykata.agent.channel") or ""
    try:
        channel = parse_channel(channel_text) if channel_text else Channel("auto")
    except ValueError as exc:
        if not init_mode:
            build_parser().error(str(exc))
        log.error("%s; using the default channel", exc)
        channel = Channel("auto")
    if channel.kind == "auto" and not init_mode:
        build_parser().error("--listen is required when the agent is not PID 1")

    if loader is not None:
        log.debug("python up, file systems mounted")
        _import_serving_code()
        loader.join()
        for err in loader.errors:
            log.warning("%s", err)
        log.info("%d kernel modules loaded in %.0f ms", loader.loaded, loader.seconds * 1000)
        sysutil.init_system()
    else:
        try:
            sysutil.set_child_subreaper()
        except OSError as exc:
            log.warning("%s: orphaned container processes will not be reaped", exc)

    from pathlib import Path

    from pykata.guest.container import Settings

    no_pivot = opts.no_pivot
    if no_pivot is None:
        no_pivot = sysutil.root_fstype() in ("rootfs", "ramfs")
    settings = Settings(
        state_dir=Path(opts.state_dir), crun=opts.crun or _default_crun(),
        crun_root=Path(opts.crun_root) if opts.crun_root else None,
        cgroup_parent=opts.cgroup_parent, cgroup_root=Path(opts.cgroup_root),
        no_pivot=no_pivot, crun_timeout=opts.crun_timeout, init_mode=init_mode,
    )
    settings.containers_dir.mkdir(parents=True, exist_ok=True)

    if init_mode:
        _run_forever(settings, channel)
    else:
        sys.exit(_run_dev(settings, channel, opts.manage_network))


def _import_serving_code() -> None:
    try:
        import pykata.guest.channel  # noqa: F401
    except Exception:
        _log().exception("cannot import the agent's serving code")


def _default_crun() -> str:
    if os.path.exists("/usr/bin/crun"):
        return "/usr/bin/crun"
    import shutil

    return shutil.which("crun") or "/usr/bin/crun"


def _run_dev(settings: Settings, channel: Channel, manage_network: bool) -> int:
    import asyncio
    import signal

    from pykata.guest.channel import Agent

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(settings, channel)
        agent.service.manage_network = manage_network
        await agent.run(stop)

    log = _log()
    try:
        asyncio.run(go())
    except Exception as exc:
        log.error("agent failed: %s", exc, exc_info=log.isEnabledFor(10))
        return 1
    return 0


def _run_forever(settings: Settings, channel: Channel) -> None:
    """PID 1 never returns: a broken loop is logged and started again."""
    import time

    delay = 0.1
    while True:
        try:
            import asyncio

            from pykata.guest.channel import Agent

            async def go() -> None:
                agent = Agent(settings, channel)
                await agent.run(asyncio.Event())

            asyncio.run(go())
            _log().error("serve loop ended; restarting it")
        except BaseException:
            try:
                _log().exception("serve loop failed; restarting it in %.1f s", delay)
            except BaseException:
                pass
        try:
            time.sleep(delay)
        except BaseException:
            pass
        delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    main()
