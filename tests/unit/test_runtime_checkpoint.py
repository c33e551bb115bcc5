"""`pykata-runtime checkpoint|restore` without a VM (docs/checkpoint-design.md
§2.4, §6.6): the argv podman and conmon pass parses, ``checkpoint --help``
exits 0 (podman's probe), the keeper is asked with runc's options, what
cannot work is refused in one line before the keeper is reached; and, for
pods without a shared file system, the bind mounts the guest gets: small
regular files copied in, everything else refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pykata import errors
from pykata.cli.runtime import args, checkpoint, entry
from pykata.cli.runtime.base import CLIError
from pykata.protos import containerd_shim_pb2 as pb
from pykata.runtime import checkpoint as ckpt
from pykata.runtime import specconv
from pykata.runtime.container import GUEST_PULL_IMAGE_ANNOTATION, read_bind_file
from pykata.shim.service import checkpoint_exit
from pykata.testing import default_spec
from pykata.testing.fakes import FakeSandbox
from pykata.wire import GUEST_SHARED_DIR


# -- the command line -------------------------------------------------------------------
def test_checkpoint_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """podman's CRRuntimeSupportsCheckpointRestore runs `<runtime> checkpoint --help`."""
    for verb in ("checkpoint", "restore"):
        with pytest.raises(SystemExit) as exc:
            entry.main([verb, "--help"])
        assert exc.value.code == 0
        assert "--image-path" in capsys.readouterr().out


def test_podman_checkpoint_argv_parses() -> None:
    """podman 4.3.1 (libpod/oci_conmon_common.go) with -R, --tcp-established and
    --file-locks: --leave-running comes twice."""
    a = args.parse_args(["checkpoint", "--image-path", "/b/checkpoint", "--work-path", "/b",
                         "--leave-running", "--tcp-established", "--file-locks",
                         "--leave-running", "cid1"])
    assert (a.command, a.image_path, a.work_path, a.leave_running, a.id) == (
        "checkpoint", "/b/checkpoint", "/b", True, "cid1")
    b = args.parse_args(["checkpoint", "--image-path", "/b/checkpoint", "--work-path", "/b",
                         "cid1"])
    assert not b.leave_running
    c = args.parse_args(["checkpoint", "--ext-unix-sk", "--shell-job", "--auto-dedup",
                         "--manage-cgroups-mode", "soft", "--empty-ns", "network", "c"])
    assert c.id == "c" and c.image_path == ""


def test_conmon_restore_argv_parses() -> None:
    """conmon's configure_runtime_args for a podman restore (plus --runtime-opt
    of a pod restore), global flags first."""
    a = args.parse_args([
        "--systemd-cgroup", "--root", "/run/r", "--log", "/b/oci-log", "--log-format", "json",
        "restore", "--bundle", "/b", "--pid-file", "/b/pidfile", "--no-pivot",
        "--no-new-keyring", "--detach", "--image-path", "/b/checkpoint", "--work-path", "/b",
        "--tcp-established", "--file-locks", "--lsm-mount-context=", "--lsm-profile=",
        "--console-socket", "/b/console.sock", "--manage-cgroups-mode", "soft",
        "--no-subreaper", "cid1"])
    assert (a.command, a.root, a.bundle, a.pid_file, a.detach, a.image_path, a.id) == (
        "restore", "/run/r", "/b", "/b/pidfile", True, "/b/checkpoint", "cid1")
    assert a.console_socket == "/b/console.sock" and a.log_format == "json"


@pytest.mark.parametrize("extra", [["--pre-dump"], ["--parent-path", "../pre-checkpoint"],
                                   ["--lazy-pages"], ["--page-server", "10.0.0.1:27"]])
