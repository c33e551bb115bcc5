"""Pure parts of the guest image builder (no network, no root, no apt)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pykata import errors
from pykata.guest.sysutil import parse_modules_dep
from pykata.image import agent, apt, builder, cache, rootfs, tools
from pykata.image.apt import apt_error_package, parse_kernel_depends, parse_policy
from pykata.image.cache import compute_digest, find_image
from pykata.image.elf import elf_complete, elf_info
from pykata.image.kernel import KERNEL_META, extract_vmlinux, find_lz4_vmlinux, module_load_order

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/vmw_vsock/vmw-vsock-virtio-transport.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
"""


def _deps() -> dict[str, list[str]]:
    return parse_modules_dep(MODULES_DEP.replace("\\\n", ""))


# -- modules (modules.dep read by the guest agent's own parser) -------------------------
def test_parse_modules_dep_names_and_deps() -> None:
    deps = _deps()
    assert deps["virtiofs"][0] == "kernel/fs/fuse/virtiofs.ko"
    assert deps["ext4"][0] == "kernel/fs/ext4/ext4.ko.xz"
    assert "kernel/fs/fuse/fuse.ko" in deps["virtiofs"][1:]
    assert "vmw_vsock_virtio_transport" in deps  # dashes in file names become underscores


def test_load_order_puts_dependencies_first() -> None:
    order = module_load_order(["virtiofs", "virtio_pci", "ext4", "virtio_net"], _deps(),
                              builtin=set())
    pos = {Path(p).name.split(".ko")[0]: i for i, p in enumerate(order)}
    assert pos["virtio_ring"] < pos["virtio"] < pos["virtiofs"]
    assert pos["fuse"] < pos["virtiofs"]
    assert pos["virtio_pci_modern_dev"] < pos["virtio_pci"]
    assert pos["jbd2"] < pos["ext4"] and pos["mbcache"] < pos["ext4"]
    assert pos["failover"] < pos["net_failover"] < pos["virtio_net"]
    assert len(order) == len(set(order)) == 12


def test_load_order_keeps_the_requested_order_otherwise() -> None:
    order = module_load_order(["fuse", "virtio_ring", "vsock"], _deps(), builtin=set())
    assert [Path(p).stem for p in order] == ["fuse", "virtio_ring", "vsock"]


def test_builtin_and_unknown_modules_are_skipped() -> None:
    assert module_load_order(["fuse", "no_such_module"], _deps(), builtin={"fuse"}) == []
    order = module_load_order(["ext4"], _deps(), builtin={"jbd2", "mbcache"})
    assert order == ["kernel/fs/ext4/ext4.ko.xz"]


def test_module_names_accept_dashes() -> None:
    order = module_load_order(["vmw-vsock-virtio-transport"], _deps(), builtin=set())
    assert order == ["kernel/net/vmw_vsock/vsock.ko",
                     "kernel/net/vmw_vsock/vmw-vsock-virtio-transport.ko"]


