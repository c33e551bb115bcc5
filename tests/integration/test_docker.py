"""Issue 6 acceptance (Docker part): dockerd 20.10 with `pykata-runtime`
registered in its daemon.json runs a container in its own VM. The daemon is
private (own data root, exec root and socket; no iptables, no bridge)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata.testing.images import BUSYBOX_REF, oci_archive

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def docker(rootfs: Path) -> Iterator[dict[str, str]]:
    if not shutil.which("dockerd") or not shutil.which("skopeo"):
        pytest.fail("dockerd and skopeo are needed: run 'make setup'")
    base = Path(f"/run/pykata-docker-{uuid.uuid4().hex[:6]}")
    data = Path("/var/lib/pykata-docker-test")
    base.mkdir(parents=True)
    (base / "daemon.json").write_text(
        '{"runtimes": {"pykata": {"path": "/usr/local/bin/pykata-runtime"}},'
        ' "iptables": false, "bridge": "none", "ip-forward": false, "ip-masq": false}')
    sock = base / "docker.sock"
    log = (base / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        ["dockerd", "--config-file", str(base / "daemon.json"), "--data-root", str(data),
         "--exec-root", str(base / "exec"), "--pidfile", str(base / "docker.pid"),
         "-H", f"unix://{sock}"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True)
    env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "version"], env=env, capture_output=True,
                             check=False).returncode != 0:
            assert proc.poll() is None, (base / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "dockerd did not come up"
            time.sleep(0.3)
        oci = oci_archive(rootfs, Path("/var/tmp/pykata-test/busybox.oci.tar"))
        archive = Path("/var/tmp/pykata-test/busybox.docker.tar")
        archive.unlink(missing_ok=True)
        subprocess.run(["skopeo", "copy", "-q", f"oci-archive:{oci}",
                        f"docker-archive:{archive}:{BUSYBOX_REF}"], check=True)
        subprocess.run(["docker", "load", "-q", "-i", str(archive)], env=env, check=True,
                       capture_output=True)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", str(base)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_docker_run_with_pykata_runtime(docker: dict[str, str]) -> None:
    r = subprocess.run(["docker", "run", "--runtime", "pykata", "--rm", "--network", "none",
                        BUSYBOX_REF, "sh", "-c", "cat /proc/version; exit 4"], env=docker,
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 4, r.stderr
    assert r.stdout.startswith("Linux version ") and platform.release() not in r.stdout
    left = subprocess.run(["pgrep", "-af", "qemu-system|virtiofsd|pykata.shim"],
                          capture_output=True, text=True, check=False).stdout
    assert not left.strip(), left


@pytest.fixture()
def bridge(docker: dict[str, str]) -> Iterator[str]:
    """A user-defined bridge network with a private subnet (the test's own bridge)."""
    name = f"pk{uuid.uuid4().hex[:6]}"
    subprocess.run(["docker", "network", "create", "--driver", "bridge", "--subnet",
                    "10.213.7.0/24", "--gateway", "10.213.7.1", "-o",
                    f"com.docker.network.bridge.name={name}", name], env=docker, check=True,
                   capture_output=True, timeout=60)
    yield name
    subprocess.run(["docker", "network", "rm", name], env=docker, capture_output=True,
                   timeout=60, check=False)


@pytest.mark.parametrize("runtime", ["runc", "pykata"])
def test_docker_bridge_network_gets_its_address_and_reaches_the_gateway(
        docker: dict[str, str], bridge: str, runtime: str, tmp_path: Path) -> None:
    # Docker wires the network from the spec's prestart hook (libnetwork-setkey),
    # which pykata-runtime runs with its stand-in in the container's namespace.
    cidfile = tmp_path / "cid"
    r = subprocess.run(["docker", "run", "--runtime", runtime, "--rm", "--network", bridge,
                        "--cidfile", str(cidfile), BUSYBOX_REF, "sh", "-c",
                        "uname -r; ip -4 addr show eth0; ping -c 1 -W 10 10.213.7.1"],
                       env=docker,
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "inet 10.213.7." in r.stdout and "1 packets received" in r.stdout, r.stdout
    assert (r.stdout.split()[0] == platform.release()) == (runtime == "runc"), r.stdout
    if runtime == "pykata":
        from pykata.testing.leaks import processes_mentioning

        cid = cidfile.read_text().strip()
        deadline = time.monotonic() + 15
        while (left := processes_mentioning(cid, ("qemu-system", "virtiofsd", "pykata"))) \
                and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not left, left
