"""One uid per VM: leases from a (fake) subordinate range in a tmp lease dir."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pykata import errors
from pykata.hypervisor.base import VMSpec
from pykata.hypervisor.qemu import uids
from pykata.hypervisor.qemu.cmdline import QemuOptions
from pykata.hypervisor.qemu.driver import QemuHypervisor
from pykata.hypervisor.qemu.uids import IdRange, id_range, ids_in_use, lease, lease_for

ROOT = os.geteuid() == 0
BASE = 1_500_000_000  # far from any uid a real process here runs as


def fake_range(tmp: Path, user: str, first: int, count: int, gfirst: int | None = None) -> None:
    (tmp / "subuid").write_text(f"other:100000:65536\n{user}:{first}:{count}\n")
    (tmp / "subgid").write_text(f"{user}:{gfirst or first}:{count}\nother:100000:65536\n")


@pytest.fixture
def subids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(uids, "SUBUID", tmp_path / "subuid")
    monkeypatch.setattr(uids, "SUBGID", tmp_path / "subgid")
    return tmp_path


def test_ranges_by_name_or_uid_and_gid_at_the_same_offset(tmp_path: Path) -> None:
    (tmp_path / "subuid").write_text("q:1000000:10\n# junk\n999:2000000:5\nq:bad:1\nq:5:0\n")
    (tmp_path / "subgid").write_text("q:3000000:15\n")
    ids = id_range("q", 999, tmp_path / "subuid", tmp_path / "subgid")
    assert ids is not None and ids.size == 15
    assert ids.at(0) == (1000000, 3000000)
    assert ids.at(9) == (1000009, 3000009)
    assert ids.at(10) == (2000000, 3000010)  # second uid range, still one gid range
    assert (2000004, 3000014) in ids and (2000004, 3000013) not in ids
    assert (999, 999) not in ids
    assert ids.describe() == "1000000-1000009, 2000000-2000004"
    (tmp_path / "subgid").write_text("someone:3000000:15\n")
    assert id_range("q", 999, tmp_path / "subuid", tmp_path / "subgid") is None


def test_two_leases_differ_and_a_released_one_is_reusable(tmp_path: Path) -> None:
    ids = IdRange(((BASE, 2),), ((BASE + 100, 2),))
    d = tmp_path / "state" / "uids"
    a = lease(ids, d)
    b = lease(ids, d)
    try:
        assert {a.uid, b.uid} == {BASE, BASE + 1}
        assert {(a.uid, a.gid), (b.uid, b.gid)} == {(BASE, BASE + 100), (BASE + 1, BASE + 101)}
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        f = d / str(a.uid)
        assert stat.S_IMODE(f.lstat().st_mode) == 0o600 and stat.S_ISREG(f.lstat().st_mode)
        with pytest.raises(errors.ResourceExhausted) as exc:
            lease(ids, d, "pykata-qemu")
        msg = str(exc.value)
        assert "\n" not in msg and f"{BASE}-{BASE + 1}" in msg and "pykata-qemu" in msg
        freed = a.uid
        a.release()
        a.release()  # idempotent
        assert not (d / str(freed)).exists()  # the holder unlinks before it lets go
        c = lease(ids, d)
        assert c.uid == freed
        c.release()
    finally:
        a.release()
        b.release()
    assert os.listdir(d) == []


def test_many_leases_are_all_distinct(tmp_path: Path) -> None:
    ids = IdRange(((BASE, 16),), ((BASE, 16),))
    held = [lease(ids, tmp_path / "uids") for _ in range(16)]
    try:
        assert len({h.uid for h in held}) == 16
    finally:
        for h in held:
            h.release()


def test_a_stale_lease_file_is_reused_and_a_planted_symlink_is_not(tmp_path: Path) -> None:
    ids = IdRange(((BASE, 2),), ((BASE, 2),))
    d = tmp_path / "uids"
    d.mkdir(mode=0o700)
    (d / str(BASE)).touch()  # left by an owner that died: nobody holds it
    os.symlink("/etc/passwd", d / str(BASE + 1))
    (d / str(BASE + 5)).touch()  # stale, outside the range: swept as well
    got = lease(ids, d, start=0)
    try:
        assert got.uid == BASE
        assert not (d / str(BASE + 5)).exists()
        with pytest.raises(errors.ResourceExhausted):
            lease(ids, d, start=1)  # the symlink is never followed, never a lease
        assert (d / str(BASE)).is_file()  # a held lease is never swept
    finally:
        got.release()
    assert Path("/etc/passwd").is_file()


def test_unsafe_lease_dir_is_refused(tmp_path: Path) -> None:
    ids = IdRange(((BASE, 2),), ((BASE, 2),))
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "link")
    with pytest.raises(errors.FailedPrecondition, match="symlink"):
        lease(ids, tmp_path / "link")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(errors.FailedPrecondition, match="mode 755"):
        lease(ids, loose)


def test_the_kernel_releases_a_dead_owners_lease(tmp_path: Path) -> None:
    ids = IdRange(((BASE, 1),), ((BASE, 1),))
    d = tmp_path / "uids"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner: leases, says so, waits to be killed
        try:
            os.close(r)
            lease(ids, d)
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(errors.ResourceExhausted):
            lease(ids, d)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    got = lease(ids, d)
    assert got.uid == BASE
    got.release()


@pytest.mark.skipif(not ROOT, reason="needs root to run a process as another uid")
def test_a_uid_some_process_runs_as_is_skipped(tmp_path: Path) -> None:
    """A QEMU can outlive its owner (and its lock): its uid is still taken."""
    ids = IdRange(((BASE, 2),), ((BASE + 50, 2),))
    child = subprocess.Popen(["sleep", "60"], user=BASE, group=BASE + 77, extra_groups=[])
    try:
        assert BASE in ids_in_use()[0]
        for start in (0, 1):
            got = lease(ids, tmp_path / "uids", start=start)
            assert (got.uid, got.gid) == (BASE + 1, BASE + 51)
            got.release()
    finally:
        child.kill()
        child.wait()
    # A gid in use is skipped too (same offset as the uid that would get it).
    child = subprocess.Popen(["sleep", "60"], user=BASE + 900, group=BASE + 51,
                             extra_groups=[])
    try:
        got = lease(ids, tmp_path / "uids", start=1)
        assert got.uid == BASE
        got.release()
    finally:
        child.kill()
        child.wait()


def test_no_range_falls_back_to_the_users_uid_with_one_warning(
        subids: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uids, "_warned", set())
    (subids / "subuid").write_text("other:100000:65536\n")
    (subids / "subgid").write_text("")
    with caplog.at_level(logging.WARNING, logger="pykata.hypervisor.qemu.uids"):
        assert lease_for("qemu-user", 4242, subids / "uids") is None
        assert lease_for("qemu-user", 4242, subids / "uids") is None
    warnings = [r for r in caplog.records if "subordinate" in r.getMessage()]
    assert len(warnings) == 1 and "make setup" in warnings[0].getMessage()
    fake_range(subids, "qemu-user", BASE, 4)
    assert lease_for("qemu-user", 4242, None) is None  # no lease dir: the user's own uid
    got = lease_for("qemu-user", 4242, subids / "uids")
    assert got is not None and BASE <= got.uid < BASE + 4
    got.release()


def _vm(tmp: Path, name: str) -> QemuHypervisor:
    kernel = tmp / "vmlinux"
    kernel.write_bytes(b"k")
    kernel.chmod(0o644)
    spec = VMSpec(id=name, run_dir=tmp / name, kernel=kernel)
    return QemuHypervisor(spec, "/bin/true", QemuOptions(run_as_user="nobody",
                                                         uid_lease_dir=tmp / "uids"))


async def test_each_vm_gets_its_own_uid_until_it_stops(subids: Path) -> None:
    """The driver leases at prepare (again on a second prepare: the same one),
    runs QEMU as that uid/gid, gives it back at stop."""
    import pwd

    fake_range(subids, "nobody", BASE, 3, gfirst=BASE + 10)
    a, b = _vm(subids, "a"), _vm(subids, "b")
    await a.prepare()
    await a.prepare()
    await b.prepare()
    try:
        ca, cb = a.credentials, b.credentials
        assert ca is not None and cb is not None and ca.leased and cb.leased
        assert ca.uid != cb.uid and ca.uid != pwd.getpwnam("nobody").pw_uid
        assert {ca.uid - BASE, cb.uid - BASE} <= {0, 1, 2}
        assert (ca.gid - ca.uid, cb.gid - cb.uid) == (10, 10)
        assert sorted(os.listdir(subids / "uids")) == sorted([str(ca.uid), str(cb.uid)])
        assert "uid" in str(ca) and "nobody" in str(ca)
    finally:
        await a.stop()
        await b.stop()
    assert os.listdir(subids / "uids") == []
    # Without a range: the user's own uid, as before.
    (subids / "subuid").write_text("")
    c = _vm(subids, "c")
    await c.prepare()
    assert c.credentials is not None and not c.credentials.leased
    assert c.credentials.uid == pwd.getpwnam("nobody").pw_uid
    await c.stop()


@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_memory_file_goes_to_the_leased_uid(subids: Path) -> None:
    import asyncio

    from pykata.hypervisor.qemu.driver import _Fds

    fake_range(subids, "nobody", BASE, 2, gfirst=BASE + 10)
    mem = subids / "vm.mem"
    mem.touch(mode=0o600)
    vm = _vm(subids, "m")
    vm.spec.memory_file = mem
    asyncio.run(vm.prepare())
    fds = _Fds()
    try:
        fd = vm._open_memory(fds)
        st = os.fstat(fd)
        assert vm.credentials is not None
        assert (st.st_uid, st.st_gid) == (vm.credentials.uid, vm.credentials.gid)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        fds.close_all()
        asyncio.run(vm.stop())
