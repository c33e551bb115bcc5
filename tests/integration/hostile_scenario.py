"""A hostile guest against the host's shared tree (run by test_hostile_guest.py
inside a private mount namespace: ``unshare -m --propagation private``).

A container with CAP_SYS_ADMIN mounts the sandbox's virtio-fs tag itself and
tries what a guest that owns its kernel would: rename another container's
directory, plant symlinks where the host later walks, write into a read-only
volume, hard-link across mounts, swap a directory of a root filesystem for a
symlink to /. Prints one JSON object: what the guest saw and what the host saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

from pykata import config
from pykata.runtime.container import Container
from pykata.runtime.sandbox import Sandbox
from pykata.testing import default_spec, make_bundle
from pykata.utils import mounts

ATTACK = r"""
A=$VICTIM; B=$SELF
mkdir -p /m && mount -t virtiofs pykatashared /m || { echo "MOUNTFAIL"; exit 3; }
try() { if "$@" 2>/dev/null; then echo "ALLOWED $1 $2"; else echo "denied $1 $2"; fi; }
try mv /m/$A /m/gone
try ln -s / /m/$A.evil
try mkdir /m/new
try rm -rf /m/$A/mounts
try ln -s /etc /m/$A/mounts/planted
try sh -c "echo x > /m/$A/mounts/7/ro/pwned"
try sh -c "echo x > /m/$A/mounts/7/ro/secret"
try mv /m/$A/rootfs /m/$A/rootfs2
try ln /m/$A/mounts/7/ro/secret /m/$A/mounts/8/rw/hardlink
try ln -s / /m/$A/mounts/8/rw/up
try sh -c "rm -rf /m/$A/rootfs/tmp && ln -s / /m/$A/rootfs/tmp"
try sh -c "echo y > /m/$A/mounts/8/rw/written"
echo DONE
"""


async def run(c: Container) -> str:
    await c.start()
    out = b""
    async with asyncio.timeout(180):
        while chunk := await c.init.read_stdout():
            out += chunk
        await c.wait()
    return out.decode(errors="replace")


def snapshot(*dirs: str) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(d)) for d in dirs if os.path.isdir(d)}


async def main(state_dir: str, rootfs: Path, work: Path) -> dict[str, object]:
    cfg = config.load()
    cfg.runtime.state_dir = state_dir
    ro, rw = work / "ro", work / "rw"
    for d in (ro, rw):
        d.mkdir()
    (ro / "secret").write_text("host secret")
    watched = ("/", "/etc", "/etc/cron.d", "/root", "/tmp", str(work))
    mounts_before, files_before = set(mounts.mount_points()), snapshot(*watched)
    result: dict[str, object] = {}
    sb = await Sandbox.create(f"hostile-{uuid.uuid4().hex[:6]}", cfg)
    result["sandbox_dir"] = str(sb.dir)
    try:
        victim, attacker = f"v{uuid.uuid4().hex[:6]}", f"a{uuid.uuid4().hex[:6]}"
        vspec = default_spec(["sleep", "600"])
        vspec["mounts"] += [
            {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]},
            {"destination": "/rw", "type": "bind", "source": str(rw), "options": ["rbind", "rw"]},
        ]
        v = await sb.create_container(victim, make_bundle(work / victim, rootfs, vspec))
        await v.start()
        aspec = default_spec(["sh", "-c", ATTACK], env=[
            "PATH=/bin:/sbin:/usr/bin:/usr/sbin", f"VICTIM={victim}", f"SELF={attacker}"])
        caps = aspec["process"]["capabilities"]
        for k in caps:
            caps[k] = [*caps[k], "CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"]
        a = await sb.create_container(attacker, make_bundle(work / attacker, rootfs, aspec))
        result["guest"] = await run(a)
        result["host_mounts_during"] = mounts.mounts_under(sb.dir)
        await a.delete(force=True)
        await v.delete(force=True)
        result["host_mounts_after_delete"] = mounts.mounts_under(sb.dir)
        result["tree_after_delete"] = sorted(os.listdir(sb.dir / "mounts"))
    finally:
        await sb.stop()
    result["secret"] = (ro / "secret").read_text()
    result["ro_listing"] = sorted(os.listdir(ro))
    result["rw_listing"] = sorted(os.listdir(rw))
    result["sandbox_dir_left"] = os.path.lexists(sb.dir)
    files_after = snapshot(*watched)
    result["mounts_changed"] = sorted(mounts_before ^ set(mounts.mount_points()))
    result["files_changed"] = {d: sorted(set(files_before.get(d, []))
                                         ^ set(files_after.get(d, []))) for d in watched}
    return result


if __name__ == "__main__":
    out = asyncio.run(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
    print("RESULT " + json.dumps(out))
