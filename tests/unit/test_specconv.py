from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from pykata.errors import InvalidArgument
from pykata.runtime.specconv import (
    GUEST_SANDBOX_DIR,
    GUEST_SPEC_VERSION,
    GUEST_STORAGE_DIR,
    MAX_SUBMOUNT_BINDS,
    SANDBOX_NS_MARKER,
    SANDBOX_SCOPE,
    BlockVolume,
    HostMount,
    HostProbe,
    PodNamespaces,
    check_namespaces,
    check_spec,
    plan,
    spec_version,
    strip_resources,
    validate,
)
from pykata.runtime.types import Storage


def base_spec() -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"]},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "h",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/data", "type": "bind", "source": "/srv/data",
             "options": ["rbind", "rw"]},
            {"destination": "/cfg", "type": "none", "source": "/etc/app.conf",
             "options": ["bind", "ro"]},
            {"destination": "/dev/kvm", "type": "bind", "source": "/dev/kvm",
             "options": ["bind"]},
        ],
        "hooks": {"prestart": [{"path": "/bin/true"}]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network",
                                                   "path": "/var/run/netns/x"}]},
    }


def guest_spec(spec: dict[str, Any], container_id: str,
               bundle: Path) -> tuple[dict[str, Any], list[HostMount]]:
    """The guest spec and the host bind mounts of plan(), with the real host probe."""
    p = plan(spec, container_id, bundle)
    return p.spec, p.host_mounts


def test_rootfs_and_binds_go_through_the_share() -> None:
    out, host = guest_spec(base_spec(), "c1", Path("/b"))
    assert out["root"]["path"] == "/run/pykata/shared/c1/rootfs"
    assert host[0] == HostMount(Path("/b/rootfs"), "c1/rootfs")
    binds = {m["destination"]: m for m in out["mounts"]}
    assert binds["/data"]["source"] == "/run/pykata/shared/c1/mounts/2/data"
    assert binds["/cfg"]["source"] == "/run/pykata/shared/c1/mounts/3/app.conf"
    assert binds["/proc"]["source"] == "proc"  # guest-local mounts stay
    assert HostMount(Path("/srv/data"), "c1/mounts/2/data", False) in host
    assert HostMount(Path("/etc/app.conf"), "c1/mounts/3/app.conf", True,
                     recursive=False) in host  # "bind": the file alone


def test_host_devices_hooks_and_netns_paths_dropped() -> None:
    out, host = guest_spec(base_spec(), "c1", Path("/b"))
    assert "/dev/kvm" not in {m["destination"] for m in out["mounts"]}
    assert all(h.source != Path("/dev/kvm") for h in host)
    assert "hooks" not in out
    assert all("path" not in ns for ns in out["linux"]["namespaces"])  # pid, network
    assert {"type": "cgroup"} in out["linux"]["namespaces"]


def test_input_not_modified() -> None:
    spec = base_spec()
    guest_spec(spec, "c1", Path("/b"))
    assert spec == base_spec()


def test_absolute_root_path_kept_as_host_source() -> None:
    spec = base_spec()
    spec["root"]["path"] = "/abs/rootfs"
    _, host = guest_spec(spec, "c1", Path("/b"))
    assert host[0].source == Path("/abs/rootfs")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.pop("process"), "'process' is missing"),
    (lambda s: s["process"].update(args=[]), "process.args must be a non-empty list"),
    (lambda s: s["process"].update(args="sh"), "process.args must be a non-empty list"),
    (lambda s: s["process"].update(cwd="rel"), "process.cwd must be an absolute path"),
    (lambda s: s.pop("root"), "root.path is missing"),
    (lambda s: s["root"].update(path="missing"), "does not exist"),
    (lambda s: s["mounts"].append({"destination": "rel"}), "is not absolute"),
])
def test_validate_rejects_bad_specs(tmp_path: Path, mutate: Any, message: str) -> None:
    (tmp_path / "rootfs").mkdir()
    spec = base_spec()
    validate(spec, tmp_path)
    mutate(spec)
    with pytest.raises(InvalidArgument, match=message):
        validate(spec, tmp_path)


