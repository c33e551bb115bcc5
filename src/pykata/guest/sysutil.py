"""Linux system calls the agent needs, through ctypes (stdlib only).

Mounts, kernel modules, hostname, clock, child subreaper, bringing ``lo`` up,
and the kernel command line. Parsing helpers are pure and unit-tested; the
rest raise ``OSError`` with the errno of the failed call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

from pykata import wire

# Imported lazily: this module runs first in a booting guest, where every
# import is slow (TCG), so only what mounting and module loading need is loaded.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Iterable, Mapping, Sequence


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

# Options that are flags: name -> (set?, flag). Everything else is file system data.
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "ro": (True, MS_RDONLY),
    "rw": (False, MS_RDONLY),
    "nosuid": (True, MS_NOSUID),
    "suid": (False, MS_NOSUID),
    "nodev": (True, MS_NODEV),
    "dev": (False, MS_NODEV),
    "noexec": (True, MS_NOEXEC),
    "exec": (False, MS_NOEXEC),
    "sync": (True, MS_SYNCHRONOUS),
    "async": (False, MS_SYNCHRONOUS),
    "remount": (True, MS_REMOUNT),
    "mand": (True, MS_MANDLOCK),
    "nomand": (False, MS_MANDLOCK),
    "dirsync": (True, MS_DIRSYNC),
    "nosymfollow": (True, MS_NOSYMFOLLOW),
    "noatime": (True, MS_NOATIME),
    "atime": (False, MS_NOATIME),
    "nodiratime": (True, MS_NODIRATIME),
    "diratime": (False, MS_NODIRATIME),
    "bind": (True, MS_BIND),
    "rbind": (True, MS_BIND | MS_REC),
    "silent": (True, MS_SILENT),
    "relatime": (True, MS_RELATIME),
    "norelatime": (False, MS_RELATIME),
    "strictatime": (True, MS_STRICTATIME),
    "lazytime": (True, MS_LAZYTIME),
    "private": (True, MS_PRIVATE),
    "rprivate": (True, MS_PRIVATE | MS_REC),
    "slave": (True, MS_SLAVE),
    "rslave": (True, MS_SLAVE | MS_REC),
    "shared": (True, MS_SHARED),
    "rshared": (True, MS_SHARED | MS_REC),
    "unbindable": (True, MS_UNBINDABLE),
    "runbindable": (True, MS_UNBINDABLE | MS_REC),
    "defaults": (True, 0),
}

_PROPAGATION = MS_PRIVATE | MS_SLAVE | MS_SHARED | MS_UNBINDABLE

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# -- mounts -----------------------------------------------------------------------------


def parse_mount_options(options: Iterable[str]) -> tuple[int, int, str]:
    """Mount options -> (flags, propagation flags, data string)."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if not opt:
            continue
        known = _FLAG_OPTIONS.get(opt)
        if known is None:
            data.append(opt)
            continue
        on, flag = known
        if flag & _PROPAGATION:
            propagation |= flag
        elif on:
            flags |= flag
        else:
            flags &= ~flag
    return flags, propagation, ",".join(data)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    ret = libc().mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(ret, f"mount {source or 'none'} on {target} ({fstype or 'bind'})")


def mount_with_options(source: str, target: str, fstype: str | None,
                       options: Sequence[str] = ()) -> None:
    """mount(8)-like: flags and data from ``options``; propagation applied after."""
    flags, propagation, data = parse_mount_options(options)
    mount(source, target, fstype, flags, data)
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY until remounted.
        mount("", target, None, MS_REMOUNT | MS_BIND | (flags & ~MS_REC))
    if propagation:
        mount("", target, None, propagation)


def umount(target: str, detach: bool = False) -> None:
    ret = libc().umount2(target.encode(), MNT_DETACH if detach else 0)
    _check(ret, f"umount {target}")


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, fs type) per line of /proc/self/mountinfo."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        fstype = right.split()[0] if right.split() else ""
        out.append((point, fstype))
    return out


def mounts() -> list[tuple[str, str]]:
    try:
        return parse_mountinfo(_read("/proc/self/mountinfo"))
    except OSError:
        return []


def is_mountpoint(path: str) -> bool:
    p = os.path.normpath(path)
    return any(m == p for m, _ in mounts())


def root_fstype() -> str:
    """File system type of "/" (the last mount on it): "rootfs" in an initramfs."""
    fstype = ""
    for point, t in mounts():
        if point == "/":
            fstype = t
    return fstype


