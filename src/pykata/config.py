"""Configuration: /etc/pykata/configuration.toml over built-in defaults.

``PYKATA_CONFIG`` names another file. Every key is validated: an unknown key,
a wrong type or an impossible value is an InvalidArgument naming the file, the
section and the key. ``pykata env`` prints the effective result.

``[hypervisor] driver`` selects the hypervisor driver (default "qemu"); its
section ``[hypervisor.<driver>]`` has the keys every driver has (VMConfig,
what the runtime reads through ``Config.vm``) and the driver's own.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pykata.errors import InvalidArgument

DEFAULT_PATH = Path("/etc/pykata/configuration.toml")
ENV_VAR = "PYKATA_CONFIG"

_T = TypeVar("_T")

# The kernel command line that boots fastest here (see docs/benchmarks.md).
LEAN_KERNEL_PARAMS = (
    "quiet loglevel=1 tsc=reliable no_timer_check rcupdate.rcu_expedited=1 "
    "i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 i8042.nokbd=1 "
    "noreplace-smp reboot=k cryptomgr.notests pci=lastbus=0 panic=-1 "
    "mitigations=off random.trust_cpu=on nowatchdog "
    # No 64 MiB bounce buffer: virtio devices here do DMA directly (no IOMMU, no
    # memory encryption), and the buffer alone is 64 MiB of touched guest RAM.
    "swiotlb=noforce"
)


@dataclass
class VMConfig:
    """The keys every hypervisor driver's section ([hypervisor.<driver>]) has:
    the guest's boot files and size, the shared file system and its daemon, the
    agent channel. The runtime reads these, and only these, through
    :attr:`Config.vm` (the selected driver's section); a driver's own keys are
    in its subclass (``QemuConfig``)."""

    path: str = ""  # the VMM executable
    kernel: str = ""  # "" = the built image: vmlinux if present, else vmlinuz
    initrd: str = ""  # "" = the built initrd
    # The guest's root: "initrd" unpacks the whole image into each VM's RAM;
    # "image" maps the read-only root image (erofs) from the host's page cache
    # with DAX through an early initrd, so VMs share one copy (docs/rootfs.md).
    rootfs: str = "initrd"  # initrd | image
    rootfs_device: str = "nvdimm"  # image: nvdimm | virtio-pmem (DAX) | virtio-blk
    kernel_params: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0  # 0 = number of host CPUs
    default_memory: int = 512  # MiB
    memory_slots: int = 10
    default_maxmemory: int = 0  # MiB, 0 = host memory
    shared_fs: str = "virtio-fs"  # virtio-fs | none
    virtio_fs_daemon: str = "/usr/lib/qemu/virtiofsd"
    virtio_fs_cache: str = "auto"  # auto | always | none
    virtio_fs_cache_size: int = 0  # DAX window, MiB (0 = no DAX)
    virtio_fs_extra_args: list[str] = field(default_factory=list)
    # virtiofsd: its own sandbox (namespace where the binary has it, else chroot)
    # and extended attributes only when asked for (SELinux labels, file caps).
    virtio_fs_sandbox: str = "auto"  # auto | namespace | chroot
    virtio_fs_xattr: bool = False
    agent_channel: str = "auto"  # auto | vsock | serial
    # virtio-balloon free page reporting: memory the guest frees goes back to
    # the host (Kata's key; measured -7% idle QEMU memory here, docs/benchmarks.md).
    reclaim_guest_freed_memory: bool = True
    enable_debug: bool = False


@dataclass
class QemuConfig(VMConfig):
    """[hypervisor.qemu]: the common keys (VMConfig) and QEMU's own."""

    path: str = "/usr/bin/qemu-system-x86_64"
    machine_type: str = "q35"
    machine_options: str = "sata=off,smbus=off,vmport=off,smm=off,usb=off"
    accelerator: str = "auto"  # auto | kvm | tcg
    cpu_model: str = ""  # "" = host (kvm) or max (tcg)
    # MiB of TCG translation cache (TCG only); 0 = QEMU's default (1 GiB, of
    # which an idle guest fills ~40 MiB). 32 saves ~14 MiB per idle VM and ~47
    # MiB after work (docs/memory.md). Multi-threaded TCG aborts (tcg/region.c)
    # when a vCPU is hot-plugged while the cache's last region is in use, at any
    # size; so a VM that can gain vCPUs runs single-threaded TCG (thread=single:
    # a new vCPU starts no thread). A 1-vCPU pod loses nothing.
    tb_size: int = 32
    extra_args: list[str] = field(default_factory=list)
    # Confinement (docs/security.md). QEMU's own seccomp filter ("-sandbox"); ""
    # turns it off. QEMU starts as this unprivileged user (created by make setup)
    # and gets every file and socket it needs as an open fd; "" keeps it root.
    seccomp_sandbox: str = (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )
    run_as_user: str = "pykata-qemu"


@dataclass
class HypervisorConfig:
    """[hypervisor]: which driver runs the VMs (``driver``), and one section per
    driver pykata has, [hypervisor.<driver>]. A second driver adds its section
    here (a VMConfig subclass) and its name to pykata.hypervisor.DRIVERS."""

    driver: str = "qemu"
    qemu: QemuConfig = field(default_factory=QemuConfig)

    @classmethod
    def drivers(cls) -> tuple[str, ...]:
        """The driver names a configuration may select: its driver sections."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "driver")

    def selected(self) -> VMConfig:
        """The selected driver's section."""
        if self.driver not in self.drivers():
            raise InvalidArgument(f"[hypervisor] driver = {self.driver!r} is not one of"
                                  f" {', '.join(self.drivers())}")
        section = getattr(self, self.driver)
        assert isinstance(section, VMConfig)
        return section


@dataclass
class AgentConfig:
    """[agent]"""

    dial_timeout: int = 45  # seconds to wait for the agent after VM start
    enable_debug: bool = False
    kernel_modules: list[str] = field(default_factory=list)
    # Who runs containers in the guest: the agent itself ("native") or crun. The guest
    # defaults to native; crun is asked for with the kernel parameter
    # pykata.wire.AGENT_ENGINE_PARAM.
    container_engine: str = "native"
    # A shell in the guest outside any container (`pykata exec SANDBOX`), for
    # debugging: only sandboxes started with this on allow it; off by default.
    debug_console: bool = False
    # The agent policy (docs/confidential.md): a JSON file on the host, read when
    # a sandbox is created and fixed in the guest for the sandbox's life; "" (the
    # default) allows every request, as before. A pod may carry its own in the
    # annotation io.katacontainers.config.agent.policy (base64) when
    # policy_annotation is true.
    policy_file: str = ""
    policy_annotation: bool = False


@dataclass
class GuestPullConfig:
    """[guest_pull]: images pulled and verified inside the guest (issue 19)
    instead of mounting the host's snapshot through virtio-fs."""

    # Every container of a sandbox started with this configuration pulls its
    # image in the guest (the RuntimeClass pykata-guest-pull points at such a
    # configuration); a pod can also ask with the annotation
    # io.pykata.guest-pull = "true".
    enabled: bool = False
    # Size cap of the guest storage the layers are unpacked into (tmpfs), MiB.
    storage_mib: int = 1024
    # Registries (host[:port]) reached over plain HTTP instead of HTTPS.
    plain_http_registries: list[str] = field(default_factory=list)
    # The node's image signature policy (JSON, docs/confidential.md): which
    # images must carry a cosign signature by which keys; "" = none required.
    signature_policy_file: str = ""


@dataclass
class RuntimeConfig:
    """[runtime]"""

    state_dir: str = "/run/pykata"
    internetworking_model: str = "tcfilter"  # tcfilter | macvtap | none
    create_container_timeout: int = 60
    enable_debug: bool = False
    sandbox_cgroup_only: bool = False
    # Kubernetes emptyDir volumes live in the guest by default; true keeps them
    # on the host, shared through virtio-fs.
    disable_guest_empty_dir: bool = False
    # Pods that can be checkpointed (shared_fs = "none") boot with their RAM in
    # a file (<state_dir>/vm/<sandbox>.mem) instead of an anonymous memfd: what
    # a checkpoint packs (docs/checkpoint-design.md). Off: nothing changes.
    checkpointable: bool = False
    # Cap, in bytes, of each host log a sandbox writes from what the guest or its
    # VMM prints (console.log, qemu.log, virtiofsd.log): when full, a file becomes
    # <name>.1 (replacing the older one) and starts again, so at most twice this.
    log_max_bytes: int = 1048576
    # OpenTelemetry spans of sandbox and container lifecycle, the shim's and the
    # agent's (carried back over the agent channel). Off by default; when on, they
    # go to tracing_endpoint (an OTLP/HTTP traces URL, e.g.
    # http://127.0.0.1:4318/v1/traces) and/or tracing_file (JSON lines, appended).
    enable_tracing: bool = False
    tracing_endpoint: str = ""
    tracing_file: str = ""


@dataclass
class FactoryConfig:
    """[factory]: VM templating. A template VM is booted once (agent up, idle)
    and saved; each sandbox then starts as a copy of it instead of booting."""

    enable_template: bool = False
    # Where the template's memory and device state live: on tmpfs, in a
    # root-only directory (created 0700, its owner and mode checked before use).
    template_path: str = "/run/pykata/template"
    # The VM cache (Kata's vm_cache_number): `pykata factory serve` keeps this
    # many VMs booted and idle (each its own boot, or a template clone when
    # enable_template is on) and hands one to each new sandbox of the default
    # shape; 0 turns it off. Sandboxes fall back to booting when it is empty or gone.
    vm_cache_number: int = 0
    # The cache server's unix socket (0600, root only; its directory must be root's).
    vm_cache_endpoint: str = "/run/pykata/vmcache.sock"


@dataclass
class ImageConfig:
    """[image]"""

    output_dir: str = "/var/lib/pykata"


@dataclass
class Config:
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    guest_pull: GuestPullConfig = field(default_factory=GuestPullConfig)
    source: str = ""  # the file it was read from ("" = built-in defaults)

    @property
    def vm(self) -> VMConfig:
        """The selected driver's section ([hypervisor] driver), as every driver
        has it: what the runtime reads (sizes, boot files, shared fs, channel)."""
        try:
            return self.hypervisor.selected()
        except InvalidArgument as exc:  # a driver set in code, past parse()'s checks
            raise InvalidArgument(f"{self.source or 'configuration'}: {exc}") from None

    @property
    def qemu(self) -> QemuConfig:
        """[hypervisor.qemu]: for QEMU's own code (its driver, ``pykata check``)."""
        return self.hypervisor.qemu

    def kernel_path(self) -> Path:
        if self.vm.kernel:
            return Path(self.vm.kernel)
        out = Path(self.image.output_dir)
        vmlinux = out / "vmlinux"
        return vmlinux if vmlinux.exists() else out / "vmlinuz"

    def initrd_path(self) -> Path:
        """The initrd QEMU boots: the whole root, or (rootfs = "image") the early
        initrd that mounts the root image."""
        if self.vm.initrd:
            return Path(self.vm.initrd)
        name = "initrd-early.img" if self.vm.rootfs == "image" else "initrd.img"
        return Path(self.image.output_dir) / name

    def root_image_path(self) -> Path | None:
        """The read-only root image (rootfs = "image"), else None."""
        if self.vm.rootfs != "image":
            return None
        return Path(self.image.output_dir) / "rootfs.erofs"


# Rules by (section, key); "hypervisor.*" holds for the common keys (VMConfig)
# in every driver's section.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("hypervisor", "driver"): HypervisorConfig.drivers(),
    ("hypervisor.*", "shared_fs"): ("virtio-fs", "none"),
    ("hypervisor.*", "virtio_fs_cache"): ("auto", "always", "none", "never", "metadata"),
    ("hypervisor.*", "agent_channel"): ("auto", "vsock", "serial"),
    ("hypervisor.*", "virtio_fs_sandbox"): ("auto", "namespace", "chroot"),
    ("hypervisor.*", "rootfs"): ("initrd", "image"),
    ("hypervisor.*", "rootfs_device"): ("nvdimm", "virtio-pmem", "virtio-blk"),
    ("hypervisor.qemu", "accelerator"): ("auto", "kvm", "tcg"),
    ("runtime", "internetworking_model"): ("tcfilter", "macvtap", "none"),
    ("agent", "container_engine"): ("native", "crun"),
}
_MINIMUM: dict[tuple[str, str], int] = {
    ("hypervisor.*", "default_vcpus"): 1,
    ("hypervisor.*", "default_maxvcpus"): 0,
    ("hypervisor.*", "default_memory"): 64,
    ("hypervisor.*", "memory_slots"): 0,
    ("hypervisor.*", "default_maxmemory"): 0,
    ("hypervisor.*", "virtio_fs_cache_size"): 0,
    ("hypervisor.qemu", "tb_size"): 0,
    ("agent", "dial_timeout"): 1,
    ("runtime", "create_container_timeout"): 1,
    ("runtime", "log_max_bytes"): 4096,
    ("factory", "vm_cache_number"): 0,
    ("guest_pull", "storage_mib"): 16,
}
_MAXIMUM: dict[tuple[str, str], int] = {
    # Each cached VM is a whole idle guest (hundreds of MiB under TCG).
    ("factory", "vm_cache_number"): 64,
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of strings"
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number"}
    return names.get(tp, str(tp))


def _rule(rules: dict[tuple[str, str], _T], section: str, key: str) -> _T | None:
    if (section, key) in rules:
        return rules[(section, key)]
    if section.startswith("hypervisor."):
        return rules.get(("hypervisor.*", key))
    return None


def _check_value(where: str, section: str, key: str, tp: Any, value: Any) -> Any:
    if typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{where}: [{section}] {key} must be a list of strings")
        return list(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise InvalidArgument(
            f"{where}: [{section}] {key} must be {_type_name(tp)}, not {value!r}"
        )
    choices = _rule(_CHOICES, section, key)
    if choices and value not in choices:
        raise InvalidArgument(
            f"{where}: [{section}] {key} = {value!r} is not one of {', '.join(choices)}"
        )
    minimum = _rule(_MINIMUM, section, key)
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{where}: [{section}] {key} = {value} is below {minimum}")
    maximum = _rule(_MAXIMUM, section, key)
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{where}: [{section}] {key} = {value} is above {maximum}")
    return value


def _fill(where: str, section: str, obj: Any, table: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in table.items():
        if key not in names or key == "source":
            known = ", ".join(sorted(n for n in names if n != "source"))
            raise InvalidArgument(
                f"{where}: unknown key {key!r} in [{section or 'top level'}] (known: {known})"
            )
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            sub = f"{section}.{key}" if section else key
            if not isinstance(value, dict):
                raise InvalidArgument(f"{where}: [{sub}] must be a table")
            _fill(where, sub, current, value)
        else:
            setattr(obj, key, _check_value(where, section, key, tp, value))


def parse(text: str, where: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{where}: not valid TOML: {exc}") from exc
    except RecursionError:
        raise InvalidArgument(f"{where}: not valid TOML: nested too deeply") from None
    cfg = Config()
    _fill(where, "", cfg, data)
    cfg.source = where
    _cross_check(cfg, where)
    return cfg


def _cross_check(cfg: Config, where: str) -> None:
    q = cfg.vm
    section = f"hypervisor.{cfg.hypervisor.driver}"
    if q.default_maxvcpus and q.default_maxvcpus < q.default_vcpus:
        raise InvalidArgument(
            f"{where}: [{section}] default_maxvcpus ({q.default_maxvcpus}) is below"
            f" default_vcpus ({q.default_vcpus})"
        )
    if cfg.factory.enable_template and not os.path.isabs(cfg.factory.template_path):
        raise InvalidArgument(
            f"{where}: [factory] template_path must be an absolute path,"
            f" not {cfg.factory.template_path!r}")
    if not os.path.isabs(cfg.factory.vm_cache_endpoint):
        raise InvalidArgument(
            f"{where}: [factory] vm_cache_endpoint must be an absolute path,"
            f" not {cfg.factory.vm_cache_endpoint!r}")
    for section_name, key, value in (
            ("agent", "policy_file", cfg.agent.policy_file),
            ("guest_pull", "signature_policy_file", cfg.guest_pull.signature_policy_file)):
        if value and not os.path.isabs(value):
            raise InvalidArgument(
                f"{where}: [{section_name}] {key} must be an absolute path, not {value!r}")
    if q.default_maxmemory and q.default_maxmemory < q.default_memory:
        raise InvalidArgument(
            f"{where}: [{section}] default_maxmemory ({q.default_maxmemory}) is below"
            f" default_memory ({q.default_memory})"
        )


def config_path() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path | None = None) -> Config:
    """The effective configuration: the file (if it exists) over the defaults.

    A file named by PYKATA_CONFIG or ``path`` must exist; the default path may not.
    """
    explicit = path is not None or ENV_VAR in os.environ
    p = path or config_path()
    try:
        text = p.read_bytes().decode()
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"configuration file {p} is not UTF-8 text (byte {exc.start})"
                              ) from None
    except FileNotFoundError:
        if explicit:
            raise InvalidArgument(f"configuration file {p} does not exist") from None
        return Config()
    except OSError as exc:
        raise InvalidArgument(f"cannot read configuration file {p}: {exc}") from exc
    return parse(text, str(p))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + "".join(_TOML_ESCAPES.get(c) or (
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in str(value)) + '"'


# A TOML basic string: these escaped by name, other control characters as \uXXXX.
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def to_toml(cfg: Config) -> str:
    """The configuration as TOML (what ``pykata env`` prints)."""
    out: list[str] = []

    def emit(section: str, obj: Any) -> None:
        scalars = []
        tables = []
        for f in dataclasses.fields(obj):
            if f.name == "source":
                continue
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                tables.append((f"{section}.{f.name}" if section else f.name, v))
            else:
                scalars.append(f"{f.name} = {_toml_value(v)}")
        if scalars:
            out.append(f"[{section}]")
            out.extend(scalars)
            out.append("")
        for name, sub in tables:
            emit(name, sub)

    emit("", cfg)
    return "\n".join(out)


