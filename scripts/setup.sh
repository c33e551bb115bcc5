#!/usr/bin/env bash
# Idempotent setup: Debian packages, the project's virtualenv, the guest image,
# entry points on PATH, then `pykata check`. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.venv
export DEBIAN_FRONTEND=noninteractive

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages. qemu + virtiofsd run VMs; busybox/cpio/lz4/kmod build the guest
#    image, erofs-utils its read-only root image; crun/runc/containerd/podman/... are
#    the container tools pykata plugs into and is measured against; iptables goes
#    into the test image of the privileged-pod tests; prometheus is the real scraper
#    of the pykata-monitor test, and its promtool checks the dashboard's PromQL; criu
#    only because podman refuses checkpoint/restore unless criu >= 3.11 answers its
#    version query (pykata never runs it; runc's checkpoint in the benchmarks does).
PKGS=(qemu-system-x86 qemu-utils busybox-static cpio lz4 zstd xz-utils kmod binutils e2fsprogs
      erofs-utils iproute2 psmisc util-linux crun runc containerd containernetworking-plugins
      podman conmon skopeo docker-registry docker.io runsc iptables ca-certificates
      prometheus criu)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
lists_empty() { ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; }
if [ ${#missing[@]} -gt 0 ] || lists_empty; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install Debian packages: ${missing[*]}" >&2; exit 1
  fi
  step "apt-get update"
  apt-get update -q >/dev/null
  if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a node-wide Prometheus on :9090 where systemd runs; the
    # tests run their own on loopback: one we installed is not left serving.
    if printf '%s\n' "${missing[@]}" | grep -qx prometheus && command -v systemctl >/dev/null; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
else
  step "Debian packages: all present"
fi

# 2. Python environment (reinstalled only when pyproject.toml changes).
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.pykata-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  step "installing pykata and its dependencies into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "^$" || true
  "$VENV/bin/python" -c "import pykata, google.protobuf, qemu.qmp" # fail loudly if broken
  rm -f "$VENV"/.pykata-installed-*
  touch "$stamp"
else
  step "Python environment: up to date"
fi

# 3. Entry points on PATH, so containerd, podman and docker find them.
for bin in pykata pykata-agent containerd-shim-pykata-v2 pykata-runtime pykata-monitor; do
  if [ -x "$VENV/bin/$bin" ]; then
    ln -sfn "$VENV/bin/$bin" "/usr/local/bin/$bin"
  fi
done

# 4. The unprivileged user QEMU runs as ([hypervisor.qemu] run_as_user): a system
#    account with no shell and no home, so a device-emulation bug is not host root.
if ! id -u pykata-qemu >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    step "creating system user pykata-qemu"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pykata-qemu
    if getent group kvm >/dev/null; then usermod -aG kvm pykata-qemu; fi
  else
    echo "setup: need root to create the system user pykata-qemu" >&2; exit 1
  fi
fi
# ... and its subordinate uid and gid range: each VM's QEMU runs as its own uid
# (and gid) leased from it, so one QEMU cannot open another's guest RAM through
# /proc/<pid>/mem or /proc/<pid>/fd. 65536 ids, after every range and every
# uid/gid >= 100000 already in use (so it overlaps nothing).
QEMU_IDS=65536
need_ids=()
for f in /etc/subuid /etc/subgid; do
  if ! grep -q "^pykata-qemu:" "$f" 2>/dev/null && \
     ! grep -q "^$(id -u pykata-qemu):" "$f" 2>/dev/null; then need_ids+=("$f"); fi
done
if [ ${#need_ids[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to give pykata-qemu a subordinate uid range" >&2; exit 1
  fi
  first=$( { cat /etc/subuid /etc/subgid 2>/dev/null | awk -F: 'NF == 3 { print $2 + $3 }'
             getent passwd | awk -F: '{ print $3 + 1 }'
             getent group | awk -F: '{ print $3 + 1 }'; } |
           awk -v min=100000 'BEGIN { m = min } $1 > m && $1 < 4000000000 { m = $1 } END { print m }')
  # start on a multiple of the range size, like useradd does
  first=$(( (first + QEMU_IDS - 1) / QEMU_IDS * QEMU_IDS ))
  last=$(( first + QEMU_IDS - 1 ))
  step "giving pykata-qemu the subordinate uid/gid range $first-$last"
  for f in "${need_ids[@]}"; do
    [ -e "$f" ] || install -m 0644 /dev/null "$f"
    if [ "$f" = /etc/subuid ]; then usermod --add-subuids "$first-$last" pykata-qemu
    else usermod --add-subgids "$first-$last" pykata-qemu; fi
  done
fi

# 5. Guest image (cached by a hash of its inputs: a second run does nothing).
step "guest image"
"$VENV/bin/pykata" image build

# 6. Does the host have what pykata needs?
step "pykata check"
"$VENV/bin/pykata" check