def ensure_mount(source: str, target: str, fstype: str, options: Sequence[str] = (),
                 mode: int = 0o755) -> None:
    """Mount unless something is mounted there already."""
    os.makedirs(target, mode=mode, exist_ok=True)
    if is_mountpoint(target):
        return
    mount_with_options(source, target, fstype, options)


# -- kernel modules ------------------------------------------------------------------

MODULE_INIT_COMPRESSED_FILE = 4
_SYS_INIT_MODULE = 175  # x86_64
_SYS_FINIT_MODULE = 313  # x86_64


def load_module(path: str, params: str = "") -> bool:
    """Load a module file: finit_module(2), or for a ``.ko.gz`` (the image's
    on-demand modules: the guest kernel cannot decompress modules itself) the
    image decompressed here with init_module(2). False if it was loaded already."""
    if path.endswith(".gz"):
        import zlib  # built into the guest's Python

        with open(path, "rb") as f:
            image = zlib.decompress(f.read(), wbits=31)
        buf = ctypes.create_string_buffer(image, len(image))
        ret = libc().syscall(_SYS_INIT_MODULE, buf, ctypes.c_ulong(len(image)),
                             params.encode())
    else:
        flags = MODULE_INIT_COMPRESSED_FILE if path.endswith((".xz", ".zst")) else 0
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ret = libc().syscall(_SYS_FINIT_MODULE, fd, params.encode(), flags)
        finally:
            os.close(fd)
    if ret < 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        raise OSError(err, f"load module {path}: {os.strerror(err)}")
    return True


def parse_module_list(text: str) -> list[str]:
    """Lines of /etc/pykata/modules: paths relative to /, '#' comments."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line if line.startswith("/") else "/" + line)
    return out


def module_loaded(path: str, sys_module: str = "/sys/module") -> bool:
    """Whether the module of ``path`` is in the kernel already (the early initrd of
    the image root loads some): no need to read and hand it to the kernel again."""
    return os.path.exists(os.path.join(sys_module, module_name(path), "initstate"))


def load_modules_file(path: str = wire.GUEST_MODULES_FILE) -> tuple[int, list[str]]:
    """Load every module listed in ``path`` in order, skipping the loaded ones:
    (loaded, error lines)."""
    try:
        listed = parse_module_list(_read(path))
    except FileNotFoundError:
        return 0, []
    except OSError as exc:
        return 0, [f"cannot read {path}: {exc}"]
    loaded = 0
    failed = []
    for mod in listed:
        if module_loaded(mod):
            continue
        try:
            if load_module(mod):
                loaded += 1
        except OSError as exc:
            failed.append(str(exc))
    return loaded, failed


class ModuleLoader:
    """Loads the listed modules in a thread while the main thread goes on importing
    (finit_module runs in the kernel with the GIL released). A bare ``_thread``:
    the threading module (and what it imports) is not needed this early."""

    def __init__(self, path: str = wire.GUEST_MODULES_FILE) -> None:
        import _thread

        self.path = path
        self.loaded = 0
        self.errors: list[str] = []
        self.seconds = 0.0
        self._done = _thread.allocate_lock()

    def start(self) -> None:
        import _thread

        self._done.acquire()
        _thread.start_new_thread(self.run, ())

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.loaded, self.errors = load_modules_file(self.path)
        except BaseException as exc:
            self.errors.append(f"module loading failed: {exc}")
        finally:
            self.seconds = time.monotonic() - t0
            self._done.release()

    def join(self, timeout: float = -1) -> bool:
        """Wait until the modules are loaded (``timeout`` seconds, -1: no limit)."""
        if not self._done.acquire(timeout=timeout):
            return False
        self._done.release()
        return True


def module_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".xz", ".zst", ".gz"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep -> module name -> [its path, then its dependencies' paths]."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        mod, sep, deps = line.partition(":")
        if not sep:
            continue
        out[module_name(mod.strip())] = [mod.strip(), *deps.split()]
    return out


def parse_modules_alias(text: str) -> list[tuple[str, str]]:
    """modules.alias (or modules.symbols) -> [(pattern, module name)] in order, from
    its ``alias PATTERN MODULE`` lines; comments and anything else are skipped."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            out.append((words[1], module_name(words[2])))
    return out


def _alias_key(name: str) -> str:
    """modprobe's normalisation for matching: '-' and '_' are the same character
    (outside ``[...]`` classes of a pattern, which are kept as written)."""
    out = []
    depth = 0
    for ch in name:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append("_" if ch == "-" and not depth else ch)
    return "".join(out)


