from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pykata.errors import InvalidArgument
from pykata.runtime.specconv import HostMount, guest_spec, validate


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


def test_rootfs_and_binds_go_through_the_share() -> None:
    out, host = guest_spec(base_spec(), "c1", Path("/b"))
    assert out["root"]["path"] == "/run/pykata/shared/c1/rootfs"
    assert host[0] == HostMount(Path("/b/rootfs"), "c1/rootfs")
    binds = {m["destination"]: m for m in out["mounts"]}
    assert binds["/data"]["source"] == "/run/pykata/shared/c1/mounts/2-data"
    assert binds["/cfg"]["source"] == "/run/pykata/shared/c1/mounts/3-app.conf"
    assert binds["/proc"]["source"] == "proc"  # guest-local mounts stay
    assert HostMount(Path("/srv/data"), "c1/mounts/2-data", False) in host
    assert HostMount(Path("/etc/app.conf"), "c1/mounts/3-app.conf", True) in host


def test_host_devices_hooks_and_netns_paths_dropped() -> None:
    out, host = guest_spec(base_spec(), "c1", Path("/b"))
    assert "/dev/kvm" not in {m["destination"] for m in out["mounts"]}
    assert all(h.source != Path("/dev/kvm") for h in host)
    assert "hooks" not in out
    assert all("path" not in ns for ns in out["linux"]["namespaces"])
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
