"""The one sandbox an agent serves: its id, its containers, what it mounted.

CreateSandbox prepares the guest (clock, hostname, /etc, kernel modules,
entropy: only as PID 1, apart from entropy) and mounts the sandbox's own
storages; containers are created, looked up and removed here; DestroySandbox
removes every container, then unmounts what the sandbox owns.

Pod namespaces: the first container created with a sandbox pid namespace (the
pod's sandbox container) owns it; later containers join its pid namespace
(when asked) and, for entries the host marked ``wire.SANDBOX_NS_MARKER``, its
``wire.POD_SHARED_NAMESPACES`` (ipc, uts).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pykata import errors, wire
from pykata.guest import guestops, logs, sysutil
from pykata.guest import spec as specmod
from pykata.guest.container import Container, Process
from pykata.guest.crun import Crun
from pykata.guest.oom import OomWatcher
from pykata.guest.policy import ContainerInfo, Policy
from pykata.guest.pull import GuestPulls
from pykata.guest.settings import Settings
from pykata.guest.storage import Storages
from pykata.protos import agent_pb2 as pb

log = logging.getLogger(__name__)


class Sandbox:
    def __init__(self, settings: Settings, crun: Crun) -> None:
        self.settings = settings
        self.crun = crun
        self.id = ""  # "" until CreateSandbox
        self.pidns = False  # every container joins the sandbox pid namespace
        self.pidns_owner: Container | None = None
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._legacy_tables = False  # ip_tables/ip6_tables loaded for iptables-legacy
        self.storages = Storages()
        self.oom = OomWatcher(self.containers)
        # The agent policy (docs/confidential.md): allow-all until CreateSandbox
        # brings a document; after that only SetPolicy, if the document allows it.
        self.policy = Policy.allow_all()
        self.image_policy = b""  # the node's image signature policy (JSON), from CreateSandbox
        self.pulls = GuestPulls(settings.state_dir / "images")  # guest-pulled images (pull.py)

    # -- lookups --------------------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        try:
            return self.containers[container_id]
        except KeyError:
            raise errors.NotFound(f"container {container_id} not found") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.container(container_id).process(exec_id)

    def container_infos(self) -> dict[str, ContainerInfo]:
        """What the policy sees of each container, by id."""
        return {cid: ContainerInfo.from_spec(cid, c.spec, c.image_digest, c.execs)
                for cid, c in self.containers.items()}

    # -- the sandbox ----------------------------------------------------------------------

    async def create(self, req: pb.CreateSandboxRequest) -> None:
        if self.id:
            raise errors.AlreadyExists(f"sandbox {self.id} is already created")
        if req.policy:  # first: a refused or invalid document changes nothing
            self.policy = self.policy.replace(req.policy)
            log.info("agent policy in force: %d bytes", len(req.policy))
        self.image_policy = req.image_policy
        if self.settings.init_mode:
            self._prepare_guest(req)
        else:
            log.info("development mode: hostname, clock, /etc and modules left alone")
        if req.random_seed:
            sysutil.add_entropy(req.random_seed)
        self.storages.mount_sandbox(req.storages)
        self.pidns = req.sandbox_pidns
        self.id = req.sandbox_id or "sandbox"
        if self.settings.init_mode:
            from pykata.guest import portfwd  # lazy: not on the agent's start path

            portfwd.start()  # the host's port-forward channel (CRI PortForward)
        log.info("sandbox %s created", self.id)

    @staticmethod
    def _prepare_guest(req: pb.CreateSandboxRequest) -> None:
        """Clock, hostname, /etc and kernel modules (PID 1 only)."""
        if req.host_time_unix_nano:
            try:
                sysutil.set_clock(req.host_time_unix_nano)
            except OSError as exc:
                log.warning("cannot set the clock: %s", exc)
        if req.hostname:
            sysutil.set_hostname(req.hostname)
        guestops.write_etc(req.dns, req.hosts)
        for mod in req.kernel_modules:
            try:
                sysutil.load_module_by_name(mod.name, mod.parameters)
            except OSError as exc:
                raise errors.InvalidArgument(f"cannot load kernel module {mod.name}: "
                                             f"{exc.strerror or exc}") from None

    async def destroy(self) -> None:
        """Remove every container, unmount what the sandbox owns; all is tried,
        the first failure is raised (Internal) with the count of the others."""
        failures: list[str] = []
        results = await asyncio.gather(
            *(self.remove_container(c, 10.0) for c in list(self.containers.values())),
            return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                failures.append(str(r))
        failures += self.storages.release_sandbox()
        if self.settings.init_mode:
            os.sync()
        log.info("sandbox %s destroyed", self.id)
        self.id = ""
        self.pidns_owner = None
        logs.set_sandbox("")
        if failures:
            raise errors.Internal(f"destroy sandbox: {failures[0]}"
                                  + (f" (and {len(failures) - 1} more)" if len(failures) > 1
                                     else ""))

    async def shutdown(self) -> None:
        """Remove every container (the agent is stopping in development mode)."""
        if not self.containers:
            return
        log.info("removing %d containers before exiting", len(self.containers))
        await asyncio.gather(
            *(self.remove_container(c, 5.0) for c in list(self.containers.values())),
            return_exceptions=True)

    # -- pod namespaces -------------------------------------------------------------------

    def _sandbox_namespaces(self) -> dict[str, str]:
        """The pod sandbox container's IPC and UTS namespaces (the pod's), if it runs."""
        owner = self.pidns_owner
        if owner is None or owner.init.exited or owner.init.pid <= 0:
            return {}
        return {kind: f"/proc/{owner.init.pid}/ns/{kind}" for kind in wire.POD_SHARED_NAMESPACES}

    def _pidns_path(self, wanted: bool) -> str | None:
        if not (wanted or self.pidns):
            return None
        owner = self.pidns_owner
        if owner is None:
            return None
        if owner.init.exited or owner.init.pid <= 0:
            raise errors.FailedPrecondition(
                f"sandbox pid namespace is gone: container {owner.id} has stopped")
        return f"/proc/{owner.init.pid}/ns/pid"

    # -- containers -----------------------------------------------------------------------

    async def create_container(self, req: pb.CreateContainerRequest) -> Container:
        """Storages, guest spec, ``crun create``; on any error nothing is left behind."""
        cid = specmod.check_id("container", req.container_id)
        if cid in self.containers or cid in self._creating:
            raise errors.AlreadyExists(f"container {cid} already exists")
        oci = specmod.load_json(req.oci_spec_json, "OCI spec")
        specmod.validate(oci)
        self._creating.add(cid)
        mounted: list[str] = []
        disks: list[str] = []
        try:
            await self.storages.mount_container(cid, oci, req.storages, req.devices, mounted,
                                                disks)
            # The manifest digest the agent verified itself when it pulled the
            # image (guest pull); "" when the host shared the root filesystem.
            digest = ""
            infos = self.container_infos()
            if req.HasField("guest_pull") and req.guest_pull.image:
                # Signatures and the agent policy are decided once the manifest
                # is verified, before any layer is fetched.
                def check(d: str) -> None:
                    self.policy.check("CreateContainer", req, infos, image_digest=d)

                pulled = await self.pulls.pull(cid, req.guest_pull, self.image_policy, check)
                digest = pulled.digest
                oci["root"]["path"] = self.pulls.root(cid)
            else:
                self.policy.check("CreateContainer", req, infos, image_digest=digest)
            rootfs = oci["root"]["path"]
            if not os.path.isdir(rootfs):
                raise errors.InvalidArgument(
                    f"container root filesystem {rootfs} does not exist in the guest")
            pidns = self._pidns_path(req.sandbox_pidns)
            guest = specmod.guest_spec(oci, cid, self.settings.cgroup_parent, pidns,
                                       self._sandbox_namespaces())
            if os.getpid() == 1:  # the VM's network namespace is the pod's
                _set_sysctls(specmod.network_sysctls(oci))
                if not self._legacy_tables and _grants_net_admin(oci):
                    await asyncio.to_thread(_load_legacy_tables)
                    self._legacy_tables = True
            c = Container(cid, guest, self.settings, self.crun, on_exit=self.oom.check)
            c.storages = mounted
            c.disks = disks
            c.image_digest = digest
            await c.create(guest)
        except BaseException:
            for failure in self.pulls.release(cid):
                log.warning("container %s: %s", cid, failure)
            await self.storages.release_container(cid, mounted, disks)
            # What the failed create looked up stays cached otherwise: host
            # descriptors in virtiofsd, and dentries of a directory the host
            # removes; a create that reuses the id would walk them, stale.
            await asyncio.to_thread(forget_unused_inodes)
            raise
        finally:
            self._creating.discard(cid)
        self.containers[cid] = c
        if (req.sandbox_pidns or self.pidns) and self.pidns_owner is None:
            self.pidns_owner = c
        return c

    async def remove_container(self, c: Container, timeout: float) -> None:
        async with c.lock:
            if self.containers.get(c.id) is not c:
                raise errors.NotFound(f"container {c.id} not found")
            await c.remove(timeout)
            del self.containers[c.id]
            if self.pidns_owner is c:
                self.pidns_owner = None
            await self.storages.release_container(c.id, c.storages, c.disks)
            for failure in self.pulls.release(c.id):
                log.warning("container %s: %s", c.id, failure)
        await asyncio.to_thread(forget_unused_inodes)


DROP_PASSES = 3


def forget_unused_inodes() -> None:
    """Drop the kernel's unused dentries and inodes. A removed (or failed)
    container's files, looked up through virtio-fs, stay cached in the guest
    otherwise, and for each the host's virtiofsd keeps a descriptor open (it
    closes it when the guest forgets the inode): about 20 per busybox container
    and 3 to 6 per failed create, for the pod's life. A directory's dentry is
    unused only once its children are gone, and the kernel ends a pass when it
    frees fewer than ten objects: a short chain (a failed create's cid/rootfs/usr)
    can outlive one pass, so there are DROP_PASSES."""
    try:
        for _ in range(DROP_PASSES):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2\n")
    except OSError as exc:
        log.warning("cannot drop the inode cache: %s", exc.strerror)


def _set_sysctls(sysctls: dict[str, str]) -> None:
    for key, value in sysctls.items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as exc:
            raise errors.InvalidArgument(
                f"cannot set sysctl {key}={value}: {exc.strerror}") from exc


# iptables-legacy talks to ip_tables/ip6_tables through socket options, which no
# kernel alias loads on demand (nftables and every table module are loaded by the
# kernel itself when first used). On runc the node's kernel has them loaded
# already; here the first container that may change the firewall gets them.
LEGACY_TABLE_MODULES = ("ip_tables", "ip6_tables")


def _grants_net_admin(oci: dict[str, Any]) -> bool:
    caps = ((oci.get("process") or {}).get("capabilities") or {})
    return any("CAP_NET_ADMIN" in (caps.get(kind) or ()) for kind in ("bounding", "effective"))


def _load_legacy_tables() -> None:
    for mod in LEGACY_TABLE_MODULES:
        try:
            sysutil.load_module_by_name(mod)
        except OSError as exc:  # an image without them: iptables-nft still works
            log.warning("cannot load %s for iptables-legacy: %s", mod, exc.strerror or exc)
