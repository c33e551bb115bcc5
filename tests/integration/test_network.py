"""Issue 5 (network part): a pykata pod gets its CNI network inside the VM.

Traffic stays inside namespaces this test creates: the pod's (made by CNI for
the test's own containerd) and a peer namespace attached to the test's bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pykata import config
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, leftovers, make_bundle
from tests.integration.test_cri_pykata import Env, Pod, cri_env

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", params=["tcfilter", "macvtap", "tcfilter-template"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    model, _, template = str(request.param).partition("-")
    text = f'[runtime]\ninternetworking_model = "{model}"\n'
    tpl = Path(f"/dev/shm/pykata-test-{uuid.uuid4().hex[:6]}")
    if template:
        # Sandboxes start from a VM template: the NICs are hot-plugged after the restore.
        text += f'[factory]\nenable_template = true\ntemplate_path = "{tpl}/template"\n'
    try:
        yield from cri_env(default_route=True, pykata_config=text)
    finally:
        shutil.rmtree(tpl, ignore_errors=True)


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30).stdout


@contextlib.contextmanager
def peer_namespace(env: Env) -> Iterator[tuple[str, str]]:
    """A netns of ours on the test's CNI bridge, with an address in its subnet."""
    _, net, _ = env
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f"pkpeer-{tag}", f"pkp{tag}", f"pkq{tag}"
    ip = str(net.subnet.network_address + 200)
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        sh("ip", "link", "set", ns_end, "netns", ns)
        sh("ip", "link", "set", host_end, "master", net.bridge, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/{net.subnet.prefixlen}",
           "dev", ns_end)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, ip
    finally:
        sh("ip", "link", "del", host_end, check=False)
        sh("ip", "netns", "del", ns, check=False)


