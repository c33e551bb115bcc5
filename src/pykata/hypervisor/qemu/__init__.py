"""QEMU driver: command line (pure), accelerator probe, driver (QMP)."""

from pykata.hypervisor.qemu.driver import QemuHypervisor

__all__ = ["QemuHypervisor"]
