"""Persisted sandbox state under <state_dir>/sbs/<namespace>/<id>/state.json.

A later process (shim ``delete`` after the shim died, ``pykata-runtime``) reads
it to find and clean up what a sandbox left running or mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pykata.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from pykata.utils.process import ProcRef

STATE_FILE = "state.json"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_id(kind: str, value: str) -> None:
    """Sandbox, container and namespace ids name directories: 1-128 of a safe set."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidArgument(
            f"invalid {kind} id {value!r}: use 1-128 letters, digits, '_', '.', '-'"
        )


def ref_json(ref: ProcRef | None) -> dict[str, int] | None:
    """A process as a record keeps it (pid and start time), None for none."""
    return ref.to_json() if ref is not None else None


@dataclass
class ContainerRecord:
    id: str
    bundle: str
    state: str
    rootfs_mounted: list[str] = field(default_factory=list)  # host mount points we made


@dataclass
class SandboxRecord:
    id: str
    state: str
    dir: str
    vmm: dict[str, int] | None = None  # ProcRef json of the VM's process (VMM)
    virtiofsd: dict[str, int] | None = None
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    namespace: str = "default"
    owner: dict[str, int] | None = None  # ProcRef json of the process running it
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        d = Path(self.dir)
        data = asdict(self)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, d / STATE_FILE)

    @classmethod
    def load(cls, sandbox_dir: Path) -> SandboxRecord:
        try:
            data = json.loads((sandbox_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            raise NotFound(f"no sandbox state in {sandbox_dir}") from None
        containers = {k: ContainerRecord(**v) for k, v in data.pop("containers", {}).items()}
        if "qemu" in data:  # written before the VMM was driver-neutral: the same ProcRef
            data.setdefault("vmm", data.pop("qemu"))
        return cls(containers=containers, **data)


def sandboxes_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "sbs"


DEFAULT_NAMESPACE = "default"


def sandbox_dir(state_dir: str | Path, sandbox_id: str,
                namespace: str = DEFAULT_NAMESPACE) -> Path:
    """Where one sandbox keeps its state: keyed by containerd namespace, so the
    same id in two namespaces are two sandboxes. The configured state directory
    is resolved once (it is the host's); nothing below it ever is."""
    return sandboxes_dir(os.path.realpath(state_dir)) / namespace / sandbox_id


def all_sandboxes(state_dir: str | Path) -> list[tuple[str, str]]:
    """(namespace, id) of every sandbox directory under ``state_dir``."""
    root = sandboxes_dir(os.path.realpath(state_dir))
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for ns in sorted(os.listdir(root)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                found += [(ns, sid) for sid in sorted(os.listdir(root / ns))]
    return found


def make_sandbox_dir(d: Path, sandbox_id: str) -> None:
    """Make a sandbox's directory (0700), AlreadyExists if it is there. Its
    namespace's directory goes when its last sandbox does: made again if that
    happens between the two mkdirs."""
    for attempt in range(3):
        d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
            return
        except FileExistsError:
            raise AlreadyExists(f"sandbox {sandbox_id} already exists ({d})") from None
        except FileNotFoundError:
            if attempt == 2:
                raise Unavailable(f"cannot create {d}: its parent keeps disappearing") from None
