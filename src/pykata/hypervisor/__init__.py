"""Hypervisors behind one contract (base.py). The runtime asks for a driver
here and never imports a driver package itself.

    driver = await make_driver(config)      # probed once per sandbox start
    vm = driver.vm(spec)                    # a Hypervisor, not started

A second driver is a package next to ``qemu/`` with a ``Driver`` subclass,
listed in ``DRIVERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykata.config import Config
    from pykata.hypervisor.base import Driver, Hypervisor, VMSpec

DRIVERS = ("qemu",)


async def make_driver(config: Config, name: str = "qemu") -> Driver:
    """The configured driver ``name``, probed."""
    if name == "qemu":
        from pykata.hypervisor.qemu.setup import QemuDriver

        return await QemuDriver.probe(config)
    from pykata.errors import InvalidArgument

    raise InvalidArgument(f"unknown hypervisor {name!r}: use one of {', '.join(DRIVERS)}")


async def make_hypervisor(config: Config, spec: VMSpec) -> Hypervisor:
    """A VM for ``spec`` from the configured driver (not started)."""
    return (await make_driver(config)).vm(spec)
