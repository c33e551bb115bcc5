"""What the forked child does, in the order the kernel needs, then execve.

Runs in a fork of the agent: only system calls (os, ctypes, fcntl, socket
wrappers), no asyncio, no logging, no allocation-heavy work, and it never
returns: it ends in ``execve`` or ``os._exit``. Every step is named; the
first failure is written to the report pipe as ``E`` + errno + message and
the child exits 127, so the agent's create/exec fails with one line saying
what failed. A successful execve closes the (CLOEXEC) report pipe: EOF.

Order (create; exec skips what the container already has):
 1. fds: stdio onto 0-2, the few fds it needs onto 3.., close the rest
    (a forked agent holds every fd of the agent: none may leak, even before
    start, or another process's stdin would never see EOF)
 2. setsid; join the cgroup (before a new cgroup namespace, so it is the root)
 3. join namespaces by path (ipc, uts, net, cgroup, mount last), unshare the new ones
    (the pid namespace was chosen by the agent before fork: the child is its pid 1)
 4. mount propagation of /, bind the rootfs on itself, spec mounts in order
    (destinations resolved inside the rootfs), device nodes, /dev links;
    createContainer hooks (their path resolved inside the rootfs)
 5. pivot_root (or MS_MOVE + chroot when / is an initramfs: settings.no_pivot)
 6. sysctls, masked paths, read-only paths, hostname, read-only root
 7. terminal: a pty from the container's devpts, master sent to the agent,
    slave as the controlling terminal and 0-2
 8. oom_score_adj, rlimits, cwd, the executable looked up in PATH, umask
 9. create: report ready and wait for start (a byte on the start pipe);
    startContainer hooks
10. bounding set, (seccomp here when no_new_privs is off: it needs
    CAP_SYS_ADMIN), keep caps, groups, gid, uid, capset, ambient set
11. no_new_privs, seccomp, signal mask cleared, execve
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from pykata.guest import sysutil
from pykata.guest.engine import plan as planmod
from pykata.guest.engine import syscalls as sc
from pykata.guest.engine.mounts import secure_join
from pykata.guest.engine.plan import HookPlan, Plan, ProcessPlan

TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
HOOK_OUTPUT_CAP = 4096  # the tail of a hook's output kept for its error

# Fixed fd numbers in the child after step 1.
REPORT_FD = 3
START_FD = 4
CONSOLE_FD = 5


@dataclass
class Job:
    """Everything the child needs, prepared by the agent before fork."""

    proc: ProcessPlan
    plan: Plan | None  # None: an exec into a running container
    report_w: int
    start_r: int = -1  # create only
    stdio: tuple[int, int, int] | None = None  # pipes; None with a terminal
    console_w: int = -1  # terminal: unix socket to send the pty master on
    cgroup_procs: str = ""
    cgroup_dir: str = ""
    join: tuple[tuple[int, str, str], ...] = ()  # (clone flag, path, name)
    unshare: int = 0
    no_pivot: bool = False
    seccomp: bytes | None = None
    seccomp_flags: int = 0
    last_cap: int = 40
    trace: bool = False  # debug: step stamps (monotonic ns) to the agent before R and execve
    marks: tuple[tuple[str, int], ...] = ()  # stamps taken before the fork (fork server)
    drop_bounding: tuple[int, ...] = ()  # cap_steps()
    raise_ambient: tuple[int, ...] = ()


# The signals the forking process does not leave at their default (set by the
# fork server once; the agent computes them at each fork): the child resets these.
RESET_SIGNALS: tuple[int, ...] | None = None


def changed_signals() -> tuple[int, ...]:
    out = []
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP) or not 0 < sig < signal.NSIG:
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if handler is not signal.SIG_DFL:  # None: set outside Python, reset too
            out.append(int(sig))
    return tuple(out)


def enter_pid_ns(pid_ns: str | None) -> None:
    """Where this process's children go: a new pid namespace (``"new"``), one by
    path, or (None) its own."""
    if pid_ns == "new":
        sc.unshare(planmod.CLONE_NEWPID)
    elif pid_ns:
        what = f"join the pid namespace {pid_ns}"
        try:
            fd = os.open(pid_ns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: {exc.strerror}") from None
        try:
            sc.setns(fd, planmod.CLONE_NEWPID, what)
        finally:
            os.close(fd)


def cap_steps(job: Job) -> None:
    """The capability numbers to drop from the bounding set and to raise in the
    ambient set, computed before the fork."""
    caps = job.proc.caps
    job.drop_bounding = tuple(c for c in range(job.last_cap + 1) if not caps.bounding >> c & 1)
    job.raise_ambient = tuple(c for c in range(job.last_cap + 1) if caps.ambient >> c & 1)


class _Step:
    name = "start"
    marks: list[tuple[str, int]] | None = None

    def mark(self, label: str) -> None:
        if self.marks is not None:
            self.marks.append((label, time.monotonic_ns()))


def _send_marks(step: _Step) -> None:
    """``T`` + length + ``label=ns;...``: the stamps so far (debug only)."""
    if not step.marks:
        return
    text = ";".join(f"{label}={ns}" for label, ns in step.marks).encode()[:60000]
    os.write(REPORT_FD, b"T" + struct.pack("<H", len(text)) + text)
    step.marks = []


def _report(step: str, err: int, msg: str) -> None:
    text = f"{step}: {msg}" if msg else step
    data = b"E" + struct.pack("<i", err) + text.encode(errors="replace")[:3800]
    try:
        os.write(REPORT_FD, data)
    except OSError:
        pass


def run(job: Job) -> NoReturn:
    """The child's whole life: never returns."""
    step = _Step()
    if job.trace:
        step.marks = [*job.marks, ("forked", time.monotonic_ns())]
    try:
        _setup(job, step)
    except OSError as exc:
        _report(step.name, exc.errno or errno.EIO, exc.strerror or str(exc))
    except BaseException as exc:
        _report(step.name, errno.EINVAL, f"{type(exc).__name__}: {exc}")
    os._exit(127)