def test_validate_rejects_non_object(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="JSON object"):
        validate([1, 2], tmp_path)


# -- block volumes, emptyDir, /dev/shm (plan) ---------------------------------------------

class FakeProbe(HostProbe):
    """Host paths as the tests say: block devices, tmpfs mounts, the rest absent."""

    def __init__(self, blocks: dict[str, tuple[int, int]] | None = None,
                 files: set[str] | None = None, tmpfs: dict[str, int] | None = None,
                 subs: dict[str, list[tuple[str, frozenset[str]]]] | None = None) -> None:
        self.subs = subs or {}
        self.blocks = blocks or {}
        self.files = files or set()
        self.tmpfs = tmpfs or {}

    def block_rdev(self, path: str) -> int | None:
        if path in self.blocks:
            return os.makedev(*self.blocks[path])
        if path in self.files:
            return None
        raise FileNotFoundError(path)

    def block_device(self, major: int, minor: int) -> Path | None:
        for path, numbers in self.blocks.items():
            if numbers == (major, minor):
                return Path(path)
        return None

    def tmpfs_size(self, path: str) -> int | None:
        return self.tmpfs.get(path)

    def submounts(self, path: str, limit: int) -> list[tuple[str, frozenset[str]]]:
        return self.subs.get(path, [])[:limit]


def spec_with(*mounts: dict[str, Any], devices: list[dict[str, Any]] | None = None,
              rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec = base_spec()
    spec["mounts"] = [{"destination": "/proc", "type": "proc", "source": "proc"}, *mounts]
    spec["linux"]["devices"] = devices or []
    spec["linux"]["resources"] = {"devices": rules or [{"allow": False, "access": "rwm"}]}
    return spec


def test_block_device_mount_becomes_a_guest_mount_and_a_bind() -> None:
    probe = FakeProbe(blocks={"/dev/loop3": (7, 3)})
    spec = spec_with({"destination": "/data", "type": "ext4", "source": "/dev/loop3",
                      "options": ["rw", "noatime", "nosuid", "data=ordered"]})
    p = plan(spec, "c1", Path("/b"), probe=probe)
    assert p.blocks == [BlockVolume(Path("/dev/loop3"), False,
                                    mount_point=f"{GUEST_STORAGE_DIR}/c1/1", fstype="ext4",
                                    options=("rw", "noatime", "nosuid", "data=ordered"))]
    data = next(m for m in p.spec["mounts"] if m["destination"] == "/data")
    assert data == {"destination": "/data", "type": "bind",
                    "source": f"{GUEST_STORAGE_DIR}/c1/1",
                    "options": ["rbind", "rw", "noatime", "nosuid"]}
    assert all(h.source != Path("/dev/loop3") for h in p.host_mounts)


def test_read_only_block_mount_is_a_read_only_disk() -> None:
    probe = FakeProbe(blocks={"/dev/loop3": (7, 3)})
    spec = spec_with({"destination": "/data", "type": "xfs", "source": "/dev/loop3",
                      "options": ["ro", "rbind"]})
    p = plan(spec, "c1", Path("/b"), probe=probe)
    (b,) = p.blocks
    assert b.readonly and b.fstype == "xfs" and b.options == ("ro",)
    assert p.spec["mounts"][-1]["options"][:2] == ["rbind", "ro"]


@pytest.mark.parametrize(("source", "probe", "message"), [
    ("/dev/nosuch", FakeProbe(), r"mount source /dev/nosuch for /data does not exist"),
    ("/srv/disk.img", FakeProbe(files={"/srv/disk.img"}),
     r"mount source /srv/disk.img for /data is not a block device"),
])
def test_block_mount_errors_name_the_source(source: str, probe: HostProbe,
                                            message: str) -> None:
    spec = spec_with({"destination": "/data", "type": "ext4", "source": source})
    with pytest.raises(InvalidArgument, match=message):
        plan(spec, "c1", Path("/b"), probe=probe)


def test_bind_of_block_device_becomes_a_device_node() -> None:
    probe = FakeProbe(blocks={"/dev/loop5": (7, 5)})
    spec = spec_with({"destination": "/dev/xvdb", "type": "bind", "source": "/dev/loop5",
                      "options": ["rbind", "ro"]})
    p = plan(spec, "c1", Path("/b"), probe=probe)
    assert p.blocks == [BlockVolume(Path("/dev/loop5"), True, container_path="/dev/xvdb")]
    assert "/dev/xvdb" not in {m["destination"] for m in p.spec["mounts"]}
    assert {"path": "/dev/xvdb", "type": "b", "major": 7, "minor": 5, "fileMode": 0o660,
            "uid": 0, "gid": 0} in p.spec["linux"]["devices"]
    assert p.spec["linux"]["resources"]["devices"][-1] == {
        "allow": True, "type": "b", "major": 7, "minor": 5, "access": "r"}


def test_other_host_devices_stay_out() -> None:
    probe = FakeProbe(files={"/dev/kvm", "/dev/fuse"})
    spec = spec_with({"destination": "/dev/kvm", "type": "bind", "source": "/dev/kvm",
                      "options": ["bind"]},
                     devices=[{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}])
    p = plan(spec, "c1", Path("/b"), probe=probe)
    assert p.blocks == []
    assert "/dev/kvm" not in {m["destination"] for m in p.spec["mounts"]}
    assert p.spec["linux"]["devices"] == [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]


def test_linux_devices_block_entry_is_hot_plugged() -> None:
    probe = FakeProbe(blocks={"/dev/loop7": (7, 7)})
    dev = {"path": "/dev/mydisk", "type": "b", "major": 7, "minor": 7}
    rw = spec_with(devices=[dict(dev)], rules=[
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 7, "minor": 7, "access": "rwm"}])
    p = plan(rw, "c1", Path("/b"), probe=probe)
    assert p.blocks == [BlockVolume(Path("/dev/loop7"), False, container_path="/dev/mydisk")]
    # The entry keeps the host numbers: the agent puts the guest's in.
    assert p.spec["linux"]["devices"] == [dev]
    ro = spec_with(devices=[dict(dev)], rules=[
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 7, "minor": 7, "access": "r"}])
    assert plan(ro, "c1", Path("/b"), probe=probe).blocks[0].readonly is True


