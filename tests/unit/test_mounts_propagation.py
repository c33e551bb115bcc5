"""Read-only and propagation semantics of the shared tree's binds
(utils/mounts.bind_onto through runtime/sharedtree), against the real kernel,
each case in a forked child in its own private mount namespace; and the pure
walk of a mount table that finds a volume's submounts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pykata.runtime.sharedtree import SharedTree
from pykata.utils import mounts
from pykata.utils.mounts import MountEntry, parse_mountinfo, visible_submounts
from tests.unit.test_safe_mounts import in_private_ns

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    (tmp_path / "sb").mkdir(mode=0o700)
    return tmp_path


def _writable(path: Path) -> bool:
    try:
        path.write_text("x")
    except OSError as exc:
        assert exc.errno == errno.EROFS, (path, exc)
        return False
    path.unlink()
    return True


def _source_with_submount(base: Path, shared: bool = False) -> Path:
    """src (a tmpfs, shared if asked) with a writable tmpfs at src/sub."""
    src = base / "src"
    mounts.mount("tmpfs", src, "tmpfs")
    if shared:
        mounts.mount("none", src, flags=mounts.MS_SHARED)
    (src / "sub").mkdir()
    mounts.mount("tmpfs", src / "sub", "tmpfs")
    return src


@needs_root
def test_ro_is_the_top_mount_only_and_rro_every_mount(base: Path) -> None:
    def check() -> None:
        src = _source_with_submount(base)
        t = SharedTree(base / "sb")
        t.setup()
        ro, _ = t.share(src, "c1/mounts/0/src", readonly=True)
        rro, _ = t.share(src, "c1/mounts/1/src", readonly=True, recursive_ro=True)
        view = base / "sb/shared/c1/mounts"
        # ro: the volume refuses writes, its writable submount stays writable.
        assert not _writable(view / "0/src/top")
        assert _writable(view / "0/src/sub/f")
        # rro: read-only all the way down, in the host-only tree as in the guest's view.
        assert not _writable(view / "1/src/top")
        assert not _writable(view / "1/src/sub/f")
        assert not _writable(base / "sb/mounts/c1/mounts/1/src/sub/f")
        assert _writable(src / "sub/f")  # the source itself is untouched
        assert t.unshare([ro, rro]) == []
        assert t.clear("c1") == [] and t.teardown() == []
        assert mounts.is_mount_point(src / "sub")
    in_private_ns(check)


@needs_root
def test_bind_without_rbind_carries_no_submount(base: Path) -> None:
    def check() -> None:
        src = _source_with_submount(base)
        t = SharedTree(base / "sb")
        t.setup()
        point, _ = t.share(src, "c1/mounts/0/src", readonly=False, recursive=False)
        (src / "sub/only-in-the-submount").write_text("x")
        view = base / "sb/shared/c1/mounts/0/src"
        assert (view / "sub").is_dir()
        assert not (view / "sub/only-in-the-submount").exists()
        assert mounts.mounts_under(view) == [str(view)]
        assert t.unshare([point]) == [] and t.clear("c1") == [] and t.teardown() == []
    in_private_ns(check)


@needs_root
def test_a_receiving_share_gets_later_host_mounts_and_sends_nothing_back(base: Path) -> None:
    def check() -> None:
        src = _source_with_submount(base, shared=True)
        t = SharedTree(base / "sb")
        t.setup()
        point, _ = t.share(src, "c1/mounts/0/src", readonly=True, receive=True)
        view = base / "sb/shared/c1/mounts/0/src"
        # A host mount made after the share: in the host-only tree and the guest's view.
        (src / "late").mkdir()
        mounts.mount("tmpfs", src / "late", "tmpfs")
        (src / "late/marker").write_text("late")
        assert (view / "late/marker").read_text() == "late"
        # A mount made in the share does not reach the host (a slave, never a peer).
        inner = base / "sb/mounts/c1/mounts/0/src/sub"
        mounts.mount("tmpfs", inner, "tmpfs")
        assert mounts.mount_points().count(str(src / "sub")) == 1
        mounts.umount(inner)
        # The host's unmount reaches the share too.
        mounts.umount(src / "late")
        assert not (view / "late/marker").exists()
        # Removing the share never unmounts the host's own mounts.
        assert t.unshare([point]) == [] and t.clear("c1") == [] and t.teardown() == []
        assert mounts.is_mount_point(src / "sub")
    in_private_ns(check)


@needs_root
def test_a_private_share_of_a_shared_source_leaves_the_host_alone(base: Path) -> None:
    """Before: the share was a peer of a shared source, and removing it unmounted the
    host's submounts."""
    def check() -> None:
        src = _source_with_submount(base, shared=True)
        t = SharedTree(base / "sb")
        t.setup()
        point, _ = t.share(src, "c1/mounts/0/src", readonly=False)
        (src / "late").mkdir()
        mounts.mount("tmpfs", src / "late", "tmpfs")
        assert not mounts.is_mount_point(base / "sb/shared/c1/mounts/0/src/late")
        assert t.unshare([point]) == [] and t.clear("c1") == [] and t.teardown() == []
        assert mounts.is_mount_point(src / "sub") and mounts.is_mount_point(src / "late")
    in_private_ns(check)


# -- the mount table walk (pure) ------------------------------------------------------

def entry(mid: int, parent: int, point: str, opts: str = "rw") -> MountEntry:
    return MountEntry(mid, parent, point, frozenset(opts.split(",")))


def test_parse_mountinfo_reads_ids_escaped_points_and_options() -> None:
    text = ("22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
            "30 22 0:40 / /srv/my\\040vol ro,nosuid,nodev master:7 - tmpfs tmpfs rw\n"
            "garbage\n")
    assert parse_mountinfo(text) == [entry(22, 1, "/", "rw,relatime"),
                                     entry(30, 22, "/srv/my vol", "ro,nosuid,nodev")]


def test_submounts_are_the_visible_ones_parents_first() -> None:
    table = [
        entry(1, 0, "/"),
        entry(2, 1, "/srv"),                      # the source's file system
        entry(3, 2, "/srv/vol/a/hidden"),         # hidden by 4 (mounted over its parent)
        entry(4, 2, "/srv/vol/a"),
        entry(5, 4, "/srv/vol/a/x", "ro,nosuid"),
        entry(6, 2, "/srv/vol/b"),
        entry(7, 6, "/srv/vol/b", "rw,noexec"),   # stacked on 6: the top one counts
        entry(8, 7, "/srv/vol/b/c"),
        entry(9, 6, "/srv/vol/b/under"),          # on the covered mount: not visible
        entry(10, 2, "/srv/volume"),              # a sibling that only shares a prefix
        entry(11, 1, "/srv/vol/z"),               # under /srv's covered mount point
    ]
    found = visible_submounts(table, "/srv/vol")
    assert [e.point for e in found] == ["/srv/vol/a", "/srv/vol/a/x", "/srv/vol/b",
                                        "/srv/vol/b/c"]
    assert found[2].options == frozenset({"rw", "noexec"})
    assert [e.point for e in visible_submounts(table, "/srv/vol", limit=3)] == [
        "/srv/vol/a", "/srv/vol/a/x", "/srv/vol/b"]
    # The source is itself a mount point: its own mounts below it.
    assert [e.point for e in visible_submounts(table, "/srv/vol/a")] == ["/srv/vol/a/x"]
    assert visible_submounts(table, "/nowhere") == []
    assert visible_submounts([], "/srv") == []