def _fds(job: Job) -> None:
    """Step 1: 0-2, then report/start/console on 3-5, everything else closed."""
    keep = [job.report_w, job.start_r, job.console_w]
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) if fd >= 0 else -1 for fd in keep]
    if job.stdio is not None:
        for target, fd in enumerate(job.stdio):
            os.dup2(fd, target, inheritable=True)
    for target, fd in zip((REPORT_FD, START_FD, CONSOLE_FD), moved, strict=True):
        if fd >= 0:
            os.dup2(fd, target, inheritable=False)
    sc.close_from(CONSOLE_FD + 1)


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _touch(path: str) -> None:
    if not os.path.lexists(path):
        _mkdirs(os.path.dirname(path))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _mounts(job: Job, p: Plan, step: _Step) -> None:
    """Step 4."""
    root = p.rootfs
    step.name = "make / a slave mount (rootfsPropagation)"
    private = p.propagation & sysutil.MS_PRIVATE
    sysutil.mount("", "/", None, sysutil.MS_REC | (sysutil.MS_PRIVATE if private
                                                    else sysutil.MS_SLAVE))
    step.name = f"bind the root file system {root}"
    sysutil.mount(root, root, None, sysutil.MS_BIND | sysutil.MS_REC)
    cgroupns = bool(job.unshare & planmod.CLONE_NEWCGROUP)
    for m in p.mounts:
        step.name = f"mount {m.destination} ({m.fstype or 'bind'} from {m.source})"
        dest = secure_join(root, m.destination)
        if m.bind:
            if stat.S_ISDIR(os.stat(m.source).st_mode):
                _mkdirs(dest)
            else:
                _touch(dest)
        else:
            _mkdirs(dest)
        if m.cgroup and not cgroupns:
            flags = sysutil.MS_BIND | sysutil.MS_REC
            sysutil.mount(job.cgroup_dir, dest, None, flags)
            remount = m.flags & (sysutil.MS_RDONLY | sysutil.MS_NOSUID | sysutil.MS_NODEV
                                 | sysutil.MS_NOEXEC)
            if remount:
                sysutil.mount("", dest, None, sysutil.MS_REMOUNT | sysutil.MS_BIND | remount)
        else:
            sysutil.mount(m.source, dest, m.fstype or None, m.flags, m.data)
            if m.remount_flags:
                sysutil.mount("", dest, None, m.remount_flags)
        if m.propagation:
            sysutil.mount("", dest, None, m.propagation)
        step.mark(m.destination)
    old = os.umask(0)
    dev = secure_join(root, "/dev") if p.dev_tmpfs else ""
    try:
        for node in p.nodes:
            step.name = f"create device {node.path}"
            path = ""
            if dev and node.path.count("/") == 2 and node.path.startswith("/dev/"):
                # Directly in the fresh /dev tmpfs: no parents to make; a link there
                # (none is made before this step) would take the careful way.
                path = dev + node.path[4:]
                try:
                    if stat.S_ISLNK(os.lstat(path).st_mode):
                        path = ""
                    else:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
            if not path:
                path = secure_join(root, node.path)
                _mkdirs(os.path.dirname(path))
                if os.path.lexists(path):
                    os.unlink(path)
            os.mknod(path, node.kind | node.mode, os.makedev(node.major, node.minor))
            if node.uid or node.gid:
                os.chown(path, node.uid, node.gid)
    finally:
        os.umask(old)
    step.mark("nodes")
    if p.dev_tmpfs:
        step.name = "create the /dev links"
        for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                             ("ptmx", "pts/ptmx")):
            path = os.path.join(secure_join(root, "/dev"), link)
            if not os.path.lexists(path):
                os.symlink(target, path)
    if job.proc.terminal:
        step.name = "create /dev/console"
        _touch(secure_join(root, "/dev/console"))


