"""`pykata`: the admin CLI. Build the guest image, check the host, show the
configuration, run a bundle in a VM for debugging, clean up leftovers, open the
debug console of a sandbox (`exec`), show its guest console (`logs`) and check
an agent policy document (`policy check`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

from pykata import __version__, config, errors


def _load_config(args: argparse.Namespace) -> config.Config:
    return config.load(Path(args.config) if args.config else None)


# -- image --------------------------------------------------------------------------
def cmd_image_build(args: argparse.Namespace) -> int:
    from pykata.image import build_image

    cfg = _load_config(args)
    out = Path(args.output or cfg.image.output_dir)
    images: tuple[str, ...] | None = None  # default: erofs if mkfs.erofs is there
    if args.rootfs == "initrd":
        images = ()
    elif args.rootfs == "both" or args.image_fs:
        images = tuple(f for f in (args.image_fs or "erofs").split(",") if f)
    art = build_image(out, force=args.force, progress=not args.quiet, root_images=images)
    print(f"kernel  {art.kernel} ({art.kernel_release})")
    if art.vmlinux:
        print(f"vmlinux {art.vmlinux}")
    print(f"initrd  {art.initrd} ({art.size_bytes / 2**20:.1f} MiB)")
    for fs, path in sorted(art.root_images.items()):
        print(f"{fs:7} {path} ({path.stat().st_size / 2**20:.0f} MiB, read-only root image)")
    if art.early_initrd:
        print(f"early   {art.early_initrd}")
    print(f"digest  {art.digest}")
    return 0


def cmd_image_show(args: argparse.Namespace) -> int:
    from pykata.image import find_image

    cfg = _load_config(args)
    art = find_image(Path(args.output or cfg.image.output_dir))
    if art is None:
        print(f"no guest image in {args.output or cfg.image.output_dir}: run 'pykata image build'")
        return 1
    print(f"kernel  {art.kernel} ({art.kernel_release})")
    print(f"initrd  {art.initrd} ({art.size_bytes / 2**20:.1f} MiB)")
    print(f"digest  {art.digest}")
    return 0


# -- check --------------------------------------------------------------------------
def _ksm_check(cfg: config.Config) -> tuple[str, bool, str, str]:
    """Whether KSM could merge guest RAM here (docs/memory.md). Informational."""
    ksm = Path("/sys/kernel/mm/ksm/run")
    try:
        state = {"0": "off", "1": "on", "2": "unmerging"}.get(ksm.read_text().strip(), "?")
    except OSError:
        return ("KSM", True, "not available in this kernel", "")
    if cfg.vm.shared_fs == "virtio-fs":
        return ("KSM", True, f"{state}; not used: guest RAM is shared with virtiofsd"
                " (share=on), which KSM cannot merge", "")
    return ("KSM", True, f"{state}; guest RAM is shared memory, which KSM does not merge",
            "see docs/memory.md for private guest RAM with KSM")


def _rootfs_check(cfg: config.Config) -> tuple[str, bool, str, str]:
    """Which guest root is in use, and whether its files are there."""
    q = cfg.qemu
    image = cfg.root_image_path()
    if image is None:
        erofs = Path(cfg.image.output_dir) / "rootfs.erofs"
        hint = (f"; {erofs.name} is built: rootfs = \"image\" shares it between VMs"
                if erofs.is_file() else "")
        return ("guest root", True, f"initrd (unpacked into each VM's RAM){hint}", "")
    how = ("DAX: VMs share the host's page cache" if q.rootfs_device != "virtio-blk"
           else "read-only disk, no DAX")
    return ("guest root", image.is_file(),
            f"image {image} on {q.rootfs_device} ({how})",
            "apt-get install erofs-utils, then 'pykata image build'"
            " (or set [hypervisor.qemu] rootfs = \"initrd\")")


def host_checks(cfg: config.Config) -> list[tuple[str, bool, str, str]]:
    """(what, ok, detail, how to fix) for everything pykata needs on this host."""
    from pykata.hypervisor.channels import vhost_vsock_available
    from pykata.hypervisor.qemu.accel import probe

    q = cfg.qemu
    out: list[tuple[str, bool, str, str]] = []
    out.append(("running as root", os.geteuid() == 0, f"euid {os.geteuid()}",
                "run as root (VMs, mounts and network namespaces need it)"))
    qemu_ok = os.access(q.path, os.X_OK)
    out.append(("QEMU", qemu_ok, q.path,
                "apt-get install qemu-system-x86, or set [hypervisor.qemu] path"))
    if qemu_ok:
        acc = probe(q.path, q.accelerator,
                    Path(cfg.runtime.state_dir) / "accel.json")
        out.append(("accelerator", True, f"{acc.accel}: {acc.reason}",
                    "" if acc.accel == "kvm" else "TCG works but is slow; KVM needs VT-x/AMD-V"))
        out += _confinement_checks(cfg, acc.accel)
    if q.shared_fs == "virtio-fs":
        out.append(("virtiofsd", os.access(q.virtio_fs_daemon, os.X_OK), q.virtio_fs_daemon,
                    "apt-get install qemu-system-common, or set virtio_fs_daemon"))
        if qemu_ok:
            from pykata.hypervisor.qemu.caps import dax_supported

            dax = dax_supported(q.path)
            want = q.virtio_fs_cache_size
            out.append(("virtio-fs DAX", dax or not want,
                        f"{'supported' if dax else 'not supported by this QEMU'}; "
                        f"virtio_fs_cache_size = {want} MiB, cache = {q.virtio_fs_cache}",
                        "set [hypervisor.qemu] virtio_fs_cache_size = 0"))
    kernel, initrd = cfg.kernel_path(), cfg.initrd_path()
    out.append(("guest kernel", kernel.is_file(), str(kernel), "run 'pykata image build'"))
    out.append(("guest initrd", initrd.is_file(), str(initrd), "run 'pykata image build'"))
    out.append(_rootfs_check(cfg))
    out.append(_ksm_check(cfg))
    vsock = vhost_vsock_available()
    out.append(("agent channel", True,
                "vsock (/dev/vhost-vsock)" if vsock else "virtio-serial (no /dev/vhost-vsock)", ""))
    cg2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    cg1 = Path("/sys/fs/cgroup/memory").is_dir()
    out.append(("host cgroups", cg1 or cg2,
                "v2" if cg2 else ("v1" + (" (hybrid)" if Path(
                    "/sys/fs/cgroup/unified").is_dir() else "") if cg1 else "none"),
                "mount cgroup hierarchies under /sys/fs/cgroup"))
    out.append(("/dev/net/tun", Path("/dev/net/tun").exists(), "/dev/net/tun",
                "modprobe tun (needed for pod networking)"))
    state = Path(cfg.runtime.state_dir)
    writable = os.access(state if state.exists() else state.parent, os.W_OK)
    out.append(("state directory", writable, str(state), "make it writable for root"))
    return out


def _confinement_checks(cfg: config.Config, accel: str) -> list[tuple[str, bool, str, str]]:
    """QEMU's unprivileged user and its seccomp filter (docs/security.md)."""
    from pykata.hypervisor.qemu.caps import seccomp_probe
    from pykata.hypervisor.qemu.driver import permits, qemu_credentials

    q = cfg.qemu
    out: list[tuple[str, bool, str, str]] = []
    uid = gid = -1
    if not q.run_as_user:
        out.append(("QEMU user", True, "root (run_as_user = \"\"): QEMU is not confined to a"
                    " user", ""))
    else:
        try:
            cred = qemu_credentials(q.run_as_user, accel)
        except errors.FailedPrecondition:
            cred = None
        add_user = (f"run 'make setup' or 'useradd --system --no-create-home --shell"
                    f" /usr/sbin/nologin {q.run_as_user}' (or set [hypervisor.qemu]"
                    " run_as_user = \"\")")
        out.append(("QEMU user", cred is not None,
                    f"{q.run_as_user} (uid {cred.uid})" if cred else
                    f"{q.run_as_user}: no such user", add_user))
        if cred is not None:
            uid, gid = cred.uid, cred.gid
            out.append(_uid_range_check(q.run_as_user, cred.uid))
            if accel == "kvm":
                kvm = Path("/dev/kvm")
                ok = kvm.exists() and permits(kvm.stat(), cred, 6)
                out.append(("/dev/kvm access", ok, f"for {q.run_as_user}",
                            "give /dev/kvm to group kvm, mode 0660 (udev rule), or set"
                            " run_as_user = \"\""))
    if not q.seccomp_sandbox:
        out.append(("QEMU seccomp", True, "off (seccomp_sandbox = \"\")", ""))
    else:
        why = seccomp_probe(q.path, q.seccomp_sandbox, uid, gid)
        out.append(("QEMU seccomp", not why, why or f"-sandbox {q.seccomp_sandbox}",
                    "use a QEMU built with libseccomp (Debian's is) and valid -sandbox"
                    " options, or set [hypervisor.qemu] seccomp_sandbox = \"\""))
    return out


