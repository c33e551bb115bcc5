"""The guest container engine's pure parts, without a VM: spec -> plan,
refusals naming the field, capability masks, mount options, cgroup files,
device rules and their eBPF program, seccomp rules; the hooks it runs (as
real processes) and crun's spec of them."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pykata import wire
from pykata.errors import InvalidArgument
from pykata.guest import sysutil
from pykata.guest.crun import crun_error, crun_spec
from pykata.guest.engine import caps, cgroup, child, devices, mounts, plan, seccomp
from pykata.guest.engine.child import lookup
from pykata.guest.engine.runner import report_error
from pykata.testing import default_spec


def guest_spec(args: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    spec = default_spec(args or ["sh"], **kw)
    spec["root"] = {"path": "/run/c1/rootfs", "readonly": False}
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "ipc", "uts", "mount",
                                                           "cgroup")]
    spec["linux"]["cgroupsPath"] = "/pykata/c1"
    return spec


# -- plan ---------------------------------------------------------------------------------


def test_plan_of_the_default_spec() -> None:
    p = plan.plan(guest_spec(["sh", "-c", "echo hi"], hostname="h1"))
    assert p.rootfs == "/run/c1/rootfs"
    assert p.pid_ns == "new"
    assert p.new_ns == plan.CLONE_NEWIPC | plan.CLONE_NEWUTS | plan.CLONE_NEWNS \
        | plan.CLONE_NEWCGROUP
    assert p.join_ns == ()
    assert p.hostname == "h1"
    assert p.cgroup_path == "pykata/c1"
    assert p.dev_tmpfs
    assert [n.path for n in p.nodes][:3] == ["/dev/null", "/dev/zero", "/dev/full"]
    assert p.process.args == ("sh", "-c", "echo hi")
    assert p.process.env["PATH"].startswith("/usr/local/sbin")
    assert p.process.no_new_privs
    assert p.process.rlimits == ((plan.RLIMITS["RLIMIT_NOFILE"], 1024, 1024),)
    assert p.process.caps.bounding == p.process.caps.effective != 0
    assert p.process.caps.inheritable == p.process.caps.ambient == 0
    assert "/proc/kcore" in p.masked and "/proc/sys" in p.readonly
    # deny all, then the defaults allowed after it
    assert p.device_rules[0] == devices.Rule(False, 0, -1, -1, 7)
    assert devices.DEFAULT_ALLOW[0] in p.device_rules


def test_joined_namespaces_in_order_and_pid_path() -> None:
    spec = guest_spec()
    spec["linux"]["namespaces"] = [
        {"type": "mount"}, {"type": "uts", "path": "/proc/7/ns/uts"},
        {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "pid", "path": "/proc/7/ns/pid"}]
    p = plan.plan(spec)
    assert p.join_ns == (("ipc", "/proc/7/ns/ipc"), ("uts", "/proc/7/ns/uts"))
    assert p.pid_ns == "/proc/7/ns/pid"
    assert p.new_ns == plan.CLONE_NEWNS
    assert p.hostname is None  # the pod's uts namespace keeps the pod's name


def test_user_settings() -> None:
    spec = guest_spec()
    spec["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [5, 6],
                               "umask": 0o077}
    spec["process"]["oomScoreAdj"] = 500
    spec["process"]["consoleSize"] = {"height": 30, "width": 90}
    p = plan.plan(spec).process
    assert (p.uid, p.gid, p.groups, p.umask, p.oom_score_adj, p.console_size) == \
        (1000, 1001, (5, 6), 0o077, 500, (30, 90))


@pytest.mark.parametrize(("change", "field"), [
    (lambda s: s["linux"].update(uidMappings=[{"containerID": 0, "hostID": 1, "size": 1}]),
     r"linux\.uidMappings"),
    (lambda s: s["linux"]["namespaces"].append({"type": "user"}), r"'user'"),
    (lambda s: s["linux"]["namespaces"].append({"type": "time"}), r"'time'"),
    (lambda s: s["linux"].update(personality={"domain": "LINUX32"}), r"linux\.personality"),
    (lambda s: s["linux"].update(intelRdt={"closID": "x"}), r"linux\.intelRdt"),
    (lambda s: s["linux"].update(timeOffsets={"boottime": {}}), r"linux\.timeOffsets"),
    (lambda s: s["linux"].update(mountLabel="system_u"), r"linux\.mountLabel"),
    (lambda s: s["linux"].update(somethingNew=1), r"linux\.somethingNew"),
    (lambda s: s.update(hooks={"prestart": [{"path": "/bin/true"}]}), r"hooks"),
    (lambda s: s.update(windows={}), r"windows"),
    (lambda s: s["process"].update(apparmorProfile="p"), r"process\.apparmorProfile"),
    (lambda s: s["process"].update(selinuxLabel="l"), r"process\.selinuxLabel"),
    (lambda s: s["process"].update(scheduler={"policy": "SCHED_FIFO"}),
     r"process\.scheduler"),
    (lambda s: s["process"].update(ioPriority={"class": "IOPRIO_CLASS_RT"}),
     r"process\.ioPriority"),
    (lambda s: s["process"]["rlimits"].append({"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}),
     r"process\.rlimits\[1\]\.type"),
    (lambda s: s["process"]["capabilities"]["bounding"].append("CAP_FLY"),
     r"process\.capabilities\.bounding.*CAP_FLY"),
    (lambda s: s["mounts"].append({"destination": "/m", "type": "bind", "source": "/x",
                                   "options": ["rbind", "idmap"]}),
     r"mounts\[7\]\.options.*idmap"),
    (lambda s: s["mounts"].append({"destination": "/m", "type": "bind", "source": "/x",
                                   "uidMappings": []}), r"mounts\[7\]\.uidMappings"),
    (lambda s: s["linux"].update(sysctl={"vm.swappiness": "1"}), r"linux\.sysctl\.vm"),
    (lambda s: s["linux"].update(sysctl={"net.ipv4.ip_forward": "1"}), r"linux\.sysctl\.net"),
    (lambda s: s["linux"]["resources"].update(memory={"kernel": 1 << 20}),
     r"linux\.resources\.memory\.kernel"),
    (lambda s: s["linux"]["resources"].update(network={"classID": 1}),
     r"linux\.resources\.network"),
    (lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_NOTIFY"}),
     r"SCMP_ACT_NOTIFY"),
    (lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW",
                                          "listenerPath": "/run/s.sock"}),
     r"linux\.seccomp\.listenerPath"),
    (lambda s: s["linux"].update(seccomp={"defaultAction": "SCMP_ACT_ALLOW",
                                          "architectures": ["SCMP_ARCH_ARM"]}),
     r"linux\.seccomp\.architectures"),
    (lambda s: s["linux"].update(cgroupsPath="system.slice:pykata:c1"), r"cgroupsPath"),
    (lambda s: s["linux"].update(namespaces=[{"type": "pid"}]), r"mount namespace"),
])
def test_refusals_name_the_field(change: Any, field: str) -> None:
    spec = guest_spec()
    change(spec)
    with pytest.raises(InvalidArgument, match=field):
        plan.plan(spec)


def test_namespaced_sysctls_are_accepted() -> None:
    spec = guest_spec()
    spec["linux"]["sysctl"] = {"kernel.shmmax": "1", "fs.mqueue.msg_max": "20",
                               "kernel.domainname": "d"}
    assert dict(plan.plan(spec).sysctl) == spec["linux"]["sysctl"]
    spec["linux"]["namespaces"] = [{"type": "mount"}]
    spec.pop("hostname")
    with pytest.raises(InvalidArgument, match=r"kernel\.shmmax.*ipc"):
        plan.plan(spec)


def test_exec_process_plan() -> None:
    p = plan.process_plan({"args": ["true"], "cwd": "/", "terminal": True,
                           "env": ["A=1", "A=2", "B=x=y"]})
    assert p.terminal and p.env == {"A": "2", "B": "x=y"}
    assert p.caps == caps.CapSets()  # no capabilities object: none at all
    with pytest.raises(InvalidArgument, match=r"process\.env entry 'NOEQUALS'"):
        plan.process_plan({"args": ["true"], "env": ["NOEQUALS"]})
    with pytest.raises(InvalidArgument, match=r"process\.args"):
        plan.process_plan({"args": []})


# -- capabilities -------------------------------------------------------------------------


def test_capability_bits() -> None:
    assert caps.CAPS["CAP_CHOWN"] == 0
    assert caps.CAPS["CAP_SYS_ADMIN"] == 21
    assert caps.CAPS["CAP_CHECKPOINT_RESTORE"] == 40
    assert caps.mask(["CAP_KILL", "NET_RAW", "cap_chown"], "f") == (1 << 5) | (1 << 13) | 1
    # known to us, unknown to an older kernel: left out
    assert caps.mask(["CAP_BPF", "CAP_KILL"], "f", last_cap=37) == 1 << 5
    assert caps.names((1 << 5) | 1) == ["CAP_CHOWN", "CAP_KILL"]
    with pytest.raises(InvalidArgument, match=r"x\.y: unknown capability 'CAP_NOPE'"):
        caps.mask(["CAP_NOPE"], "x.y")


def test_capability_sets() -> None:
    s = caps.cap_sets({"bounding": ["CAP_KILL"], "ambient": ["CAP_KILL"]})
    assert (s.bounding, s.effective, s.ambient) == (1 << 5, 0, 1 << 5)
    with pytest.raises(InvalidArgument, match=r"process\.capabilities\.extra"):
        caps.cap_sets({"extra": []})


# -- mounts -------------------------------------------------------------------------------


def test_bind_mount_with_flags_gets_a_remount() -> None:
    m = mounts.parse_mount({"destination": "/data/", "type": "bind", "source": "/run/v",
                            "options": ["rbind", "ro", "nosuid", "rslave"]}, 0)
    assert m.destination == "/data" and m.bind
    assert m.flags & sysutil.MS_BIND and m.flags & sysutil.MS_REC
    assert m.remount_flags == sysutil.MS_REMOUNT | sysutil.MS_BIND | sysutil.MS_RDONLY \
        | sysutil.MS_NOSUID
    assert m.propagation == sysutil.MS_SLAVE | sysutil.MS_REC
    plain = mounts.parse_mount({"destination": "/d", "type": "bind", "source": "/s",
                                "options": ["rbind"]}, 0)
    assert plain.remount_flags == 0


def test_fs_mount_data_and_cgroup() -> None:
    m = mounts.parse_mount({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}, 0)
    assert (m.fstype, m.data, m.bind) == ("tmpfs", "mode=755,size=65536k", False)
    assert m.flags == sysutil.MS_NOSUID | sysutil.MS_STRICTATIME
    cg = mounts.parse_mount({"destination": "/sys/fs/cgroup", "type": "cgroup",
                             "source": "cgroup", "options": ["ro", "nosuid"]}, 3)
    assert cg.cgroup and cg.fstype == "cgroup2" and cg.flags & sysutil.MS_RDONLY


@pytest.mark.parametrize(("entry", "match"), [
    ({"destination": "rel", "type": "tmpfs"}, r"mounts\[2\]\.destination"),
    ({"destination": "/x", "type": "bind", "source": "rel"}, r"mounts\[2\]\.source"),
    ({"destination": "/x", "source": "none"}, r"mounts\[2\]\.type"),
    ({"destination": "/x", "type": "tmpfs", "options": ["remount"]}, r"remount"),
    ({"destination": "/x", "type": "bind", "source": "/s", "options": ["rro"]}, r"'rro'"),
])
def test_mount_errors(entry: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        mounts.parse_mount(entry, 2)


def test_secure_join_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "abs").symlink_to("/etc")
    (root / "up").symlink_to("../../../../..")
    (root / "etc" / "rel").symlink_to("../etc")
    r = str(root)
    assert mounts.secure_join(r, "/abs/passwd") == f"{r}/etc/passwd"
    assert mounts.secure_join(r, "/up/x") == f"{r}/x"
    assert mounts.secure_join(r, "/../../etc/./rel/y") == f"{r}/etc/y"
    assert mounts.secure_join(r, "/new/dir") == f"{r}/new/dir"
    (root / "loop").symlink_to("loop")
    with pytest.raises(OSError, match="symbolic links"):
        mounts.secure_join(r, "/loop")


# -- cgroup -------------------------------------------------------------------------------


def test_resource_writes() -> None:
    res = {"memory": {"limit": 64 << 20, "swap": 96 << 20, "reservation": 1 << 20},
           "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0"},
           "pids": {"limit": 100},
           "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
           "blockIO": {"weight": 500},
           "unified": {"memory.high": "max"}}
    w = dict(cgroup.resource_writes(res))
    assert w == {"memory.max": str(64 << 20), "memory.low": str(1 << 20),
                 "memory.swap.max": str(32 << 20), "cpu.weight": "39",
                 "cpu.max": "50000 100000", "cpuset.cpus": "0", "pids.max": "100",
                 "hugetlb.2MB.max": "0", "io.weight": "default 4950",
                 "memory.high": "max"}
    assert cgroup.resource_writes({"cpu": {"quota": -1}}) == [("cpu.max", "max 100000")]
    assert cgroup.resource_writes({"memory": {"limit": -1, "swap": -1}}) == \
        [("memory.max", "max"), ("memory.swap.max", "max")]
    assert cgroup.shares_to_weight(2) == 1 and cgroup.shares_to_weight(262144) == 10000


@pytest.mark.parametrize(("res", "match"), [
    ({"memory": {"swappiness": 10}}, r"memory\.swappiness"),
    ({"memory": {"limit": 100, "swap": 50}}, r"memory\.swap"),
    ({"cpu": {"realtimeRuntime": 5}}, r"cpu\.realtimeRuntime"),
    ({"rdma": {"mlx": {}}}, r"resources\.rdma"),
    ({"unified": {"../x": "1"}}, r"unified"),
    ({"whatever": {}}, r"resources\.whatever"),
])
def test_resource_refusals(res: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        cgroup.resource_writes(res)


# -- devices ------------------------------------------------------------------------------


def test_device_rules_last_match_wins() -> None:
    rules = devices.parse_rules([
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
        {"allow": True, "type": "b", "major": 8, "access": "r"},
        {"allow": False, "type": "b", "major": 8, "minor": 1, "access": "w"},
    ])
    C, B = devices.DEV_CHAR, devices.DEV_BLOCK
    R, W, M = devices.ACC_READ, devices.ACC_WRITE, devices.ACC_MKNOD
    ev = devices.evaluate
    assert ev(rules, C, 1, 3, R | W)
    assert not ev(rules, C, 1, 3, M)
    assert not ev(rules, C, 1, 5, R)
    assert ev(rules, B, 8, 0, R) and not ev(rules, B, 8, 0, W)
    assert ev(rules, B, 8, 1, R) and not ev(rules, B, 8, 1, R | W)
    assert not ev(rules, B, 9, 0, R)


def test_effective_rules_add_defaults_and_nodes() -> None:
    nodes = devices.parse_nodes([{"path": "/dev/fuse", "type": "c", "major": 10,
                                  "minor": 229}])
    assert nodes[0] == devices.Node("/dev/fuse", stat.S_IFCHR, 10, 229, 0o666, 0, 0)
    assert devices.effective_rules([], nodes) == []  # no rule: no program
    rules = devices.effective_rules(devices.parse_rules([{"allow": False}]), nodes)
    assert devices.evaluate(rules, devices.DEV_CHAR, 10, 229, devices.ACC_MKNOD)
    assert devices.evaluate(rules, devices.DEV_CHAR, 136, 4, devices.ACC_READ)
    assert not devices.evaluate(rules, devices.DEV_BLOCK, 8, 0, devices.ACC_MKNOD)


def _run_bpf(prog: bytes, kind: int, major: int, minor: int, access: int) -> int:
    """A tiny interpreter of the instructions the assembler emits."""
    regs = [0] * 11
    ctx = ((access << 16) | kind, major, minor)
    insns = [struct.unpack("<BBhi", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    pc = 0
    while True:
        code, regsb, off, imm = insns[pc]
        dst, src = regsb & 0xF, regsb >> 4
        pc += 1
        if code == 0x61:
            regs[dst] = ctx[off // 4]
        elif code == 0xBF:
            regs[dst] = regs[src]
        elif code == 0xB7:
            regs[dst] = imm
        elif code == 0x57:
            regs[dst] &= imm
        elif code == 0x77:
            regs[dst] >>= imm
        elif code == 0x55:
            pc += off if regs[dst] != imm else 0
        elif code == 0x15:
            pc += off if regs[dst] == imm else 0
        elif code == 0x45:
            pc += off if regs[dst] & imm else 0
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unknown opcode {code:#x}")


def test_bpf_program_agrees_with_the_rules() -> None:
    rules = devices.effective_rules(devices.parse_rules([
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "access": "r"},
        {"allow": False, "type": "b", "major": 8, "minor": 1, "access": "w"},
        {"allow": True, "type": "c", "major": 4, "access": "rw"},
    ]), [])
    prog = devices.program(rules)
    assert len(prog) % 8 == 0
    for kind in (devices.DEV_CHAR, devices.DEV_BLOCK):
        for major, minor in ((1, 3), (1, 4), (8, 0), (8, 1), (4, 7), (136, 2), (5, 2)):
            for access in range(1, 8):
                want = devices.evaluate(rules, kind, major, minor, access)
                assert _run_bpf(prog, kind, major, minor, access) == int(want), \
                    (kind, major, minor, access)


def test_bpf_program_stops_after_a_catch_all() -> None:
    prog = devices.program([devices.Rule(True, 0, -1, -1, 7),
                            devices.Rule(False, devices.DEV_CHAR, 1, 3, 7)])
    # header (6), the deny block (3 tests + 2), the allow-all block (2): no dead code
    assert len(prog) // 8 == 6 + 5 + 2


# -- seccomp ------------------------------------------------------------------------------


def test_seccomp_profile_parsing() -> None:
    p = seccomp.parse({
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        ]})
    assert p is not None
    assert p.default_action == seccomp.ACT_ERRNO | 38
    assert p.architectures == ("x86_64", "x86")
    assert p.flags == 4
    assert [r.name for r in p.rules] == ["read", "write", "personality", "mkdir"]
    assert p.rules[2].args == (seccomp.Arg(0, 4, 8),)
    assert p.rules[3].action == seccomp.ACT_ERRNO | 13
    assert seccomp.parse(None) is None


def test_seccomp_same_argument_twice_is_or() -> None:
    rule = seccomp.SyscallRule("clone", seccomp.ACT_ALLOW, (
        seccomp.Arg(0, 7, 0x10000000, 0), seccomp.Arg(0, 7, 0x20000000, 0)))
    assert seccomp.rule_groups(rule) == [(rule.args[0],), (rule.args[1],)]
    both = seccomp.SyscallRule("x", seccomp.ACT_ALLOW, (seccomp.Arg(0, 4, 1),
                                                         seccomp.Arg(1, 4, 2)))
    assert seccomp.rule_groups(both) == [both.args]


@pytest.mark.parametrize(("profile", "match"), [
    ({"defaultAction": "SCMP_ACT_FLY"}, r"defaultAction.*SCMP_ACT_FLY"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]},
     r"flags"),
    ({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["x"], "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}]}]},
     r"syscalls\[0\]\.args\[0\]\.op"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"],
                                                       "action": "SCMP_ACT_NOTIFY"}]},
     r"syscalls\[0\]\.action: SCMP_ACT_NOTIFY"),
])
def test_seccomp_refusals(profile: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        seccomp.parse(profile)


@pytest.mark.skipif(not os.path.exists("/usr/lib/x86_64-linux-gnu/libseccomp.so.2"),
                    reason="no libseccomp")
def test_seccomp_compiles_and_a_denied_syscall_gets_eperm() -> None:
    p = seccomp.parse({"defaultAction": "SCMP_ACT_ALLOW",
                       "syscalls": [{"names": ["mkdir", "mkdirat", "no_such_call"],
                                     "action": "SCMP_ACT_ERRNO"}]})
    assert p is not None
    prog = seccomp.compile_bpf(p)
    assert prog and len(prog) % 8 == 0
    # Load it in a throw-away process (no_new_privs first, as an unprivileged one would).
    code = (
        "import os, sys\n"
        "from pykata.guest.engine import syscalls as sc\n"
        "sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)\n"
        f"sc.seccomp_load({prog!r}, 0)\n"
        "try:\n    os.mkdir(sys.argv[1])\nexcept PermissionError:\n    print('EPERM')\n")
    out = subprocess.run([sys.executable, "-c", code, "/tmp/never-made-by-seccomp-test"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "EPERM", out.stderr


# -- child helpers ------------------------------------------------------------------------


def test_lookup_in_path(tmp_path: Path) -> None:
    exe = tmp_path / "tool"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert lookup("tool", {"PATH": f"/nonexistent:{tmp_path}"}) == str(exe)
    assert lookup(str(exe), {}) == str(exe)
    with pytest.raises(OSError, match="not found in \\$PATH"):
        lookup("tool", {"PATH": "/nonexistent"})
    with pytest.raises(OSError, match="`/no/such` not found"):
        lookup("/no/such", {})


def test_report_error_format() -> None:
    assert report_error(b"E" + struct.pack("<i", 2) + b"mount /x: gone") == (2, "mount /x: gone")
    assert report_error(b"") is None
    assert report_error(b"R") is None


def test_engine_choice() -> None:
    from pykata import wire
    from pykata.guest.agent import choose_engine, parse_args

    assert choose_engine(None, {}, init_mode=True) == "native"
    assert choose_engine(None, {}, init_mode=False) == "crun"
    assert choose_engine(None, {wire.AGENT_ENGINE_PARAM: "crun"}, init_mode=True) == "crun"
    assert choose_engine("native", {wire.AGENT_ENGINE_PARAM: "crun"}, init_mode=True) == "native"
    assert choose_engine(None, {wire.AGENT_ENGINE_PARAM: "bogus"}, init_mode=True) == "native"
    assert parse_args(["--engine", "native"]).engine == "native"
    assert wire.AGENT_ENGINE_PARAM == "pykata.agent.engine"


# -- hooks the engine runs (createContainer, startContainer) --------------------------------


def test_plan_of_guest_hooks_and_their_state() -> None:
    spec = guest_spec()
    spec["ociVersion"] = "1.0.2"
    spec["annotations"] = {"a": "b", wire.HOOK_STATE_ANNOTATION: json.dumps(
        {"bundle": "/host/bundle", "ociVersion": "1.3.0"})}
    spec["hooks"] = {
        "createContainer": [{"path": "/bin/cc", "args": ["cc", "-v"], "env": ["A=1", "B=x=y"],
                             "timeout": 7}],
        "startContainer": [{"path": "/usr/bin/../bin/sc"}]}
    p = plan.plan(spec, container_id="c1")
    assert p.hooks == (
        plan.HookPlan("createContainer", "hooks.createContainer[0]", "/bin/cc", ("cc", "-v"),
                      (("A", "1"), ("B", "x=y")), 7.0),
        plan.HookPlan("startContainer", "hooks.startContainer[0]", "/usr/bin/sc",
                      ("/usr/bin/../bin/sc",), (), plan.HOOK_TIMEOUT))
    # The host's bundle and version; the annotation is the host's note, not the spec's.
    assert p.hook_state == {"ociVersion": "1.3.0", "id": "c1", "bundle": "/host/bundle",
                            "annotations": {"a": "b"}}
    assert p.annotations == {"a": "b"}
    assert plan.hook_timeout(p, "createContainer") == 7.0
    assert plan.hook_timeout(p, "startContainer") == plan.HOOK_TIMEOUT
    assert plan.plan(guest_spec()).hooks == ()


@pytest.mark.parametrize("hooks,match", [
    ({"prestart": [{"path": "/bin/p"}]}, r"hooks\.prestart \(the host runs it\)"),
    ({"createContainer": [{"path": "bin/cc"}]}, r"hooks\.createContainer\[0\]\.path"),
    ({"startContainer": [{"path": "/x", "timeout": -1}]}, r"hooks\.startContainer\[0\]\.timeout"),
    ({"startContainer": [{"path": "/x", "args": "a"}]}, r"hooks\.startContainer\[0\]\.args"),
    ({"startContainer": [{"path": "/x", "when": {}}]}, r"hooks\.startContainer\[0\]\.when"),
])
def test_hook_refusals_name_the_field(hooks: dict[str, Any], match: str) -> None:
    spec = guest_spec()
    spec["hooks"] = hooks
    with pytest.raises(InvalidArgument, match=match):
        plan.plan(spec)


def test_run_hook_state_args_exact_env_cwd_and_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = (f"cat > {out}.state; tr '\\0' ' ' < /proc/$$/cmdline > {out}.args;"
              f" tr '\\0' ' ' < /proc/$$/environ > {out}.env; pwd > {out}.cwd;"
              " echo to-stdout; echo to-stderr >&2; exit 3")
    status, text = child.run_hook("/bin/sh", ("hookname", "-c", script, "x"), {"A": "1"},
                                  b'{"id": "c1"}', str(tmp_path), 30)
    assert os.waitstatus_to_exitcode(status) == 3
    assert text == b"to-stdout\nto-stderr\n"
    assert Path(f"{out}.args").read_text() == f"hookname -c {script} x "  # argv[0] as given
    assert Path(f"{out}.env").read_text() == "A=1 "  # exactly its env
    assert Path(f"{out}.cwd").read_text() == f"{tmp_path}\n"
    assert Path(f"{out}.state").read_text() == '{"id": "c1"}'


def test_run_hook_timeout_kills_its_session_and_big_unread_state(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        child.run_hook("/bin/sh", ("sh", "-c", "sleep 60 & sleep 60"), {}, b"{}", "/", 1)
    assert time.monotonic() - t0 < 30
    # A hook that does not read a state larger than a pipe holds: no hang, no SIGPIPE.
    status, _ = child.run_hook("/bin/sh", ("sh", "-c", "exit 0"), {}, b"x" * (1 << 20), "/",
                               30)
    assert status == 0
    # Output is capped to its tail.
    status, text = child.run_hook("/bin/sh", ("sh", "-c", "yes | head -c 100000; echo END"),
                                  {}, b"", "/", 30)
    assert len(text) == child.HOOK_OUTPUT_CAP and text.endswith(b"END\n")


def test_run_hooks_resolve_in_the_rootfs_and_fail_naming_the_hook(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    real = root / "bin" / "hook"
    log = tmp_path / "log"
    real.write_text(f"#!/bin/sh\ncat > {log}.state; echo $0 $(pwd) > {log}\n")
    real.chmod(0o755)
    (root / "usr").mkdir()
    (root / "usr" / "hook").symlink_to("/bin/hook")  # absolute: resolved inside the rootfs
    hooks = (plan.HookPlan("createContainer", "hooks.createContainer[0]", "/usr/hook",
                           ("h0",), (), 30.0),
             plan.HookPlan("startContainer", "hooks.startContainer[0]", "/x", ("h1",), (),
                           30.0))
    state = {"ociVersion": "1.3.0", "id": "c1", "bundle": "/b", "annotations": {"k": "v"}}
    step = child._Step()
    child.run_hooks(hooks, "createContainer", state, str(root), step)
    assert json.loads(Path(f"{log}.state").read_text()) == {
        "ociVersion": "1.3.0", "id": "c1", "status": "creating", "pid": os.getpid(),
        "bundle": "/b", "annotations": {"k": "v"}}
    # The link resolved inside the rootfs (the script's $0), run from the rootfs.
    assert log.read_text().split() == [str(real), str(root)]
    with pytest.raises(OSError, match="not a file in the container's root filesystem"):
        child.run_hooks(hooks, "startContainer", state, str(root), step)
    assert step.name == "hooks.startContainer[0] (/x)"
    failing = (plan.HookPlan("startContainer", "hooks.startContainer[0]", "/bin/sh",
                             ("sh", "-c", "echo no  way; exit 4"), (), 30.0),)
    with pytest.raises(OSError, match=r"^\[Errno 5\] exited with status 4: no way$"):
        child.run_hooks(failing, "startContainer", state, "", step)


def test_crun_spec_rewrites_create_container_paths_into_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_text("")
    (root / "bin" / "sh").symlink_to("/bin/busybox")
    spec = guest_spec()
    spec["root"]["path"] = str(root)
    spec["annotations"] = {"a": "b", wire.HOOK_STATE_ANNOTATION: "{}"}
    spec["hooks"] = {"createContainer": [{"path": "/bin/sh"},
                                         {"path": "/bin/sh", "args": ["sh", "-c", "x"]}],
                     "startContainer": [{"path": "/bin/sh"}]}
    out = crun_spec(spec, "c1")
    assert out["hooks"]["createContainer"] == [
        {"path": str(root / "bin" / "busybox"), "args": ["/bin/sh"]},
        {"path": str(root / "bin" / "busybox"), "args": ["sh", "-c", "x"]}]
    assert out["hooks"]["startContainer"] == [{"path": "/bin/sh"}]  # resolved by crun, inside
    assert out["annotations"] == {"a": "b"}
    assert spec["hooks"]["createContainer"][0] == {"path": "/bin/sh"}  # not modified
    spec["hooks"]["startContainer"] = [{"path": "/no/hook"}]
    with pytest.raises(InvalidArgument, match=r"cannot create container c1:"
                                              r" hooks\.startContainer\[0\] \(/no/hook\): not a"
                                              r" file in the container's root filesystem"):
        crun_spec(spec, "c1")
    assert "hooks" not in crun_spec(guest_spec(), "c1")


def test_crun_error_unwraps_a_hook_failure_logged_by_its_child() -> None:
    inner = json.dumps({"msg": "error executing hook `/r/bin/busybox` (exit code: -1)",
                        "level": "error", "time": "t"})
    log = json.dumps({"msg": inner, "level": "error", "time": "t"}) + "\n"
    assert crun_error(log, b"", 1) == "error executing hook `/r/bin/busybox` (exit code: -1)"
    assert crun_error("", inner.encode() + b"\n", 1) == \
        "error executing hook `/r/bin/busybox` (exit code: -1)"