def resolve_module(request: str, deps: Mapping[str, Sequence[str]],
                   aliases: Iterable[tuple[str, str]], builtin: Iterable[str] = ()) -> list[str]:
    """The modules a ``modprobe request`` loads, as modprobe resolves it: a module
    name (``-`` and ``_`` alike) is itself; a built-in one needs nothing ([]);
    anything else is an alias, matched (shell wildcards) against ``aliases``
    (:func:`parse_modules_alias`), every match counts. Names of modules
    that are in ``deps``; FileNotFoundError if none is."""
    name = request.replace("-", "_")
    if name in deps:
        return [name]
    if name in set(builtin):
        return []
    import fnmatch

    key = _alias_key(request)
    found = list(dict.fromkeys(mod for pattern, mod in aliases
                               if mod in deps and fnmatch.fnmatchcase(key, _alias_key(pattern))))
    if not found:
        raise FileNotFoundError(errno.ENOENT, f"kernel module {request} not found")
    return found


def module_files(names: Iterable[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """modules.dep paths of ``names`` and their dependencies, dependencies first
    (modules.dep lists a module's closest dependency first), each once."""
    out: list[str] = []
    for name in names:
        own, *needed = deps[name]
        for path in [*reversed(needed), own]:
            if path not in out:
                out.append(path)
    return out


def load_module_by_name(name: str, params: Sequence[str] = (),
                        base: str | None = None) -> int:
    """modprobe for the agent: load a module of the running kernel, or what an alias
    names, with its dependencies (modules.dep, modules.alias of ``base``, by
    default /lib/modules/<release>); ``params`` go to the named module(s). Loaded
    ones are skipped. The number of modules loaded."""
    base = base or f"/lib/modules/{os.uname().release}"
    try:
        deps = parse_modules_dep(_read(os.path.join(base, "modules.dep")))
    except OSError as exc:
        raise OSError(exc.errno or errno.ENOENT, f"no modules.dep for this kernel: {exc}") from exc
    aliases: list[tuple[str, str]] = []
    builtin: list[str] = []
    if name.replace("-", "_") not in deps:  # an alias, or built in
        try:
            aliases = parse_modules_alias(_read(os.path.join(base, "modules.alias")))
        except FileNotFoundError:
            pass
        try:
            builtin = [module_name(p) for p in _read(os.path.join(base, "modules.builtin")).split()]
        except FileNotFoundError:
            pass
    targets = resolve_module(name, deps, aliases, builtin)
    own = {deps[t][0] for t in targets}
    loaded = 0
    for path in module_files(targets, deps):
        if module_loaded(path):
            continue
        if load_module(os.path.join(base, path), " ".join(params) if path in own else ""):
            loaded += 1
    return loaded


# -- identity, time, entropy -----------------------------------------------------------


def set_hostname(name: str) -> None:
    raw = name.encode()
    _check(libc().sethostname(raw, len(raw)), f"sethostname {name}")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


CLOCK_REALTIME = 0


def set_clock(unix_nano: int) -> None:
    ts = _Timespec(unix_nano // 1_000_000_000, unix_nano % 1_000_000_000)
    _check(libc().clock_settime(CLOCK_REALTIME, ctypes.byref(ts)), "clock_settime")


RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)


def add_entropy(data: bytes) -> None:
    """Mix ``data`` into the kernel's input pool (no entropy credit), then make
    the kernel reseed its generator from that pool at once: a write alone only
    reaches the output at the next scheduled reseed (up to a minute away), so
    two clones of one template VM would go on giving the same random bytes."""
    if not data:
        return
    import fcntl

    with open("/dev/urandom", "wb", buffering=0) as f:
        f.write(data)
        try:
            fcntl.ioctl(f, RNDRESEEDCRNG)
        except OSError as exc:
            # ENODATA: the generator is not ready yet; its first seeding takes the
            # pool with this data in it. ENOTTY/EINVAL: a kernel without the call.
            if exc.errno not in (errno.ENODATA, errno.ENOTTY, errno.EINVAL):
                raise


PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    _check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def sync() -> None:
    os.sync()


# -- network --------------------------------------------------------------------------

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def link_up(name: str = "lo") -> None:
    """Set IFF_UP on an interface (ioctl, no ip tool needed)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", name.encode(), 0)
        res = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req)
        flags = struct.unpack("16sH22x", res)[1]
        if flags & IFF_UP:
            return
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(),
                                                           flags | IFF_UP))


# -- kernel command line ---------------------------------------------------------------


def parse_cmdline(text: str, prefix: str = "pykata.") -> dict[str, str]:
    """``key=value`` words of the kernel command line that start with ``prefix``."""
    out: dict[str, str] = {}
    for word in text.split():
        if not word.startswith(prefix):
            continue
        key, _, value = word.partition("=")
        out[key] = value
    return out


def kernel_params() -> dict[str, str]:
    try:
        return parse_cmdline(_read("/proc/cmdline"))
    except OSError:
        return {}


# -- init (PID 1) setup -----------------------------------------------------------------

CGROUP_CONTROLLERS = ("cpu", "cpuset", "memory", "pids", "io")


def _console_stdio() -> None:
    """Make sure fds 0-2 exist: the kernel gives none if /dev/console was missing."""
    try:
        os.fstat(2)
        return
    except OSError:
        pass
    try:
        fd = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        fd = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def init_filesystems() -> None:
    """Mount what a booted Linux needs; each failure is logged, none is fatal."""
    init_early_filesystems()
    init_late_filesystems()


def init_early_filesystems() -> None:
    """/proc, /sys, /dev (what module loading and the agent channel need) and
    fds 0-2. The early init of the image root mounts and moves these already."""
    steps: list[tuple[str, str, str, list[str], int]] = [
        ("proc", "/proc", "proc", ["nosuid", "nodev", "noexec"], 0o555),
        ("sysfs", "/sys", "sysfs", ["nosuid", "nodev", "noexec"], 0o555),
        ("devtmpfs", "/dev", "devtmpfs", ["nosuid", "mode=0755"], 0o755),
    ]
    for source, target, fstype, options, mode in steps:
        try:
            ensure_mount(source, target, fstype, options, mode)
        except OSError as exc:
            _log().error("%s", exc)
    _console_stdio()


def init_late_filesystems() -> None:
    """The rest: devpts, /dev/shm, /run, /tmp, cgroup2 and its controllers, /dev links."""
    steps: list[tuple[str, str, str, list[str], int]] = [
        ("devpts", "/dev/pts", "devpts",
         ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"], 0o755),
        ("shm", "/dev/shm", "tmpfs", ["nosuid", "nodev", "mode=1777"], 0o1777),
        ("tmpfs", "/run", "tmpfs", ["nosuid", "nodev", "mode=0755"], 0o755),
        ("tmpfs", "/tmp", "tmpfs", ["nosuid", "nodev", "mode=1777"], 0o1777),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ["nosuid", "nodev", "noexec"], 0o755),
    ]
    for source, target, fstype, options, mode in steps:
        try:
            ensure_mount(source, target, fstype, options, mode)
        except OSError as exc:
            _log().error("%s", exc)
    # /dev/ptmx must be the devpts instance's, and /dev/fd & co are expected.
    for link, dest in (("/dev/ptmx", "pts/ptmx"), ("/dev/fd", "/proc/self/fd"),
                       ("/dev/stdin", "/proc/self/fd/0"), ("/dev/stdout", "/proc/self/fd/1"),
                       ("/dev/stderr", "/proc/self/fd/2")):
        try:
            if link == "/dev/ptmx" and os.path.exists(link) and not os.path.islink(link):
                os.unlink(link)
            if not os.path.lexists(link):
                os.symlink(dest, link)
        except OSError as exc:
            _log().debug("cannot link %s: %s", link, exc)
    enable_cgroup_controllers("/sys/fs/cgroup")


def enable_cgroup_controllers(root: str, wanted: Sequence[str] = CGROUP_CONTROLLERS) -> None:
    try:
        available = _read(os.path.join(root, "cgroup.controllers")).split()
    except OSError as exc:
        _log().warning("no cgroup v2 at %s: %s", root, exc)
        return
    for c in wanted:
        if c not in available:
            _log().debug("cgroup controller %s not available", c)
            continue
        try:
            _write(os.path.join(root, "cgroup.subtree_control"), f"+{c}")
        except OSError as exc:
            _log().warning("cannot enable cgroup controller %s: %s", c, exc)


def init_system() -> None:
    """What PID 1 does once modules are loaded: hostname, lo, directories."""
    try:
        set_hostname("localhost")
    except OSError as exc:
        _log().warning("%s", exc)
    try:
        link_up("lo")
    except OSError as exc:
        _log().warning("cannot bring lo up: %s", exc)
    for d in (wire.GUEST_STATE_DIR, "/etc"):
        os.makedirs(d, exist_ok=True)
