"""The VM cache (Kata's ``vm_cache_number``): a node-wide process,
``pykata factory serve``, keeps ``[factory] vm_cache_number`` VMs booted and
idle and hands one to each new sandbox of the default shape.

Each cached VM is its own cold boot of the default-sized sandbox shape (or,
with ``[factory] enable_template``, a clone of the template) whose agent has
answered a Check. A sandbox asks for one over a unix socket; the server sends
the VM's host-side fds (SCM_RIGHTS) and a JSON description; the sandbox adopts
the VM (its driver's ``adopt_vm``), records it, and confirms; only
then does the server let go of the VM (and boot a replacement). What a cached
VM cannot carry (virtio-fs, NICs) is hot-plugged as for a template clone; the
clock and entropy are set by CreateSandbox.

Protocol (one request per connection, no pipelining):

    client -> server   one JSON line, at most MAX_REQUEST bytes:
                       {"op": "take", "key": <shape key>, "who": <sandbox>} | {"op": "status"}
    server -> client   a 4-byte big-endian length + JSON (at most MAX_REPLY),
                       the fds attached to it: {"ok": true, "vm": {..., "fds": [names]}}
                       or {"ok": false, "reason": "..."}
    client -> server   (take) {"op": "ack"} once it holds the VM (or it closes)
    server -> client   {"ok": true, "released": true}: the VM is the client's

A VM whose client never confirms (closed, timed out) is stopped by the server.

Security: the socket is bound 0600 (umask 0177) in a directory that must be
root's and writable by nobody else (no symlink on the way); a stale socket of
ours is replaced only when nothing answers on it, anything else at the path is
refused. Every connection is authenticated by SO_PEERCRED (uid 0 only); the
client checks the server's too. Bounded: at most ``vm_cache_number`` VMs,
MAX_CONNECTIONS connections at once (more are closed at once), requests and
replies of bounded size, timeouts on every read. SIGTERM stops every cached VM
and removes the socket and the server's directory; VMs already handed over
belong to their sandboxes and keep running.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pykata import errors
from pykata.config import Config
from pykata.hypervisor import make_driver
from pykata.hypervisor.base import Driver, VMSpec
from pykata.hypervisor.handoff import MAX_FDS, ExportableVM, Handoff
from pykata.runtime import factory
from pykata.runtime.dial import dial_agent
from pykata.runtime.sizing import vm_spec
from pykata.runtime.state import DEFAULT_NAMESPACE
from pykata.utils.unixsock import socket_of_ours

log = logging.getLogger(__name__)

MAX_REQUEST = 4096  # bytes of one request line
MAX_REPLY = 64 << 10  # bytes of one reply
MAX_CONNECTIONS = 8  # served at once; more are closed unanswered
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request
ACK_TIMEOUT = 10.0  # seconds a client has to confirm it holds the VM
CLIENT_TIMEOUT = 5.0  # seconds a sandbox waits for the server at each step
RETRY_MAX = 60.0  # longest pause between failed boots
STALE_CHECK = 30.0  # seconds between checks that cached VMs still match the shape
CACHE_SUBDIR = "vmcache"  # <state dir>/vmcache/<vm>/: each cached VM's logs
OPS = ("take", "status", "ack")
_HEADER = struct.Struct(">I")
_KEY = re.compile(r"[0-9a-f]{1,64}")


# -- protocol (pure) -------------------------------------------------------------------------
def encode_request(req: dict[str, Any]) -> bytes:
    line = json.dumps(req, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_REQUEST:
        raise errors.InvalidArgument(f"VM cache request of {len(line)} bytes (at most"
                                     f" {MAX_REQUEST})")
    return line


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line, checked: a known op and, for take, a hex key."""
    if len(line) > MAX_REQUEST:
        raise errors.InvalidArgument(f"request longer than {MAX_REQUEST} bytes")
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("request is not JSON") from None
    if not isinstance(req, dict) or req.get("op") not in OPS:
        raise errors.InvalidArgument(f"unknown request (ops: {', '.join(OPS)})")
    if req["op"] == "take":
        key, who = req.get("key"), req.get("who", "")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise errors.InvalidArgument("take: key must be a hex digest")
        if not isinstance(who, str) or len(who) > 256:
            raise errors.InvalidArgument("take: who must be a short string")
    return req