def test_linux_devices_entry_not_on_the_host_is_made_as_given() -> None:
    # runc makes the node as the spec says; so does the guest engine.
    entry = {"path": "/dev/test2", "type": "b", "major": 8, "minor": 666, "fileMode": 0o640,
             "uid": 5, "gid": 6}
    char = {"path": "/dev/test3", "type": "c", "major": 1, "minor": 3, "fileMode": 0o600}
    p = plan(spec_with(devices=[dict(entry), dict(char)]), "c1", Path("/b"), probe=FakeProbe())
    assert p.blocks == []
    assert p.spec["linux"]["devices"] == [entry, char]


EMPTY = "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~empty-dir"


def test_empty_dir_is_guest_local_and_pod_wide() -> None:
    spec = spec_with({"destination": "/cache", "type": "bind", "source": f"{EMPTY}/cache",
                      "options": ["rbind", "rprivate", "rw"]})
    p1 = plan(spec, "c1", Path("/b"), probe=FakeProbe())
    p2 = plan(spec, "c2", Path("/b"), probe=FakeProbe())
    target = f"{GUEST_SANDBOX_DIR}/local/cache"
    assert p1.storages == [Storage("local", "local", target, "", ("mode=0777",),
                                   (SANDBOX_SCOPE,))]
    assert p1.storages == p2.storages  # both containers get the same guest directory
    cache = p1.spec["mounts"][-1]
    assert cache == {"destination": "/cache", "type": "bind", "source": target,
                     "options": ["rbind", "rw"]}
    assert all(EMPTY not in str(h.source) for h in p1.host_mounts)


