"""Persisted sandbox state under <state_dir>/sbs/<id>/state.json.

A later process (shim ``delete`` after the shim died, ``pykata-runtime``) reads
it to find and clean up what a sandbox left running or mounted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pykata.errors import NotFound

STATE_FILE = "state.json"


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
    qemu: dict[str, int] | None = None  # ProcRef json
    virtiofsd: dict[str, int] | None = None
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
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
        return cls(containers=containers, **data)


def sandboxes_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "sbs"


def sandbox_dir(state_dir: str | Path, sandbox_id: str) -> Path:
    return sandboxes_dir(state_dir) / sandbox_id