def test_incremental_and_remote_checkpoints_are_one_line(
        tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["--root", str(tmp_path), "checkpoint", *extra, "c1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not supported: pykata saves" in err, err


def test_checkpoint_of_an_unknown_container(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert entry.main(["--root", str(tmp_path), "checkpoint", "--image-path",
                       str(tmp_path / "img"), "nope"]) == 1
    assert capsys.readouterr().err == 'pykata-runtime: container "nope" does not exist\n'
    assert not (tmp_path / "img").exists()


def test_restore_without_a_checkpoint_is_one_line_and_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / ckpt.INVENTORY).write_text("criu's, not ours\n")
    root = tmp_path / "root"
    assert entry.main(["--root", str(root), "restore", "--bundle", str(tmp_path),
                       "--image-path", str(tmp_path / "img"), "--detach", "c1"]) == 1
    err = capsys.readouterr().err
    assert err == (f"pykata-runtime: cannot restore container c1: {tmp_path / 'img'} holds no"
                   f" pykata checkpoint (no {ckpt.MANIFEST})\n")
    assert not root.exists()


def test_image_path_defaults_to_checkpoint_in_the_cwd(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert checkpoint.image_dir("") == tmp_path / "checkpoint"
    assert checkpoint.image_dir("rel") == tmp_path / "rel"


@pytest.mark.parametrize("leave_running", [True, False])
def test_the_keeper_is_asked_with_runc_options(leave_running: bool) -> None:
    """What the CLI sends decodes, in the shim, to exit = not --leave-running."""
    assert checkpoint_exit(checkpoint.run_options(leave_running)) is (not leave_running)


class Keeper:
    """The calls do_checkpoint makes of the keeper (``rtclient.call``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, image: Path, status: str = "running",
                 fail: Exception | None = None) -> None:
        self.requests: list[Any] = []
        self.image = image
        self.fail = fail
        monkeypatch.setattr(checkpoint, "existing", lambda root, cid: Path(root) / cid)
        monkeypatch.setattr(checkpoint, "task_status", lambda d, cid: status)
        monkeypatch.setattr(checkpoint, "call", self.call)
        monkeypatch.setattr(checkpoint, "_wait_stopped", lambda d: None)

    def call(self, d: Path, method: str, req: Any, resp: Any, timeout: float) -> Any:
        self.requests.append((method, req))
        if self.fail is not None:
            raise self.fail
        assert Path(req.path).parent == Path(self.image)  # a new directory inside it
        for name in ckpt.FILES:
            Path(req.path, name).write_text(f"new {name}")
        return resp()


@pytest.mark.parametrize("leave", [True, False])
def test_checkpoint_makes_the_image_dir_and_asks_the_keeper(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leave: bool) -> None:
    image = tmp_path / "bundle" / "checkpoint"
    keeper = Keeper(monkeypatch, image)
    argv = ["checkpoint", "--image-path", str(image), "--work-path", str(tmp_path),
            *(["--leave-running"] * 2 if leave else []), "c1"]
    assert checkpoint.do_checkpoint(args.parse_args(argv)) == 0
    ((method, req),) = keeper.requests
    assert method == "Checkpoint" and isinstance(req, pb.CheckpointTaskRequest)
    assert req.id == "c1"
    assert checkpoint_exit(req.options) is (not leave)
    assert image.is_dir() and (image.stat().st_mode & 0o777) == 0o700
    assert sorted(p.name for p in image.iterdir()) == sorted(ckpt.FILES)


def test_a_checkpoint_replaces_the_one_in_the_image_path_only_when_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """podman checkpoints -R into the same path again: the old files go only
    once the new checkpoint is complete, and a failure leaves the old one."""
    image = tmp_path / "checkpoint"
    image.mkdir()
    for name in ckpt.FILES:
        (image / name).write_text(f"old {name}")
    (image / "keep-me").write_text("podman's")
    argv = ["checkpoint", "--image-path", str(image), "--leave-running", "c1"]
    Keeper(monkeypatch, image, fail=errors.Internal("the VM went away"))
    with pytest.raises(errors.Internal):
        checkpoint.do_checkpoint(args.parse_args(argv))
    assert sorted(p.name for p in image.iterdir()) == sorted([*ckpt.FILES, "keep-me"])
    assert (image / ckpt.MANIFEST).read_text() == f"old {ckpt.MANIFEST}"
    Keeper(monkeypatch, image)
    assert checkpoint.do_checkpoint(args.parse_args(argv)) == 0
    assert sorted(p.name for p in image.iterdir()) == sorted([*ckpt.FILES, "keep-me"])
    assert all((image / n).read_text() == f"new {n}" for n in ckpt.FILES)


def test_a_refused_checkpoint_leaves_no_image_dir(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    line = ("cannot checkpoint sandbox c1: its VM has a virtio-fs device (QEMU 7.2 cannot"
            " save vhost-user-fs)")
    image = tmp_path / "checkpoint"
    Keeper(monkeypatch, image, fail=errors.FailedPrecondition(line))
    with pytest.raises(errors.FailedPrecondition, match="virtio-fs"):
        checkpoint.do_checkpoint(args.parse_args(["checkpoint", "--image-path", str(image),
                                                  "c1"]))
    assert not image.exists()


@pytest.mark.parametrize("status", ["created", "stopped"])
def test_only_a_running_container_is_checkpointed(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  status: str) -> None:
    keeper = Keeper(monkeypatch, tmp_path / "i", status=status)
    with pytest.raises(CLIError, match=f"cannot checkpoint container c1: it is {status}"):
        checkpoint.do_checkpoint(args.parse_args(["checkpoint", "--image-path",
                                                  str(tmp_path / "i"), "c1"]))
    assert keeper.requests == [] and not (tmp_path / "i").exists()


# -- bind mounts without a shared file system ---------------------------------------------
IMAGE = "10.0.0.2:5000/pk/busybox:v1"


async def no_shared_fs(tmp_path: Path) -> FakeSandbox:
    sb = await FakeSandbox.running("pod", state_dir=tmp_path / "state")
    sb.config.vm.shared_fs = "none"
    return sb


def bundle(tmp_path: Path, mounts: list[dict[str, Any]], guest_pull: bool = True) -> Path:
    b = tmp_path / "b"
    (b / "rootfs").mkdir(parents=True, exist_ok=True)
    spec = default_spec(["sh"])
    spec["mounts"] = [*spec.get("mounts", []), *mounts]
    if guest_pull:
        spec["annotations"] = {GUEST_PULL_IMAGE_ANNOTATION: IMAGE}
    (b / "config.json").write_text(json.dumps(spec))
    return b


def bind(src: Path, dest: str, *opts: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(src),
            "options": ["rbind", "rprivate", *opts]}


async def test_small_file_binds_are_copied_into_the_guest(tmp_path: Path) -> None:
    """podman's /etc/hosts (rw) and /run/.containerenv (ro): each copied to
    the guest path the container's spec binds, with its mode and owner; the
    host shares nothing."""
    sb = await no_shared_fs(tmp_path)
    hosts = tmp_path / "userdata" / "hosts"
    hosts.parent.mkdir()
    hosts.write_text("127.0.0.1 localhost\n10.0.0.5 me\n")
    env = tmp_path / "userdata" / ".containerenv"
    env.write_text("")
    os.chmod(env, 0o600)
    c = await sb.create_container("c1", bundle(tmp_path, [bind(hosts, "/etc/hosts"),
                                                          bind(env, "/run/.containerenv",
                                                               "ro")]))
    agent = sb.fake_agent
    guest = {m["destination"]: m for m in agent.containers["c1"]["mounts"]}
    src = guest["/etc/hosts"]["source"]
    assert src.startswith(f"{GUEST_SHARED_DIR}/c1/mounts/") and src.endswith("/hosts")
    data, mode, uid, gid = agent.files[src]
    assert (data, mode, uid, gid) == (hosts.read_bytes(), hosts.stat().st_mode & 0o7777,
                                      hosts.stat().st_uid, hosts.stat().st_gid)
    esrc = guest["/run/.containerenv"]["source"]
    assert agent.files[esrc] == (b"", 0o600, env.stat().st_uid, env.stat().st_gid)
    assert "ro" in guest["/run/.containerenv"]["options"]
    # Copied before the container is made in the guest; nothing bound on the host.
    names = [n for n, _ in agent.calls]
    assert names.index("copy_file") < names.index("create_container")
    assert sb.tree.shared == {}
    await c.delete(force=True)


@pytest.mark.parametrize("case", ["directory", "symlink", "too-big", "fifo"])
async def test_what_cannot_be_copied_is_refused_in_one_line(tmp_path: Path,
                                                            case: str) -> None:
    sb = await no_shared_fs(tmp_path)
    src = tmp_path / "src"
    if case == "directory":
        src.mkdir()
        why = "it is a directory"
    elif case == "symlink":
        (tmp_path / "real").write_text("x")
        src.symlink_to(tmp_path / "real")
        why = "it is a symbolic link"
    elif case == "fifo":
        os.mkfifo(src)
        why = "it is not a regular file"
    else:
        src.write_bytes(b"x" * ((1 << 20) + 1))
        why = "it is larger than 1024 KiB"
    with pytest.raises(errors.FailedPrecondition) as exc:
        await sb.create_container("c1", bundle(tmp_path, [bind(src, "/data")]))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"bind mount /data (source {src}) needs a shared file system;"
                          " this pod has shared_fs = none"), msg
    assert why in msg
    # Nothing reached the guest, nothing is left.
    assert sb.fake_agent.called("copy_file") == []
    assert sb.fake_agent.containers == {} and "c1" not in sb.containers


async def test_a_host_root_filesystem_is_refused_without_a_shared_fs(tmp_path: Path) -> None:
    sb = await no_shared_fs(tmp_path)
    with pytest.raises(errors.FailedPrecondition) as exc:
        await sb.create_container("c1", bundle(tmp_path, [], guest_pull=False))
    assert str(exc.value) == (
        f"cannot create container c1: its root filesystem {tmp_path / 'b' / 'rootfs'} needs"
        " a shared file system; this pod has shared_fs = none (have the guest pull its"
        f" image: annotation {GUEST_PULL_IMAGE_ANNOTATION})")
    assert sb.fake_agent.containers == {}


async def test_with_virtio_fs_file_binds_are_shared_not_copied(tmp_path: Path) -> None:
    sb = await FakeSandbox.running("pod", state_dir=tmp_path / "state")
    f = tmp_path / "hosts"
    f.write_text("127.0.0.1 localhost\n")
    c = await sb.create_container("c1", bundle(tmp_path, [bind(f, "/etc/hosts")]))
    assert sb.fake_agent.called("copy_file") == []
    assert any(p.endswith("/hosts") for p in sb.tree.shared)
    await c.delete(force=True)


def test_read_bind_file_caps_what_it_reads(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    hm = specconv.HostMount(f, "c1/mounts/3/f", destination="/etc/f")
    assert read_bind_file(hm, limit=10).data == b"0123456789"
    with pytest.raises(errors.FailedPrecondition, match="larger than"):
        read_bind_file(hm, limit=9)
    with pytest.raises(errors.InvalidArgument, match="No such file"):
        read_bind_file(specconv.HostMount(tmp_path / "gone", "c1/mounts/1/gone"))


# -- restore --------------------------------------------------------------------------------
class Restore:
    """What do_restore does with create (lifecycle) and the keeper."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, image: Path,
                 start_fails: bool = False) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.start_fails = start_fails
        image.mkdir(exist_ok=True)
        (image / ckpt.MANIFEST).write_text("{}")
        monkeypatch.setattr(checkpoint, "create", self.create)
        monkeypatch.setattr(checkpoint, "call", self.call)
        monkeypatch.setattr(checkpoint, "destroy", lambda d, cid: self.events.append(
            ("destroy", cid)))

    def create(self, a: Any, checkpoint: Path | None = None, timeout: float = 0) -> None:
        self.events.append(("create", a.id, checkpoint, a.bundle, a.pid_file))

    def call(self, d: Path, method: str, req: Any, resp: Any, timeout: float) -> Any:
        self.events.append((method, req.id))
        if self.start_fails:
            raise errors.Unavailable("the VM went away")
        return resp()


def test_restore_is_create_from_the_checkpoint_then_start(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    r = Restore(monkeypatch, tmp_path / "checkpoint")
    a = args.parse_args(["--root", str(tmp_path), "restore", "--bundle", "/b", "--pid-file",
                         "/b/pid", "--detach", "--image-path", str(tmp_path / "checkpoint"),
                         "--work-path", "/b", "c1"])
    assert checkpoint.do_restore(a) == 0
    assert r.events == [("create", "c1", tmp_path / "checkpoint", "/b", "/b/pid"),
                        ("Start", "c1")]


def test_a_restore_that_cannot_start_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    r = Restore(monkeypatch, tmp_path / "checkpoint", start_fails=True)
    a = args.parse_args(["--root", str(tmp_path), "restore", "--detach", "--image-path",
                         str(tmp_path / "checkpoint"), "c1"])
    with pytest.raises(errors.Unavailable):
        checkpoint.do_restore(a)
    assert r.events[-1] == ("destroy", "c1")