def test_empty_dir_shared_through_virtio_fs_when_disabled() -> None:
    spec = spec_with({"destination": "/cache", "type": "bind", "source": f"{EMPTY}/cache",
                      "options": ["rbind", "rw"]})
    p = plan(spec, "c1", Path("/b"), guest_empty_dir=False, probe=FakeProbe())
    assert p.storages == []
    assert HostMount(Path(f"{EMPTY}/cache"), "c1/mounts/1/cache", False) in p.host_mounts


def test_memory_empty_dir_is_a_guest_tmpfs_of_the_same_size() -> None:
    spec = spec_with({"destination": "/mem", "type": "bind", "source": f"{EMPTY}/mem",
                      "options": ["rbind", "rw"]})
    for guest_local in (True, False):
        p = plan(spec, "c1", Path("/b"), guest_empty_dir=guest_local,
                 probe=FakeProbe(tmpfs={f"{EMPTY}/mem": 32 << 20}))
        (st,) = p.storages
        assert st.driver == "tmpfs" and st.mount_point == f"{GUEST_SANDBOX_DIR}/ephemeral/mem"
        assert f"size={32 << 20}" in st.options and SANDBOX_SCOPE in st.driver_options


def test_pod_shm_bind_becomes_the_pods_guest_tmpfs() -> None:
    shm = "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/abc/shm"
    spec = spec_with({"destination": "/dev/shm", "type": "bind", "source": shm,
                      "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    p = plan(spec, "c1", Path("/b"), probe=FakeProbe(tmpfs={shm: 64 << 20}))
    (st,) = p.storages
    assert (st.driver, st.mount_point) == ("tmpfs", f"{GUEST_SANDBOX_DIR}/shm")
    assert f"size={64 << 20}" in st.options
    assert p.spec["mounts"][-1]["source"] == f"{GUEST_SANDBOX_DIR}/shm"
    # A /dev/shm bind that is not a tmpfs is shared like any other directory.
    p = plan(spec, "c1", Path("/b"), probe=FakeProbe())
    assert p.storages == [] and any(h.source == Path(shm) for h in p.host_mounts)


# -- read-only binds, submounts, propagation ----------------------------------------------

def _opts(text: str) -> frozenset[str]:
    return frozenset(text.split(","))


SUBS = {"/srv/vol": [("tmp", _opts("rw,nosuid,nodev")), ("tmp/deep", _opts("ro")),
                     ("bin", _opts("rw,noexec"))]}


def _vol(*options: str) -> dict[str, Any]:
    return {"destination": "/data/", "type": "bind", "source": "/srv/vol",
            "options": list(options)}


def test_ro_volume_is_read_only_at_its_top_and_submounts_keep_their_own() -> None:
    p = plan(spec_with(_vol("rbind", "ro", "rprivate")), "c1", Path("/b"),
             probe=FakeProbe(subs=SUBS))
    src = "/run/pykata/shared/c1/mounts/1/vol"
    assert p.spec["mounts"][1:] == [
        {"destination": "/data/", "type": "bind", "source": src,
         "options": ["rbind", "ro", "rprivate"]},
        {"destination": "/data/tmp", "type": "bind", "source": f"{src}/tmp",
         "options": ["bind", "rw", "nosuid", "nodev", "rprivate"]},
        {"destination": "/data/tmp/deep", "type": "bind", "source": f"{src}/tmp/deep",
         "options": ["bind", "ro", "rprivate"]},
        {"destination": "/data/bin", "type": "bind", "source": f"{src}/bin",
         "options": ["bind", "rw", "noexec", "rprivate"]},
    ]
    assert p.host_mounts[1] == HostMount(Path("/srv/vol"), "c1/mounts/1/vol", True)


def test_rro_volume_is_read_only_all_the_way_down() -> None:
    p = plan(spec_with(_vol("rbind", "rro")), "c1", Path("/b"), probe=FakeProbe(subs=SUBS))
    vol, *subs = p.spec["mounts"][1:]
    # The guest's engines get a plain ro (the native one refuses rro): in the guest
    # the volume is one virtio-fs mount, and each submount's bind is read-only.
    assert vol["options"] == ["rbind", "ro"]
    assert [m["options"][:2] for m in subs] == [["bind", "ro"]] * 3
    assert p.host_mounts[1] == HostMount(Path("/srv/vol"), "c1/mounts/1/vol", True,
                                         recursive_ro=True)
    # rrw wins over an earlier rro, as the last of ro/rw does.
    p = plan(spec_with(_vol("rbind", "rro", "rrw")), "c1", Path("/b"), probe=FakeProbe())
    assert p.host_mounts[1] == HostMount(Path("/srv/vol"), "c1/mounts/1/vol", False)
    assert p.spec["mounts"][1]["options"] == ["rbind"]


def test_bind_without_rbind_carries_no_submounts() -> None:
    p = plan(spec_with(_vol("bind", "ro")), "c1", Path("/b"), probe=FakeProbe(subs=SUBS))
    assert len(p.spec["mounts"]) == 2
    assert p.host_mounts[1] == HostMount(Path("/srv/vol"), "c1/mounts/1/vol", True,
                                         recursive=False)


def test_many_submounts_are_capped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    many = {"/srv/vol": [(f"m{i}", _opts("rw")) for i in range(MAX_SUBMOUNT_BINDS + 5)]}
    p = plan(spec_with(_vol("rbind", "ro")), "c1", Path("/b"), probe=FakeProbe(subs=many))
    assert len(p.spec["mounts"]) == 2 + MAX_SUBMOUNT_BINDS
    assert f"more than {MAX_SUBMOUNT_BINDS} mounts below it" in caplog.text


@pytest.mark.parametrize("prop", ["rslave", "slave"])
def test_host_to_container_makes_the_share_a_receiver(prop: str) -> None:
    p = plan(spec_with(_vol("rbind", prop, "rw")), "c1", Path("/b"),
             probe=FakeProbe(subs=SUBS))
    assert p.host_mounts[1] == HostMount(Path("/srv/vol"), "c1/mounts/1/vol", False,
                                         receive=True)
    assert p.spec["mounts"][2]["options"][-1] == prop
    # private, or no propagation at all: nothing is received.
    for opts in (("rbind", "rprivate"), ("rbind",), ("rbind", "rslave", "rprivate")):
        p = plan(spec_with(_vol(*opts)), "c1", Path("/b"), probe=FakeProbe())
        assert not p.host_mounts[1].receive, opts


@pytest.mark.parametrize("prop", ["rshared", "shared"])
def test_bidirectional_is_refused_naming_the_mount(prop: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"^mount /data/ \(source /srv/vol\): {prop}"
                       r" propagation \(Kubernetes mountPropagation Bidirectional\) is not"):
        plan(spec_with(_vol("rbind", prop)), "c1", Path("/b"), probe=FakeProbe())


def test_rro_on_guest_volumes_and_disks_is_read_only() -> None:
    spec = spec_with({"destination": "/cache", "type": "bind", "source": f"{EMPTY}/cache",
                      "options": ["rbind", "rro"]},
                     {"destination": "/disk", "type": "ext4", "source": "/dev/loop3",
                      "options": ["rro", "noatime"]})
    p = plan(spec, "c1", Path("/b"), probe=FakeProbe(blocks={"/dev/loop3": (7, 3)}))
    assert p.spec["mounts"][1]["options"] == ["rbind", "ro"]
    (disk,) = p.blocks
    assert disk.readonly and disk.options == ("noatime", "ro")
    assert p.spec["mounts"][2]["options"] == ["rbind", "ro", "noatime"]


def test_real_probe_lists_nothing_below_a_file_or_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    probe = HostProbe()
    assert probe.submounts(str(tmp_path / "f"), 10) == []
    assert probe.submounts(str(tmp_path / "missing"), 10) == []
    assert probe.submounts(str(tmp_path), 10) == []


def test_guest_tmpfs_mounts_are_left_to_the_guest() -> None:
    tmp = {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
           "options": ["size=16m", "mode=1777"]}
    p = plan(spec_with(tmp), "c1", Path("/b"), probe=FakeProbe())
    assert p.spec["mounts"][-1] == tmp and p.blocks == [] and p.storages == []


def test_pod_ipc_and_uts_become_the_sandbox_marker() -> None:
    spec = base_spec()
    spec["linux"]["namespaces"] += [{"type": "ipc", "path": "/proc/55/ns/ipc"},
                                    {"type": "uts", "path": "/proc/55/ns/uts"},
                                    {"type": "mount"}]
    out, _ = guest_spec(spec, "c1", Path("/b"))
    by_type = {ns["type"]: ns for ns in out["linux"]["namespaces"]}
    assert by_type["ipc"]["path"] == by_type["uts"]["path"] == SANDBOX_NS_MARKER
    assert "path" not in by_type["mount"] and "path" not in by_type["network"]
    # The guest agent uses the same marker.
    from pykata.guest import spec as guest_specmod

    assert guest_specmod.SANDBOX_NS_MARKER == SANDBOX_NS_MARKER


@pytest.mark.parametrize("src", ["/proc", "/sys", "/sys/fs/cgroup", "/proc/sys/kernel",
                                 "/proc/../proc/1"])
def test_host_proc_and_sys_are_guest_local(src: str) -> None:
    """hostPath /proc or /sys is the guest's own: never the host's through virtio-fs."""
    spec = base_spec()
    spec["mounts"].append({"destination": "/host", "type": "bind", "source": src,
                           "options": ["rbind", "ro"]})
    out, host = guest_spec(spec, "c1", Path("/b"))
    assert {"destination": "/host", "type": "bind", "source": src,
            "options": ["rbind", "ro"]} in out["mounts"]
    assert all(not str(h.source).startswith(("/proc", "/sys")) for h in host)


def test_proc_lookalike_is_still_shared() -> None:
    spec = base_spec()
    spec["mounts"].append({"destination": "/x", "type": "bind", "source": "/procfiles",
                           "options": ["rbind"]})
    _, host = guest_spec(spec, "c1", Path("/b"))
    assert any(h.source == Path("/procfiles") for h in host)


# -- spec versions ------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["1.0.0", "1.0.2", "1.0.2-dev", "1.1.0", "1.1.0-rc.1",
                                     "1.2.0", "1.2.1", "1.3.0"])
