"""Checkpoint and restore side by side (issue 20, docs/checkpoint-design.md §6.7):
an idle container and one that wrote 256 MiB of random data into memory
(a tmpfs), each checkpointed and restored ``runs`` times in a row (each
cycle checkpoints the container the previous cycle restored):

- pykata through containerd 1.6 (``ctr c checkpoint --task``, kill and remove,
  ``ctr c restore --live``): a pod with ``shared_fs = "none"``, ``[runtime]
  checkpointable`` and its image pulled in the guest from a plain-HTTP
  docker-registry in a network namespace made here (the dd goes into the
  container's writable layer, a guest tmpfs);
- runc with criu through the same ctr commands (the dd goes into a tmpfs
  mounted at /tmp); if criu cannot work on this host, the one-line reason;
- gVisor runsc (ptrace, --network=none) on an OCI bundle: ``runsc
  checkpoint`` / ``runsc restore`` (a tmpfs at /tmp);
- a bare QEMU VM of the same kernel + initrd and memory size, a shell as init
  (the dd into the initramfs): QMP ``migrate`` to a file fd, a new QEMU with
  ``-incoming defer``, ``migrate-incoming``, ``cont``.

Per cycle: checkpoint wall time (and pykata's own phases from the
checkpoint's dump.log), checkpoint size (containerd's content-store blob of
the criu media type, the files in it; runsc's image dir; QEMU's state file),
restore time to a running task and to the first answer from the container
(``ctr t exec true``, ``runsc exec true``; the bare VM: the first line its
shell prints after ``cont``), and the restored container's host memory (PSS
of shim/sandbox/VM processes, QEMU's RSS). Load average at start and end.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import (
    CACHE,
    SHIM_MARKERS,
    Series,
    arg_parser,
    descendants,
    log,
    processes,
    pss_kib,
    remove_containers,
    rss_kib,
    run_section,
    runs,
    save_series,
    sigterm_as_interrupt,
    start_containerd,
    unmapped_ram_file_kib,
)

from pykata import config
from pykata.hypervisor.qemu.accel import probe
from pykata.runtime.bundle import default_spec
from pykata.runtime.container import GUEST_PULL_IMAGE_ANNOTATION
from pykata.testing import busybox_rootfs
from pykata.testing.bundles import make_bundle
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF, _layer_tar

CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
MEMORY_MIB = 1024  # guest RAM of the pykata pod and of the bare VM
FILL_MIB = 256
FILL = f"dd if=/dev/urandom of=/tmp/fill bs=1M count={FILL_MIB}"
REGISTRY = "/usr/bin/docker-registry"
PORT = 5000
ANSWER_WAIT = 300.0  # seconds to wait for a first answer
MiB = 1 << 20
PARTS = ("pykata", "runc", "runsc", "bare")
WORKLOADS = ("idle", f"{FILL_MIB} MiB")


def sh(*argv: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode(errors="replace")


def one_line(text: str, limit: int = 240) -> str:
    """The last line of an error output, without state paths (gone afterwards)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = re.sub(r" path= ?\S+", "", lines[-1] if lines else "no message")
    line = re.sub(r":? unknown$", "", line.removeprefix("ctr: "))
    return line[:limit]


# -- results ---------------------------------------------------------------------------

METRICS = (  # key, unit, what
    ("checkpoint", "s", "checkpoint"),
    ("shim", "s", "checkpoint: in the shim"),
    ("size", "MiB", "checkpoint size"),
    ("restore", "s", "restore to a running task"),
    ("answer", "s", "restore to the first answer"),
    ("pss", "MiB", "restored: PSS"),
    ("rss", "MiB", "restored: VMM RSS"),
)


@dataclass
class Row:
    runtime: str  # pykata | runc | runsc | bare QEMU
    workload: str  # idle | 256 MiB
    commands: dict[str, str]
    samples: dict[str, list[float]]
    failures: int = 0
    note: str = ""

    def name(self, key: str) -> str:
        return f"{self.runtime}, {self.workload}: {key}"

    def series(self) -> list[Series]:
        return [Series(self.name(key), self.commands.get(key, ""), unit,
                       list(self.samples.get(key, [])), self.failures if key == "checkpoint"
                       else 0, self.note) for key, unit, _ in METRICS]


