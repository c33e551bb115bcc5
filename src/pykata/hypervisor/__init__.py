"""Hypervisors behind one contract (base.py). The runtime asks for a driver
here and never imports a driver package itself.

    driver = await make_driver(config)      # [hypervisor] driver, probed
    vm = driver.vm(spec)                    # a Hypervisor, not started

A second driver is a package next to ``qemu/`` with a ``Driver`` subclass,
listed in ``DRIVERS`` under the name of its configuration section
(``pykata.config.HypervisorConfig``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pykata.errors import InvalidArgument

if TYPE_CHECKING:
    from pykata.config import Config
    from pykata.hypervisor.base import Driver


async def _qemu(config: Config) -> Driver:
    from pykata.hypervisor.qemu.setup import QemuDriver

    return await QemuDriver.probe(config)


# [hypervisor] driver -> how that driver is set up (imported only when selected)
DRIVERS: dict[str, Callable[[Config], Awaitable[Driver]]] = {"qemu": _qemu}


async def make_driver(config: Config) -> Driver:
    """The driver ``[hypervisor] driver`` names, probed (accelerator,
    capabilities); InvalidArgument naming the key for a driver pykata lacks."""
    name = config.hypervisor.driver
    setup = DRIVERS.get(name)
    if setup is None:
        raise InvalidArgument(
            f"{config.source or 'configuration'}: [hypervisor] driver = {name!r} is not"
            f" one of {', '.join(DRIVERS)}")
    return await setup(config)
