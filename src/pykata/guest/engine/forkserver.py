"""The engine's fork server: a small Python process that forks container
processes for the agent, so that the fork on the hot path copies a ~10 MB
process instead of the ~40 MB agent (under TCG, fork and the copy-on-write
faults that follow cost in proportion to what the forking process maps).

Started by the agent (``runner.ForkServer``) with ``posix_spawn`` through the
agent's reaper, so it is the agent's child and the agent's reaper reaps it.
It imports only what the container child needs (``child`` and the plan's
dataclasses), freezes its objects out of the garbage collector's reach and
dies with the agent (``PR_SET_PDEATHSIG``).

Shape (no ``waitpid`` in this process: ``SIGCHLD`` is ignored, so the kernel
reaps its workers; container processes end up the agent's children):

- the server keeps one *worker* forked in advance, blocked reading the agent's
  socket (fd 0, ``SOCK_SEQPACKET``);
- a request is one message: the pickled ``(Job, pid namespace)`` with the
  child's fds (stdio or console socket, report and start pipes) as
  ``SCM_RIGHTS``. The worker enters the pid namespace for its children
  (``unshare``/``setns``; it is a throwaway process, nothing to switch back),
  forks the container process, answers ``P`` + pid (a pid of the agent's
  namespace) or ``E`` + errno + what failed, and exits;
- its child, orphaned, is re-parented to the agent (PID 1, or the development
  agent, a child subreaper) and is reaped there like every container process;
- the server learns that the worker is done from a pipe (EOF) and forks the
  next one. A worker that died after taking a request without answering is
  answered for (``E``), so the agent never waits forever.

The agent closes its end of the socket to stop the server; the idle worker
reads EOF and both exit.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

from pykata.guest.engine import child as childmod
from pykata.guest.engine import plan as planmod
from pykata.guest.engine import syscalls as sc

PR_SET_PDEATHSIG = 1
MAX_REQUEST = 1 << 20
MAX_FDS = 8


def reply_error(sock: socket.socket, err: int, msg: str) -> None:
    sock.send(b"E" + struct.pack("<i", err) + msg.encode(errors="replace")[:3800])


def job_with_fds(job: childmod.Job, fds: list[int]) -> childmod.Job:
    """The job's fd fields are indices into the message's fds: the fds."""
    def at(i: int) -> int:
        return fds[i] if i >= 0 else -1
    job.report_w, job.start_r, job.console_w = at(job.report_w), at(job.start_r), \
        at(job.console_w)
    if job.stdio is not None:
        a, b, c = job.stdio
        job.stdio = (at(a), at(b), at(c))
    return job


MADV_POPULATE_WRITE = 23  # Linux 5.14
_CHUNK = 256 << 10
# Background work (a new spare, a worker's prefault) waits for this long without
# requests: the container just made is still being set up, and the guest may have
# a single vCPU.
QUIET = 0.3


def _present_runs(start: int, end: int, pagemap: int) -> list[tuple[int, int]]:
    """(address, length) of the runs of pages of [start, end) that are present."""
    page = os.sysconf("SC_PAGE_SIZE")
    raw = os.pread(pagemap, (end - start) // page * 8, start // page * 8)
    runs: list[tuple[int, int]] = []
    run_start = -1
    for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
        addr = start + i * page
        if entry >> 63:
            if run_start < 0:
                run_start = addr
        elif run_start >= 0:
            runs.append((run_start, addr - run_start))
            run_start = -1
    if run_start >= 0:
        runs.append((run_start, start + len(raw) // 8 * page - run_start))
    return runs


def prefault(sock: socket.socket) -> bool:
    """After ``QUIET`` s without a message on ``sock``, break copy-on-write sharing
    with the server while idle: the present pages of every private writable
    mapping faulted in writable by the kernel (MADV_POPULATE_WRITE), 256 KB at a
    time, stopping as soon as ``sock`` has a message (False). The job then runs
    without the page faults a fresh fork takes on every page its Python touches
    (the bulk of a forked child's early steps under TCG)."""
    from pykata.guest.sysutil import libc

    if select.select([sock], [], [], QUIET)[0]:
        return False
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    madvise = libc().madvise
    try:
        for line in lines:
            parts = line.split()
            if len(parts) < 2 or not parts[1].startswith("rw") or parts[1][3] != "p":
                continue
            lo, _, hi = parts[0].partition("-")
            try:
                runs = _present_runs(int(lo, 16), int(hi, 16), pagemap)
            except OSError:
                continue
            for addr, length in runs:
                while length > 0:
                    if select.select([sock], [], [], 0)[0]:
                        return False
                    n = min(_CHUNK, length)
                    madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), MADV_POPULATE_WRITE)
                    addr += n
                    length -= n
    finally:
        os.close(pagemap)
    return True