def _uid_range_check(user: str, uid: int) -> tuple[str, bool, str, str]:
    """One uid per VM needs the user's subordinate uid and gid ranges; without
    them every QEMU shares one uid (a warning: it still runs)."""
    from pykata.hypervisor.qemu.uids import SUBGID, SUBUID, id_range

    ids = id_range(user, uid)
    if ids is None:
        return ("QEMU uids", True, f"{WARNING}QEMU processes share one uid ({user} has no"
                f" subordinate uid and gid range in {SUBUID} and {SUBGID})",
                f"run make setup (adds a subordinate uid range to {user})")
    return ("QEMU uids", True, f"one per VM from {user}'s subordinate range {ids.describe()}"
            f" ({ids.size} ids)", "")


WARNING = "warning: "  # a check that passes with this detail is printed as a warning


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    failed = 0
    for what, ok, detail, fix in host_checks(cfg):
        warn = ok and detail.startswith(WARNING)
        mark = "warn" if warn else "ok  " if ok else "FAIL"
        line = f"[{mark}] {what:16} {detail.removeprefix(WARNING) if warn else detail}"
        if (warn or not ok) and fix:
            line += f"\n       fix: {fix}"
        if not ok and fix:
            failed += 1
        print(line)
    if failed:
        print(f"\n{failed} check(s) failed: this host cannot run pykata yet.")
        return 1
    print("\nThis host can run pykata.")
    return 0