def new_row(runtime: str, workload: str, commands: dict[str, str]) -> Row:
    return Row(runtime, workload, commands, {k: [] for k, _, _ in METRICS})


def tree_memory(root: int) -> dict[str, float]:
    """PSS of ``root`` and its descendants (MiB); the largest VMM RSS (MiB) and
    unmapped RAM file of QEMU."""
    pss = pss_kib(root)
    vmm_rss = 0
    ram_file = 0
    for pid, cmd in descendants(root):
        pss += pss_kib(pid)
        if "qemu-system" in cmd or "runsc-sandbox" in cmd:
            vmm_rss = max(vmm_rss, rss_kib(pid))
            if "qemu-system" in cmd:
                ram_file += unmapped_ram_file_kib(pid, cmd)
    return {"pss": (pss + ram_file) / 1024, "rss": vmm_rss / 1024}


# -- a registry in a network namespace made here ----------------------------------------


@dataclass
class Net:
    pod_ns: str
    reg_ns: str
    reg_ip: str
    pod_ip: str


@contextlib.contextmanager
def network() -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    n = Net(f"pkbck-pod-{tag}", f"pkbck-reg-{tag}", "10.231.78.1", "10.231.78.2")
    sh("ip", "netns", "add", n.pod_ns)
    try:
        sh("ip", "netns", "add", n.reg_ns)
        try:
            pod_end, reg_end = f"bcp{tag}", f"bcr{tag}"
            sh("ip", "link", "add", pod_end, "type", "veth", "peer", "name", reg_end)
            sh("ip", "link", "set", reg_end, "netns", n.reg_ns)
            sh("ip", "link", "set", pod_end, "netns", n.pod_ns)
            sh("ip", "-n", n.reg_ns, "addr", "add", f"{n.reg_ip}/24", "dev", reg_end)
            sh("ip", "-n", n.reg_ns, "link", "set", reg_end, "up")
            sh("ip", "-n", n.reg_ns, "link", "set", "lo", "up")
            sh("ip", "-n", n.pod_ns, "link", "set", pod_end, "name", "eth0")
            sh("ip", "-n", n.pod_ns, "addr", "add", f"{n.pod_ip}/24", "dev", "eth0")
            sh("ip", "-n", n.pod_ns, "link", "set", "eth0", "up")
            sh("ip", "-n", n.pod_ns, "link", "set", "lo", "up")
            yield n
        finally:
            sh("ip", "netns", "del", n.reg_ns, check=False)
    finally:
        sh("ip", "netns", "del", n.pod_ns, check=False)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _store(v2: Path, repo: str, data: bytes, link: str) -> str:
    d = _sha(data)
    f = v2 / "blobs/sha256" / d[7:9] / d[7:] / "data"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    for sub in ([f"_layers/sha256/{d[7:]}"] if link == "layer" else
                [f"_manifests/revisions/sha256/{d[7:]}", f"_manifests/tags/{link}/current",
                 f"_manifests/tags/{link}/index/sha256/{d[7:]}"]):
        p = v2 / "repositories" / repo / sub
        p.mkdir(parents=True, exist_ok=True)
        (p / "link").write_text(d)
    return d


def store_image(storage: Path, repo: str, tag: str, rootfs: Path) -> None:
    """The busybox image written straight into the registry's storage
    (distribution's filesystem layout)."""
    v2 = storage / "docker/registry/v2"
    raw = _layer_tar(rootfs)
    gz = gzip.compress(raw, compresslevel=6, mtime=0)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                      "rootfs": {"type": "layers", "diff_ids": [_sha(raw)]}}).encode()
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": _store(v2, repo, cfg, "layer"), "size": len(cfg)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": _store(v2, repo, gz, "layer"), "size": len(gz)}]}
    _store(v2, repo, json.dumps(man, sort_keys=True).encode(), tag)