def encode_reply(reply: dict[str, Any]) -> bytes:
    body = json.dumps(reply, separators=(",", ":")).encode()
    if len(body) > MAX_REPLY:
        raise errors.InvalidArgument(f"VM cache reply of {len(body)} bytes (at most {MAX_REPLY})")
    return _HEADER.pack(len(body)) + body


def reply_length(header: bytes) -> int:
    (n,) = _HEADER.unpack(header)
    if n > MAX_REPLY:
        raise errors.InvalidArgument(f"reply of {n} bytes announced (at most {MAX_REPLY})")
    return int(n)


def decode_reply(body: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("reply is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise errors.InvalidArgument("reply without ok")
    return reply


def cache_key(spec: VMSpec, driver: Driver) -> str:
    """The shape a cached VM must have for a sandbox of ``spec`` to take it
    (the template key: kernel, initrd, image, vCPUs, memory, kernel command
    line, channel, driver identity)."""
    return factory.template_key(spec, driver.identity())


# -- sockets ---------------------------------------------------------------------------------
def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def check_endpoint_dir(path: Path, create: bool = True) -> None:
    """The socket's directory must be a real directory (made 0700 if missing)
    of ours, writable by nobody else, with no other user's symlink or
    writable directory above it."""
    d = path.parent
    if create and not os.path.lexists(d):
        for p in reversed([d, *d.parents]):
            if not os.path.lexists(p):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(p, 0o700)
    st = os.lstat(d)
    why = factory._unsafe_above(d / "x")
    if not why and (stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode)):
        why = f"{d} is not a directory"
    elif not why and st.st_uid != os.geteuid():
        why = f"{d} is owned by uid {st.st_uid}"
    elif not why and st.st_mode & 0o022:
        why = f"{d} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise errors.FailedPrecondition(f"refusing the VM cache socket {path}: {why}")


def bind_endpoint(path: Path) -> socket.socket:
    """A listening socket at ``path``, 0600 from the start. A stale socket of
    ours (nothing answers) is replaced; a live one means another server runs;
    anything else at the path is refused, never removed."""
    check_endpoint_dir(path)
    if socket_of_ours(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # stale: its server is gone
        else:
            raise errors.AlreadyExists(f"a VM cache server already listens on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))  # fails if anything appeared at the path meanwhile
        finally:
            os.umask(old)
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) != 0o600:
            raise errors.FailedPrecondition(f"{path} was bound with mode"
                                            f" {stat.S_IMODE(st.st_mode):o}")
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_line(sock: socket.socket, limit: int = MAX_REQUEST) -> bytes:
    """One newline-terminated line (blocking, under the socket's timeout)."""
    buf = b""
    while b"\n" not in buf:
        if len(buf) > limit:
            raise errors.InvalidArgument(f"request longer than {limit} bytes")
        chunk = sock.recv(limit + 1 - len(buf))
        if not chunk:
            raise errors.Unavailable("the peer closed the connection")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    if rest:
        raise errors.InvalidArgument("one request at a time")
    return line


def send_reply(sock: socket.socket, reply: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode_reply(reply)
    n = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if n < len(data):
        sock.sendall(data[n:])


def _recv_fds(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], int]:
    """recvmsg with SCM_RIGHTS, the fds close-on-exec from the start
    (socket.recv_fds in 3.11 drops its flags argument)."""
    item = array.array("i").itemsize
    data, ancdata, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(max_fds * item),
                                           socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % item])
    return data, list(fds), flags


