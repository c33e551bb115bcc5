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
this module imports little at the top; as PID 1 it mounts /proc, /sys and /dev,
starts loading the kernel modules in a thread and answers the host's first
Health/Check from another (:class:`~pykata.guest.channel.EarlyHealth`, builtins
only), and only then imports logging and the serving code (asyncio, protobuf,
services), mounts the rest and hands the channel to the full server. argparse
is only loaded when there are arguments to parse. docs/boot.md has the profile.
"""

from __future__ import annotations

import os
import sys

from pykata import __version__, wire
from pykata.guest import sysutil
from pykata.guest.channel import SERIAL, VSOCK, Channel, EarlyHealth, parse_channel, stamp

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import logging

    from pykata.guest.settings import Settings


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("pykata.guest.agent")


ENGINES = ("native", "crun")


def choose_engine(option: str | None, params: dict[str, str], init_mode: bool) -> str:
    """--engine, else the kernel parameter, else native as PID 1 (the VM) and crun in
    development mode on a host (whose cgroups may be v1, which the engine does not do)."""
    if option:
        return option
    value = params.get(wire.AGENT_ENGINE_PARAM, "")
    if value in ENGINES:
        return value
    if value:
        _log().error("unknown %s=%s (native or crun); ignored", wire.AGENT_ENGINE_PARAM, value)
    return "native" if init_mode else "crun"


# -- options ------------------------------------------------------------------------------


class Options:
    """Command line options with their defaults (what PID 1 gets without arguments)."""

    def __init__(self) -> None:
        self.listen: str | None = None
        self.state_dir = wire.GUEST_STATE_DIR
        self.engine: str | None = None
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
                        f" port {SERIAL.address} if present, else {VSOCK})")
    p.add_argument("--state-dir", default=d.state_dir,
                   help="bundles, console sockets (default %(default)s)")
    p.add_argument("--engine", choices=list(ENGINES), default=None,
                   help="who runs containers: the agent itself (native) or crun (default:"
                        f" native as PID 1, crun otherwise; kernel parameter"
                        f" {wire.AGENT_ENGINE_PARAM}=)")
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
    stamp("main")
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


def _early_channel(params: dict[str, str]) -> Channel | None:
    """The channel named by the kernel parameter (None: the default, or invalid:
    logged once logging is set up)."""
    text = params.get(wire.AGENT_CHANNEL_PARAM) or ""
    try:
        return parse_channel(text) if text else None
    except ValueError:
        return None


def _main(argv: list[str] | None) -> None:
    init_mode = os.getpid() == 1
    loader: sysutil.ModuleLoader | None = None
    early: EarlyHealth | None = None
    params: dict[str, str] = {}
    if init_mode:
        # The kernel starts init without PATH.
        os.environ.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                      "/sbin:/bin")
        # What the channel needs first: /proc, /sys, /dev, the virtio modules (the
        # channel's come first in the list), then the early Check responder.
        sysutil.init_early_filesystems()
        loader = sysutil.ModuleLoader()
        loader.start()
        params = sysutil.kernel_params()
        chosen = _early_channel(params)
        if argv is None and len(sys.argv) <= 1 and (chosen is None or chosen.kind == "serial"):
            early = EarlyHealth(chosen.address if chosen else SERIAL.address)
            early.start()
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sysutil.init_late_filesystems()

    import logging

    from pykata.guest import logs

    opts = parse_args(sys.argv[1:] if argv is None else argv)
    level_name = opts.log_level or params.get(wire.AGENT_LOG_PARAM) or "info"
    logs.setup(getattr(logging, level_name.upper(), logging.INFO), guest=init_mode)
    log = _log()
    channel_text = opts.listen or params.get(wire.AGENT_CHANNEL_PARAM) or ""
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
        stamp("imports")
        _import_serving_code()
        stamp("imported")
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

    from pykata.guest.settings import Settings

    no_pivot = opts.no_pivot
    if no_pivot is None:
        no_pivot = sysutil.root_fstype() in ("rootfs", "ramfs")
    engine = choose_engine(opts.engine, params, init_mode)
    log.info("container engine: %s", engine)
    settings = Settings(
        state_dir=Path(opts.state_dir), engine=engine, crun=opts.crun or _default_crun(),
        crun_root=Path(opts.crun_root) if opts.crun_root else None,
        cgroup_parent=opts.cgroup_parent, cgroup_root=Path(opts.cgroup_root),
        no_pivot=no_pivot, crun_timeout=opts.crun_timeout, init_mode=init_mode,
        manage_network=init_mode or opts.manage_network,
    )
    settings.containers_dir.mkdir(parents=True, exist_ok=True)

    if init_mode:
        _run_forever(settings, channel, early)
    else:
        sys.exit(_run_dev(settings, channel))


def _import_serving_code() -> None:
    try:
        import pykata.guest.server  # noqa: F401
    except Exception:
        _log().exception("cannot import the agent's serving code")


def _default_crun() -> str:
    if os.path.exists("/usr/bin/crun"):
        return "/usr/bin/crun"
    import shutil

    return shutil.which("crun") or "/usr/bin/crun"


def _run_dev(settings: Settings, channel: Channel) -> int:
    import asyncio
    import signal

    from pykata.guest.server import AgentServer

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await AgentServer(settings, channel).run(stop)

    log = _log()
    try:
        asyncio.run(go())
    except Exception as exc:
        log.error("agent failed: %s", exc, exc_info=log.isEnabledFor(10))
        return 1
    return 0


def _run_forever(settings: Settings, channel: Channel, early: EarlyHealth | None = None
                 ) -> None:
    """PID 1 never returns: a broken loop is logged and started again (the early
    responder's port is handed to the first loop only)."""
    import time

    delay = 0.1
    while True:
        try:
            import asyncio

            from pykata.guest.server import AgentServer

            handed, early = early, None

            async def go(handed: EarlyHealth | None = handed) -> None:
                await AgentServer(settings, channel, handed).run(asyncio.Event())

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
