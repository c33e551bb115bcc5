"""Helpers for pykata's own tests, benchmarks and demos: busybox root
filesystems and OCI bundles built offline, leak checks, reading output to its end."""

from pykata.testing.bundles import busybox_rootfs, default_spec, make_bundle
from pykata.testing.leaks import leftovers
from pykata.testing.streams import read_all

__all__ = ["busybox_rootfs", "default_spec", "leftovers", "make_bundle", "read_all"]
