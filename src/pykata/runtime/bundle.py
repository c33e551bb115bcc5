"""The OCI bundle reader: a bundle's ``config.json`` parsed in one place, for
the runtime, the shim and ``pykata-runtime``.

Rules:

- ``load_spec(bundle)`` returns the spec as a dict, or raises
  ``errors.InvalidArgument`` with one line saying which of these it is: the
  bundle does not exist, it has no config.json, config.json is unreadable, it
  is not JSON (or nested too deeply to read), it is not a JSON object. What
  the spec must contain beyond that (process.args, root.path, ...) is checked
  by its users.
- ``load_spec_or_empty(bundle)`` is the same read for callers that must go on
  without a spec (the shim's ``start``/``delete`` of a bundle already gone): ``{}``.
- ``spec_annotations(spec)`` is the spec's string-valued annotations (``{}`` when
  there are none, or when ``annotations`` is not an object).
- ``default_spec(args, ...)`` is a spec shaped like ``runc spec`` output (what
  ``pykata-runtime spec`` writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pykata import errors

CONFIG = "config.json"
OCI_VERSION = "1.0.2"
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_spec(bundle: str | Path) -> dict[str, Any]:
    """The bundle's config.json as a dict (InvalidArgument, one line, otherwise)."""
    bundle = Path(bundle)
    path = bundle / CONFIG
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not bundle.is_dir():
            raise errors.InvalidArgument(f"bundle {bundle} does not exist") from None
        raise errors.InvalidArgument(f"bundle {bundle} has no {CONFIG}") from None
    except OSError as exc:
        raise errors.InvalidArgument(
            f"cannot read {path}: {_one_line(exc.strerror or exc)}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also undecodable bytes (UnicodeDecodeError)
        raise errors.InvalidArgument(f"{path} is not JSON: {_one_line(exc)}") from exc
    except RecursionError:  # arrays or objects nested thousands deep
        raise errors.InvalidArgument(f"{path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.InvalidArgument(
            f"{path} is not a JSON object (a {type(data).__name__})")
    return data


def load_spec_or_empty(bundle: str | Path) -> dict[str, Any]:
    """``load_spec``, or ``{}`` when the bundle has no readable spec."""
    try:
        return load_spec(bundle)
    except errors.InvalidArgument:
        return {}


def spec_annotations(spec: dict[str, Any]) -> dict[str, str]:
    """The spec's annotations with string values ({} if absent or not an object)."""
    ann = spec.get("annotations")
    if not isinstance(ann, dict):
        return {}
    return {str(k): v for k, v in ann.items() if isinstance(v, str)}


def default_spec(args: list[str], *, hostname: str = "pykata", terminal: bool = False,
                 env: list[str] | None = None, cwd: str = "/",
                 memory_limit: int | None = None) -> dict[str, Any]:
    """An OCI runtime spec shaped like `runc spec` output (root: ``rootfs``)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_SETUID",
            "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETPCAP",
            "CAP_MKNOD", "CAP_NET_RAW", "CAP_SYS_CHROOT"]
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": env if env is not None else list(DEFAULT_ENV), "cwd": cwd,
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount",
                                                                    "cgroup")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    if memory_limit is not None:
        spec["linux"]["resources"]["memory"] = {"limit": memory_limit, "swap": memory_limit}
    return spec