def test_every_1x_version_is_accepted_and_sent_as_the_guests(version: str) -> None:
    spec = base_spec()
    spec["ociVersion"] = version
    assert spec_version(spec) == version
    out = plan(spec, "c1", Path("/b"), probe=FakeProbe()).spec
    assert out["ociVersion"] == GUEST_SPEC_VERSION == "1.0.2"
    assert spec["ociVersion"] == version  # the input is not touched


@pytest.mark.parametrize("version,message", [
    ("2.0.0", "unsupported OCI spec version 2.0.0 (ociVersion)"),
    ("1.4.0", "unsupported OCI spec version 1.4.0"),
    ("0.6.0", "unsupported OCI spec version 0.6.0"),
    ("one", "ociVersion 'one' is not a version"),
])
def test_unsupported_version_is_one_error_naming_it(version: str, message: str) -> None:
    spec = ns_spec()
    spec["ociVersion"] = version
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_spec(spec)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        plan(spec, "c1", Path("/b"), probe=FakeProbe())


def test_unknown_fields_are_ignored_known_new_ones_kept() -> None:
    spec = base_spec()
    spec["ociVersion"] = "1.3.0"
    spec["futureThing"] = {"x": 1}
    spec["process"]["futureProcessThing"] = True
    spec["linux"]["netDevices"] = {"eth1": {}}
    out = plan(spec, "c1", Path("/b"), probe=FakeProbe()).spec
    assert "futureThing" not in out and "futureProcessThing" not in out["process"]
    assert out["linux"]["netDevices"] == {"eth1": {}}  # the guest engine refuses it by name