# -- env / config -------------------------------------------------------------------
def _version_of(argv: list[str]) -> str:
    import subprocess

    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return "not found"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def cmd_env(args: argparse.Namespace) -> int:
    from pykata.image import find_image

    cfg = _load_config(args)
    art = find_image(Path(cfg.image.output_dir))
    print("# pykata environment")
    print("[versions]")
    print(f'pykata = "{__version__}"')
    print(f'python = "{platform.python_version()}"')
    print(f'host_kernel = "{platform.release()}"')
    print(f'qemu = "{_version_of([cfg.qemu.path, "--version"])}"')
    print(f'guest_kernel = "{art.kernel_release if art else "not built"}"')
    print(f'guest_image_digest = "{art.digest if art else ""}"')
    print()
    print(f"# configuration: {cfg.source or 'built-in defaults'} "
          f"(file: {config.config_path()})")
    print(config.to_toml(cfg))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    print(f"{cfg.source or 'built-in defaults'}: valid")
    return 0


# -- run (debug) --------------------------------------------------------------------
async def _run_bundle(cfg: config.Config, bundle: Path, cid: str) -> int:
    from pykata.runtime.bundle import load_spec
    from pykata.runtime.sandbox import Sandbox

    spec = load_spec(bundle)
    sb = await Sandbox.create(cid, cfg, annotations=spec.get("annotations") or {})
    try:
        c = await sb.create_container(cid, bundle, spec)
        await c.start()

        async def pump(read: Any, out: Any) -> None:
            try:
                while data := await read():
                    out.write(data)
                    out.flush()
            except errors.PermissionDenied as exc:  # the agent policy keeps it private
                print(f"pykata: {exc}", file=sys.stderr)

        pumps = [asyncio.ensure_future(pump(c.init.read_stdout, sys.stdout.buffer))]
        if not c.init.terminal:
            pumps.append(asyncio.ensure_future(pump(c.init.read_stderr, sys.stderr.buffer)))
        status = await c.wait()
        await asyncio.wait(pumps, timeout=10)
        return status.code
    finally:
        await sb.stop()


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    return asyncio.run(_run_bundle(cfg, Path(args.bundle).resolve(), args.id))


