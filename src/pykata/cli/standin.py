"""The host process that stands for a container's init (or an exec'd process).

`pykata-runtime create/exec` spawns it with the caller's stdio. It relays that
stdio to and from the fifos the keeper (shim) serves the guest process on, or,
with a console socket, sends a pty master to the caller and relays the pty
slave. When the process exits it exits with the process's status, so a caller
that waits for the pid in `--pid-file` (conmon, containerd's runc shim) sees
what it would see with runc.

    python -m pykata.cli.standin STATE_DIR ID EXEC_ID FIFO_DIR TERMINAL [CONSOLE_SOCKET]
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from pathlib import Path

from google.protobuf import empty_pb2

from pykata.cli.rtclient import call
from pykata.protos import containerd_shim_pb2 as pb

CHUNK = 64 * 1024
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy(src: int, dst: int) -> None:
    while True:
        try:
            data = os.read(src, CHUNK)
        except OSError:
            return
        if not data:
            return
        try:
            _write_all(dst, data)
        except OSError:
            # The reader went away: keep draining so the guest is never blocked.
            dst = os.open(os.devnull, os.O_WRONLY)


def _pump_out(fifo: Path, dst: int) -> None:
    fd = os.open(fifo, os.O_RDONLY)  # blocks until the keeper opens its end
    try:
        _copy(fd, dst)
    finally:
        os.close(fd)


def _pump_in(src: int, fifo: Path) -> None:
    fd = os.open(fifo, os.O_WRONLY)  # blocks until the keeper opens its end
    try:
        _copy(src, fd)
    finally:
        os.close(fd)  # EOF: the guest process's stdin closes


def send_fd(console_socket: str, fd: int) -> None:
    """Send ``fd`` over the unix socket as runc does (one message, SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(console_socket)
        name = os.ttyname(fd).encode() if os.isatty(fd) else b"/dev/ptmx"
        s.sendmsg([name], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                            array.array("i", [fd]).tobytes())])


def _thread(target: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state_dir, cid, exec_id, fifo_dir = Path(args[0]), args[1], args[2], Path(args[3])
    terminal = args[4] == "1"
    console_socket = args[5] if len(args) > 5 else ""

    def forward(sig: int, _frame: object) -> None:
        def kill() -> None:
            with contextlib.suppress(Exception):
                call(state_dir, "Kill", pb.KillRequest(id=cid, exec_id=exec_id, signal=sig),
                     empty_pb2.Empty, timeout=10)
        _thread(kill)

    outs: list[threading.Thread] = []
    slave = -1
    if console_socket:
        master, slave = os.openpty()
        tty.setraw(slave)
        with contextlib.suppress(OSError):
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        send_fd(console_socket, master)
        os.close(master)

        def resize(_sig: int, _frame: object) -> None:
            def do() -> None:
                with contextlib.suppress(Exception):
                    rows, cols, _, _ = struct.unpack(
                        "HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
                    call(state_dir, "ResizePty", pb.ResizePtyRequest(
                        id=cid, exec_id=exec_id, width=cols, height=rows),
                        empty_pb2.Empty, timeout=10)
            _thread(do)

        signal.signal(signal.SIGWINCH, resize)
        _thread(_pump_in, slave, fifo_dir / "stdin")
        outs.append(_thread(_pump_out, fifo_dir / "stdout", slave))
    else:
        _thread(_pump_in, 0, fifo_dir / "stdin")
        outs.append(_thread(_pump_out, fifo_dir / "stdout", 1))
        if not terminal:
            outs.append(_thread(_pump_out, fifo_dir / "stderr", 2))
    for sig in FORWARDED:
        signal.signal(sig, forward)
    for t in outs:
        while t.is_alive():
            t.join(0.2)  # wake up now and then so signal handlers run
    code = 255
    try:
        resp = call(state_dir, "Wait", pb.WaitRequest(id=cid, exec_id=exec_id), pb.WaitResponse,
                    timeout=60)
        code = resp.exit_status
        if exec_id:
            with contextlib.suppress(Exception):
                call(state_dir, "Delete", pb.DeleteRequest(id=cid, exec_id=exec_id),
                     pb.DeleteResponse, timeout=10)
    except Exception:  # the keeper is gone: the container was killed
        code = 128 + signal.SIGKILL
    sys.stdout.flush()
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main()
