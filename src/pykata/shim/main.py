"""`containerd-shim-pykata-v2`: containerd's runtime v2 shim binary.

    start   (cwd = bundle) start the pod's shim, or reuse it, print its address
    delete  clean up a container whose shim is gone; print a DeleteResponse
    (none)  serve containerd.task.v2.Task on the socket handed over by `start`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import logging.handlers
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pykata import config, errors, tracing
from pykata.runtime.bundle import load_spec_or_empty, spec_annotations
from pykata.runtime.specconv import CRI_SANDBOX, CRI_TYPE, CRIO_SANDBOX, CRIO_TYPE
from pykata.utils.unixsock import bind_private

log = logging.getLogger("pykata.shim")

LISTEN_FD_ENV = "PYKATA_SHIM_LISTEN_FD"
SOCKET_DIR = Path("/run/pykata/s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="containerd-shim-pykata-v2", add_help=True)
    p.add_argument("-namespace", default="")
    p.add_argument("-address", default="")
    p.add_argument("-publish-binary", dest="publish_binary", default="")
    p.add_argument("-id", default="")
    p.add_argument("-bundle", default="")
    p.add_argument("-socket", default="")
    p.add_argument("-debug", action="store_true")
    p.add_argument("-v", dest="version", action="store_true")
    p.add_argument("-info", action="store_true")
    p.add_argument("action", nargs="?", default="")
    return p.parse_args(argv)


def pod_of(spec: dict[str, Any], container_id: str) -> tuple[str, bool]:
    """(sandbox id, this container is the sandbox) from the spec's annotations."""
    ann = spec_annotations(spec)
    for type_key, sb_key in ((CRI_TYPE, CRI_SANDBOX), (CRIO_TYPE, CRIO_SANDBOX)):
        kind = ann.get(type_key)
        if kind == "container" and ann.get(sb_key):
            return str(ann[sb_key]), False
        if kind == "sandbox":
            return container_id, True
    return container_id, True


def socket_path(address: str, namespace: str, sandbox_id: str) -> Path:
    digest = hashlib.sha256(f"{address}/{namespace}/{sandbox_id}".encode()).hexdigest()
    return SOCKET_DIR / digest[:32]


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


STALE_SOCKET_AGE = 10.0  # seconds: far beyond a starting shim's bind -> listen
MAX_SWEEP = 4096  # socket directory entries looked at per start


def socket_refused(path: Path) -> bool:
    """Whether connecting to ``path`` is refused: a socket nobody listens on."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()


def sweep_stale_sockets(directory: Path = SOCKET_DIR,
                        min_age: float = STALE_SOCKET_AGE) -> list[str]:
    """Remove the sockets of ours in ``directory`` that nobody serves any more:
    a shim killed before containerd dialled it leaves its socket, and
    containerd (1.6) runs no ``shim delete`` when that dial fails. Only a
    socket (owned by us, not a link or file) at least ``min_age`` seconds old,
    whose connect is refused, and that is still the same inode when removed.
    The names removed."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    removed: list[str] = []
    try:
        now = time.time()
        for n, name in enumerate(os.listdir(dfd)):
            if n >= MAX_SWEEP:
                break
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid()
                    or now - st.st_mtime < min_age or not socket_refused(directory / name)):
                continue
            try:
                if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino != st.st_ino:
                    continue  # bound again meanwhile: someone's live socket now
                os.unlink(name, dir_fd=dfd)
            except OSError:
                continue
            removed.append(name)
    finally:
        os.close(dfd)
    return removed


