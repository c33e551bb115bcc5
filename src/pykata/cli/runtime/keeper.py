"""A container's processes on the host: the keeper (the pykata shim serving the
Task API on the state dir's socket; it owns the VM) and the stand-ins (one per
container init or exec, carrying its stdio and exit status), and ``destroy``,
which tears all of it down. Processes are followed by :class:`ProcRef` (pid +
start time) and stopped with :mod:`pykata.utils.process`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2

from pykata import errors
from pykata.cli.rtclient import call, socket_of
from pykata.cli.runtime import hookrun
from pykata.cli.runtime.base import NAMESPACE, CLIError
from pykata.cli.runtime.state import KEEPER, load_meta, load_ref, ref_of, save_ref, standin_ref
from pykata.protos import containerd_shim_pb2 as pb
from pykata.utils import process
from pykata.utils.process import ProcRef


def wait_gone(ref: ProcRef, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``ref`` to exit (reaped if our child)."""
    gone = asyncio.run(process.wait_gone(ref, timeout))
    process.reap(ref.pid)
    return gone


def terminate(ref: ProcRef, grace: float) -> None:
    """SIGTERM, ``grace`` seconds, then SIGKILL (reaped if our child)."""
    asyncio.run(process.terminate(ref, grace))
    process.reap(ref.pid)


def spawn_keeper(d: Path, cid: str, debug: bool, netns: Path | None = None) -> ProcRef:
    """The keeper; with ``netns``, the network namespace its VM is connected to
    when the spec names none. Hooks are this CLI's (hookrun), not the keeper's."""
    from pykata.shim.main import spawn_server

    (d / "log").touch()
    env = dict(os.environ)
    env.pop("TTRPC_ADDRESS", None)  # no containerd to publish events to
    env[hookrun.HOOKS_ENV] = "caller"
    env.pop(hookrun.NETNS_ENV, None)
    if netns is not None:
        env[hookrun.NETNS_ENV] = str(netns)
    try:
        pid = spawn_server(socket_of(d), cwd=d, namespace=NAMESPACE, address=str(d),
                           publish_binary="", shim_id=cid, debug=debug, env=env)
    except OSError as exc:
        raise CLIError(f"cannot bind {socket_of(d)}: {exc}") from exc
    ref = ref_of(pid)
    save_ref(d, KEEPER, ref)
    return ref


def make_fifos(fdir: Path) -> None:
    fdir.mkdir(parents=True, exist_ok=True)
    for name in ("stdin", "stdout", "stderr"):
        os.mkfifo(fdir / name, 0o600)


def spawn_standin(d: Path, cid: str, exec_id: str, fdir: Path, terminal: bool,
                  console_socket: str, netns: Path | None = None) -> subprocess.Popen[bytes]:
    """The stand-in; with ``netns``, in that network namespace (the container's,
    as /proc/<its pid>/ns/net)."""
    argv = [sys.executable, "-m", "pykata.cli.standin", str(d), cid, exec_id, str(fdir),
            "1" if terminal else "0"]
    if console_socket:
        argv.append(console_socket)
    enter, fds = hookrun.enter_netns(netns)
    try:
        return subprocess.Popen(argv, close_fds=True, preexec_fn=enter, pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


def destroy(d: Path, cid: str) -> None:
    """Tear down everything of a container: task, VM, keeper, stand-in, state."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(CLIError):
        meta = load_meta(d)
    with contextlib.suppress(errors.PykataError):
        call(d, "Shutdown", pb.ShutdownRequest(id=cid, now=True), empty_pb2.Empty, timeout=60)
    keeper = load_ref(d, KEEPER)
    if keeper is not None and not wait_gone(keeper, 30.0):
        terminate(keeper, 5.0)
    standin = standin_ref(d, meta)
    if standin is not None and standin.alive() and not wait_gone(standin, 2.0):
        terminate(standin, 1.0)
    # Whatever the keeper could not stop (it was killed): VMM, virtiofsd, mounts.
    from pykata import config
    from pykata.runtime.cleanup import cleanup

    with contextlib.suppress(Exception):
        # The keeper's configuration (its state dir), which may not be this process's.
        cfg = config.load(Path(meta["config"]) if meta.get("config") else None)
        asyncio.run(cleanup(cfg.runtime.state_dir, cid, NAMESPACE, force=True))
    with contextlib.suppress(FileNotFoundError):
        socket_of(d).unlink()
    hookrun.remove_netns(d)
    shutil.rmtree(d, ignore_errors=True)
