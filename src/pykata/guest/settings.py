"""The agent's settings: where it keeps things, which container engine runs
containers, how it calls crun, what it may change in the guest. Made once by
``agent.main`` from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pykata import wire


@dataclass
class Settings:
    """Where the agent keeps things, which engine runs containers (and how crun is
    called), what it may change."""

    state_dir: Path = Path(wire.GUEST_STATE_DIR)
    engine: str = "native"  # "native" (pykata.guest.engine) or "crun"
    crun: str = "/usr/bin/crun"
    crun_root: Path | None = None
    cgroup_parent: str = "pykata"
    cgroup_root: Path = Path("/sys/fs/cgroup")
    no_pivot: bool = False
    crun_timeout: float = 60.0
    init_mode: bool = False  # PID 1 of the VM (else: a development agent on a host)
    manage_network: bool = False  # interfaces, routes, ARP (always as PID 1)

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / "containers"

    @property
    def crun_state(self) -> Path:
        return self.crun_root or self.state_dir / "crun"

    @property
    def console_sockets_dir(self) -> Path:
        return self.state_dir / "cs"
