"""pykata.wire: the host <-> guest vocabulary, shipped in the guest image."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from pykata import wire
from pykata.protos import agent_pb2 as pb

WIRE = Path(wire.__file__)


def test_wire_imports_nothing_and_holds_only_constants() -> None:
    tree = ast.parse(WIRE.read_text())
    for node in tree.body:
        assert not isinstance(node, ast.Import | ast.ImportFrom), ast.unparse(node)
        assert isinstance(node, ast.Assign | ast.Expr), ast.unparse(node)
    names = [n for n in vars(wire) if n.isupper()]
    assert names
    for name in names:
        value = getattr(wire, name)
        assert isinstance(value, str | int | tuple), name


def test_service_names_are_the_protos() -> None:
    services = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert {wire.AGENT_SERVICE, wire.HEALTH_SERVICE} == services
    assert pb.DESCRIPTOR.package == wire.AGENT_PROTO_PACKAGE


def test_guest_dirs_are_below_the_state_dir() -> None:
    for d in (wire.GUEST_SHARED_DIR, wire.GUEST_STORAGE_DIR, wire.GUEST_SANDBOX_DIR):
        assert d.startswith(wire.GUEST_STATE_DIR + "/")


def test_the_guest_uses_the_wire() -> None:
    from pykata.guest import channel, settings, spec, storage

    assert (channel.SERIAL.address, channel.VSOCK.address) == (
        wire.SERIAL_PORT_NAME, str(wire.VSOCK_PORT))
    assert str(settings.Settings().state_dir) == wire.GUEST_STATE_DIR
    assert spec.SANDBOX_NS_MARKER == wire.SANDBOX_NS_MARKER
    assert storage.STORAGE_DRIVERS == wire.STORAGE_DRIVERS


# Host constants that still have their own copy: they must agree with the wire
# until they import it (then these checks pass trivially).
HOST_COPIES = [
    ("pykata.runtime.specconv", "SANDBOX_SCOPE", wire.SANDBOX_SCOPE),
    ("pykata.runtime.specconv", "SANDBOX_NS_MARKER", wire.SANDBOX_NS_MARKER),
    ("pykata.runtime.specconv", "POD_SHARED_NAMESPACES", wire.POD_SHARED_NAMESPACES),
    ("pykata.runtime.specconv", "GUEST_STORAGE_DIR", wire.GUEST_STORAGE_DIR),
    ("pykata.runtime.specconv", "GUEST_SANDBOX_DIR", wire.GUEST_SANDBOX_DIR),
    ("pykata.resources.sharedfs", "SHARED_TAG", wire.SHARED_FS_TAG),
    ("pykata.resources.sharedfs", "GUEST_SHARED_DIR", wire.GUEST_SHARED_DIR),
    ("pykata.hypervisor.qemu.cmdline", "AGENT_PORT_NAME", wire.SERIAL_PORT_NAME),
    ("pykata.hypervisor.qemu.cmdline", "VSOCK_PORT", wire.VSOCK_PORT),
    ("pykata.agent.client", "AGENT_SERVICE", wire.AGENT_SERVICE),
    ("pykata.agent.client", "HEALTH_SERVICE", wire.HEALTH_SERVICE),
]


@pytest.mark.parametrize(("module", "name", "value"), HOST_COPIES)
def test_host_copies_agree(module: str, name: str, value: object) -> None:
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        pytest.skip(f"{module}.{name} is gone (the host reads pykata.wire)")
    assert getattr(mod, name) == value


def test_vm_spec_default_tag_is_the_wire_tag() -> None:
    from pykata.hypervisor.base import VMSpec

    assert VMSpec.__dataclass_fields__["shared_fs_tag"].default == wire.SHARED_FS_TAG