def _enter_root(job: Job, p: Plan, step: _Step) -> None:
    """Step 5."""
    os.chdir(p.rootfs)
    if job.no_pivot:
        step.name = f"move {p.rootfs} to / (no pivot)"
        sysutil.mount(p.rootfs, "/", None, sysutil.MS_MOVE)
        step.name = "chroot"
        os.chroot(".")
    else:
        step.name = f"pivot_root to {p.rootfs}"
        sc.pivot_root(".", ".")
        step.name = "detach the old root"
        sysutil.umount(".", detach=True)
    os.chdir("/")
    if p.propagation and not p.propagation & sysutil.MS_PRIVATE:
        step.name = "rootfsPropagation"
        sysutil.mount("", "/", None, p.propagation)


def _inside(p: Plan, step: _Step) -> None:
    """Step 6."""
    for key, value in p.sysctl:
        step.name = f"set sysctl {key}={value}"
        fd = os.open("/proc/sys/" + key.replace(".", "/"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    for path in p.masked:
        step.name = f"mask {path}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            sysutil.mount("tmpfs", path, "tmpfs", sysutil.MS_RDONLY)
        else:
            sysutil.mount("/dev/null", path, None, sysutil.MS_BIND)
    ro = sysutil.MS_BIND | sysutil.MS_REMOUNT | sysutil.MS_RDONLY
    for path in p.readonly:
        step.name = f"make {path} read-only"
        if not os.path.exists(path):
            continue
        sysutil.mount(path, path, None, sysutil.MS_BIND | sysutil.MS_REC)
        sysutil.mount("", path, None, ro | sysutil.MS_NOSUID | sysutil.MS_NODEV
                      | sysutil.MS_NOEXEC)
    if p.hostname is not None:
        step.name = "set the hostname"
        sc.sethostname(p.hostname)
    if p.domainname is not None:
        step.name = "set the domain name"
        sc.setdomainname(p.domainname)
    if p.readonly_root:
        step.name = "make the root file system read-only (root.readonly)"
        sysutil.mount("", "/", None, ro)


def _terminal(job: Job, step: _Step, console: bool) -> None:
    """Step 7."""
    proc = job.proc
    step.name = "open a terminal in the container's /dev/pts"
    master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0\0\0\0"))[0]
    slave_path = f"/dev/pts/{n}"
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
    os.fchown(slave, proc.uid, -1)
    if proc.console_size:
        rows, cols = proc.console_size
        fcntl.ioctl(master, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    if console and os.path.exists("/dev/console"):
        step.name = "bind the terminal on /dev/console"
        sysutil.mount(slave_path, "/dev/console", None, sysutil.MS_BIND)
    step.name = "send the terminal to the agent"
    sock = socket.socket(fileno=CONSOLE_FD)
    socket.send_fds(sock, [b"t"], [master])
    sock.detach()
    os.close(CONSOLE_FD)
    os.close(master)
    step.name = "make the terminal the controlling one"
    fcntl.ioctl(slave, TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target, inheritable=True)
    if slave > 2:
        os.close(slave)


def lookup(name: str, env: dict[str, str]) -> str:
    """The executable run for ``args[0]``: as given with a '/', else the first
    in PATH (the process's, else the default one)."""
    if "/" in name:
        if not os.path.isfile(name):
            raise OSError(errno.ENOENT, f"executable file `{name}` not found: No such file"
                                        " or directory")
        return name
    for d in (env.get("PATH") or planmod.DEFAULT_PATH).split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise OSError(errno.ENOENT, f"executable file `{name}` not found in $PATH")


def run_hook(path: str, argv: tuple[str, ...], env: dict[str, str], data: bytes, cwd: str,
             timeout: float) -> tuple[int, bytes]:
    """Run one hook to its end, as a child of this process in a session of its
    own: ``data`` on its stdin, its stdout and stderr read into a buffer (the
    last HOOK_OUTPUT_CAP bytes kept). (wait status, output); after ``timeout``
    seconds its session is killed and TimeoutError raised."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise
    if pid == 0:  # the hook
        try:
            os.setsid()
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            sc.close_from(3)
            os.chdir(cwd)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(path, list(argv), env)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"cannot execute {path}: {exc.strerror or exc}".encode())
        os._exit(127)
    os.close(in_r)
    os.close(out_w)
    out = bytearray()
    pidfd = -1
    try:
        pidfd = os.pidfd_open(pid)
        os.set_blocking(in_w, False)
        os.set_blocking(out_r, False)
        poll = select.poll()
        poll.register(pidfd, select.POLLIN)
        poll.register(out_r, select.POLLIN)
        poll.register(in_w, select.POLLOUT)
        todo = memoryview(data)
        deadline = time.monotonic() + timeout
        exited = False
        while not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError
            for fd, _ in poll.poll(int(left * 1000) + 1):
                if fd == pidfd:
                    exited = True
                elif fd == out_r and _read_into(out_r, out):
                    poll.unregister(out_r)  # EOF (it may still run)
                elif fd == in_w:
                    try:
                        todo = todo[os.write(in_w, todo):]
                    except OSError:  # EPIPE: it does not read its state
                        todo = todo[:0]
                    if not todo:
                        poll.unregister(in_w)
                        os.close(in_w)
                        in_w = -1
        _read_into(out_r, out)  # what it wrote before it exited
        _, status = os.waitpid(pid, 0)
    finally:
        for fd in (in_w, out_r, pidfd):
            if fd >= 0:
                os.close(fd)
        # A write to a hook that did not read its state raised SIGPIPE, pending
        # while signals are blocked: it would kill the container at execve.
        signal.sigtimedwait([signal.SIGPIPE], 0)
    return status, bytes(out[-HOOK_OUTPUT_CAP:])


def _read_into(fd: int, buf: bytearray) -> bool:
    """What ``fd`` has now, onto ``buf`` (its tail kept); True at EOF."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            return True
        buf.extend(chunk)
        del buf[:-HOOK_OUTPUT_CAP]


def run_hooks(hooks: tuple[HookPlan, ...], kind: str, state: dict[str, Any], root: str,
              step: _Step) -> None:
    """The ``kind`` hooks in order, each with ``state`` (its status and this
    process's pid added) on stdin; the first failure raises OSError naming it.
    ``root``: the container's root filesystem, not yet the root (createContainer:
    the hook's path is resolved inside it, and it runs there); "" after pivot_root."""
    todo = [h for h in hooks if h.kind == kind]
    if not todo:
        return
    st = {"ociVersion": state.get("ociVersion", ""), "id": state.get("id", ""),
          "status": planmod.HOOK_STATUS[kind], "pid": os.getpid(),
          "bundle": state.get("bundle", ""), "annotations": state.get("annotations", {})}
    data = json.dumps(st).encode()
    for h in todo:
        step.name = f"{h.name} ({h.path})"
        path = secure_join(root, h.path) if root else h.path
        if not os.path.isfile(path):
            raise OSError(errno.ENOENT, "not a file in the container's root filesystem (hooks"
                                        " run in the VM)")
        try:
            status, out = run_hook(path, h.args, dict(h.env), data, root or "/", h.timeout)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"timed out after {h.timeout:g}s") from None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            text = " ".join(out.decode(errors="replace").split())[-300:]
            raise OSError(errno.EIO, f"{how}: {text}" if text else how)
        step.mark(h.name)


def _setup(job: Job, step: _Step) -> None:
    proc, p = job.proc, job.plan
    step.name = "set up file descriptors"
    _fds(job)
    step.mark("fds")
    step.name = "reset signals"
    signal.set_wakeup_fd(-1)
    reset = RESET_SIGNALS
    if reset is None:
        reset = tuple(s for s in range(1, signal.NSIG)
                      if s not in (signal.SIGKILL, signal.SIGSTOP))
    for sig in reset:
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
    step.name = "setsid"
    if os.getsid(0) != os.getpid():  # a fork server spare made its session already
        os.setsid()
    step.mark("signals+setsid")
    if job.cgroup_procs:
        step.name = f"join the cgroup {job.cgroup_dir}"
        fd = os.open(job.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        step.mark("cgroup")
    fds = []
    for flag, path, name in job.join:
        step.name = f"open the {name} namespace {path}"
        fds.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), flag, path, name))
    for fd, flag, path, name in fds:
        step.name = f"join the {name} namespace {path}"
        sc.setns(fd, flag, step.name)
        os.close(fd)
    if job.unshare:
        step.name = "create namespaces"
        sc.unshare(job.unshare)
    step.mark("namespaces")
    if p is not None:
        _mounts(job, p, step)
        step.mark("mounts")
        run_hooks(p.hooks, "createContainer", p.hook_state, p.rootfs, step)
        _enter_root(job, p, step)
        step.mark("root")
        _inside(p, step)
        step.mark("inside")
    else:
        step.name = "enter the container's root"
        os.chdir("/")
    if proc.terminal:
        _terminal(job, step, console=p is not None)
        step.mark("terminal")
    if proc.oom_score_adj is not None:
        step.name = f"set oom_score_adj {proc.oom_score_adj}"
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(proc.oom_score_adj).encode())
        finally:
            os.close(fd)
    for res, soft, hard in proc.rlimits:
        step.name = f"set rlimit {res} to {soft}:{hard}"
        sc.setrlimit(res, soft, hard)
    step.mark("oom+rlimits")
    step.name = f"change to the working directory {proc.cwd} (process.cwd)"
    os.chdir(proc.cwd)
    step.mark("cwd")
    step.name = "find the executable (process.args[0])"
    path = lookup(proc.args[0], proc.env)
    os.umask(proc.umask)
    step.mark("process")
    if job.start_r >= 0:
        step.name = "wait for start"
        _send_marks(step)
        os.write(REPORT_FD, b"R")
        if os.read(START_FD, 1) != b"S":
            os._exit(1)
        os.close(START_FD)
        step.mark("started")
        if p is not None:
            run_hooks(p.hooks, "startContainer", p.hook_state, "", step)
    _identity(job, step)
    step.mark("identity")
    step.name = f"execute {path}"
    _send_marks(step)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.execve(path, list(proc.args), proc.env)


