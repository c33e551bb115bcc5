"""What a sandbox may have left behind: processes, mounts, state directories."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pykata.utils.mounts import mounts_under

_NAMES = ("qemu-system", "virtiofsd", "containerd-shim-pykata", "pykata.shim")


def _processes() -> Iterator[tuple[Path, str]]:
    """(/proc/PID, command line) of every process that is still there."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield p, cmd


def processes_mentioning(needle: str, names: Iterable[str] = _NAMES) -> list[str]:
    """Processes of one of ``names`` (qemu, virtiofsd, shim) whose command line
    contains ``needle``."""
    names = tuple(names)
    return [f"{p.name}: {cmd.strip()[:160]}" for p, cmd in _processes()
            if needle in cmd and any(n in cmd for n in names)]


def leftovers(state_dir: str | Path, sandbox_id: str = "") -> list[str]:
    """Everything of pykata under ``state_dir`` (or of one sandbox) still present."""
    from pykata.runtime.state import all_sandboxes, sandbox_dir

    root = Path(os.path.realpath(state_dir))
    if sandbox_id:
        ns, _, sid = sandbox_id.rpartition("/")
        target = sandbox_dir(root, sid, ns or "default")
        needle = sid
    else:
        target, needle = root / "sbs", str(root)
    out = [f"process {p}" for p in processes_mentioning(needle)]
    if root.exists():
        out += [f"mount {m}" for m in mounts_under(target)]
    from pykata.runtime.factory import clone_memory_files

    out += [f"VM memory file {f}" for f in clone_memory_files(root, sandbox_id)]
    if sandbox_id and target.exists():
        out.append(f"state directory {target}")
    elif not sandbox_id:
        out += [f"state directory {sandbox_dir(root, sid, ns)}"
                for ns, sid in all_sandboxes(root)]
    return out


def procs_mentioning(needles: list[str]) -> list[str]:
    """Processes whose command line or cgroup paths contain one of ``needles``."""
    found = []
    for p, cmd in _processes():
        try:
            cg = (p / "cgroup").read_text()
        except OSError:
            continue
        if any(n in cmd or n in cg for n in needles):
            found.append(f"{p.name}: {cmd.strip()[:160]}")
    return found


def pod_leftovers(needles: list[str], netns: str = "") -> list[str]:
    """What a pod (named by its ids in ``needles``) left: processes, its netns,
    mounts, host cgroups."""
    left = [f"process {x}" for x in procs_mentioning(needles)]
    if netns and Path(netns).exists():
        left.append(f"netns {netns}")
    with open("/proc/mounts") as f:
        left += [f"mount {ln.split()[1]}" for ln in f if any(n in ln for n in needles)]
    left += [f"cgroup {d}" for n in needles for d in Path("/sys/fs/cgroup").glob(f"*/*/{n}")]
    return left


def _others_pods(address: str) -> set[int]:
    """Pids of the pykata shims serving another containerd than ``address``
    (``-address <socket>`` on their command line) and of everything below them:
    a healthy pod of someone else, not a leftover of ours."""
    parent: dict[int, int] = {}
    roots: list[int] = []
    mark = f"-address {address} "
    for p, cmd in _processes():
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        pid = int(p.name)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if ("pykata.shim" in cmd or "containerd-shim-pykata" in cmd) and " -address " in cmd \
                and mark not in cmd + " ":
            roots.append(pid)
    theirs = set(roots)
    for pid in parent:  # everything whose ancestry reaches one of those shims
        seen: list[int] = []
        cur = pid
        while cur > 1 and cur not in theirs and len(seen) < 64:
            seen.append(cur)
            cur = parent.get(cur, 0)
        if cur in theirs:
            theirs.update(seen)
    return theirs


def _subdirs(root: Path) -> list[Path]:
    try:
        return [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return []


def _sockets_held_by(pids: set[int]) -> set[str]:
    """Paths of the unix sockets that processes ``pids`` hold open."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    paths: set[str] = set()
    try:
        with open("/proc/net/unix") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[6] in inodes:
                    paths.add(fields[7])
    except OSError:
        pass
    return paths


def host_leftovers(state_dir: str | Path = "/run/pykata", address: str = "") -> list[str]:
    """What the shims of a containerd (default state dir) may have left: any QEMU,
    virtiofsd or pykata shim process, mounts, sandbox state, shim sockets and VM
    RAM files under ``state_dir``. With ``address`` (that containerd's socket),
    the shims of other containerds and their VMs are not counted, so a test can
    run beside other pods (an orphaned QEMU or virtiofsd still counts: no shim
    owns it); without it every such process on the host counts."""
    root = Path(state_dir)
    skip = _others_pods(address) if address else set()
    out = [f"process {p.name}: {cmd.strip()[:160]}" for p, cmd in _processes()
           if any(n in cmd for n in _NAMES) and not cmd.startswith("pgrep ")
           and int(p.name) not in skip]
    # Scoped: another configuration's state directory nested in this one (e.g.
    # /run/pykata/soak-*) and the shim sockets other containerds' shims serve
    # are theirs.
    nested = [str(d) + "/" for d in _subdirs(root) if (d / "sbs").is_dir()] if address else []
    theirs = _sockets_held_by(skip) if address else set()
    out += [f"mount {m}" for m in mounts_under(root)
            if not any(str(m).startswith(n) for n in nested)]
    from pykata.runtime.state import all_sandboxes, sandbox_dir

    out += [f"state directory {sandbox_dir(root, sid, ns)}" for ns, sid in all_sandboxes(root)]
    if (root / "s").is_dir():
        out += [f"socket {p}" for p in (root / "s").iterdir() if str(p) not in theirs]

    from pykata.runtime.factory import clone_memory_files

    out += [f"VM memory file {f}" for f in clone_memory_files(root)]
    return out
