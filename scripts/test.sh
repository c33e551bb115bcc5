#!/usr/bin/env bash
# The whole suite: lint, types, unit tests, integration tests (real QEMU, real
# containerd, ...). pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
status=0
run() { echo "==> $*"; "$@"; local rc=$?; [ $rc -eq 0 ] || { echo "FAILED ($rc): $*"; status=1; }; return 0; }
run $V/ruff check src tests bench
run $V/mypy
run $V/mypy --strict --python-version 3.11 bench/*.py
run $V/python scripts/check_imports.py
echo "==> pytest"
$V/pytest -p no:cacheprovider --timeout=600 --durations=30 "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "FAILED: pytest collected no tests"; status=1
elif [ $rc -ne 0 ]; then status=1; fi
# The whole suite boots guests from the initrd (the default); a smoke set runs
# again with the guest root as the read-only DAX image ([hypervisor.qemu] rootfs).
if [ $# -eq 0 ]; then
  echo "==> pytest smoke set, rootfs = image (PYKATA_TEST_ROOTFS=image)"
  PYKATA_TEST_ROOTFS=image $V/pytest -p no:cacheprovider --timeout=600 \
    tests/integration/test_sandbox.py tests/integration/test_containerd.py
  rc=$?
  if [ $rc -eq 5 ]; then echo "FAILED: the smoke set collected no tests"; status=1
  elif [ $rc -ne 0 ]; then status=1; fi
fi
# Nothing of pykata may be left running or mounted after the suite.
left=$(pgrep -a -f 'qemu-system|virtiofsd|containerd-shim-pykata|pykata-agent' | grep -v pgrep || true)
if [ -n "$left" ]; then
  echo "FAILED: processes left behind:"; echo "$left"; status=1
  # who holds them (a zombie's parent is the process that did not reap it)
  for pid in $(echo "$left" | awk '{print $1}'); do
    ppid=$(awk '/^PPid:/{print $2}' "/proc/$pid/status" 2>/dev/null) || continue
    echo "  $pid: parent $ppid: $(tr '\0' ' ' < "/proc/$ppid/cmdline" 2>/dev/null | cut -c1-200)"
  done
fi
if grep -q ' /run/pykata' /proc/mounts; then
  echo "FAILED: mounts left under /run/pykata:"; grep ' /run/pykata' /proc/mounts; status=1
fi
exit $status