def make_spare(sock: socket.socket) -> tuple[int, int] | None:
    """Fork a spare: a process forked in advance as pid 1 of a new pid namespace,
    prefaulted, a child of the agent once its intermediate exits, in a session of
    its own. Offered to the agent (``O`` + pid, its socket as SCM_RIGHTS): the next
    container whose spec asks for a new pid namespace *is* this process, no fork
    on the hot path. Returns (pid, read end of a pipe that reads EOF when the
    spare has taken its job or died), or None."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe2(os.O_CLOEXEC)
    gone_r, gone_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the intermediate: its child is pid 1 of a new namespace
        try:
            os.close(r)
            os.close(gone_r)
            ours.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sc.unshare(planmod.CLONE_NEWPID)
            spare = os.fork()
            if spare == 0:
                os.close(w)
                _spare(theirs)  # never returns
            os.write(w, struct.pack("<i", spare))
        finally:
            os._exit(0)
    os.close(w)
    os.close(gone_w)
    theirs.close()
    data = os.read(r, 4)
    os.close(r)
    if len(data) != 4:
        ours.close()
        os.close(gone_r)
        return None
    spare = struct.unpack("<i", data)[0]
    try:
        socket.send_fds(sock, [b"O" + struct.pack("<i", spare)], [ours.fileno()])
    finally:
        ours.close()
    return spare, gone_r


def _spare(sock: socket.socket) -> NoReturn:
    try:
        os.dup2(1, 0)  # not the agent's socket (fd 1 is /dev/null)
        os.setsid()  # a container init leads its own session
        complete = prefault(sock)
        msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
        t_recv = time.monotonic_ns()
        if not msg:  # the agent let it go
            os._exit(0)
        job, _ = pickle.loads(msg)
        job = job_with_fds(job, fds)
        if job.trace:
            job.marks = (*job.marks, ("spare woke" if complete else "spare woke (prefault cut)",
                                      t_recv), ("spare unpickled", time.monotonic_ns()))
    except BaseException:
        os._exit(1)
    childmod.run(job)  # never returns


def _worker(sock: socket.socket, done_w: int, server: int) -> NoReturn:
    sc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        os._exit(0)
    # The container process must stay a zombie until this worker exits (then the
    # agent reaps it): no automatic reaping below this process.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    prefault(sock)
    try:
        msg, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
    except OSError:
        os._exit(1)
    if not msg:
        os.write(done_w, b"q")
        os._exit(0)
    os.write(done_w, b"r")
    try:
        t_recv = time.monotonic_ns()
        job, pid_ns = pickle.loads(msg)
        job = job_with_fds(job, fds)
        childmod.enter_pid_ns(pid_ns)
        if job.trace:
            job.marks = (*job.marks, ("server received", t_recv),
                         ("unpickled+pidns", time.monotonic_ns()))
        pid = os.fork()
        if pid == 0:
            childmod.run(job)  # never returns
    except OSError as exc:
        reply_error(sock, exc.errno or errno.EIO, exc.strerror or str(exc))
    except BaseException as exc:  # a bug: still one answer
        reply_error(sock, errno.EINVAL, f"fork server: {type(exc).__name__}: {exc}")
    else:
        sock.send(b"P" + struct.pack("<i", pid))
    os.write(done_w, b"k")
    os._exit(0)


def serve(sock: socket.socket, spares: bool = True) -> NoReturn:
    """One worker at a time, and (with ``spares``) one spare offered to the agent,
    replaced ``QUIET`` s after it was taken (and no request came since)."""
    me = os.getpid()
    spare_gone = -1
    spare_due = 0.0 if spares else -1.0  # monotonic time to make a spare; -1: none due
    while True:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            if spare_gone >= 0:
                os.close(spare_gone)
            try:
                _worker(sock, w, me)
            finally:
                os._exit(1)
        os.close(w)
        seen = b""
        while True:
            wait = None if spare_due < 0 else max(0.0, spare_due - time.monotonic())
            ready = select.select([r] + ([spare_gone] if spare_gone >= 0 else []), [], [],
                                  wait)[0]
            if not ready and spare_due >= 0:
                spare_due = -1.0
                made = make_spare(sock)
                if made is not None:
                    spare_gone = made[1]
            if spare_gone in ready:  # taken (or dead): the next one, a little later
                os.close(spare_gone)
                spare_gone = -1
                spare_due = time.monotonic() + QUIET
            if r in ready:
                chunk = os.read(r, 16)
                if not chunk:
                    break
                seen += chunk
        os.close(r)
        if b"q" in seen:
            os._exit(0)
        if b"r" in seen and b"k" not in seen:
            reply_error(sock, errno.EIO, "the fork server's worker died while forking")
        if spare_due >= 0:  # requests keep coming: later still
            spare_due = max(spare_due, time.monotonic() + QUIET)


def main() -> NoReturn:
    """The server's process: fd 0 is its socket to the agent."""
    agent = os.getppid()
    sc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent:  # the agent died before the line above
        os._exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    childmod.RESET_SIGNALS = childmod.changed_signals()
    sock = socket.socket(fileno=0)
    gc.disable()
    gc.freeze()
    try:
        sock.send(b"S")
        serve(sock, spares=os.environ.get("PYKATA_FORKSERVER_SPARE") != "0")
    except BaseException as exc:  # the agent falls back to forking itself
        print(f"pykata fork server: {type(exc).__name__}: {exc}", file=sys.stderr)
        os._exit(1)


if __name__ == "__main__":
    main()