# -- policy -------------------------------------------------------------------------
def cmd_policy_check(args: argparse.Namespace) -> int:
    """Parse an agent policy document as the agent would: "ok", or its error."""
    from pykata.guest.policy import MAX_DOCUMENT, Policy
    from pykata.runtime.agentpolicy import read_document

    try:
        if args.file == "-":
            doc = sys.stdin.buffer.read(MAX_DOCUMENT + 1)
        else:
            doc = read_document(args.file, "policy file")
        Policy.parse(doc)
    except errors.InvalidArgument as exc:
        print(exc, file=sys.stderr)
        return 1
    print("ok")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from pykata.runtime.cleanup import cleanup
    from pykata.runtime.state import all_sandboxes, check_id

    cfg = _load_config(args)
    if args.id:
        ns, _, sid = args.id.rpartition("/")
        targets = [(ns or "default", sid)]
    else:
        targets = all_sandboxes(cfg.runtime.state_dir)
    for ns, sid in targets:
        try:
            check_id("namespace", ns)
            check_id("sandbox", sid)
        except errors.InvalidArgument as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        # A sandbox whose shim is still running is not "left behind": skipped.
        if asyncio.run(cleanup(cfg.runtime.state_dir, sid, ns, force=args.force)):
            print(f"cleaned up sandbox {ns}/{sid}")
    return 0


# -- exec and logs (the debug console, the guest's log) -----------------------------
def _find_sandbox(cfg: config.Config, name: str) -> Path:
    """The directory of sandbox ``[NAMESPACE/]ID``: checked to be pykata's (a real
    directory owned by us, closed to others); one error line if it is unknown."""
    import stat

    from pykata.runtime.state import all_sandboxes, check_id, sandbox_dir

    ns, _, sid = name.rpartition("/")
    check_id("sandbox", sid)
    if ns:
        check_id("namespace", ns)
        found = [ns]
    else:
        found = [n for n, s in all_sandboxes(cfg.runtime.state_dir) if s == sid]
        if len(found) > 1:
            raise errors.InvalidArgument(
                f"sandbox {sid} is in several namespaces ({', '.join(found)}): name it as"
                " NAMESPACE/ID")
    if not found:
        raise errors.NotFound(f"no sandbox {sid} in {cfg.runtime.state_dir}")
    d = sandbox_dir(cfg.runtime.state_dir, sid, found[0])
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise errors.NotFound(f"no sandbox {found[0]}/{sid} in {cfg.runtime.state_dir}"
                              ) from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise errors.FailedPrecondition(f"{d} is not a sandbox directory of pykata's"
                                        " (a symlink, someone else's or open to others)")
    return d


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        return _logs(args)
    except BrokenPipeError:  # `pykata logs X | head`: the reader had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _logs(args: argparse.Namespace) -> int:
    import collections
    import time

    from pykata.shim.guestlog import LogFollower, read_lines, sanitise

    cfg = _load_config(args)
    if args.tail is not None and args.tail < 0:
        raise errors.InvalidArgument(f"--tail must be 0 or more, not {args.tail}")
    d = _find_sandbox(cfg, args.sandbox)
    path = d / "console.log"
    out = sys.stdout
    if not args.follow:
        for line in read_lines(path, args.tail):
            out.write(sanitise(line) + "\n")
        return 0
    # Following: the current file is read by the follower itself, from its start,
    # so nothing written meanwhile falls between what is printed and what follows.
    follower = LogFollower(path)
    try:
        first = follower.poll()
        shown = collections.deque(read_lines(path, current=False), maxlen=args.tail)
        shown.extend(first)
        while more := follower.poll():
            shown.extend(more)
        for line in shown:
            out.write(sanitise(line) + "\n")
        out.flush()
        while os.path.isdir(d):
            for line in follower.poll():
                out.write(sanitise(line) + "\n")
            out.flush()
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    d = _find_sandbox(cfg, args.sandbox)
    if args.tty and args.no_tty:
        raise errors.InvalidArgument("--tty and --no-tty exclude each other")
    terminal = args.tty or (not args.no_tty and sys.stdin.isatty() and sys.stdout.isatty())
    return asyncio.run(_debug_exec(d, args.command or ["/bin/sh"], terminal))


