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


def host_leftovers(state_dir: str | Path = "/run/pykata") -> list[str]:
    """What the shims of a containerd (default state dir) may have left, on the
    whole host: any QEMU, virtiofsd or pykata shim process (for a test that owns
    the machine), mounts, sandbox state, shim sockets and VM RAM files under
    ``state_dir``."""
    root = Path(state_dir)
    out = [f"process {p.name}: {cmd.strip()[:160]}" for p, cmd in _processes()
           if any(n in cmd for n in _NAMES) and not cmd.startswith("pgrep ")]
    out += [f"mount {m}" for m in mounts_under(root)]
    from pykata.runtime.state import all_sandboxes, sandbox_dir

    out += [f"state directory {sandbox_dir(root, sid, ns)}" for ns, sid in all_sandboxes(root)]
    if (root / "s").is_dir():
        out += [f"socket {p}" for p in (root / "s").iterdir()]

    from pykata.runtime.factory import clone_memory_files

    out += [f"VM memory file {f}" for f in clone_memory_files(root)]
    return out