def private_dir(path: Path, *, tighten: bool = False) -> None:
    """Make sure ``path`` is a directory only we can change: missing components
    are created 0700 (whatever the umask); an existing one must be a real
    directory (no symlink) owned by us and not writable by group or others, else
    FailedPrecondition. ``tighten`` also takes group/other access away (0700)."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a racing shim start made it
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise errors.FailedPrecondition(f"{path} is not a directory (a symlink?): refusing"
                                        " to put a shim socket there")
    if st.st_uid != os.geteuid():
        raise errors.FailedPrecondition(f"{path} is owned by uid {st.st_uid}, not by us:"
                                        " refusing to put a shim socket there")
    if tighten and stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    elif st.st_mode & 0o022:
        raise errors.FailedPrecondition(f"{path} is writable by other users"
                                        f" (mode {stat.S_IMODE(st.st_mode):o}): refusing"
                                        " to put a shim socket there")


def spawn_server(path: Path, *, cwd: Path, namespace: str, address: str,
                 publish_binary: str, shim_id: str, debug: bool,
                 env: dict[str, str] | None = None) -> int:
    """Listen on ``path`` (0600, in a directory only root can change: see
    private_dir, bind_private) and start the serving shim (its own session) with
    that socket handed over, so a client can connect at once; the shim's pid.
    Bind errors are OSError; an unsafe directory or path is FailedPrecondition."""
    private_dir(path.parent)
    sock = bind_private(path)
    try:
        child_env = dict(os.environ if env is None else env,
                         **{LISTEN_FD_ENV: str(sock.fileno())})
        argv = [sys.executable, "-m", "pykata.shim", "-namespace", namespace, "-address",
                address, "-publish-binary", publish_binary, "-id", shim_id]
        if debug:
            argv.append("-debug")
        proc = subprocess.Popen(argv, cwd=cwd, env=child_env, pass_fds=(sock.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        sock.close()
    return proc.pid


def cmd_start(args: argparse.Namespace) -> int:
    bundle = Path.cwd()
    sandbox_id, is_sandbox = pod_of(load_spec_or_empty(bundle), args.id)
    path = socket_path(args.address, args.namespace, sandbox_id)
    address = f"unix://{path}"
    # Before anything connects: nobody but root can have put a socket there.
    private_dir(SOCKET_DIR, tighten=True)
    if not is_sandbox:
        if not _alive(path):
            print(f"pod sandbox {sandbox_id} has no running pykata shim", file=sys.stderr)
            return 1
        _write_address(bundle, address)
        print(address, end="")
        return 0
    if _alive(path):
        _write_address(bundle, address)
        print(address, end="")
        return 0
    try:
        stale = sweep_stale_sockets()
    except OSError as exc:  # never a reason not to start
        log.warning("cannot sweep stale shim sockets: %s", exc)
    else:
        if stale:
            log.info("removed %d stale shim socket(s) nobody served: %s", len(stale),
                     ", ".join(stale[:8]))
    pid = spawn_server(path, cwd=bundle, namespace=args.namespace, address=args.address,
                       publish_binary=args.publish_binary, shim_id=sandbox_id,
                       debug=args.debug)
    (bundle / "shim.pid").write_text(str(pid))
    _write_address(bundle, address)
    print(address, end="")
    return 0


def _write_address(bundle: Path, address: str) -> None:
    """The shim's address in the container's bundle, for every container of the
    pod: a restarted containerd reconnects each task through its own bundle's
    file (a container without one is taken for dead and cleaned up)."""
    tmp = bundle / "address.tmp"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")


def namespace_of(args: argparse.Namespace) -> str:
    """containerd's namespace: the -namespace flag, else $CONTAINERD_NAMESPACE."""
    return args.namespace or os.environ.get("CONTAINERD_NAMESPACE", "") or "default"


def _shown(value: str, limit: int = 80) -> str:
    """An untrusted id for one line of output: quoted (control characters
    escaped), at most ``limit`` characters of it."""
    text = repr(value[:limit])
    return text if len(text) <= limit and len(value) <= limit else text[:limit] + "..."


def cmd_delete(args: argparse.Namespace, cfg: config.Config) -> int:
    """containerd's cleanup when the shim is gone: stop the VM if this container
    was the pod's sandbox, unmount, remove state; then print a DeleteResponse.

    The sandbox id comes from the bundle's annotations: untrusted, like the
    container id and the namespace; all are checked before any path is built."""
    from pykata.protos import containerd_shim_pb2 as pb
    from pykata.runtime.cleanup import cleanup, cleanup_container_mounts
    from pykata.runtime.state import check_id
    from pykata.shim.rootfs import unmount_rootfs

    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    namespace = namespace_of(args)
    sandbox_id, is_sandbox = pod_of(load_spec_or_empty(bundle), args.id)
    for kind, value in (("namespace", namespace), ("container", args.id),
                        ("sandbox", sandbox_id)):
        try:
            check_id(kind, value)
        except errors.InvalidArgument:
            print(f"pykata: shim delete: invalid {kind} id {_shown(value)}: nothing done",
                  file=sys.stderr)
            return 1
    if is_sandbox:
        path = socket_path(args.address, args.namespace, sandbox_id)
        asyncio.run(cleanup(cfg.runtime.state_dir, sandbox_id, namespace))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        left = cleanup_container_mounts(cfg.runtime.state_dir, sandbox_id, args.id, namespace)
        if left:
            log.warning("container %s: could not unmount %s", args.id, left)
    unmount_rootfs(bundle)
    resp = pb.DeleteResponse(exit_status=128 + signal.SIGKILL)
    resp.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(resp.SerializeToString())
    sys.stdout.flush()
    return 0