@contextlib.contextmanager
def registry(net: Net, work: Path, rootfs: Path) -> Iterator[str]:
    """docker-registry serving plain HTTP in the registry namespace: its host:port."""
    if not Path(REGISTRY).exists():
        raise RuntimeError("docker-registry is needed: apt-get install docker-registry")
    host = f"{net.reg_ip}:{PORT}"
    storage = work / "registry"
    storage.mkdir(parents=True)
    store_image(storage, "bench/ck", "v1", rootfs)
    cfg = work / "registry.yml"
    cfg.write_text("version: 0.1\nlog:\n  level: warn\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
                   f"http:\n  addr: {host}\n")
    with (work / "registry.log").open("wb") as logf:
        proc = subprocess.Popen(["ip", "netns", "exec", net.reg_ns, REGISTRY, "serve", str(cfg)],
                                stdout=logf, stderr=logf)
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError("docker-registry exited: " + one_line(
                    (work / "registry.log").read_text(errors="replace")))
            r = subprocess.run(["ip", "netns", "exec", net.reg_ns, "busybox", "wget", "-q",
                                "-O", "/dev/null", f"http://{host}/v2/"],
                               capture_output=True, timeout=30, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("docker-registry did not answer /v2/")
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- through containerd: pykata and runc ------------------------------------------------


def status(ctd: PrivateContainerd, cid: str) -> str:
    for line in ctd.ctr("tasks", "ls", check=False).stdout.decode().splitlines()[1:]:
        f = line.split()
        if f and f[0] == cid:
            return f[-1]
    return ""


def exec_true(ctd: PrivateContainerd, cid: str, *argv: str, timeout: float = 120) -> bool:
    r = ctd.ctr("tasks", "exec", "--exec-id", f"x{uuid.uuid4().hex[:8]}", cid,
                *(argv or ("true",)), check=False, timeout=timeout)
    return r.returncode == 0


def wait_answer(answer: Callable[[], bool], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if answer():
            return True
        time.sleep(0.1)
    return False


def remove_task(ctd: PrivateContainerd, cid: str) -> None:
    """Kill the task, wait (bounded) until it stopped, delete it and its container."""
    ctd.ctr("tasks", "kill", "-s", "KILL", cid, check=False, timeout=60)
    for _ in range(600):
        if status(ctd, cid) in ("STOPPED", ""):
            break
        time.sleep(0.2)
    ctd.ctr("tasks", "rm", "-f", cid, check=False, timeout=120)
    ctd.ctr("containers", "rm", cid, check=False, timeout=60)


def checkpoint_blob(ctd: PrivateContainerd, ref: str) -> Path | None:
    """The content-store file of the checkpoint image's criu tar."""
    for line in ctd.ctr("images", "ls").stdout.decode().splitlines()[1:]:
        f = line.split()
        if f and f[0] == ref:
            index = json.loads(ctd.ctr("content", "get", f[2]).stdout)
            for d in index.get("manifests", []):
                if d.get("mediaType") == CRIU_TAR:
                    return Path(ctd.root / "io.containerd.content.v1.content/blobs/sha256"
                                / str(d["digest"])[7:])
    return None


def blob_contents(blob: Path) -> tuple[dict[str, int], str]:
    """Sizes of the files in a checkpoint tar and its dump.log (pykata's phases)."""
    sizes: dict[str, int] = {}
    dump = ""
    with tarfile.open(blob, "r:") as t:
        for m in t.getmembers():
            if m.isfile():
                sizes[m.name.lstrip("./")] = m.size
                if m.name.lstrip("./") == "dump.log" and m.size < 65536:
                    f = t.extractfile(m)
                    dump = f.read().decode(errors="replace") if f is not None else ""
    return sizes, dump


def dump_phases(dump: str) -> dict[str, float]:
    """pykata's dump.log lines ``what: 1.234s``: phase -> seconds ("memory (N MiB
    in M extents)" becomes "memory")."""
    out: dict[str, float] = {}
    for line in dump.splitlines():
        what, _, secs = line.rpartition(": ")
        with contextlib.suppress(ValueError):
            out[what.split(" (")[0]] = float(secs.rstrip("s"))
    return out


def shim_checkpoint_times(ctd: PrivateContainerd, cid: str) -> list[float]:
    """What pykata's shim logged (containerd's log) for each checkpoint of ``cid``:
    seconds from its Checkpoint call's start to the pod running again."""
    pat = re.compile(rf"sandbox {re.escape(cid)} checkpointed into \S+ in ([0-9.]+)s")
    try:
        text = ctd.log.read_text(errors="replace")
    except OSError:
        return []
    return [float(m.group(1)) for m in pat.finditer(text)]


def shim_root(ctd: PrivateContainerd, cid: str, markers: tuple[str, ...]) -> int:
    for pid, _, cmd in processes():
        words = cmd.split()
        if (any(m in cmd for m in markers) and f"-address {ctd.socket}" in cmd and "-id" in words
                and words.index("-id") + 1 < len(words) and words[words.index("-id") + 1] == cid):
            return pid
    return 0


def ctr_row(ctd: PrivateContainerd, runtime: str, workload: str, run_extra: list[str],
            markers: tuple[str, ...], n: int, extra: dict[str, Any]) -> Row:
    """Start a container, fill it if asked, then ``n`` cycles of checkpoint, kill and
    remove, restore --live, first exec answer, memory."""
    fill = workload != "idle"
    cid = f"ck{runtime[:2]}{uuid.uuid4().hex[:6]}"
    row = new_row(runtime, workload, {
        "checkpoint": "ctr c checkpoint --task CID REF",
        "shim": "the shim's log: checkpointed into DIR in Ns" if runtime == "pykata" else "-",
        "size": "content-store blob of media type ...criu.checkpoint.criu.tar",
        "restore": "ctr c restore --live CID REF",
        "answer": "ctr c restore --live CID REF; ctr t exec CID true",
        "pss": "shim + its children, /proc/PID/smaps_rollup",
        "rss": "VMM (QEMU) RSS" if runtime == "pykata" else "-"})
    phases: list[dict[str, float]] = []
    files: list[dict[str, int]] = []
    refs: list[str] = []
    try:
        t0 = time.monotonic()
        r = ctd.ctr("run", "-d", *run_extra, BUSYBOX_REF, cid, "sleep", "1000000", check=False,
                    timeout=1200)
        if r.returncode != 0:
            row.note = f"ctr run failed: {one_line(r.stderr.decode(errors='replace'))}"
            row.failures = n
            return row
        if not wait_answer(lambda: exec_true(ctd, cid), time.monotonic() + ANSWER_WAIT):
            raise RuntimeError(f"{runtime}: the container never answered an exec")
        extra["start_s"] = time.monotonic() - t0
        if fill:
            t0 = time.monotonic()
            if not exec_true(ctd, cid, "sh", "-c", FILL, timeout=1200):
                raise RuntimeError(f"{runtime}: {FILL} failed in the container")
            extra["fill_s"] = time.monotonic() - t0
        root = shim_root(ctd, cid, markers)
        extra["before"] = tree_memory(root) if root else {}
        for i in range(n):
            ref = f"bench/ck-{cid}:{i}"
            log(f"checkpoint: {runtime} {workload}: cycle {i + 1}/{n}")
            t0 = time.perf_counter()
            r = ctd.ctr("containers", "checkpoint", "--task", cid, ref, check=False,
                        timeout=1200)
            dt = time.perf_counter() - t0
            refs.append(ref)
            if r.returncode != 0:
                row.failures += 1
                row.note = f"ctr c checkpoint failed: {one_line(r.stderr.decode(errors='replace'))}"
                break
            row.samples["checkpoint"].append(dt)
            shim = shim_checkpoint_times(ctd, cid)
            if len(shim) == i + 1:
                row.samples["shim"].append(shim[-1])
            blob = checkpoint_blob(ctd, ref)
            if blob is not None and blob.exists():
                row.samples["size"].append(blob.stat().st_size / MiB)
                sizes, dump = blob_contents(blob)
                files.append(sizes)
                if dump:
                    phases.append(dump_phases(dump))
            remove_task(ctd, cid)
            t0 = time.perf_counter()
            r = ctd.ctr("containers", "restore", "--live", cid, ref, check=False, timeout=1200)
            restored = time.perf_counter() - t0
            if r.returncode != 0:
                row.note = f"ctr c restore failed: {one_line(r.stderr.decode(errors='replace'))}"
                break
            row.samples["restore"].append(restored)
            if not wait_answer(lambda: exec_true(ctd, cid), time.monotonic() + ANSWER_WAIT):
                row.note = f"no exec answer within {ANSWER_WAIT:g} s of the restore"
                break
            row.samples["answer"].append(time.perf_counter() - t0)
            root = shim_root(ctd, cid, markers)
            if root:
                mem = tree_memory(root)
                row.samples["pss"].append(mem["pss"])
                if runtime == "pykata":
                    row.samples["rss"].append(mem["rss"])
            ctd.ctr("images", "rm", "--sync", ref, check=False, timeout=300)
            refs.remove(ref)
    finally:
        remove_containers(ctd, [cid])
        for ref in refs:
            ctd.ctr("images", "rm", "--sync", ref, check=False, timeout=300)
    extra["phases"] = phases
    extra["files"] = files
    return row


def pykata_config(work: Path, state: Path, registry_host: str) -> Path:
    cfg = config.load()
    cfg.runtime.state_dir = str(state)
    cfg.vm.shared_fs = "none"
    cfg.vm.default_memory = MEMORY_MIB
    cfg.runtime.checkpointable = True
    cfg.guest_pull.plain_http_registries = [registry_host]
    cfg.guest_pull.storage_mib = 512
    cfg.runtime.create_container_timeout = 900  # a pull under TCG on a busy machine
    cfg.agent.dial_timeout = 600  # a TCG boot on a loaded 2-core host can take minutes
    p = work / "pykata-checkpoint.toml"
    p.write_text(config.to_toml(cfg))
    return p


def criu_check() -> str:
    if not shutil.which("criu"):
        return "criu is not installed"
    r = subprocess.run(["criu", "check"], capture_output=True, timeout=60, check=False)
    text = (r.stdout + r.stderr).decode(errors="replace")
    if r.returncode == 0:
        return ""
    errs = [ln for ln in text.splitlines() if "Error" in ln]
    ver = one_line(sh("criu", "--version", check=False)).replace("Version: ", "")
    return f"`criu check` (criu {ver}): " + (errs[0] if errs else one_line(text))


# -- gVisor runsc on an OCI bundle -----------------------------------------------------


def runsc_row(work: Path, rootfs: Path, workload: str, n: int, extra: dict[str, Any]) -> Row:
    row = new_row("runsc", workload, {
        "checkpoint": "runsc checkpoint --image-path DIR CID",
        "size": "the image dir",
        "restore": "runsc restore --detach --image-path DIR --bundle B CID",
        "answer": "runsc restore ...; runsc exec CID true",
        "pss": "runsc sandbox + gofer processes",
        "rss": "runsc-sandbox RSS"})
    binary = shutil.which("runsc")
    if not binary:
        row.note = "runsc not installed"
        return row
    tag = uuid.uuid4().hex[:6]
    root = work / f"runsc-root-{tag}"
    root.mkdir(parents=True)
    bundle = work / f"runsc-bundle-{tag}"
    spec = default_spec(["sleep", "1000000"], hostname="ck")
    spec["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777", "size=300m"]})
    make_bundle(bundle, rootfs, spec)
    cid = f"ckrs{tag}"
    base = [binary, "--root", str(root), "--platform=ptrace", "--network=none"]

    def runsc(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        if "--detach" not in args:
            return subprocess.run([*base, *args], capture_output=True, timeout=timeout,
                                  check=False, stdin=subprocess.DEVNULL)
        # The detached sandbox keeps the stdio it was given: a file, never a pipe
        # (reading a pipe would wait for the sandbox's end).
        out = work / f"runsc-{tag}.log"
        with out.open("wb") as f:
            r = subprocess.run([*base, *args], stdout=f, stderr=f, timeout=timeout,
                               check=False, stdin=subprocess.DEVNULL)
        return subprocess.CompletedProcess(r.args, r.returncode, b"",
                                           out.read_bytes()[-4000:])

    def answer() -> bool:
        return runsc("exec", cid, "true", timeout=120).returncode == 0

    def sandbox_root() -> int:
        for pid, _, cmd in processes():
            if "runsc" in cmd and str(root) in cmd and " boot " in f" {cmd} ":
                return pid
        return 0

    def memory() -> dict[str, float]:
        pss = 0
        rss = 0
        for pid, _, cmd in processes():
            if "runsc" in cmd and str(root) in cmd:
                pss += pss_kib(pid)
                if " boot " in f" {cmd} ":
                    rss = max(rss, rss_kib(pid))
        return {"pss": pss / 1024, "rss": rss / 1024}

    try:
        t0 = time.monotonic()
        r = runsc("run", "--detach", "--bundle", str(bundle), cid)
        if r.returncode != 0:
            row.note = f"runsc run failed: {one_line(r.stderr.decode(errors='replace'))}"
            return row
        if not wait_answer(answer, time.monotonic() + ANSWER_WAIT):
            raise RuntimeError("runsc: the container never answered an exec")
        extra["start_s"] = time.monotonic() - t0
        if workload != "idle":
            t0 = time.monotonic()
            r = runsc("exec", cid, "sh", "-c", FILL, timeout=1200)
            if r.returncode != 0:
                raise RuntimeError(f"runsc: {FILL}: {one_line(r.stderr.decode(errors='replace'))}")
            extra["fill_s"] = time.monotonic() - t0
        extra["before"] = memory()
        extra["sandbox_pid_found"] = bool(sandbox_root())
        for i in range(n):
            log(f"checkpoint: runsc {workload}: cycle {i + 1}/{n}")
            image = work / f"runsc-image-{tag}-{i}"
            image.mkdir()
            try:
                t0 = time.perf_counter()
                r = runsc("checkpoint", "--image-path", str(image), cid, timeout=1200)
                dt = time.perf_counter() - t0
                if r.returncode != 0:
                    row.failures += 1
                    row.note = f"runsc checkpoint failed: " \
                               f"{one_line(r.stderr.decode(errors='replace'))}"
                    break
                row.samples["checkpoint"].append(dt)
                row.samples["size"].append(
                    sum(f.stat().st_size for f in image.rglob("*") if f.is_file()) / MiB)
                runsc("delete", "--force", cid, timeout=120)
                t0 = time.perf_counter()
                r = runsc("restore", "--detach", "--image-path", str(image), "--bundle",
                          str(bundle), cid, timeout=1200)
                restored = time.perf_counter() - t0
                if r.returncode != 0:
                    row.note = f"runsc restore failed: " \
                               f"{one_line(r.stderr.decode(errors='replace'))}"
                    break
                row.samples["restore"].append(restored)
                if not wait_answer(answer, time.monotonic() + ANSWER_WAIT):
                    row.note = f"no exec answer within {ANSWER_WAIT:g} s of the restore"
                    break
                row.samples["answer"].append(time.perf_counter() - t0)
                mem = memory()
                row.samples["pss"].append(mem["pss"])
                row.samples["rss"].append(mem["rss"])
            finally:
                shutil.rmtree(image, ignore_errors=True)
    finally:
        runsc("kill", cid, "KILL", timeout=60)
        runsc("delete", "--force", cid, timeout=120)
        for pid, _, cmd in processes():  # last resort: nothing of this root stays
            if "runsc" in cmd and str(root) in cmd:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
    return row


# -- a bare QEMU VM: QMP migrate to a file and back --------------------------------------


class Qmp:
    """A minimal synchronous QMP client (one command at a time; events skipped)."""

    def __init__(self, path: Path, deadline: float) -> None:
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(300)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QMP socket {path} never answered") from None
                time.sleep(0.05)
        self.rfile = self.sock.makefile("rb")
        self.rfile.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        msg = json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode()
        if fd >= 0:
            self.sock.sendmsg([msg + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               struct.pack("i", fd))])
        else:
            self.sock.sendall(msg + b"\n")
        for _ in range(10000):
            line = self.rfile.readline(1 << 20)
            if not line:
                raise RuntimeError(f"QMP {name}: QEMU closed the connection")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error'].get('desc')}")
        raise RuntimeError(f"QMP {name}: no reply")

    def wait_migration(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.cmd("query-migrate").get("status", "")
            if st == "completed":
                return
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"migration {st}")
            time.sleep(0.02)
        raise RuntimeError(f"migration not done within {timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()


@dataclass
class BareVM:
    proc: subprocess.Popen[bytes]
    qmp: Qmp
    serial: Path


def bare_argv(cfg: config.Config, qmp: Path, serial: Path, fill: bool) -> list[str]:
    q = cfg.qemu
    accel = probe(q.path, q.accelerator).accel
    work = (f"{FILL.replace('/tmp/fill', '/fill')}; " if fill else "")
    script = (f"mount -t devtmpfs dev /dev; {work}echo READY; i=0;"
              " while :; do i=$((i+1)); echo tick $i; sleep 0.2; done")
    return [q.path, "-machine", f"{q.machine_type},{q.machine_options}", "-accel",
            accel + (f",tb-size={q.tb_size}" if accel == "tcg" and q.tb_size else ""),
            "-cpu", "max" if accel == "tcg" else "host", "-m", f"{MEMORY_MIB}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(cfg.kernel_path()), "-initrd", str(cfg.initrd_path()),
            "-append", f'console=ttyS0 {config.LEAN_KERNEL_PARAMS} rdinit=/usr/bin/sh'
                       f' -- -c "{script}"',
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off"]


def start_bare(argv: list[str], qmp: Path, serial: Path, incoming: bool) -> BareVM:
    qmp.unlink(missing_ok=True)
    args = [*argv, *(["-incoming", "defer"] if incoming else [])]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        return BareVM(proc, Qmp(qmp, time.monotonic() + 60), serial)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def stop_bare(vm: BareVM) -> None:
    with contextlib.suppress(Exception):
        vm.qmp.cmd("quit")
    vm.qmp.close()
    try:
        vm.proc.wait(30)
    except subprocess.TimeoutExpired:
        vm.proc.kill()
        vm.proc.wait()


def wait_serial(path: Path, what: bytes, after: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if what in path.read_bytes()[after:]:
                return True
        time.sleep(0.02)
    return False


def bare_row(cfg: config.Config, work: Path, workload: str, n: int,
             extra: dict[str, Any]) -> Row:
    fill = workload != "idle"
    row = new_row("bare QEMU", workload, {
        "checkpoint": "QMP stop; getfd; migrate fd:NAME (a file) until completed",
        "size": "the state file (RAM in the stream)",
        "restore": "qemu ... -incoming defer; migrate-incoming fd:NAME; cont",
        "answer": "... until the guest's shell prints its next line",
        "pss": "QEMU PSS", "rss": "QEMU RSS"})
    tag = uuid.uuid4().hex[:6]
    qmp = work / f"bare-{tag}.qmp"
    state = work / f"bare-{tag}.state"
    vms: list[BareVM] = []
    try:
        serial = work / f"bare-{tag}-0.serial"
        t0 = time.monotonic()
        vm = start_bare(bare_argv(cfg, qmp, serial, fill), qmp, serial, False)
        vms.append(vm)
        if not wait_serial(serial, b"tick 1", 0, 900):
            raise RuntimeError("bare VM: its shell never printed (serial: "
                               f"{serial.read_bytes()[-300:]!r})")
        extra["boot_and_fill_s" if fill else "boot_s"] = time.monotonic() - t0
        extra["before"] = {"pss": pss_kib(vm.proc.pid) / 1024, "rss": rss_kib(vm.proc.pid) / 1024}
        for i in range(n):
            log(f"checkpoint: bare QEMU {workload}: cycle {i + 1}/{n}")
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                t0 = time.perf_counter()
                vm.qmp.cmd("stop")
                vm.qmp.cmd("getfd", {"fdname": "ck"}, fd=fd)
                vm.qmp.cmd("migrate", {"uri": "fd:ck"})
                vm.qmp.wait_migration(600)
                os.fsync(fd)
                dt = time.perf_counter() - t0
            finally:
                os.close(fd)
            row.samples["checkpoint"].append(dt)
            row.samples["size"].append(state.stat().st_size / MiB)
            stop_bare(vm)
            vms.remove(vm)
            serial = work / f"bare-{tag}-{i + 1}.serial"
            fd = os.open(state, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                vm = start_bare(bare_argv(cfg, qmp, serial, fill), qmp, serial, True)
                vms.append(vm)
                vm.qmp.cmd("getfd", {"fdname": "ck"}, fd=fd)
                vm.qmp.cmd("migrate-incoming", {"uri": "fd:ck"})
                vm.qmp.wait_migration(600)
                vm.qmp.cmd("cont")
                row.samples["restore"].append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            if not wait_serial(serial, b"tick", 0, ANSWER_WAIT):
                row.note = f"the restored guest printed nothing within {ANSWER_WAIT:g} s"
                break
            row.samples["answer"].append(time.perf_counter() - t0)
            time.sleep(1)
            row.samples["pss"].append(pss_kib(vm.proc.pid) / 1024)
            row.samples["rss"].append(rss_kib(vm.proc.pid) / 1024)
    except RuntimeError as exc:
        row.note = str(exc)[:300]
        row.failures += 1
    finally:
        for v in vms:
            stop_bare(v)
        for p in work.glob(f"bare-{tag}*"):
            p.unlink(missing_ok=True)
    return row


# -- the section -------------------------------------------------------------------------


def guarded(runtime: str, workload: str, fn: Callable[..., Row], *args: Any) -> Row:
    """``fn(*args)``; a part that fails is a row with its one-line reason (what
    it made was removed by its own finally blocks), and the others still run."""
    try:
        return fn(*args)
    except Exception as exc:
        log(f"checkpoint: {runtime}, {workload}: failed: {exc}")
        row = new_row(runtime, workload, {})
        row.failures = 1
        row.note = f"failed: {one_line(str(exc))}"
        return row


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    d = CACHE / f"checkpoint-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def cleanup_state(state: Path) -> list[str]:
    """pykata's state dir of the section: what was left (reported), then removed."""
    from pykata.testing import leftovers

    left = leftovers(state) if state.exists() else []
    if left:
        import asyncio

        from pykata.runtime.cleanup import cleanup
        from pykata.runtime.state import all_sandboxes

        with contextlib.suppress(Exception):
            for ns, sid in all_sandboxes(state):
                asyncio.run(cleanup(state, sid, ns))
    shutil.rmtree(state, ignore_errors=True)
    return left


def main() -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)} (development)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    sigterm_as_interrupt()
    n = runs(args, 3, 1)
    cfg = config.load()
    rows: list[Row] = []
    info: dict[str, Any] = {"memory_mib": MEMORY_MIB, "fill_mib": FILL_MIB, "runs": n,
                            "loadavg_start": list(os.getloadavg())}
    details: dict[str, Any] = {}

    def add(runtime: str, workload: str, fn: Callable[..., Row], *fn_args: Any) -> Row:
        extra: dict[str, Any] = {"loadavg_start": list(os.getloadavg())}
        log(f"checkpoint: {runtime}, {workload}")
        row = guarded(runtime, workload, fn, *fn_args, extra)
        extra["loadavg_end"] = list(os.getloadavg())
        rows.append(row)
        details[row.name("details")] = extra
        return row

    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    with workdir() as work:
        # The pods' state, and so their RAM files, on tmpfs as /run is on a usual
        # host (here /run is on the disk).
        state = Path(f"/dev/shm/pykata-bench-ck-{uuid.uuid4().hex[:6]}")
        try:
            ctd = start_containerd("checkpoint")
            try:
                with network() as net, registry(net, work, rootfs) as host:
                    cfg_file = pykata_config(work, state, host)
                    image = f"{host}/bench/ck:v1"
                    pod = ["--runtime", RUNTIME_TYPE, "--runtime-config-path", str(cfg_file),
                           "--with-ns", f"network:/run/netns/{net.pod_ns}", "--annotation",
                           f"{GUEST_PULL_IMAGE_ANNOTATION}={image}"]
                    for workload in WORKLOADS if "pykata" in parts else ():
                        add("pykata", workload, ctr_row, ctd, "pykata", workload, pod,
                            SHIM_MARKERS, n)
                if "runc" in parts:
                    info["criu_check"] = criu_check()
                tmp = ["--mount", "type=tmpfs,src=tmpfs,dst=/tmp,options=rw:size=300m"]
                for workload in WORKLOADS if "runc" in parts else ():
                    row = add("runc", workload, ctr_row, ctd, "runc", workload, tmp,
                              ("containerd-shim-runc-v2",), n)
                    if not row.samples["checkpoint"] and info["criu_check"]:
                        row.note = (f"criu cannot work on this host (kernel {os.uname().release}"
                                    f"): {info['criu_check']}; {row.note}")
            finally:
                ctd.stop()
            for workload in WORKLOADS if "runsc" in parts else ():
                add("runsc", workload, runsc_row, work, rootfs, workload, n)
            for workload in WORKLOADS if "bare" in parts else ():
                add("bare QEMU", workload, bare_row, cfg, work, workload, n)
        finally:
            left = cleanup_state(state)
            if left:
                log(f"checkpoint: left behind and cleaned up: {left}")
                info["left_behind"] = left
    info["loadavg_end"] = list(os.getloadavg())
    series = [s for r in rows for s in r.series()]
    save_series("checkpoint", series, info=info, details=details,
                rows=[{"runtime": r.runtime, "workload": r.workload, "note": r.note,
                       "failures": r.failures} for r in rows])
    return 0


if __name__ == "__main__":
    run_section(main)