def recv_reply(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One reply and the fds that came with it (close-on-exec); on any error
    the received fds are closed."""
    data, fds, flags = _recv_fds(sock, _HEADER.size + MAX_REPLY, max(max_fds, 1))
    try:
        if flags & socket.MSG_CTRUNC or (fds and not max_fds):
            raise errors.InvalidArgument("the VM cache sent more fds than expected")
        if not data:
            raise errors.Unavailable("the VM cache closed the connection")
        while len(data) < _HEADER.size:
            more = sock.recv(_HEADER.size - len(data))
            if not more:
                raise errors.Unavailable("the VM cache closed the connection")
            data += more
        n = reply_length(data[:_HEADER.size])
        while len(data) < _HEADER.size + n:
            more = sock.recv(_HEADER.size + n - len(data))
            if not more:
                raise errors.Unavailable("the VM cache closed the connection mid-reply")
            data += more
        if len(data) != _HEADER.size + n:
            raise errors.InvalidArgument("the VM cache sent more than one reply")
        return decode_reply(data[_HEADER.size:]), fds
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def connect(endpoint: Path, timeout: float = CLIENT_TIMEOUT) -> socket.socket:
    """A connection to the cache server: the socket must be root's (ours) and
    the process behind it too."""
    try:
        st = os.lstat(endpoint)
    except FileNotFoundError:
        raise errors.Unavailable(f"no VM cache at {endpoint}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise errors.Unavailable(f"{endpoint} is not a socket of ours")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(endpoint))
        uid = peer_uid(sock)
        if uid != os.geteuid():
            raise errors.Unavailable(f"the VM cache at {endpoint} runs as uid {uid}")
    except OSError as exc:
        sock.close()
        raise errors.Unavailable(f"cannot reach the VM cache at {endpoint}:"
                                 f" {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


# -- memory ----------------------------------------------------------------------------------
def _kib_fields(text: str, names: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in out:
            with contextlib.suppress(ValueError, IndexError):
                out[key] += int(rest.split()[0]) * 1024
    return out


def vm_memory(pid: int, memory_file: str | None = None) -> dict[str, int]:
    """Host memory of one VM: QEMU's PSS and RSS (smaps_rollup) and, for a
    file-backed guest RAM (a template clone), the file's allocated bytes and
    the part of them QEMU does not map (which PSS cannot see). ``total_bytes``
    is PSS plus that unseen part. Zeros for a process that is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        rollup = ""
    out = _kib_fields(rollup, ("Pss", "Rss"))
    res = {"pss_bytes": out["Pss"], "rss_bytes": out["Rss"], "ram_file_bytes": 0,
           "ram_file_unmapped_bytes": 0}
    if memory_file:
        try:
            res["ram_file_bytes"] = os.stat(memory_file).st_blocks * 512
        except OSError:
            pass
        mapped = 0
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/smaps").read_text()
            inside = False
            for line in text.splitlines():
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
                    path = head[5] if len(head) > 5 else ""
                    inside = path.removesuffix(" (deleted)") == memory_file
                elif inside and line.startswith("Rss:"):
                    mapped += int(line.split()[1]) * 1024
        res["ram_file_unmapped_bytes"] = max(0, res["ram_file_bytes"] - mapped)
    res["total_bytes"] = res["pss_bytes"] + res["ram_file_unmapped_bytes"]
    return res


# -- the server ------------------------------------------------------------------------------
@dataclass
class Slot:
    """One cached VM."""

    name: str
    vm: ExportableVM
    key: str
    mode: str  # cold | template
    run_dir: Path
    memory_file: Path | None = None
    created: float = field(default_factory=time.time)
    boot_seconds: float = 0.0
    watch: asyncio.Task[None] | None = None

    def to_json(self) -> dict[str, Any]:
        pid = self.vm.pid
        return {
            "name": self.name, "pid": pid, "state": "idle", "mode": self.mode,
            "age_seconds": round(time.time() - self.created, 1),
            "boot_seconds": round(self.boot_seconds, 3), "key": self.key,
            "memory_file": str(self.memory_file) if self.memory_file else None,
            "memory": vm_memory(pid, str(self.memory_file) if self.memory_file else None)
            if pid else {},
        }


def _rmtree(path: Path) -> None:
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


class CacheServer:
    """Keeps ``number`` VMs booted and idle and hands them out (see the module)."""

    def __init__(self, config: Config, number: int | None = None, *,
                 endpoint: Path | None = None, driver: Driver | None = None,
                 allowed_uids: tuple[int, ...] = (0,), refill_delay: float = 0.0) -> None:
        self.config = config
        self.number = config.factory.vm_cache_number if number is None else number
        self.endpoint = Path(endpoint or config.factory.vm_cache_endpoint)
        self.driver = driver
        self.allowed_uids = allowed_uids
        self.refill_delay = refill_delay
        self.dir = Path(config.runtime.state_dir) / CACHE_SUBDIR
        self.ready: list[Slot] = []
        self.booting: str | None = None
        self.handed = 0
        self.failures = 0
        self.refused = 0
        self._changed = asyncio.Event()
        self._active = 0
        self._conns: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._stopping = False

    # -- VMs -----------------------------------------------------------------------------
    async def _driver(self) -> Driver:
        if self.driver is None:
            self.driver = await make_driver(self.config)
        return self.driver

    def _spec(self, driver: Driver, name: str, run_dir: Path) -> VMSpec:
        """The default-sized sandbox shape (what a sandbox without a size asks for)."""
        return vm_spec(self.config, name, DEFAULT_NAMESPACE, run_dir,
                       channel=driver.agent_channel(self.config.vm.agent_channel))

    async def current_key(self) -> str:
        driver = await self._driver()
        return cache_key(self._spec(driver, "vmcache", self.dir / "vmcache"), driver)

    async def _boot(self, name: str) -> Slot:
        driver = await self._driver()
        run_dir = self.dir / name
        os.mkdir(run_dir, 0o700)
        spec = self._spec(driver, name, run_dir)
        key = cache_key(spec, driver)
        template = None
        if self.config.factory.enable_template:
            why = factory.eligible(spec)
            if why:
                log.warning("VM cache: no template clones (%s): booting each VM", why)
            else:
                template = await factory.Factory(self.config).ensure(spec, driver)
        t0 = time.monotonic()
        mem: Path | None = None
        vm: ExportableVM | None = None
        try:
            if template is not None:
                mem = factory.clone_memory_path(self.config.runtime.state_dir, name)
                await asyncio.to_thread(factory.sparse_copy, template.memory, mem)
                spec = dataclasses.replace(spec, memory_file=mem, incoming=True)
            vm = driver.exportable_vm(spec)
            await vm.prepare()
            await vm.start()
            if template is not None:
                await vm.restore(template.state)
            agent = await dial_agent(vm, float(self.config.agent.dial_timeout))
            await agent.close()  # the VM keeps its copy of the channel for the taker
        except BaseException:
            if vm is not None:
                await vm.stop(timeout=1.0)
            _rmtree(run_dir)
            if mem is not None:
                with contextlib.suppress(OSError):
                    os.unlink(mem)
            raise
        slot = Slot(name, vm, key, "template" if template else "cold", run_dir, mem,
                    boot_seconds=time.monotonic() - t0)
        log.info("VM cache: %s ready (pid %s, %s, %.2fs)", name, vm.pid, slot.mode,
                 slot.boot_seconds)
        return slot

    async def _discard(self, slot: Slot, why: str) -> None:
        """Stop a cached VM and remove what it left."""
        if slot.watch is not None and slot.watch is not asyncio.current_task():
            slot.watch.cancel()
        log.info("VM cache: stopping %s (%s)", slot.name, why)
        with contextlib.suppress(Exception):
            await slot.vm.stop(timeout=2.0)
        _rmtree(slot.run_dir)
        if slot.memory_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(slot.memory_file)

    async def _watch(self, slot: Slot) -> None:
        """A cached VM that dies is reaped and replaced."""
        code = await slot.vm.wait()
        if slot in self.ready:
            self.ready.remove(slot)
            log.warning("VM cache: %s (pid %s) exited with %s while idle: replacing it",
                        slot.name, slot.vm.pid, code)
            await self._discard(slot, "exited")
            self._changed.set()

    async def _refill(self) -> None:
        delay = 1.0
        last_check = time.monotonic()
        while True:
            if time.monotonic() - last_check >= STALE_CHECK:
                last_check = time.monotonic()
                await self._retire_stale()
            if len(self.ready) < self.number:
                name = f"vm-{secrets.token_hex(4)}"
                self.booting = name
                try:
                    slot = await self._boot(name)
                except (errors.PykataError, OSError) as exc:
                    self.failures += 1
                    log.warning("VM cache: cannot boot a VM (%s); retrying in %.0fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                finally:
                    self.booting = None
                delay = 1.0
                self.ready.append(slot)
                slot.watch = asyncio.ensure_future(self._watch(slot))
                continue
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), STALE_CHECK)

    async def _retire_stale(self) -> None:
        """VMs of a shape no sandbox asks for any more (the image was rebuilt,
        the configuration changed) are replaced."""
        try:
            key = await self.current_key()
        except (errors.PykataError, OSError):
            return
        for slot in [s for s in self.ready if s.key != key]:
            self.ready.remove(slot)
            await self._discard(slot, "stale shape")

    # -- connections -------------------------------------------------------------------------
    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            if self._active >= MAX_CONNECTIONS:
                self.refused += 1
                conn.close()
                continue
            self._active += 1
            task = asyncio.ensure_future(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(REQUEST_TIMEOUT)
            uid = peer_uid(conn)
            if uid not in self.allowed_uids:
                self.refused += 1
                log.warning("VM cache: refused a connection from uid %d", uid)
                await asyncio.to_thread(send_reply, conn, {"ok": False, "reason": "refused"})
                return
            req = decode_request(await asyncio.to_thread(recv_line, conn))
            if req["op"] == "status":
                status = await asyncio.to_thread(self.status)
                await asyncio.to_thread(send_reply, conn, status)
            elif req["op"] == "take":
                await self._hand(conn, req["key"], str(req.get("who", "")))
            else:
                await asyncio.to_thread(send_reply, conn, {"ok": False, "reason": "unexpected"})
        except (errors.PykataError, OSError) as exc:
            log.info("VM cache: a request failed: %s", exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(send_reply, conn, {"ok": False,
                                                           "reason": str(exc)[:200]})
        finally:
            conn.close()
            self._active -= 1

    async def _hand(self, conn: socket.socket, key: str, who: str) -> None:
        slot = next((s for s in self.ready if s.key == key), None)
        if slot is None:
            reason = "shape differs" if self.ready else "empty"
            await asyncio.to_thread(send_reply, conn, {"ok": False, "reason": reason})
            return
        self.ready.remove(slot)
        if slot.watch is not None:
            slot.watch.cancel()
        released = False
        try:
            handoff: Handoff = await slot.vm.export()
            info = handoff.info | {"name": slot.name, "mode": slot.mode,
                                   "boot_seconds": round(slot.boot_seconds, 3),
                                   "age_seconds": round(time.time() - slot.created, 1),
                                   "fds": handoff.names()}
            try:
                await asyncio.to_thread(send_reply, conn, {"ok": True, "vm": info},
                                        handoff.fd_list())
            finally:
                handoff.close()
            conn.settimeout(ACK_TIMEOUT)
            ack = decode_request(await asyncio.to_thread(recv_line, conn))
            if ack["op"] != "ack":
                raise errors.InvalidArgument("expected ack")
            await slot.vm.release()
            released = True
            _rmtree(slot.run_dir)  # the taker drains the console into its own log now
            self.handed += 1
            log.info("VM cache: %s (pid %s) handed to %s", slot.name, info.get("pid"), who)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(send_reply, conn, {"ok": True, "released": True})
        finally:
            if not released:
                await self._discard(slot, "not taken")
            self._schedule_refill()

    def _schedule_refill(self) -> None:
        if self.refill_delay > 0:
            asyncio.get_running_loop().call_later(self.refill_delay, self._changed.set)
        else:
            self._changed.set()

    def status(self) -> dict[str, Any]:
        return {
            "ok": True, "pid": os.getpid(), "number": self.number,
            "mode": "template" if self.config.factory.enable_template else "cold",
            "vms": [s.to_json() for s in list(self.ready)], "booting": self.booting,
            "handed": self.handed, "failures": self.failures, "refused": self.refused,
            "server_memory": vm_memory(os.getpid()),
        }

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None,
                  ready: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set or SIGTERM/SIGINT; then stop every cached
        VM and remove the socket and the cache directory."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        factory.private_dir(self.dir)
        for sub in os.listdir(self.dir):  # a previous server's leftovers (it was killed)
            _rmtree(self.dir / sub)
        listener = bind_endpoint(self.endpoint)
        ino = os.lstat(self.endpoint).st_ino
        handlers = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handlers.append(sig)
        tasks = [asyncio.ensure_future(self._accept(listener))]
        if self.number > 0:
            tasks.append(asyncio.ensure_future(self._refill()))
        log.info("VM cache: serving %d VM(s) on %s", self.number, self.endpoint)
        if ready is not None:
            ready()
        try:
            await stop.wait()
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            listener.close()
            with contextlib.suppress(OSError):
                if os.lstat(self.endpoint).st_ino == ino:
                    os.unlink(self.endpoint)
            conns = list(self._conns)
            for t in conns:
                t.cancel()
            await asyncio.gather(*conns, return_exceptions=True)
            slots, self.ready = self.ready, []
            await asyncio.gather(*(self._discard(s, "server stopping") for s in slots))
            _rmtree(self.dir)
            log.info("VM cache: stopped (%d VM(s) handed out in all)", self.handed)


# -- the client (a sandbox) ------------------------------------------------------------------
class Taken:
    """A VM received from the cache, not yet confirmed: ``accept()`` once it is
    adopted and recorded (the server then lets go), else ``abort()`` (the
    server stops it)."""

    def __init__(self, sock: socket.socket, handoff: Handoff) -> None:
        self._sock = sock
        self.handoff = handoff
        self.info = handoff.info

    @property
    def name(self) -> str:
        return str(self.info.get("name", "?"))

    def _accept(self) -> None:
        self._sock.sendall(encode_request({"op": "ack"}))
        reply, _ = recv_reply(self._sock)
        if not reply.get("released"):
            raise errors.Unavailable(f"the VM cache did not release {self.name}")

    async def accept(self) -> None:
        try:
            await asyncio.to_thread(self._accept)
        except OSError as exc:
            raise errors.Unavailable(f"the VM cache did not confirm {self.name}: {exc}") from None
        finally:
            self._sock.close()

    def abort(self) -> None:
        self.handoff.close()
        self._sock.close()


def _take(endpoint: Path, key: str, who: str) -> Taken:
    sock = connect(endpoint)
    try:
        sock.sendall(encode_request({"op": "take", "key": key, "who": who}))
        reply, fds = recv_reply(sock, MAX_FDS)
        if not reply["ok"]:
            for fd in fds:
                os.close(fd)
            raise errors.Unavailable(f"the VM cache has none: {reply.get('reason', '?')}")
        vm = reply.get("vm")
        if not isinstance(vm, dict):
            for fd in fds:
                os.close(fd)
            raise errors.InvalidArgument("the VM cache's reply has no VM")
        names = vm.pop("fds", None)
        return Taken(sock, Handoff.received(vm, names if isinstance(names, list) else [], fds))
    except BaseException:
        sock.close()
        raise


async def take(config: Config, spec: VMSpec, driver: Driver, who: str) -> Taken | None:
    """A cached VM of ``spec``'s shape, or None (logged at info): no cache, an
    empty one, another shape, a server that is gone or misbehaves."""
    endpoint = Path(config.factory.vm_cache_endpoint)
    try:
        key = cache_key(spec, driver)
        return await asyncio.to_thread(_take, endpoint, key, who)
    except (errors.PykataError, OSError, ValueError) as exc:
        log.info("sandbox %s boots without the VM cache: %s", who, exc)
        return None


def query_status(endpoint: Path) -> dict[str, Any]:
    """The server's status (Unavailable if none answers)."""
    sock = connect(endpoint)
    try:
        sock.sendall(encode_request({"op": "status"}))
        reply, _ = recv_reply(sock)
    except OSError as exc:
        raise errors.Unavailable(f"the VM cache at {endpoint} did not answer: {exc}") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise errors.Unavailable(f"the VM cache refused: {reply.get('reason', '?')}")
    return reply