# -- apt output ------------------------------------------------------------------------
POLICY = """\
crun:
  Installed: 1.8.1-1+deb12u1
  Candidate: 1.8.1-1+deb12u1
  Version table:
 *** 1.8.1-1+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
busybox-static:
  Installed: (none)
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
     1:1.35.0-4+deb12u1+b1 500
ghost:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def test_parse_policy() -> None:
    assert parse_policy(POLICY) == {"crun": "1.8.1-1+deb12u1",
                                    "busybox-static": "1:1.35.0-4+deb12u1+b1"}


def test_parse_kernel_depends() -> None:
    text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert parse_kernel_depends(text) == "linux-image-6.1.0-56-cloud-amd64"
    assert parse_kernel_depends("linux-image-cloud-amd64\n") is None


def test_apt_error_names_the_package() -> None:
    pkgs = ["python3.11-minimal", "libpython3.11-minimal", "crun"]
    assert apt_error_package("E: Unable to locate package crun", pkgs) == "crun"
    assert apt_error_package("E: Version '9' for 'python3.11-minimal' was not found",
                             pkgs) == "python3.11-minimal"
    assert apt_error_package("E: Failed to fetch http://x/libpython3.11-minimal_3.11_amd64.deb",
                             pkgs) != "crun"
    assert apt_error_package("E: network down", ["a", "b"]) == "a, b"
    msg = str(apt.unavailable("crun", "E: Unable to locate package crun"))
    assert msg == ("cannot download Debian package 'crun': E: Unable to locate package crun"
                   " (run 'apt-get update' first?)")


def test_resolution_is_cached_until_apt_state_changes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    state = {"fp": "one"}

    def fake_kernel(meta: str) -> str:
        assert meta == KERNEL_META
        calls.append("depends")
        return "linux-image-6.1.0-1-cloud-amd64"

    def fake_versions(pkgs: list[str]) -> dict[str, str]:
        calls.append("policy")
        return {p: "1.0" for p in pkgs}

    monkeypatch.setattr(apt, "kernel_package", fake_kernel)
    monkeypatch.setattr(apt, "candidate_versions", fake_versions)
    monkeypatch.setattr(apt, "apt_state_fingerprint", lambda: state["fp"])

    def resolve() -> tuple[str, dict[str, str]]:
        return apt.resolve_packages(tmp_path, KERNEL_META, rootfs.ROOTFS_PACKAGES)

    first = resolve()
    assert calls == ["depends", "policy"]
    assert first[0] == "linux-image-6.1.0-1-cloud-amd64"
    assert set(first[1]) == {*rootfs.ROOTFS_PACKAGES, first[0]}
    assert resolve() == first
    assert calls == ["depends", "policy"]  # no apt the second time
    state["fp"] = "two"
    resolve()
    assert calls == ["depends", "policy"] * 2


def test_image_digest_resolves_through_the_cache(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_versions(pkgs: list[str]) -> dict[str, str]:
        calls.append("policy")
        return {p: "1.0" for p in pkgs}

    monkeypatch.setattr(apt, "kernel_package", lambda meta: "linux-image-6.1.0-1-cloud-amd64")
    monkeypatch.setattr(apt, "candidate_versions", fake_versions)
    monkeypatch.setattr(apt, "apt_state_fingerprint", lambda: "fp")
    digest, kpkg, versions = builder.image_digest(tmp_path)
    assert (tmp_path / "cache/apt-resolution.json").is_file()
    assert kpkg == "linux-image-6.1.0-1-cloud-amd64" and versions[kpkg] == "1.0"
    assert digest == compute_digest(versions, agent.agent_sources(), agent.protobuf_version())
    assert builder.image_digest(tmp_path) == (digest, kpkg, versions)
    assert calls == ["policy"]


# -- digest ----------------------------------------------------------------------------
def test_digest_changes_with_each_input() -> None:
    import pykata

    root = Path(pykata.__file__).parent
    src = [root / "errors.py"]
    base = compute_digest({"crun": "1.8.1-1"}, src, "7.0")
    assert base == compute_digest({"crun": "1.8.1-1"}, src, "7.0")
    assert base != compute_digest({"crun": "1.8.1-2"}, src, "7.0")
    assert base != compute_digest({"crun": "1.8.1-1", "libc6": "2.36"}, src, "7.0")
    assert base != compute_digest({"crun": "1.8.1-1"}, src, "7.1")
    assert base != compute_digest({"crun": "1.8.1-1"}, [*src, root / "config.py"], "7.0")
    assert base != compute_digest({"crun": "1.8.1-1"}, src, "7.0", modules=["fuse"])


def test_digest_covers_every_stage_of_the_builder() -> None:
    names = {p.name for p in cache.recipe_sources()}
    assert {"builder.py", "apt.py", "kernel.py", "rootfs.py", "agent.py", "initrd.py",
            "cache.py", "elf.py", "tools.py"} <= names


def test_digest_follows_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stage = tmp_path / "kernel.py"
    stage.write_text("# one recipe\n")
    monkeypatch.setattr(cache, "recipe_sources", lambda: [stage])
    one = compute_digest({}, [], "7.0")
    stage.write_text("# another recipe\n")
    assert compute_digest({}, [], "7.0") != one


def test_digest_follows_file_contents(tmp_path: Path) -> None:
    f = tmp_path / "agent.py"
    f.write_text("print(1)\n")
    one = compute_digest({}, [f], "7.0")
    f.write_text("print(2)\n")
    assert compute_digest({}, [f], "7.0") != one


def test_agent_sources_cover_the_agent() -> None:
    root = agent.pykata_root()
    rel = {p.relative_to(root).as_posix() for p in agent.agent_sources()}
    assert {"__init__.py", "errors.py", "ttrpc/__init__.py", "protos/agent_pb2.py",
            "guest/agent.py"} <= rel
    assert not any("__pycache__" in n or n.endswith(".pyi") for n in rel)


# -- kernel ----------------------------------------------------------------------------
def _fake_elf(body: bytes = b"\x90" * 200) -> bytes:
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    shoff = 64 + len(body)
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HH", head, 0x3A, 64, 2)
    return bytes(head) + body + b"\0" * 128


def test_lz4_magic_search() -> None:
    blob = b"\x00" * 100 + b"\x02\x21\x4c\x18" + b"payload" + b"\x02\x21\x4c\x18"
    assert find_lz4_vmlinux(blob) == 100
    assert find_lz4_vmlinux(blob, 101) == 111
    assert find_lz4_vmlinux(b"no magic here") == -1


def test_elf_complete() -> None:
    elf = _fake_elf()
    assert elf_complete(elf)
    assert not elf_complete(elf[:-1])  # section headers cut off
    assert not elf_complete(b"MZ" + elf[2:])


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 not installed")
def test_extract_vmlinux_from_a_synthetic_bzimage() -> None:
    elf = _fake_elf(bytes(range(256)) * 64)
    packed = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True,
                            check=True).stdout
    assert packed.startswith(b"\x02\x21\x4c\x18")
    # A false magic first, then the real stream, then trailing bytes (as in a bzImage).
    bz = b"MZ" + b"\0" * 500 + b"\x02\x21\x4c\x18garbage" + b"\0" * 64 + packed + b"\xff" * 40
    assert extract_vmlinux(bz) == elf
    assert extract_vmlinux(b"MZ" + b"\0" * 100) is None


def test_elf_info_of_this_python() -> None:
    exe = Path(sys.executable).resolve()
    info = elf_info(exe.read_bytes())
    if info is None:
        pytest.skip("not an x86_64/aarch64 ELF64 python")
    assert info.interp is not None and "ld-linux" in info.interp
    assert "libc.so.6" in info.needed
    assert elf_info(b"#!/bin/sh\n") is None


def test_resolve_in_keeps_absolute_links_inside(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/x86_64-linux-gnu/ld.so").write_text("x")
    (tmp_path / "lib").symlink_to("usr/lib")
    (tmp_path / "usr/lib64").mkdir()
    (tmp_path / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld.so")
    (tmp_path / "lib64").symlink_to("usr/lib64")
    got = rootfs.resolve_in(tmp_path, "/lib64/ld-linux-x86-64.so.2")
    assert got == tmp_path / "usr/lib/x86_64-linux-gnu/ld.so"


def test_merge_usr(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_text("bb")
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib/x86_64-linux-gnu/libc.so.6").write_text("c")
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/x86_64-linux-gnu/libz.so.1").write_text("z")
    rootfs.merge_usr(tmp_path)
    for top in ("bin", "sbin", "lib", "lib64"):
        assert (tmp_path / top).is_symlink()
    assert (tmp_path / "usr/bin/busybox").read_text() == "bb"
    assert (tmp_path / "lib/x86_64-linux-gnu/libc.so.6").read_text() == "c"
    assert (tmp_path / "usr/lib/x86_64-linux-gnu/libz.so.1").exists()


# -- output ----------------------------------------------------------------------------
def test_find_image(tmp_path: Path) -> None:
    assert find_image(tmp_path) is None
    d = tmp_path / "images/abc"
    d.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img"):
        (d / name).write_bytes(b"x" * 10)
    (d / "manifest.json").write_text(json.dumps(
        {"digest": "abc", "kernel_release": "6.1.0-56-cloud-amd64", "initrd_bytes": 10}))
    (tmp_path / "current").symlink_to("images/abc")
    for name in ("vmlinuz", "vmlinux", "initrd.img", "manifest.json"):
        (tmp_path / name).symlink_to(f"current/{name}")
    art = find_image(tmp_path)
    assert art is not None
    assert art.digest == "abc" and art.kernel_release == "6.1.0-56-cloud-amd64"
    assert art.vmlinux is None  # the link dangles: no uncompressed kernel in this build
    assert art.kernel == tmp_path / "vmlinuz" and art.size_bytes == 10


def test_install_switches_current_atomically(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for digest in ("one", "two"):
        out = images / f".new-{digest}"
        out.mkdir(parents=True)
        for name in ("vmlinuz", "initrd.img", "vmlinux"):
            (out / name).write_text(digest)
        (out / "manifest.json").write_text(json.dumps(
            {"digest": digest, "kernel_release": "r", "initrd_bytes": 3}))
        cache.install(tmp_path, out, digest)
        art = find_image(tmp_path)
        assert art is not None and art.digest == digest
        assert art.initrd.read_text() == digest
    assert (tmp_path / "current").readlink() == Path("images/two")
    cache.prune(tmp_path, "two", {})
    assert [p.name for p in images.iterdir()] == ["two"]


def test_errors_are_pykata_errors() -> None:
    with pytest.raises(errors.FailedPrecondition, match="not installed"):
        tools.run(["/nonexistent/apt-cache", "policy"], "apt-cache policy")
    with pytest.raises(errors.Unavailable, match="apt-cache policy: E: boom"):
        tools.run([sys.executable, "-c", "import sys; print('E: boom', file=sys.stderr);"
                      "sys.exit(100)"], "apt-cache policy")


def test_install_modules_ships_the_closure_in_load_order(tmp_path: Path) -> None:
    from pykata.image.kernel import install_modules

    release = "6.1.0-1-cloud-amd64"
    mdir = tmp_path / "kernel/lib/modules" / release
    text = MODULES_DEP.replace("\\\n", "")
    for line in text.splitlines():
        rel = line.partition(":")[0]
        (mdir / rel).parent.mkdir(parents=True, exist_ok=True)
        data = f"module {rel}".encode()
        if rel.endswith(".xz"):
            import lzma

            data = lzma.compress(data)
        (mdir / rel).write_bytes(data)
    (mdir / "modules.dep").write_text(text)
    (mdir / "modules.builtin").write_text("kernel/fs/mbcache.ko\n")
    root = tmp_path / "root"
    steps: list[str] = []
    shipped = install_modules(tmp_path / "kernel", root, release, steps.append)
    loads = shipped.boot
    assert shipped.on_demand == [] and shipped.on_demand_bytes == 0  # none in this kernel
    base = f"lib/modules/{release}"
    assert loads[:2] == [f"{base}/kernel/drivers/virtio/virtio_ring.ko",
                         f"{base}/kernel/drivers/virtio/virtio.ko"]
    assert f"{base}/kernel/fs/mbcache.ko" not in loads  # built in
    assert loads.index(f"{base}/kernel/fs/jbd2/jbd2.ko") < loads.index(
        f"{base}/kernel/fs/ext4/ext4.ko")  # decompressed
    assert (root / "usr" / base / "kernel/fs/ext4/ext4.ko").read_bytes() == (
        b"module kernel/fs/ext4/ext4.ko.xz")
    assert (root / "etc/pykata/modules").read_text().splitlines() == loads
    dep = parse_modules_dep((root / "usr" / base / "modules.dep").read_text())
    # mbcache is built in: no file to load, so not a dependency to the guest.
    assert dep["ext4"] == ["kernel/fs/ext4/ext4.ko", "kernel/fs/jbd2/jbd2.ko"]
    assert (root / "usr" / base / "modules.builtin").read_text() == "kernel/fs/mbcache.ko\n"
    assert steps == [f"{len(loads)} kernel modules at boot, 0 on demand (0.0 MiB)"]
