"""One uid/gid per VM, leased from ``run_as_user``'s subordinate range.

Every QEMU running as the same uid could open another's guest RAM through
``/proc/<pid>/mem`` or ``/proc/<pid>/fd`` (same uid, dumpable). So each VM runs
as its own uid from the subordinate uid range that ``make setup`` gives the
QEMU user in ``/etc/subuid`` (its gid: the same offset in ``/etc/subgid``).

A lease is an exclusive ``flock`` on ``<lease dir>/<uid>`` (a root-only 0700
directory, the file 0600, never through a symlink) held by the process that
owns the VM for the VM's life: released at stop, and by the kernel if the owner
dies. A QEMU can outlive a crashed owner, so a uid (or gid) that any process
still runs as is skipped too. The holder unlinks the file before it closes it;
a taker checks that the file it locked is still the one at that name. Files
of owners that died unreleased are swept by the next lease.

Without a subordinate range every QEMU runs as the user's own uid (one warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pykata import errors

log = logging.getLogger(__name__)

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
MAX_IDS = 1 << 20  # candidates considered, whatever the size of the range
MAX_LOCK_ATTEMPTS = 64  # lease files tried (each one another owner holds) before giving up
MAX_PROCS = 1 << 16  # /proc entries read when looking for uids in use
MAX_SWEEP = 4096  # lease files looked at for stale ones, per lease
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_warned: set[str] = set()


def subordinate_ranges(user: str, uid: int, path: Path) -> list[tuple[int, int]]:
    """(first, count) of each range ``path`` (subuid(5) format) gives ``user``
    (by name or by number); [] if none or the file is missing."""
    out: list[tuple[int, int]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return out
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            first, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if first > 0 and count > 0:
            out.append((first, count))
    return out


@dataclass(frozen=True)
class IdRange:
    """Pairs (uid, gid): the i-th id of the subuid ranges with the i-th of the
    subgid ranges (in file order)."""

    uids: tuple[tuple[int, int], ...]
    gids: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return min(sum(c for _, c in self.uids), sum(c for _, c in self.gids), MAX_IDS)

    def at(self, i: int) -> tuple[int, int]:
        return _nth(self.uids, i), _nth(self.gids, i)

    def __contains__(self, ids: object) -> bool:
        """Whether ``(uid, gid)`` is a pair of this range."""
        if not isinstance(ids, tuple) or len(ids) != 2:
            return False
        i = _index(self.uids, ids[0])
        return i is not None and i < self.size and self.at(i)[1] == ids[1]

    def describe(self) -> str:
        return ", ".join(f"{a}-{a + n - 1}" for a, n in self.uids)


def _nth(ranges: Iterable[tuple[int, int]], i: int) -> int:
    for first, count in ranges:
        if i < count:
            return first + i
        i -= count
    raise IndexError(i)


def _index(ranges: Iterable[tuple[int, int]], value: object) -> int | None:
    if not isinstance(value, int):
        return None
    base = 0
    for first, count in ranges:
        if first <= value < first + count:
            return base + value - first
        base += count
    return None


def id_range(user: str, uid: int, subuid: Path | None = None,
             subgid: Path | None = None) -> IdRange | None:
    """``user``'s subordinate uid and gid ranges (None unless it has both)."""
    uids = subordinate_ranges(user, uid, subuid or SUBUID)
    gids = subordinate_ranges(user, uid, subgid or SUBGID)
    if not uids or not gids:
        return None
    return IdRange(tuple(uids), tuple(gids))


def ids_in_use(proc: Path = Path("/proc"), limit: int = MAX_PROCS) -> tuple[set[int], set[int]]:
    """Every uid and gid (real, effective, saved, fs) some process runs as:
    at most ``limit`` processes are read."""
    uids: set[int] = set()
    gids: set[int] = set()
    try:
        entries = os.scandir(proc)
    except OSError:
        return uids, gids
    with entries:
        seen = 0
        for e in entries:
            if not e.name.isdigit():
                continue
            seen += 1
            if seen > limit:
                break
            try:
                with open(os.path.join(proc, e.name, "status"), "rb") as f:
                    text = f.read(8192)
            except OSError:
                continue  # gone
            for line in text.splitlines():
                key, _, val = line.partition(b":")
                if key in (b"Uid", b"Gid"):
                    with contextlib.suppress(ValueError):
                        (uids if key == b"Uid" else gids).update(int(v) for v in val.split())
    return uids, gids