def _identity(job: Job, step: _Step) -> None:
    """Steps 10-11 but execve: capabilities, user, no_new_privs, seccomp."""
    proc = job.proc
    caps = proc.caps
    step.name = "drop capabilities from the bounding set (process.capabilities.bounding)"
    for cap in job.drop_bounding:
        sc.prctl(sc.PR_CAPBSET_DROP, cap, what="drop a capability from the bounding set")
    if job.seccomp and not proc.no_new_privs:
        step.name = "load the seccomp filter (linux.seccomp)"
        sc.seccomp_load(job.seccomp, job.seccomp_flags)
    step.name = "keep capabilities across setuid"
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    step.name = f"set supplementary groups {list(proc.groups)} (process.user.additionalGids)"
    os.setgroups(list(proc.groups))
    step.name = f"set gid {proc.gid} (process.user.gid)"
    os.setresgid(proc.gid, proc.gid, proc.gid)
    step.name = f"set uid {proc.uid} (process.user.uid)"
    os.setresuid(proc.uid, proc.uid, proc.uid)
    step.name = "set capabilities (process.capabilities)"
    sc.capset(caps.effective, caps.permitted, caps.inheritable)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL, what="clear ambient capabilities")
    for cap in job.raise_ambient:
        step.name = f"raise ambient capability {cap} (process.capabilities.ambient)"
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap, what=step.name)
    if proc.no_new_privs:
        step.name = "set no_new_privs (process.noNewPrivileges)"
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        if job.seccomp:
            step.name = "load the seccomp filter (linux.seccomp)"
            sc.seccomp_load(job.seccomp, job.seccomp_flags)