def test_pod_network_reaches_the_guest(env: Env, request: pytest.FixtureRequest) -> None:
    model, _, template = str(request.node.callspec.params["env"]).partition("-")
    pod = Pod(env)
    www = Path(f"/tmp/pk-www-{pod.tag}")
    www.mkdir()
    (www / "index.html").write_text("hello-from-peer\n")
    server = None
    try:
        st = pod.c.pod_sandbox_status(pod.id, verbose=True)
        ip = st.status.network.ip
        info = json.loads(st.info["info"])
        netns = next(n["path"] for n in info["runtimeSpec"]["linux"]["namespaces"]
                     if n["type"] == "network")
        mac = sh("nsenter", f"--net={netns}", "ip", "-o", "link", "show", "eth0").split(
            "link/ether ")[1].split()[0]
        cid = pod.container("web", "mkdir -p /www && echo hello-from-pod > /www/index.html && "
                                   "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait")
        # The CNI address, the veth's MAC and the default route, on the guest's eth0.
        out, rc = pod.sh(cid, "ip -4 -o addr show eth0; cat /sys/class/net/eth0/address; "
                              "ip route show default; ls /sys/class/net/eth0/queues")
        assert rc == 0, out
        lines = out.splitlines()
        assert f"inet {ip}/" in lines[0]
        assert lines[1] == mac
        assert lines[2].startswith("default via")
        assert "rx-0" in out.split(), out
        if template:
            pid = int(sh("pgrep", "-f", f"qemu-system.*{pod.id}").split()[0])
            assert b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        # The device that carries eth0 into the VM is the configured model's.
        link = sh("nsenter", f"--net={netns}", "ip", "-d", "link", "show", "eth0_pk")
        assert ("macvtap" if model == "macvtap" else "tun") in link, link
        if model == "tcfilter" and (os.cpu_count() or 1) > 1:
            # Multi-queue: one queue per vCPU the VM can have (the guest uses as
            # many as it has CPUs online).
            assert "multi_queue" in link, link
        if model == "tcfilter":
            filters = sh("nsenter", f"--net={netns}", "tc", "filter", "show", "dev", "eth0",
                         "ingress")
            assert "mirred" in filters and "eth0_pk" in filters, filters
        with peer_namespace(env) as (ns, peer_ip):
            server = subprocess.Popen(
                ["ip", "netns", "exec", ns, "busybox", "httpd", "-f", "-p", "8081", "-h",
                 str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Pod -> peer: a container fetches a page from the peer namespace.
            got = ("", 1)
            for _ in range(20):
                got = pod.sh(cid, f"wget -q -O - http://{peer_ip}:8081/index.html")
                if got[1] == 0:
                    break
                time.sleep(0.5)
            assert got == ("hello-from-peer\n", 0)
            # Peer -> pod: the server in the pod answers the peer namespace.
            body = ""
            for _ in range(20):
                # (Debian's static busybox wget crashes with -T; the call is bounded by
                # subprocess's timeout instead.)
                r = subprocess.run(["ip", "netns", "exec", ns, "busybox", "wget", "-q", "-O",
                                    "-", f"http://{ip}:8080/index.html"],
                                   capture_output=True, text=True, timeout=30, check=False)
                body = r.stdout
                if r.returncode == 0:
                    break
                time.sleep(0.5)
            assert body == "hello-from-pod\n"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        left = pod.remove()
        subprocess.run(["rm", "-rf", str(www)], check=False)
    assert not left, f"left behind: {left}"
    # No tap or filter remains in the (now deleted) pod namespace.
    assert not Path(netns).exists() or "_pk" not in sh(
        "nsenter", f"--net={netns}", "ip", "link", check=False)


@contextlib.contextmanager
def netns_pair(tag: str) -> Iterator[tuple[str, str]]:
    """Two namespaces of ours: the pod's and a peer's (no link yet)."""
    pod_ns, peer_ns = f"pkpod-{tag}", f"pkpeer-{tag}"
    sh("ip", "netns", "add", pod_ns)
    sh("ip", "netns", "add", peer_ns)
    try:
        yield pod_ns, peer_ns
    finally:
        sh("ip", "netns", "del", pod_ns, check=False)
        sh("ip", "netns", "del", peer_ns, check=False)


def link_namespaces(pod_ns: str, peer_ns: str, ifname: str, subnet: str) -> None:
    """A veth pair: ``ifname`` at <subnet>.2/24 in the pod, <subnet>.1 in the peer."""
    pod_end, peer_end = f"{ifname}x{pod_ns[-6:]}", f"{ifname}y{pod_ns[-6:]}"
    sh("ip", "link", "add", pod_end, "type", "veth", "peer", "name", peer_end)
    sh("ip", "link", "set", peer_end, "netns", peer_ns)
    sh("ip", "-n", peer_ns, "addr", "add", f"{subnet}.1/24", "dev", peer_end)
    sh("ip", "-n", peer_ns, "link", "set", peer_end, "up")
    sh("ip", "-n", peer_ns, "link", "set", "lo", "up")
    sh("ip", "link", "set", pod_end, "netns", pod_ns)
    sh("ip", "-n", pod_ns, "link", "set", pod_end, "name", ifname)
    sh("ip", "-n", pod_ns, "addr", "add", f"{subnet}.2/24", "dev", ifname)
    sh("ip", "-n", pod_ns, "link", "set", ifname, "up")


@pytest.mark.asyncio
async def test_interface_added_later_reaches_the_guest(pykata_config: config.Config,
                                                       rootfs: Path, tmp_path: Path) -> None:
    """A second network plugged into a running pod's namespace is hot-plugged into
    the VM: the guest gets the NIC, its address, and traffic flows over it."""
    tag = uuid.uuid4().hex[:6]
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("second-network\n")
    with netns_pair(tag) as (pod_ns, peer_ns):
        link_namespaces(pod_ns, peer_ns, "eth0", "10.231.1")
        sb = await Sandbox.create(f"hp-{tag}", pykata_config, netns=f"/run/netns/{pod_ns}")
        server = None
        try:
            assert sb.network is not None and [ep.name for ep in sb.network.endpoints] == ["eth0"]
            link_namespaces(pod_ns, peer_ns, "eth1", "10.231.2")
            server = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", peer_ns, "busybox", "httpd", "-f", "-p", "8082", "-h",
                str(www), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out = ""
            for _ in range(60):
                out = await run_in(sb, tmp_path, rootfs, "ip -4 -o addr show; "
                                   "wget -q -O - http://10.231.2.1:8082/index.html || true")
                # Both: the address may be listed a moment after wget got through
                # (the script runs the two one after the other).
                if "inet 10.231.2.2/24" in out and "second-network" in out:
                    break
                await asyncio.sleep(0.5)
            assert "inet 10.231.2.2/24" in out and "second-network" in out, out
            taps = sh("ip", "-n", pod_ns, "-o", "link")
            assert "eth0_pk" in taps and "eth1_pk" in taps, taps
        finally:
            if server is not None:
                server.terminate()
                await asyncio.wait_for(server.wait(), 10)
            await sb.stop()
        taps = sh("ip", "-n", pod_ns, "-o", "link")
        assert "_pk" not in taps, f"left behind: {taps}"
        assert not leftovers(pykata_config.runtime.state_dir, sb.id)


async def run_in(sb: Sandbox, tmp_path: Path, rootfs: Path, script: str) -> str:
    cid = f"n{uuid.uuid4().hex[:6]}"
    c = await sb.create_container(cid, make_bundle(tmp_path / cid, rootfs,
                                                   default_spec(["sh", "-c", script])))
    await c.start()
    out = b""
    async with asyncio.timeout(120):
        while chunk := await c.init.read_stdout():
            out += chunk
    await c.wait()
    await c.delete()
    return out.decode()


@pytest.mark.asyncio
async def test_model_none_gives_no_network(pykata_config: config.Config, rootfs: Path,
                                           tmp_path: Path) -> None:
    """internetworking_model = "none": the pod namespace's interfaces stay out of
    the VM (only loopback in the guest) and nothing is created in the namespace."""
    import copy

    cfg = copy.deepcopy(pykata_config)
    cfg.runtime.internetworking_model = "none"
    tag = uuid.uuid4().hex[:6]
    with netns_pair(tag) as (pod_ns, peer_ns):
        link_namespaces(pod_ns, peer_ns, "eth0", "10.231.3")
        sb = await Sandbox.create(f"nn-{tag}", cfg, netns=f"/run/netns/{pod_ns}")
        try:
            out = await run_in(sb, tmp_path, rootfs, "ls /sys/class/net")
            assert out.split() == ["lo"], out
            assert "_pk" not in sh("ip", "-n", pod_ns, "-o", "link")
        finally:
            await sb.stop()