LOG_QUEUE_MAX = 1000  # records waiting for the log fifo; more are dropped (counted)


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never waits: a full queue drops the
    record and counts it (``dropped``)."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(logging.StreamHandler):  # type: ignore[type-arg]
    """The writer thread's handler: says how many records were dropped since the
    last line it managed to write."""

    def __init__(self, stream: Any, source: DroppingQueueHandler) -> None:
        super().__init__(stream)
        self.source = source
        self.reported = 0
        self.lost = 0  # records the stream refused

    def emit(self, record: logging.LogRecord) -> None:
        dropped = self.source.dropped
        if dropped != self.reported:
            note = logging.makeLogRecord({
                "name": log.name, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log records dropped (log fifo not read)",
                "args": (dropped - self.reported,)})
            self.reported = dropped
            super().emit(note)
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # The fifo's reader went away (EPIPE) or the like: the record is lost,
        # quietly (stderr would be no better place, and it is /dev/null).
        self.lost += 1


class _Listener(logging.handlers.QueueListener):
    def enqueue_sentinel(self) -> None:
        with contextlib.suppress(queue.Full):  # then stop() waits in vain: bounded below
            self.queue.put_nowait(None)


class LogPump:
    """containerd's log fifo is written by this one thread, never by the event
    loop: a reader that stops reading blocks the thread, not the shim."""

    def __init__(self, stream: Any, formatter: logging.Formatter,
                 maxsize: int = LOG_QUEUE_MAX) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize)
        self.handler = DroppingQueueHandler(self.queue)
        self.writer = _Writer(stream, self.handler)
        self.writer.setFormatter(formatter)
        self.listener = _Listener(self.queue, self.writer)

    def start(self) -> None:
        self.listener.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Flush what is queued if the reader lets us within ``timeout``."""
        thread = threading.Thread(target=self.listener.stop, daemon=True)
        thread.start()
        thread.join(timeout)


_pump: LogPump | None = None


def _setup_logging(debug: bool, sandbox_id: str, path: str = "log") -> LogPump:
    """Log into containerd's `log` fifo in the bundle (else stderr), through a
    bounded queue and a writer thread (LogPump)."""
    global _pump
    stream: Any = sys.stderr
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)  # blocking is fine: only the writer thread waits
        stream = os.fdopen(fd, "w", buffering=1)
    except OSError:
        pass
    formatter = logging.Formatter(
        f"time=%(asctime)s level=%(levelname)s sandbox={sandbox_id} "
        "source=%(name)s msg=%(message)s")
    if _pump is not None:
        _pump.stop(0)
    _pump = LogPump(stream, formatter)
    _pump.start()
    root = logging.getLogger()
    root.handlers[:] = [_pump.handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return _pump


async def serve(args: argparse.Namespace, cfg: config.Config) -> int:
    from pykata.protos import containerd_shim_pb2 as pb
    from pykata.shim.events import Publisher
    from pykata.shim.service import TaskService
    from pykata.ttrpc import Server

    fd = int(os.environ.pop(LISTEN_FD_ENV, "-1"))
    if fd < 0:
        log.error("no listening socket handed over (run through 'start')")
        return 1
    sock = socket.socket(fileno=fd)
    shutdown = asyncio.Event()
    namespace = namespace_of(args)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), namespace)
    publisher.start()
    tracing.setup(cfg.runtime)  # [runtime] enable_tracing; off: nothing at all
    service = TaskService(args.id, namespace, cfg, publisher, shutdown)
    server = Server()
    server.register_service(pb.DESCRIPTOR.services_by_name["Task"], service)
    await server.serve_socket(sock)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    log.info("shim serving pod %s (pid %d)", args.id, os.getpid())
    await shutdown.wait()
    await asyncio.sleep(0.05)  # let the Shutdown response go out
    await service.close()
    tracing.shutdown()  # export what is queued
    await publisher.close()
    await server.close()
    with contextlib.suppress(OSError):
        os.unlink(socket_path(args.address, args.namespace, args.id))
    log.info("shim for pod %s exiting", args.id)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from pykata import __version__

        print(f"containerd-shim-pykata-v2:\n  Version: {__version__}\n  Runtime: pykata")
        return 0
    try:
        cfg = config.load()
        if args.action == "start":
            return cmd_start(args)
        if args.action == "delete":
            return cmd_delete(args, cfg)
        _setup_logging(args.debug or cfg.runtime.enable_debug, args.id)
        code = asyncio.run(serve(args, cfg))
    except errors.PykataError as exc:
        print(f"pykata: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    if _pump is not None:
        _pump.stop()
    os._exit(code)  # no lingering threads (fifo opens) may keep the shim alive