def test_fields_the_guest_crun_does_not_know_are_refused_for_crun() -> None:
    spec = ns_spec()
    spec["process"]["ioPriority"] = {"class": "IOPRIO_CLASS_IDLE"}
    check_spec(spec, "native")  # the native engine names it itself
    with pytest.raises(InvalidArgument, match=r"process\.ioPriority is not supported by the"
                                              r" guest's crun"):
        check_spec(spec, "crun")


# -- resources the guest kernel cannot apply ----------------------------------------------
def test_v1_only_resources_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    res = {"memory": {"limit": 1 << 26, "kernel": 1 << 20, "kernelTCP": 1 << 20,
                      "swappiness": 60, "disableOOMKiller": False},
           "cpu": {"shares": 512, "realtimeRuntime": 100, "realtimePeriod": 1000},
           "blockIO": {"weight": 100, "leafWeight": 50,
                       "weightDevice": [{"major": 8, "minor": 0, "weight": 10,
                                         "leafWeight": 10}]},
           "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]},
           "pids": {"limit": 10}}
    with caplog.at_level(logging.WARNING):
        out, dropped = strip_resources(res, "c1")
    assert out == {"memory": {"limit": 1 << 26}, "cpu": {"shares": 512},
                   "blockIO": {"weight": 100}, "pids": {"limit": 10}}
    assert dropped == ["linux.resources.network", "linux.resources.memory.kernel",
                       "linux.resources.memory.kernelTCP", "linux.resources.memory.swappiness",
                       "linux.resources.cpu.realtimeRuntime",
                       "linux.resources.cpu.realtimePeriod",
                       "linux.resources.blockIO.leafWeight",
                       "linux.resources.blockIO.weightDevice"]
    assert "linux.resources.memory.kernel ignored" in caplog.text
    assert res["memory"]["kernel"] == 1 << 20  # not modified
    spec = base_spec()
    spec["linux"]["resources"] = res
    p = plan(spec, "c1", Path("/b"), probe=FakeProbe())
    assert p.spec["linux"]["resources"] == out and p.ignored == dropped


