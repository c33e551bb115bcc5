"""What a sandbox is built from: the hypervisor driver, the agent connector,
the shared tree and whether it starts virtiofsd. The defaults are the real
ones; unit tests pass fakes (``pykata.testing.fakes.fake_parts``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pykata.hypervisor.base import Driver
from pykata.runtime.container import Tree
from pykata.runtime.dial import Connector, dial_agent
from pykata.runtime.sharedtree import SharedTree


class SandboxTree(Tree, Protocol):
    """The shared tree as the sandbox uses it: made at start, torn down at stop."""

    def setup(self) -> None: ...

    def teardown(self) -> list[str]:
        """Mount points that could not be unmounted."""


@dataclass
class Parts:
    """What a sandbox is built from (see the module's docstring)."""

    driver: Driver | None = None  # None: the configured driver, probed
    connect: Connector = dial_agent
    tree: Callable[[Path], SandboxTree] = SharedTree
    virtiofsd: bool = True  # False: never start virtiofsd (shared_fs is not used)
