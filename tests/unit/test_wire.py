"""pykata.wire: the host <-> guest vocabulary, shipped in the guest image."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

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


def test_the_host_uses_the_wire() -> None:
    """No host module keeps a copy of a wire constant: they import pykata.wire."""
    copies = {"pykata.runtime.specconv": ("SANDBOX_SCOPE", "SANDBOX_NS_MARKER",
                                          "POD_SHARED_NAMESPACES", "GUEST_STORAGE_DIR",
                                          "GUEST_SANDBOX_DIR", "GUEST_SHARED_DIR"),
              "pykata.agent.client": ("AGENT_SERVICE", "HEALTH_SERVICE"),
              "pykata.hypervisor.qemu.cmdline": ("SERIAL_PORT_NAME",),
              "pykata.hypervisor.qemu.driver": ("VSOCK_PORT",)}
    for module, names in copies.items():
        mod = importlib.import_module(module)
        for name in names:
            assert getattr(mod, name) is getattr(wire, name), f"{module}.{name}"
    for module, name in (("pykata.resources.sharedfs", "SHARED_TAG"),
                         ("pykata.hypervisor.qemu.cmdline", "AGENT_PORT_NAME"),
                         ("pykata.hypervisor.qemu.cmdline", "VSOCK_PORT")):
        assert not hasattr(importlib.import_module(module), name), f"{module}.{name}"
    literal = ('"pykatashared"', '"agent.channel.0"', '"pykata.agent.v1', '"pykata.scope=')
    src = WIRE.parent
    for path in sorted(src.rglob("*.py")):
        if path == WIRE or "guest" in path.relative_to(src).parts:
            continue
        text = path.read_text()
        for lit in literal:
            assert lit not in text, f"{path.relative_to(src)} spells {lit}: import pykata.wire"


def test_vm_spec_default_tag_is_the_wire_tag() -> None:
    from pykata.hypervisor.base import VMSpec

    assert VMSpec.__dataclass_fields__["shared_fs_tag"].default == wire.SHARED_FS_TAG