class UidLease:
    """One leased (uid, gid): holds the lock until :meth:`release`."""

    def __init__(self, uid: int, gid: int, dir_fd: int, fd: int) -> None:
        self.uid, self.gid = uid, gid
        self._dir_fd, self._fd = dir_fd, fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Unlink the lease file (still holding it, so a taker notices) and close
        it. Idempotent."""
        fd, dfd = self._fd, self._dir_fd
        if fd < 0:
            return
        self._fd = self._dir_fd = -1
        try:
            with contextlib.suppress(OSError):
                st, mine = os.stat(str(self.uid), dir_fd=dfd, follow_symlinks=False), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(str(self.uid), dir_fd=dfd)
        finally:
            os.close(fd)
            os.close(dfd)

    def fds(self) -> tuple[int, int]:
        """(directory fd, lease fd): what a process taking the VM over receives
        (SCM_RIGHTS). The lock belongs to the open file, so it stays held by
        whoever keeps a copy of the lease fd."""
        return self._dir_fd, self._fd

    def drop(self) -> None:
        """Close our fds without giving the uid back (no unlink): another process
        received them and holds the lease now. Idempotent."""
        fd, dfd = self._fd, self._dir_fd
        self._fd = self._dir_fd = -1
        for f in (fd, dfd):
            if f >= 0:
                with contextlib.suppress(OSError):
                    os.close(f)

    def __repr__(self) -> str:
        return f"UidLease(uid={self.uid}, gid={self.gid}, held={self.held})"


def open_lease_dir(path: Path) -> int:
    """``path`` made (0700) if missing and opened: refused unless it is a real
    directory of ours that nobody else can use."""
    path = Path(os.path.abspath(path))
    if not os.path.lexists(path):
        for p in reversed([p for p in path.parents if not os.path.lexists(p)]):
            with contextlib.suppress(FileExistsError):
                os.mkdir(p, 0o755)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    why = ""
    try:
        dfd = os.open(path, _DIR)
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"cannot open the uid lease directory {path}: {exc.strerror} (it must be a"
            " directory, not a symlink)") from exc
    st = os.fstat(dfd)
    if st.st_uid != os.geteuid():
        why = f"it is owned by uid {st.st_uid}"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        why = f"it has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    if why:
        os.close(dfd)
        raise errors.FailedPrecondition(
            f"refusing the uid lease directory {path}: {why}. Remove it so it is made again")
    return dfd


def lease(ids: IdRange, lease_dir: Path, user: str = "", start: int | None = None) -> UidLease:
    """A (uid, gid) of ``ids`` that no other owner holds and no process runs
    as, locked in ``lease_dir``. Candidates from a random offset (or ``start``);
    ResourceExhausted if none is free."""
    size = ids.size
    busy_uids, busy_gids = ids_in_use()
    dfd = open_lease_dir(lease_dir)
    first = secrets.randbelow(size) if start is None else start % size
    attempts = 0
    try:
        _sweep(dfd)
        for k in range(size):
            uid, gid = ids.at((first + k) % size)
            if uid == 0 or gid == 0 or uid in busy_uids or gid in busy_gids:
                continue
            attempts += 1
            if attempts > MAX_LOCK_ATTEMPTS:
                break
            got = _try_lock(dfd, str(uid))
            if got >= 0:
                lease_ = UidLease(uid, gid, dfd, got)
                dfd = -1
                return lease_
    finally:
        if dfd >= 0:
            os.close(dfd)
    who = f"{user}'s" if user else "the"
    raise errors.ResourceExhausted(
        f"no free uid for QEMU in {who} subordinate range {ids.describe()} (every one tried"
        f" is leased in {lease_dir} or in use by a process): stop sandboxes or give"
        f" {user or 'the user'} a larger range (usermod --add-subuids/--add-subgids)")


def _sweep(dfd: int, limit: int = MAX_SWEEP) -> None:
    """Remove lease files nobody holds (their owner died without releasing):
    the directory keeps about one file per live VM. Removed the way a holder
    does (locked, then unlinked), so a taker racing us notices."""
    with os.scandir(dfd) as entries:
        names = [e.name for _, e in zip(range(limit), entries, strict=False)
                 if e.name.isdigit()]
    for name in names:
        fd = _try_lock(dfd, name)
        if fd >= 0:
            try:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
            finally:
                os.close(fd)


def _try_lock(dfd: int, name: str) -> int:
    """The fd of ``name`` locked by us, or -1 (held by another, replaced, odd)."""
    try:
        fd = os.open(name, _FILE, 0o600, dir_fd=dfd)
    except OSError:
        return -1  # e.g. a symlink (ELOOP): not ours to use
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine = os.fstat(fd)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        os.close(fd)
        return -1
    if not stat.S_ISREG(mine.st_mode) or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
        os.close(fd)  # its holder unlinked it after we opened it: not a lease
        return -1
    return fd


def lease_for(user: str, uid: int, lease_dir: Path | None) -> UidLease | None:
    """A lease from ``user``'s subordinate range, or None (QEMU then runs as
    ``uid`` itself: no range, with a warning once; or no lease directory)."""
    if lease_dir is None:
        return None
    ids = id_range(user, uid)
    if ids is None:
        if user not in _warned:
            _warned.add(user)
            log.warning("every QEMU runs as %s (uid %d): it has no subordinate uid and gid"
                        " range in %s and %s, so a guest that escapes into its QEMU could"
                        " read other VMs' memory. Run 'make setup' (it adds one)",
                        user, uid, SUBUID, SUBGID)
        return None
    return lease(ids, lease_dir, user)
