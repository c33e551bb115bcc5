"""The engine's fork server: its pure helpers, and a real server on the host (in
a subprocess that is a child subreaper, as the agent is) that forks through its
worker and hands out its spare, reports a failed step, and leaves nothing
behind when closed."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from pykata.guest.engine import caps, child, forkserver, runner
from pykata.guest.engine.plan import ProcessPlan


def _job(**kw: object) -> child.Job:
    proc = ProcessPlan(args=("true",), env={}, cwd="/")
    return child.Job(proc=proc, plan=None, report_w=-1, **kw)  # type: ignore[arg-type]


def test_split_marks_takes_leading_stamp_records() -> None:
    text = b"forked=100;fds=250"
    data = b"T" + struct.pack("<H", len(text)) + text + b"R"
    marks, rest = runner.split_marks(data)
    assert marks == [("forked", 100), ("fds", 250)]
    assert rest == b"R"
    err = b"E" + struct.pack("<i", 2) + b"mount /x: gone"
    assert runner.split_marks(err) == ([], err)
    assert runner.split_marks(b"T\x10\x00abc") == ([], b"T\x10\x00abc")  # cut short


def test_fds_travel_as_indices() -> None:
    job = _job(start_r=11, stdio=(12, 13, 14))
    job.report_w = 10
    fds, sent = runner._indexed(job)
    assert fds == [10, 11, 12, 13, 14]
    assert (sent.report_w, sent.start_r, sent.console_w, sent.stdio) == (0, 1, -1, (2, 3, 4))
    back = forkserver.job_with_fds(sent, [30, 31, 32, 33, 34])
    assert (back.report_w, back.start_r, back.console_w, back.stdio) == (30, 31, -1, (32, 33, 34))
    assert job.report_w == 10  # the agent's job is untouched


def test_cap_steps_and_changed_signals() -> None:
    job = _job(last_cap=40)
    job.proc = ProcessPlan(args=("x",), env={}, cwd="/",
                           caps=caps.CapSets(bounding=(1 << 41) - 1 - (1 << 21), ambient=1 << 10))
    child.cap_steps(job)
    assert job.drop_bounding == (21,)
    assert job.raise_ambient == (10,)
    old = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        changed = child.changed_signals()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert signal.SIGUSR2 in changed
    assert signal.SIGKILL not in changed


def test_present_runs_of_a_touched_mapping() -> None:
    import mmap

    page = os.sysconf("SC_PAGE_SIZE")
    m = mmap.mmap(-1, 8 * page)
    try:
        m[0] = 1
        m[5 * page] = 1
        m[6 * page] = 1
        import ctypes

        start = ctypes.addressof(ctypes.c_char.from_buffer(m))
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            runs = forkserver._present_runs(start, start + 8 * page, fd)
        finally:
            os.close(fd)
        assert runs == [(start, page), (start + 5 * page, 2 * page)]
    finally:
        m.close()


SCRIPT = textwrap.dedent("""
    import asyncio, ctypes, os, sys, time
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER, as the agent
    from pykata.guest.engine import child, runner
    from pykata.guest.engine.plan import ProcessPlan
    from pykata.guest.reaper import Reaper
    from pykata.guest.settings import Settings

    def children():
        out = set()
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/children") as f:
                out |= {int(p) for p in f.read().split()}
        return out

    def job():
        return child.Job(proc=ProcessPlan(args=("true",), env={}, cwd="/"), plan=None,
                         report_w=-1, cgroup_procs="/nonexistent/cgroup.procs",
                         cgroup_dir="/nonexistent")

    async def main():
        reaper = Reaper()
        reaper.install()
        engine = runner.Engine(Settings(), reaper)
        server = engine.server
        assert server is not None
        for _ in range(600):
            if server.usable and server._spares:
                break
            await asyncio.sleep(0.05)
        assert server.usable, "the server never became ready"
        assert server._spares, "no spare was offered"
        spare = server._spares[0].pid
        for pid_ns in (None, "new"):
            sp = await engine.spawn(job(), pid_ns, False, False)
            if pid_ns == "new":
                assert sp.pid == spare, (sp.pid, spare)
            data = await runner.read_report(sp.report_r, until_eof=True, timeout=30)
            _, data = runner.split_marks(data)
            print("report", pid_ns, runner.report_error(data))
            print("status", pid_ns, await asyncio.wait_for(sp.exited, 30))
            sp.close()
        try:
            await engine.spawn(job(), "/nonexistent/ns/pid", False, False)
        except OSError as exc:
            print("refused", exc.strerror)
        engine.close()
        await asyncio.wait_for(server._exited, 30)
        for _ in range(100):  # the spare offered meanwhile reads EOF and exits
            if not children():
                break
            await asyncio.sleep(0.05)
        print("left", sorted(children()))

    asyncio.run(main())
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="pid namespaces need root")
def test_a_real_fork_server_forks_hands_out_its_spare_and_leaves_nothing() -> None:
    env = {**os.environ, "PYKATA_FORKSERVER": "on"}
    cp = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        timeout=120, env=env)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout.splitlines()
    for pid_ns in ("None", "new"):
        report = next(ln for ln in out if ln.startswith(f"report {pid_ns} "))
        assert "join the cgroup /nonexistent" in report, out
        assert f"status {pid_ns} 127" in out, out
    assert any(ln.startswith("refused join the pid namespace /nonexistent/ns/pid") for ln in out), \
        out
    assert "left []" in out, out
