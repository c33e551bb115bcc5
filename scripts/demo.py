"""`make demo`: a container in its own VM through a private containerd.

Starts containerd with its own config, state and socket under /run/pykata-demo,
imports an offline-built busybox image, runs a container with the pykata
runtime through `ctr`, prints the host kernel beside the guest kernel and the
container's output, then stops everything it started.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from pykata.testing import busybox_rootfs
from pykata.testing.containerd import RUNTIME_TYPE, PrivateContainerd
from pykata.testing.images import BUSYBOX_REF, oci_archive

CACHE = Path("/var/tmp/pykata-demo")


def main() -> int:
    print("==> building the busybox image offline")
    rootfs = busybox_rootfs(CACHE / "busybox-rootfs")
    archive = oci_archive(rootfs, CACHE / "busybox.oci.tar")
    ctd = PrivateContainerd(base=Path("/run/pykata-demo"),
                            root=Path("/var/lib/pykata-demo/containerd"), namespace="demo")
    print(f"==> starting a private containerd on {ctd.socket}")
    ctd.start()
    try:
        ctd.import_image(archive)
        script = ("echo \"guest kernel: $(uname -r)\"; echo \"hostname:     $(hostname)\"; "
                  "echo \"cpus:         $(nproc)\"; "
                  "echo \"memory:       $(free -m | awk '/Mem:/ {print $2}') MiB\"; "
                  "echo 'hello from a container in its own VM'")
        print(f"==> ctr run --rm --runtime {RUNTIME_TYPE} {BUSYBOX_REF} demo sh -c ...")
        t0 = time.monotonic()
        r = ctd.ctr("run", "--rm", "--runtime", RUNTIME_TYPE, BUSYBOX_REF, "pykata-demo",
                    "sh", "-c", script, check=False, timeout=180)
        took = time.monotonic() - t0
        out = r.stdout.decode(errors="replace")
        if r.returncode != 0:
            print(out, r.stderr.decode(errors="replace"), sep="\n", file=sys.stderr)
            print(f"demo failed: ctr exited {r.returncode}", file=sys.stderr)
            return 1
        guest = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                      if ln.startswith("guest kernel:")), "?")
        print()
        print(f"  {'host kernel':14} {platform.release()}")
        print(f"  {'guest kernel':14} {guest}")
        print()
        print("  container output:")
        for ln in out.splitlines():
            print(f"    {ln}")
        print(f"\n  ctr run --rm took {took:.2f}s (VM boot, container, teardown)")
        if guest == platform.release():
            print("demo failed: the container saw the host kernel", file=sys.stderr)
            return 1
        return 0
    finally:
        print("==> stopping containerd")
        ctd.stop()


if __name__ == "__main__":
    sys.exit(main())