# -- namespaces ---------------------------------------------------------------------------
class NsProbe(FakeProbe):
    def __init__(self, types: dict[str, str], host: set[str] | None = None) -> None:
        super().__init__()
        self.types, self.host = types, host or set()

    def ns_type(self, path: str) -> str | None:
        if path not in self.types:
            raise FileNotFoundError(path)
        return self.types[path] or None

    def is_host_ns(self, path: str, kind: str) -> bool:
        return path in self.host


def ns_spec(*namespaces: dict[str, str], cri: str = "") -> dict[str, Any]:
    spec = base_spec()
    spec["linux"]["namespaces"] = [{"type": t} for t in ("pid", "network", "ipc", "uts",
                                                         "mount")]
    for ns in namespaces:
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                       if n["type"] != ns["type"]] + [ns]
    if cri:
        spec["annotations"] = {"io.kubernetes.cri.container-type": cri}
    return spec


def test_namespace_path_of_the_wrong_type_is_refused() -> None:
    probe = NsProbe({"/proc/9/ns/ipc": "ipc", "/tmp/file": ""})
    with pytest.raises(InvalidArgument, match=r"linux\.namespaces\[5\]\.path /proc/9/ns/ipc"
                                              r" is a ipc namespace, not cgroup"):
        check_namespaces(ns_spec({"type": "cgroup", "path": "/proc/9/ns/ipc"}),
                         PodNamespaces(), probe)
    with pytest.raises(InvalidArgument, match="/tmp/file is not a namespace"):
        check_namespaces(ns_spec({"type": "uts", "path": "/tmp/file"}), PodNamespaces(), probe)
    with pytest.raises(InvalidArgument, match=r"/nope \(ipc namespace\) does not exist"):
        check_namespaces(ns_spec({"type": "ipc", "path": "/nope"}), PodNamespaces(), probe)