async def _debug_exec(sandbox_dir: Path, argv: list[str], terminal: bool) -> int:
    """Run ``argv`` in the guest through the shim's debug socket: stdio relayed,
    the local terminal raw and its size followed (SIGWINCH) when ``terminal``;
    the guest process's exit code."""
    import concurrent.futures
    import signal
    import threading
    import uuid

    from pykata.protos import agent_pb2 as pb
    from pykata.shim.debug import socket_path
    from pykata.ttrpc import Client
    from pykata.utils.unixsock import addressable
    from pykata.wire import AGENT_SERVICE

    path = socket_path(sandbox_dir)
    if not os.path.exists(path):
        raise errors.Unavailable(f"sandbox {sandbox_dir.name} has no debug socket ({path}):"
                                 " is its shim running?")
    try:
        with addressable(path) as addr:
            conn = await Client.connect_unix(addr)
    except (OSError, errors.Unavailable) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            str(getattr(exc, "__cause__", None) or exc)
        raise errors.Unavailable(f"cannot reach the shim of sandbox {sandbox_dir.name}"
                                 f" ({why}): is it running?") from None
    exec_id = "debug-" + uuid.uuid4().hex[:12]
    loop = asyncio.get_running_loop()

    async def call(method: str, req: Any, resp_type: Any, timeout: float | None = 30.0) -> Any:
        return await conn.call(AGENT_SERVICE, method, req, resp_type, timeout=timeout)

    def size() -> tuple[int, int]:
        try:
            cols, rows = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            return 0, 0
        return rows, cols

    rows, cols = size() if terminal else (0, 0)
    process: dict[str, Any] = {
        "args": argv, "terminal": terminal, "cwd": "/",
        "env": [f"TERM={os.environ.get('TERM') or 'xterm'}"] if terminal else [],
    }
    if rows and cols:
        process["consoleSize"] = {"height": rows, "width": cols}
    saved: list[Any] | None = None
    started = False
    try:
        await call("DebugExec", pb.ExecProcessRequest(
            exec_id=exec_id, process_json=json.dumps(process).encode()), pb.ProcessResponse)
        started = True
        if terminal and sys.stdin.isatty():
            import termios
            import tty

            saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno(), termios.TCSANOW)  # keep what was typed ahead

        async def pump(method: str, out: Any) -> None:
            while True:
                resp = await call(method, pb.ReadStreamRequest(exec_id=exec_id, len=65536),
                                  pb.ReadStreamResponse, timeout=None)
                if not resp.data:
                    return
                out.write(resp.data)
                out.flush()

        # Local stdin in a thread (a terminal, a pipe or a file all block alike);
        # a daemon, so a read still waiting never holds the exit.
        chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

        def reader() -> None:
            while True:
                try:
                    data = os.read(sys.stdin.fileno(), 65536)
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
                except (RuntimeError, concurrent.futures.CancelledError):
                    return  # the loop is gone: we are exiting
                if not data:
                    return

        async def feed() -> None:
            while True:
                data = await chunks.get()
                if not data:
                    await call("CloseStdin", pb.CloseStdinRequest(exec_id=exec_id), pb.Empty)
                    return
                await call("WriteStdin", pb.WriteStreamRequest(exec_id=exec_id, data=data),
                           pb.WriteStreamResponse, timeout=None)

        background: set[asyncio.Task[Any]] = set()

        def later(coro: Any) -> None:
            """A call made from a signal handler; its failure (the process just
            ended) is of no interest."""
            task = loop.create_task(coro)
            background.add(task)
            task.add_done_callback(done)

        def done(task: asyncio.Task[Any]) -> None:
            background.discard(task)
            if not task.cancelled():
                task.exception()  # retrieved: never "was never retrieved"

        def resized() -> None:
            r, c = size()
            if r and c:
                later(call("TtyWinResize", pb.TtyWinResizeRequest(
                    exec_id=exec_id, row=r, column=c), pb.Empty))

        def forward(sig: int) -> None:
            later(call("SignalProcess", pb.SignalProcessRequest(
                exec_id=exec_id, signal=sig), pb.Empty))

        if terminal:
            loop.add_signal_handler(signal.SIGWINCH, resized)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        threading.Thread(target=reader, daemon=True).start()
        feeding = asyncio.ensure_future(feed())
        outputs = [asyncio.ensure_future(pump("ReadStdout", sys.stdout.buffer))]
        if not terminal:
            outputs.append(asyncio.ensure_future(pump("ReadStderr", sys.stderr.buffer)))
        status = await call("WaitProcess", pb.WaitProcessRequest(exec_id=exec_id),
                            pb.WaitProcessResponse, timeout=None)
        # What it wrote before it ended: the streams end once every writer is gone
        # (something it started in the background may keep them open: not waited for).
        await asyncio.wait(outputs, timeout=2.0)
        feeding.cancel()
        for t in outputs:
            t.cancel()
        await asyncio.gather(feeding, *outputs, return_exceptions=True)
        started = False
        return int(status.status)
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        if started:  # interrupted before it ended: it does not outlive us
            with contextlib.suppress(Exception):
                await call("SignalProcess", pb.SignalProcessRequest(
                    exec_id=exec_id, signal=signal.SIGKILL, all=True), pb.Empty, timeout=5.0)
        await conn.close()


