"""Helpers for pykata's own tests, benchmarks and demos: busybox root
filesystems and OCI bundles built offline, and leak checks."""

from pykata.testing.bundles import busybox_rootfs, default_spec, make_bundle
from pykata.testing.leaks import leftovers

__all__ = ["busybox_rootfs", "default_spec", "leftovers", "make_bundle"]