@pytest.mark.parametrize("kind", ["ipc", "uts", "pid", "cgroup", "mount"])
def test_a_host_namespace_path_is_refused_naming_the_field(kind: str) -> None:
    path = f"/proc/77/ns/{kind}"
    with pytest.raises(InvalidArgument, match=r"joining a host namespace is not supported:"
                                              r" linux\.namespaces\[\d\]\.path"):
        check_namespaces(ns_spec({"type": kind, "path": path}), PodNamespaces(vm_pid=5),
                         NsProbe({path: kind}))


def test_pod_sharing_paths_are_accepted() -> None:
    types = {"/proc/5/ns/ipc": "ipc", "/proc/5/ns/uts": "uts", "/proc/5/ns/pid": "pid",
             "/proc/5/ns/net": "network", "/var/run/netns/cni-1": "network",
             "/run/netns/other": "network", "/proc/1/ns/net": "network"}
    probe = NsProbe(types, host={"/proc/1/ns/net", "/proc/5/ns/net"})
    # A CRI container of the pod: containerd names the sandbox task's (the VM's) pid.
    check_namespaces(ns_spec(*({"type": t, "path": f"/proc/5/ns/{n}"} for t, n in
                               (("ipc", "ipc"), ("uts", "uts"), ("pid", "pid"),
                                ("network", "net"))), cri="container"),
                     PodNamespaces(vm_pid=5, netns="/var/run/netns/cni-1", first=False), probe)
    # The pod's first container names the namespace the VM is connected to.
    check_namespaces(ns_spec({"type": "network", "path": "/var/run/netns/cni-1"}),
                     PodNamespaces(), probe)
    # A later container of a plain OCI pod: only the pod's own network.
    check_namespaces(ns_spec({"type": "network", "path": "/var/run/netns/cni-1"}),
                     PodNamespaces(vm_pid=5, netns="/var/run/netns/cni-1", first=False), probe)
    with pytest.raises(InvalidArgument, match="joining a host namespace"):
        check_namespaces(ns_spec({"type": "network", "path": "/run/netns/other"}),
                         PodNamespaces(vm_pid=5, netns="/var/run/netns/cni-1", first=False),
                         probe)
    # The host's own network is never the pod's.
    with pytest.raises(InvalidArgument, match=r"/proc/1/ns/net \(network\)"):
        check_namespaces(ns_spec({"type": "network", "path": "/proc/1/ns/net"}),
                         PodNamespaces(), probe)


@pytest.mark.parametrize("kind,field", [("network", "hostNetwork"), ("ipc", "hostIPC"),
                                        ("pid", "hostPID")])
def test_leaving_out_a_namespace_asks_for_the_hosts_and_is_refused(kind: str,
                                                                   field: str) -> None:
    spec = ns_spec(cri="sandbox")
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != kind]
    with pytest.raises(InvalidArgument, match=rf"the host's {kind} namespace is not supported"
                                              rf" \(the pod's {field}: true\): linux\.namespaces"
                                              rf" has no {kind} entry"):
        check_spec(spec)
    del spec["annotations"]
    with pytest.raises(InvalidArgument, match=rf"linux\.namespaces has no {kind} entry"):
        check_spec(spec)


def test_real_probe_reads_namespace_types() -> None:
    probe = HostProbe()
    assert probe.ns_type("/proc/self/ns/ipc") == "ipc"
    assert probe.ns_type("/proc/self/ns/net") == "network"
    assert probe.ns_type("/proc/self/ns/mnt") == "mount"
    assert probe.ns_type("/proc/self/status") is None
    assert probe.is_host_ns("/proc/self/ns/net", "network")
    with pytest.raises(FileNotFoundError):
        probe.ns_type("/nonexistent/ns")
