"""Issue 15: the security-relevant behaviour of a container, checked on a real
VM against BOTH guest engines (the agent's own, and crun selected with the
kernel parameter ``pykata.agent.engine=crun``): the same spec must give the
same result. One VM per engine, shared by the module's tests."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pykata import config, errors, wire
from pykata.guest.engine import caps as capsmod
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENGINES = ("native", "crun")
DEFAULT_CAPS = default_spec(["true"])["process"]["capabilities"]["bounding"]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=ENGINES)
async def engine_sandbox(pykata_config: config.Config,
                         request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    engine = request.param
    cfg = copy.deepcopy(pykata_config)
    cfg.qemu.kernel_params = f"{cfg.qemu.kernel_params} {wire.AGENT_ENGINE_PARAM}={engine}"
    failed_before = request.session.testsfailed
    sb = await Sandbox.create(f"eng-{engine}-{uuid.uuid4().hex[:6]}", cfg)
    console = sb.dir / "console.log"
    try:
        yield sb
    finally:
        if request.session.testsfailed > failed_before and console.exists():
            print("\n---- guest console ----\n" + console.read_text(errors="replace")[-6000:])
        await sb.stop()


async def read_all(read: Any, limit: float = 60.0) -> bytes:
    out = b""
    async with asyncio.timeout(limit):
        while chunk := await read():
            out += chunk
    return out


def spec_of(args: list[str], **kw: Any) -> dict[str, Any]:
    return default_spec(args, **kw)


async def run_spec(sb: Sandbox, tmp_path: Path, rootfs: Path,
                   spec: dict[str, Any]) -> tuple[str, str, int, bool]:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    b = make_bundle(tmp_path / f"b-{cid}", rootfs, spec)
    c = await sb.create_container(cid, b)
    try:
        await c.start()
        out, err = await asyncio.gather(read_all(c.init.read_stdout),
                                        read_all(c.init.read_stderr))
        status = await asyncio.wait_for(c.wait(), 60)
    finally:
        await c.delete(force=True)
    return out.decode(), err.decode(), status.code, status.oom_killed


async def sh(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str,
             **change: Any) -> tuple[str, str, int]:
    spec = spec_of(["sh", "-c", script])
    for key, value in change.items():
        if key == "process":
            spec["process"].update(value)
        elif key == "linux":
            spec["linux"].update(value)
        else:
            spec[key] = value
    out, err, code, _ = await run_spec(sb, tmp_path, rootfs, spec)
    return out, err, code


def status_field(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {out!r}")


async def test_engine_is_the_one_asked_for(engine_sandbox: Sandbox, tmp_path: Path,
                                           rootfs: Path, request: pytest.FixtureRequest) -> None:
    engine = request.node.callspec.params["engine_sandbox"]
    out, _, code = await sh(engine_sandbox, tmp_path, rootfs, "echo ok")
    assert (out, code) == ("ok\n", 0)
    console = (engine_sandbox.dir / "console.log").read_text(errors="replace")
    if "container engine:" in console:
        assert f"container engine: {engine}" in console


async def test_capabilities_after_drop_and_add(engine_sandbox: Sandbox, tmp_path: Path,
                                               rootfs: Path) -> None:
    wanted = [c for c in DEFAULT_CAPS if c != "CAP_NET_RAW"] + ["CAP_SYS_PTRACE"]
    caps = {k: list(wanted) for k in ("bounding", "effective", "permitted")}
    out, _, code = await sh(engine_sandbox, tmp_path, rootfs, "cat /proc/self/status",
                            process={"capabilities": caps})
    assert code == 0
    mask = capsmod.mask(wanted, "test")
    assert int(status_field(out, "CapBnd"), 16) == mask
    assert int(status_field(out, "CapEff"), 16) == mask
    assert int(status_field(out, "CapPrm"), 16) == mask
    assert int(status_field(out, "CapInh"), 16) == 0


async def test_non_root_user_groups_and_ambient(engine_sandbox: Sandbox, tmp_path: Path,
                                                rootfs: Path) -> None:
    caps = {k: ["CAP_NET_BIND_SERVICE"] for k in
            ("bounding", "effective", "permitted", "inheritable", "ambient")}
    out, _, code = await sh(
        engine_sandbox, tmp_path, rootfs, "id -u; id -g; cat /proc/self/status",
        process={"user": {"uid": 1000, "gid": 1001, "additionalGids": [10, 20]},
                 "capabilities": caps})
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == ["1000", "1001"]
    assert status_field(out, "Groups").split() == ["10", "20"]
    assert int(status_field(out, "CapEff"), 16) == 1 << capsmod.CAPS["CAP_NET_BIND_SERVICE"]
    assert int(status_field(out, "CapAmb"), 16) == 1 << capsmod.CAPS["CAP_NET_BIND_SERVICE"]


async def test_no_new_privileges(engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    on, _, _ = await sh(engine_sandbox, tmp_path, rootfs, "cat /proc/self/status",
                        process={"noNewPrivileges": True})
    off, _, _ = await sh(engine_sandbox, tmp_path, rootfs, "cat /proc/self/status",
                         process={"noNewPrivileges": False})
    assert status_field(on, "NoNewPrivs") == "1"
    assert status_field(off, "NoNewPrivs") == "0"


# An allow list in the shape of the runtimes' default profile: everything a shell
# and busybox need, but not mount, chroot, unshare, setns, keyctl, ptrace, reboot...
ALLOWED = """accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
clock_getres clock_gettime clock_nanosleep clone clone3 close close_range connect copy_file_range
dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_wait eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat
fchown fchownat fcntl fdatasync flock fork fstat fstatfs fsync ftruncate futex getcwd getdents
getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid
getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage getsid getsockname
getsockopt gettid gettimeofday getuid getxattr ioctl kill lchown lgetxattr link linkat listen
lseek lstat madvise memfd_create mkdir mkdirat mknod mknodat mmap mprotect mremap munmap nanosleep
newfstatat open openat openat2 pause pipe pipe2 poll ppoll prctl pread64 preadv prlimit64
pselect6 pwrite64 pwritev read readlink readlinkat readv recvfrom recvmsg rename renameat
renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait sched_getaffinity sched_yield select sendmsg sendto
setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid setreuid setrlimit
set_robust_list setsid setsockopt set_tid_address setuid sigaltstack socket socketpair stat
statfs statx symlink symlinkat sysinfo tgkill time times tkill truncate umask uname unlink
unlinkat utime utimensat utimes vfork wait4 waitid write writev""".split()


async def test_seccomp_default_deny_profile(engine_sandbox: Sandbox, tmp_path: Path,
                                            rootfs: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ALLOWED, "action": "SCMP_ACT_ALLOW"}]}
    script = "echo shell-ok; chroot / true; echo chroot=$?"
    out, err, _ = await sh(engine_sandbox, tmp_path, rootfs, script,
                           linux={"seccomp": profile})
    assert out.splitlines() == ["shell-ok", "chroot=1"], (out, err)
    assert "Operation not permitted" in err
    # Without the filter the same chroot works (CAP_SYS_CHROOT is granted).
    out, _, _ = await sh(engine_sandbox, tmp_path, rootfs, script)
    assert out.splitlines() == ["shell-ok", "chroot=0"]


async def test_seccomp_custom_profile_denies_with_eperm(engine_sandbox: Sandbox,
                                                        tmp_path: Path, rootfs: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                             "errnoRet": 1}]}
    out, err, _ = await sh(engine_sandbox, tmp_path, rootfs,
                           "mkdir /dev/shm/d; echo rc=$?", linux={"seccomp": profile})
    assert out == "rc=1\n"
    assert "Operation not permitted" in err


async def test_readonly_rootfs(engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    out, err, _ = await sh(engine_sandbox, tmp_path, rootfs,
                           "touch /x; echo rc=$?; touch /dev/shm/y; echo shm=$?",
                           root={"path": "rootfs", "readonly": True})
    assert out.splitlines() == ["rc=1", "shm=0"]
    assert "Read-only file system" in err


async def test_masked_and_readonly_paths(engine_sandbox: Sandbox, tmp_path: Path,
                                         rootfs: Path) -> None:
    script = ("wc -c < /proc/kcore; ls /sys/firmware | wc -l; "
              "echo x > /proc/sys/kernel/domainname; echo ro=$?")
    out, err, _ = await sh(engine_sandbox, tmp_path, rootfs, script)
    assert [ln.strip() for ln in out.splitlines()] == ["0", "0", "ro=1"]
    assert "Read-only file system" in err


async def test_device_cgroup_denies_mknod(engine_sandbox: Sandbox, tmp_path: Path,
                                          rootfs: Path, request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["engine_sandbox"] == "crun":
        # Measured: Debian's crun 1.8.1 in the guest lets "mknod b 8 0" through on
        # cgroup v2 (it attaches no device program here); the native engine does.
        request.applymarker(pytest.mark.xfail(reason="crun 1.8.1: no device program on v2",
                                              strict=True))
    script = ("mknod /dev/blk b 8 0; echo blk=$?; mknod /dev/null2 c 1 3; echo null=$?;"
              " echo hi > /dev/null2; echo write=$?")
    out, err, _ = await sh(engine_sandbox, tmp_path, rootfs, script)
    assert out.splitlines() == ["blk=1", "null=0", "write=0"], err
    assert "Operation not permitted" in err


async def test_sysctl_in_ipc_namespace(engine_sandbox: Sandbox, tmp_path: Path,
                                       rootfs: Path) -> None:
    out, _, code = await sh(engine_sandbox, tmp_path, rootfs,
                            "cat /proc/sys/kernel/shmmax /proc/sys/kernel/msgmax",
                            linux={"sysctl": {"kernel.shmmax": "12345678",
                                              "kernel.msgmax": "4096"}})
    assert code == 0
    assert out.split() == ["12345678", "4096"]


async def test_pod_pid_namespace_shared(engine_sandbox: Sandbox, tmp_path: Path,
                                        rootfs: Path) -> None:
    infra = spec_of(["sh", "-c", "exec sleep 600"])
    infra["annotations"] = {"io.kubernetes.cri.container-type": "sandbox"}
    b = make_bundle(tmp_path / "infra", rootfs, infra)
    pod = await engine_sandbox.create_container(f"infra-{uuid.uuid4().hex[:6]}", b)
    try:
        await pod.start()
        member = spec_of(["ps", "-o", "pid,args"])
        # The pod's namespaces as containerd's CRI names them: the sandbox's (VM) pid.
        assert engine_sandbox.vm is not None
        for ns in member["linux"]["namespaces"]:
            if ns["type"] in ("pid", "ipc", "uts"):
                ns["path"] = f"/proc/{engine_sandbox.vm.pid}/ns/{ns['type']}"
        out, _, code, _ = await run_spec(engine_sandbox, tmp_path, rootfs, member)
        assert code == 0
        lines = [ln.split(None, 1) for ln in out.splitlines()[1:]]
        assert ["1", "sleep 600"] in lines, out
    finally:
        await pod.delete(force=True)


async def test_oom_kill_is_137(engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    spec = spec_of(["sh", "-c", "cat /sys/fs/cgroup/memory.max; exec tail /dev/zero"],
                   memory_limit=48 << 20)
    out, _, code, oom = await run_spec(engine_sandbox, tmp_path, rootfs, spec)
    assert out.splitlines()[0] == str(48 << 20)
    assert (code, oom) == (137, True)


@pytest.mark.parametrize(("script", "sig", "code"), [
    ("exit 42", 0, 42),
    ("sh -c 'kill -SEGV $$'; exit $?", 0, 139),  # pid 1 would ignore it: a child gets it
    ("trap 'exit 143' TERM; sleep 600 & wait", 15, 143),
    ("sleep 600", 9, 137),
])
async def test_signals_and_exit_codes(engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path,
                                      script: str, sig: int, code: int) -> None:
    cid = f"s-{uuid.uuid4().hex[:8]}"
    c = await engine_sandbox.create_container(
        cid, make_bundle(tmp_path / cid, rootfs, spec_of(["sh", "-c", script])))
    try:
        await c.start()
        if sig:
            await asyncio.sleep(0.3)
            await c.kill(sig)
        assert (await asyncio.wait_for(c.wait(), 60)).code == code
    finally:
        await c.delete(force=True)


async def test_kill_all_reaches_every_process(engine_sandbox: Sandbox, tmp_path: Path,
                                              rootfs: Path) -> None:
    cid = f"k-{uuid.uuid4().hex[:8]}"
    c = await engine_sandbox.create_container(cid, make_bundle(
        tmp_path / cid, rootfs, spec_of(["sh", "-c", "trap '' TERM; sleep 600 & wait"])))
    try:
        await c.start()
        p = await c.exec("e", {"args": ["sleep", "600"], "cwd": "/"})
        await c.kill(9, all_processes=True)
        assert (await asyncio.wait_for(c.wait(), 60)).code == 137
        assert (await asyncio.wait_for(p.wait(), 60)).code == 137
    finally:
        await c.delete(force=True)


async def test_terminal_with_resize(engine_sandbox: Sandbox, tmp_path: Path,
                                    rootfs: Path) -> None:
    cid = f"t-{uuid.uuid4().hex[:8]}"
    spec = spec_of(["sh", "-c", "tty; read x; stty size; exit 5"], terminal=True)
    c = await engine_sandbox.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))
    try:
        await c.start()
        await c.init.resize(33, 101)
        await asyncio.sleep(0.2)
        await c.init.write_stdin(b"go\n")
        out = (await read_all(c.init.read_stdout)).decode()
        assert (await asyncio.wait_for(c.wait(), 60)).code == 5
        assert "/dev/pts/0" in out or "/dev/console" in out, out
        assert "33 101" in out, out
    finally:
        await c.delete(force=True)


async def test_exec_terminal_and_stdin_eof(engine_sandbox: Sandbox, tmp_path: Path,
                                           rootfs: Path) -> None:
    cid = f"x-{uuid.uuid4().hex[:8]}"
    c = await engine_sandbox.create_container(cid, make_bundle(
        tmp_path / cid, rootfs, spec_of(["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"])))
    try:
        await c.start()
        p = await c.exec("cat", {"args": ["cat"], "cwd": "/"})
        await p.write_stdin(b"through the pipe\n")
        await p.close_stdin()
        assert await read_all(p.read_stdout) == b"through the pipe\n"
        assert (await asyncio.wait_for(p.wait(), 60)).code == 0
        t = await c.exec("tty", {"args": ["sh", "-c", "tty; stty size"], "cwd": "/",
                                 "terminal": True, "consoleSize": {"height": 20, "width": 70}})
        out = (await read_all(t.read_stdout)).decode()
        assert (await asyncio.wait_for(t.wait(), 60)).code == 0
        assert "/dev/pts/" in out and "20 70" in out, out
    finally:
        await c.delete(force=True)


async def test_unsupported_fields_are_refused(engine_sandbox: Sandbox, tmp_path: Path,
                                              rootfs: Path,
                                              request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["engine_sandbox"] != "native":
        pytest.skip("the refusals are the native engine's")
    spec = spec_of(["true"])
    spec["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 1}]
    b = make_bundle(tmp_path / "refused", rootfs, spec)
    with pytest.raises(errors.InvalidArgument, match=r"linux\.uidMappings"):
        await engine_sandbox.create_container("refused", b)
    spec = spec_of(["true"])
    spec["linux"]["personality"] = {"domain": "LINUX32"}
    (b / "config.json").write_text(json.dumps(spec))
    with pytest.raises(errors.InvalidArgument, match=r"linux\.personality"):
        await engine_sandbox.create_container("refused2", b)


# -- createContainer and startContainer hooks, run in the guest by either engine -------------
NS_NAMES = "mnt uts ipc pid cgroup"


def _ns_lines(dest: str) -> str:
    return f"for n in {NS_NAMES}; do readlink /proc/self/ns/$n; done > {dest}"


def _hook(script: str, *extra: str, **kw: Any) -> dict[str, Any]:
    # argv[0] "sh": the busybox of the test image picks its applet by it.
    return {"path": "/bin/sh", "args": ["sh", "-c", script, *extra], **kw}


async def test_guest_hooks_run_in_the_container_namespaces(
        engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path,
        request: pytest.FixtureRequest) -> None:
    engine = request.node.callspec.params["engine_sandbox"]
    cid = f"c-{uuid.uuid4().hex[:8]}"
    groot = f"{wire.GUEST_SHARED_DIR}/{cid}/rootfs"  # the container's root, seen from the VM
    # createContainer: after the mounts (the container's /proc is there), before
    # pivot_root (the VM's root is still /); its path was resolved in the rootfs.
    # Its argv and environment as exec'd: from the container's /proc (its pid namespace).
    cc = (f"cat > {groot}/cc.state; {_ns_lines(groot + '/cc.ns')};"
          f" tr '\\0' ' ' < {groot}/proc/$$/cmdline > {groot}/cc.args;"
          f" tr '\\0' ' ' < {groot}/proc/$$/environ > {groot}/cc.env;"
          f" [ -e {groot}/proc/self/ns ] && [ ! -e /cc.args ] && echo mounted > {groot}/cc.where")
    # startContainer: in the container (after pivot_root), before its process.
    sc = f"cat > /sc.state; {_ns_lines('/sc.ns')}; [ -e /cc.args ] && echo pivoted > /sc.where"
    spec = spec_of(["sh", "-c", f"cat /sc.where; {_ns_lines('/dev/stdout')}"])
    spec["hooks"] = {"createContainer": [_hook(cc, "arg0", "arg1", env=["A=set"])],
                     "startContainer": [_hook(sc, timeout=30)]}
    b = make_bundle(tmp_path / cid, rootfs, spec)
    c = await engine_sandbox.create_container(cid, b)
    try:
        created = b / "rootfs" / "cc.state"
        assert created.exists() and not (b / "rootfs" / "sc.state").exists()
        await c.start()
        out = (await read_all(c.init.read_stdout)).decode().splitlines()
        assert (await asyncio.wait_for(c.wait(), 60)).code == 0
    finally:
        await c.delete(force=True)
    root = b / "rootfs"
    assert out[0] == "pivoted"
    container_ns = out[1:]
    assert len(container_ns) == 5
    assert (root / "cc.ns").read_text().split() == container_ns
    assert (root / "sc.ns").read_text().split() == container_ns
    assert (root / "cc.where").read_text() == "mounted\n"
    assert (root / "cc.args").read_text() == f"sh -c {cc} arg0 arg1 "  # args[0] is argv[0]
    assert (root / "cc.env").read_text() == "A=set "  # exactly its env
    cc_state = json.loads((root / "cc.state").read_text())
    sc_state = json.loads((root / "sc.state").read_text())
    assert cc_state["id"] == sc_state["id"] == cid
    if engine == "native":
        # As runc: the pid is the container process's, in its own pid namespace.
        common = {"ociVersion": spec["ociVersion"], "id": cid, "pid": 1, "bundle": str(b),
                  "annotations": spec.get("annotations") or {}}
        assert cc_state == {**common, "status": "creating"}
        assert sc_state == {**common, "status": "created"}


@pytest.mark.parametrize("case", ["create-fails", "start-fails", "not-in-rootfs", "timeout"])
async def test_a_failing_guest_hook_is_one_error_and_leaves_nothing(
        engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path,
        request: pytest.FixtureRequest, case: str) -> None:
    engine = request.node.callspec.params["engine_sandbox"]
    cid = f"c-{uuid.uuid4().hex[:8]}"
    spec = spec_of(["echo", "ran"])
    if case == "create-fails":
        spec["hooks"] = {"createContainer": [_hook("echo no  way; exit 3")]}
        expect = ("hooks.createContainer[0] (/bin/sh): exited with status 3: no way"
                  if engine == "native" else "(exit code: 3)")
    elif case == "start-fails":
        spec["hooks"] = {"startContainer": [_hook("echo bad start; exit 4")]}
        expect = ("hooks.startContainer[0] (/bin/sh): exited with status 4: bad start"
                  if engine == "native" else "(exit code: 4)")
    elif case == "not-in-rootfs":
        spec["hooks"] = {"createContainer": [{"path": "/usr/libexec/oci/hooks.d/x"}]}
        expect = ("hooks.createContainer[0] (/usr/libexec/oci/hooks.d/x): not a file in the"
                  " container's root filesystem (hooks run in the VM)")
    else:
        spec["hooks"] = {"createContainer": [_hook("sleep 60", timeout=1)]}
        # crun says "timeout expired for" or "(exit code: -1)" (killed) with the
        # hook's path as it ran it: rewritten into the container's root filesystem.
        expect = ("hooks.createContainer[0] (/bin/sh): timed out after 1s" if engine == "native"
                  else f"`{wire.GUEST_SHARED_DIR}/{cid}/rootfs/bin/busybox`")
    b = make_bundle(tmp_path / cid, rootfs, spec)
    if case == "start-fails" and engine == "crun":
        # As with runc, crun's start returns before its container process runs the
        # hook: the process stops with crun's error, the container's program never runs.
        c = await engine_sandbox.create_container(cid, b)
        try:
            await c.start()
            out, err_text = await asyncio.gather(read_all(c.init.read_stdout),
                                                 read_all(c.init.read_stderr))
            assert (await asyncio.wait_for(c.wait(), 60)).code != 0
        finally:
            await c.delete(force=True)
        assert out == b"" and expect in err_text.decode(), err_text
    elif case == "start-fails":
        c = await engine_sandbox.create_container(cid, b)
        try:
            with pytest.raises(errors.PykataError) as err:
                await c.start()
            # Nothing runs on: the container ends (as if killed) and waits for delete.
            status = await asyncio.wait_for(c.wait(), 60)
            assert status.code == 137 and c.state.value == "stopped"
        finally:
            await c.delete(force=True)
    else:
        with pytest.raises(errors.PykataError) as err:
            await engine_sandbox.create_container(cid, b)
    if not (case == "start-fails" and engine == "crun"):
        message = str(err.value)
        assert len(message.splitlines()) == 1 and expect in message, message
    assert cid not in engine_sandbox.containers
    assert not (engine_sandbox.dir / "mounts" / cid).exists()
    assert not (engine_sandbox.shared_dir / cid).exists()
    # Nothing of it is left in the guest either: the same id is free again.
    del spec["hooks"]
    (b / "config.json").write_text(json.dumps(spec))
    again = await engine_sandbox.create_container(cid, b)
    try:
        await again.start()
        assert await read_all(again.init.read_stdout) == b"ran\n"
        assert (await asyncio.wait_for(again.wait(), 60)).code == 0
    finally:
        await again.delete(force=True)


def _tree_fds(pid: int) -> int:
    """Open descriptors of ``pid`` and its descendants (virtiofsd forks into its sandbox)."""
    n = len(os.listdir(f"/proc/{pid}/fd"))
    for task in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
            n += _tree_fds(int(child))
    return n


async def test_failed_creates_leave_nothing_cached_in_the_guest(
        engine_sandbox: Sandbox, tmp_path: Path, rootfs: Path) -> None:
    """Each file a failed create looked up through virtio-fs kept an O_PATH
    descriptor open in virtiofsd for the pod's life (3 per failed create with crun,
    6 with the native engine), and its cached dentries went stale when the host
    shared the same id again: the agent forgets them as after a removal."""
    assert engine_sandbox.virtiofsd is not None and engine_sandbox.virtiofsd.ref is not None
    pid = engine_sandbox.virtiofsd.ref.pid

    async def failed_create() -> None:
        cid = f"c-{uuid.uuid4().hex[:8]}"
        spec = spec_of(["echo", "ran"])
        spec["hooks"] = {"createContainer": [{"path": "/usr/libexec/oci/hooks.d/x"}]}
        with pytest.raises(errors.InvalidArgument):
            await engine_sandbox.create_container(cid, make_bundle(tmp_path / cid, rootfs, spec))

    async def settled() -> int:
        # The guest's FORGETs reach virtiofsd after the failed create has answered.
        seen: list[int] = []
        for _ in range(60):  # bounded: 15 s; settled when 1 s of samples agree
            seen.append(_tree_fds(pid))
            if len(seen) >= 5 and len(set(seen[-5:])) == 1:
                break
            await asyncio.sleep(0.25)
        return seen[-1]

    await failed_create()
    base = await settled()
    for _ in range(4):
        await failed_create()
    assert await settled() == base