# -- factory (VM templating) ---------------------------------------------------------
def cmd_factory_init(args: argparse.Namespace) -> int:
    from pykata.runtime.factory import init_template

    cfg = _load_config(args)
    t = asyncio.run(init_template(cfg))
    print(f"template {t.key} in {t.dir}: booted in {t.boot_seconds:.2f}s, "
          f"{t.memory_bytes / 2**20:.0f} MiB of guest RAM saved")
    if not cfg.factory.enable_template:
        print("note: [factory] enable_template is false: sandboxes still boot cold")
    return 0


def cmd_factory_status(args: argparse.Namespace) -> int:
    from pykata.runtime.factory import Factory
    from pykata.runtime.vmcache import query_status

    cfg = _load_config(args)
    t = Factory(cfg).current()
    endpoint = Path(cfg.factory.vm_cache_endpoint)
    server: dict[str, Any] | None = None
    error = ""
    if cfg.factory.vm_cache_number > 0 or os.path.lexists(endpoint):
        try:
            server = query_status(endpoint)
        except errors.PykataError as exc:
            error = str(exc)
    if getattr(args, "json", False):
        out = {
            "templating": cfg.factory.enable_template,
            "template": None if t is None else {
                "key": t.key, "dir": str(t.dir), "memory_bytes": t.memory_bytes,
                "boot_seconds": t.boot_seconds, "created": t.created},
            "vm_cache": {"number": cfg.factory.vm_cache_number, "endpoint": str(endpoint),
                         "server": server, "error": error},
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"templating: {'enabled' if cfg.factory.enable_template else 'disabled'}"
          f" ([factory] enable_template)")
    if t is None:
        print(f"template:   none in {cfg.factory.template_path}")
    else:
        print(f"template:   {t.key} in {t.dir} ({t.memory_bytes / 2**20:.0f} MiB of RAM,"
              f" booted in {t.boot_seconds:.2f}s)")
    print(f"vm cache:   {cfg.factory.vm_cache_number} VM(s) ([factory] vm_cache_number),"
          f" {endpoint}")
    if server is None:
        print(f"            no server: {error}" if error else "            off")
        return 0
    vms = server.get("vms") or []
    mib = 2**20
    print(f"            server pid {server.get('pid')} ({server.get('mode')}): {len(vms)} idle"
          f" of {server.get('number')}{', one booting' if server.get('booting') else ''},"
          f" {server.get('handed', 0)} handed out, {server.get('failures', 0)} failed boots,"
          f" server PSS {server.get('server_memory', {}).get('pss_bytes', 0) / mib:.0f} MiB")
    if vms:
        print(f"  {'VM':14} {'PID':>8} {'AGE':>8} {'STATE':6} {'MODE':9} {'PSS':>9}"
              f" {'RAM FILE':>9} {'TOTAL':>9}")
    total = 0
    for vm in vms:
        m = vm.get("memory") or {}
        total += m.get("total_bytes", 0)
        print(f"  {vm.get('name', '?'):14} {vm.get('pid') or '-':>8}"
              f" {vm.get('age_seconds', 0):>7.0f}s {vm.get('state', '?'):6}"
              f" {vm.get('mode', '?'):9} {m.get('pss_bytes', 0) / mib:>5.0f} MiB"
              f" {m.get('ram_file_unmapped_bytes', 0) / mib:>5.0f} MiB"
              f" {m.get('total_bytes', 0) / mib:>5.0f} MiB")
    if vms:
        print(f"  cached VMs hold {total / mib:.0f} MiB (PSS, plus RAM-file pages no process"
              " maps)")
    return 0


