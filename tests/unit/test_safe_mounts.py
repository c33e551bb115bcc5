"""utils/mounts and runtime/sharedtree against the real kernel, each test in a
forked child inside its own private mount namespace (so a regression cannot touch
the host's mounts). Needs root, like the rest of the suite."""

from __future__ import annotations

import errno
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from pykata import errors
from pykata.runtime.sharedtree import SharedTree
from pykata.utils import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


def in_private_ns(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a child in a private mount namespace; fail with its traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 0
        try:
            mounts.private_mount_namespace()
            fn()
        except BaseException:
            os.write(w, traceback.format_exc().encode()[-8000:])
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("data")
    (tmp_path / "sb").mkdir(mode=0o700)
    return tmp_path


def test_guest_view_is_read_only_except_what_is_shared_writable(base: Path) -> None:
    def check() -> None:
        t = SharedTree(base / "sb")
        t.setup()
        point, created = t.share(base / "src", "c1/rootfs", readonly=False)
        assert point == str(base / "sb/mounts/c1/rootfs")
        assert created == ["c1", "c1/rootfs"]
        ro, _ = t.share(base / "src", "c1/mounts/0-src", readonly=True)
        # The exported view received both mounts...
        assert (base / "sb/shared/c1/rootfs/f").read_text() == "data"
        assert (base / "sb/shared/c1/mounts/0-src/f").read_text() == "data"
        # ...the tree itself is read-only there (no rename, no planted symlink)...
        for attack in (lambda: os.symlink("/", base / "sb/shared/c1/evil"),
                       lambda: os.rename(base / "sb/shared/c1/rootfs",
                                         base / "sb/shared/c1/moved"),
                       lambda: (base / "sb/shared/c1/mounts/0-src/new").write_text("x")):
            with pytest.raises(OSError) as exc:
                attack()
            assert exc.value.errno == errno.EROFS
        # ...a read-only volume is read-only from the first moment, a rootfs writable.
        (base / "sb/shared/c1/rootfs/w").write_text("ok")
        assert t.unshare([ro, point]) == []
        t.remove(created)
        assert mounts.mounts_under(base / "sb/mounts/c1") == []
        assert t.teardown() == []
        assert mounts.mounts_under(base / "sb") == []
    in_private_ns(check)


def test_planted_symlink_in_the_walk_is_refused(base: Path) -> None:
    def check() -> None:
        t = SharedTree(base / "sb")
        t.setup()
        # Whatever sits in the host tree (a planted link to /etc) is never followed.
        os.symlink("/etc", base / "sb/mounts/c1")
        with pytest.raises(errors.Internal):
            t.share(base / "src", "c1/rootfs", readonly=False)
        assert not Path("/etc/rootfs").exists()
        assert mounts.mounts_under("/etc") == []
        os.unlink(base / "sb/mounts/c1")
        assert t.teardown() == []
    in_private_ns(check)


def test_unmount_never_resolves_a_symlink(base: Path) -> None:
    def check() -> None:
        before = mounts.mount_points()
        t = SharedTree(base / "sb")
        t.setup()
        point, _ = t.share(base / "src", "c1/rootfs", readonly=False)
        t.unshare([point])
        os.rmdir(point)
        os.symlink("/", point)  # a recorded mount point replaced by a link to /
        assert t.unshare([point]) == []  # not mounted any more: nothing done
        assert t.unshare(["/", "/proc"]) == []  # not ours: refused, nothing done
        assert mounts.umount_all(base / "sb/mounts/c1") == []
        assert set(before) <= set(mounts.mount_points())
        os.unlink(point)
        assert t.teardown() == []
    in_private_ns(check)


def test_remove_tree_stops_at_a_mount_and_does_not_follow_links(base: Path) -> None:
    def check() -> None:
        victim = base / "victim"
        victim.mkdir()
        (victim / "keep").write_text("k")
        d = base / "sb" / "d"
        d.mkdir()
        os.symlink(victim, d / "link")
        mnt = d / "mnt"
        mnt.mkdir()
        mounts.bind(victim, mnt)
        with pytest.raises(OSError) as exc:
            mounts.remove_tree(base / "sb")
        assert exc.value.errno == errno.EBUSY
        assert (victim / "keep").exists()
        mounts.umount(mnt)
        mounts.remove_tree(base / "sb")
        assert not (base / "sb").exists()
        assert (victim / "keep").read_text() == "k"
    in_private_ns(check)


def test_mounts_under_is_an_exact_prefix(base: Path) -> None:
    def check() -> None:
        a, ab = base / "a", base / "ab"
        for p in (a, ab):
            p.mkdir()
            mounts.mount("tmpfs", p, "tmpfs")
        assert mounts.mounts_under(a) == [str(a)]
        os.symlink(ab, base / "link")
        assert mounts.mounts_under(base / "link") == []  # never resolved
        assert mounts.umount_all(a) == []
        assert mounts.is_mount_point(ab)
        mounts.umount(ab)
        with pytest.raises(ValueError):
            mounts.mounts_under("/")
    in_private_ns(check)


def test_read_only_volume_is_read_only_all_the_way_down(base: Path) -> None:
    """A recursively read-only (rro) bind of a directory that has its own submount:
    the submount is read-only in the guest's view too (set before the bind appears)."""
    def check() -> None:
        sub = base / "src" / "sub"
        sub.mkdir()
        mounts.mount("tmpfs", sub, "tmpfs")
        t = SharedTree(base / "sb")
        t.setup()
        point, _ = t.share(base / "src", "c1/mounts/0-src", readonly=True, recursive_ro=True)
        for target in (base / "sb/shared/c1/mounts/0-src/x",
                       base / "sb/shared/c1/mounts/0-src/sub/x",
                       base / "sb/mounts/c1/mounts/0-src/sub/x"):
            with pytest.raises(OSError) as exc:
                target.write_text("x")
            assert exc.value.errno == errno.EROFS, target
        (sub / "x").write_text("the source itself stays writable")
        assert t.unshare([point]) == []
        assert t.clear("c1") == []
        assert mounts.mounts_under(base / "sb/mounts/c1") == []
        assert t.teardown() == []
        mounts.umount(sub)
    in_private_ns(check)
