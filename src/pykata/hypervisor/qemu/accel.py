"""Decide between KVM and TCG by trying, not by looking at /dev/kvm.

The probe boots a 64 KiB firmware whose reset vector writes to QEMU's
isa-debug-exit port, so QEMU exits with a known status within milliseconds if
the accelerator executes guest code at all. A host whose KVM is PVM (the
``kvm_pvm`` module) runs only PVM-enabled guest kernels, so a standard guest
kernel would hang there: that counts as "KVM unusable" as well.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_EXIT_VALUE = 0x2A
_EXPECTED_STATUS = (_EXIT_VALUE << 1) | 1  # isa-debug-exit: (value << 1) | 1
PVM_MODULE = Path("/sys/module/kvm_pvm")


@dataclass(frozen=True)
class AccelProbe:
    accel: str  # "kvm" or "tcg"
    reason: str


def probe_firmware() -> bytes:
    """64 KiB of firmware: at the reset vector, `mov al,0x2a; out 0xf4,al; hlt; jmp $-1`."""
    image = bytearray(b"\xf4" * 65536)
    code = bytes([0xB0, _EXIT_VALUE, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    image[-16 : -16 + len(code)] = code
    return bytes(image)


def _run_probe(qemu: str, accel: str, timeout: float) -> tuple[bool, str]:
    with tempfile.NamedTemporaryFile(prefix="pykata-probe-", suffix=".bin") as fw:
        fw.write(probe_firmware())
        fw.flush()
        argv = [
            qemu, "-machine", f"pc,accel={accel}", "-bios", fw.name, "-m", "16",
            "-display", "none", "-nodefaults", "-no-user-config",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        try:
            p = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False, f"{accel} probe did not finish within {timeout:g}s"
        except OSError as exc:
            return False, f"cannot run {qemu}: {exc}"
    if p.returncode == _EXPECTED_STATUS:
        return True, f"{accel} ran the probe firmware"
    err = p.stderr.decode(errors="replace").strip().splitlines()
    return False, f"{accel} probe exited {p.returncode}: {err[-1] if err else 'no output'}"


def probe(qemu: str, requested: str = "auto", cache: Path | None = None) -> AccelProbe:
    """The accelerator to use. ``requested`` "kvm"/"tcg" is obeyed as is."""
    if requested in ("kvm", "tcg"):
        return AccelProbe(requested, "set in configuration")
    key = _cache_key(qemu)
    if cache is not None:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return AccelProbe(data["accel"], data["reason"] + " (cached)")
        except (OSError, ValueError, KeyError):
            pass
    result = _decide(qemu)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, **result.__dict__}))
            tmp.replace(cache)
        except OSError as exc:
            log.debug("cannot cache accelerator probe in %s: %s", cache, exc)
    return result


def _decide(qemu: str) -> AccelProbe:
    if not os.path.exists("/dev/kvm"):
        return AccelProbe("tcg", "/dev/kvm does not exist")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelProbe("tcg", "/dev/kvm is not accessible")
    if PVM_MODULE.exists():
        return AccelProbe(
            "tcg", "KVM here is PVM (kvm_pvm), which runs only PVM-enabled guest kernels"
        )
    ok, why = _run_probe(qemu, "kvm", timeout=5.0)
    return AccelProbe("kvm" if ok else "tcg", why)


def _cache_key(qemu: str) -> str:
    parts = [qemu]
    for p in (qemu, "/dev/kvm"):
        try:
            st = os.stat(p)
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}")
        except OSError:
            parts.append("-")
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    return "|".join(parts)