def cmd_factory_serve(args: argparse.Namespace) -> int:
    from pykata.runtime.vmcache import CacheServer

    cfg = _load_config(args)
    n = cfg.factory.vm_cache_number if args.number is None else args.number
    if not 0 < n <= 64:
        raise errors.InvalidArgument(
            f"a VM cache of {n} VM(s): set [factory] vm_cache_number (1-64) or pass --number")
    if not args.debug:
        logging.getLogger().setLevel(logging.INFO)
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    async def serve() -> None:
        code = 0
        try:
            await CacheServer(cfg, n, refill_delay=args.refill_delay).run()
        except errors.PykataError as exc:
            print(f"pykata: {exc}", file=sys.stderr)
            code = 1
        # Exit now, inside the loop: VMs handed to sandboxes are still our
        # children, and asyncio's shutdown would finalise (kill) them.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)

    asyncio.run(serve())
    return 1


def cmd_factory_destroy(args: argparse.Namespace) -> int:
    from pykata.runtime.factory import Factory

    cfg = _load_config(args)
    found = Factory(cfg).destroy()
    print("template removed" if found else "no template to remove")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pykata", description="pykata admin tool")
    p.add_argument("--version", action="version", version=f"pykata {__version__}")
    p.add_argument("--config", help="configuration file (default: $PYKATA_CONFIG or "
                   f"{config.DEFAULT_PATH})")
    p.add_argument("--debug", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    img = sub.add_parser("image", help="guest kernel and root filesystem")
    isub = img.add_subparsers(dest="image_cmd", required=True)
    b = isub.add_parser("build", help="build (or reuse) the guest image")
    b.add_argument("--output", help="output directory (default: [image] output_dir)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--quiet", action="store_true", help="no progress display")
    b.add_argument("--rootfs", choices=["initrd", "both"], default=None,
                   help="initrd: the initrd only; both: also the read-only root image and its"
                        " early initrd (default: both if mkfs.erofs is installed)")
    b.add_argument("--image-fs", metavar="FS[,FS]", default="",
                   help="file systems of the root image: erofs, ext4 (default erofs)")
    b.set_defaults(func=cmd_image_build)
    s = isub.add_parser("show", help="show the built image")
    s.add_argument("--output")
    s.set_defaults(func=cmd_image_show)

    sub.add_parser("check", help="can this host run pykata?").set_defaults(func=cmd_check)
    sub.add_parser("env", help="effective configuration and versions").set_defaults(func=cmd_env)
    c = sub.add_parser("config", help="configuration")
    csub = c.add_subparsers(dest="config_cmd", required=True)
    csub.add_parser("check", help="validate the configuration file").set_defaults(
        func=cmd_config_check)
    r = sub.add_parser("run", help="run an OCI bundle in its own VM (debugging aid)")
    r.add_argument("--bundle", required=True)
    r.add_argument("id")
    r.set_defaults(func=cmd_run)
    po = sub.add_parser("policy", help="the agent policy (docs/confidential.md)")
    posub = po.add_subparsers(dest="policy_cmd", required=True)
    pc = posub.add_parser("check", help="is FILE a valid agent policy document?")
    pc.add_argument("file", metavar="FILE", help="the JSON document (- for stdin)")
    pc.set_defaults(func=cmd_policy_check)
    f = sub.add_parser("factory", help="VM templating and the VM cache")
    fsub = f.add_subparsers(dest="factory_cmd", required=True)
    fsub.add_parser("init", help="boot and save the VM template").set_defaults(
        func=cmd_factory_init)
    st = fsub.add_parser("status", help="show the VM template and the VM cache")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_factory_status)
    sv = fsub.add_parser("serve", help="keep [factory] vm_cache_number VMs booted for new"
                         " sandboxes (the VM cache)")
    sv.add_argument("--number", type=int, default=None,
                    help="VMs to keep (default: [factory] vm_cache_number)")
    sv.add_argument("--refill-delay", type=float, default=0.0, metavar="SECONDS",
                    help="wait this long after a handover before booting its replacement")
    sv.set_defaults(func=cmd_factory_serve)
    fsub.add_parser("destroy", help="remove the VM template").set_defaults(
        func=cmd_factory_destroy)
    cl = sub.add_parser("cleanup", help="remove sandboxes whose owner is gone")
    cl.add_argument("id", nargs="?", help="[NAMESPACE/]SANDBOX-ID (default: all)")
    cl.add_argument("--force", action="store_true",
                    help="also sandboxes whose shim is still running")
    cl.set_defaults(func=cmd_cleanup)
    ex = sub.add_parser("exec", help="a shell (or COMMAND) in a sandbox's guest, outside any"
                        " container: needs [agent] debug_console = true when it started")
    ex.add_argument("-t", "--tty", action="store_true",
                    help="a terminal in the guest (default: when stdin and stdout are one)")
    ex.add_argument("-T", "--no-tty", action="store_true", help="pipes, not a terminal")
    ex.add_argument("sandbox", metavar="SANDBOX", help="[NAMESPACE/]SANDBOX-ID")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                    help="what to run (default: /bin/sh)")
    ex.set_defaults(func=cmd_exec)
    lg = sub.add_parser("logs", help="a sandbox's guest console (the agent's log, the"
                        " kernel's messages)")
    lg.add_argument("sandbox", metavar="SANDBOX", help="[NAMESPACE/]SANDBOX-ID")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing new lines until the sandbox goes")
    lg.add_argument("-n", "--tail", type=int, default=None, metavar="N",
                    help="only the last N lines")
    lg.set_defaults(func=cmd_logs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except errors.PykataError as exc:
        print(f"pykata: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


