#!/usr/bin/env bash
# pykata-deploy: install pykata on this Kubernetes node, or remove it.
#
# Runs in the pykata-deploy DaemonSet (privileged, hostPID) with the host's
# /etc/containerd, /opt/pykata, /var/lib/pykata, /run and /usr/local/bin mounted
# at the same paths; it can also be run by hand on a node (as root, with the
# artifacts in $ARTIFACTS).
#
#   pykata-deploy install [--wait]  copy the artifacts to /opt/pykata, link the
#                                   commands into /usr/local/bin, build the guest
#                                   image, add the runtime to containerd's config,
#                                   restart containerd, label the node;
#                                   --wait: then sleep until SIGTERM (DaemonSet)
#   pykata-deploy uninstall         all of it in reverse (the DaemonSet's preStop)
#   pykata-deploy configure         only add the runtime to containerd's config
#   pykata-deploy unconfigure       only remove it
#
# Environment (defaults in brackets):
#   NODE_NAME            node to label (from the downward API) [none: no label]
#   ARTIFACTS            the tree to install [/opt/pykata-artifacts]
#   PREFIX               where it goes on the host [/opt/pykata]; the tree's
#                        absolute paths require /opt/pykata
#   BIN_DIR              where the commands are linked [/usr/local/bin], which must
#                        be on containerd's PATH (it looks up containerd-shim-pykata-v2)
#   IMAGE_DIR            guest kernel and initrd [/var/lib/pykata]; must match
#                        [image] output_dir of pykata-deploy/configuration.toml
#   BUILD_IMAGE          0: do not build the guest image (it is provided otherwise) [1]
#   CONTAINERD_CONFIG    [/etc/containerd/config.toml]
#   SNIPPET_DIR          the runtime snippets [$ARTIFACTS/share/containerd]
#   RESTART_CONTAINERD   auto | systemctl | none | any command [auto]. auto: if the
#                        host's PID 1 is systemd, `systemctl restart containerd` in
#                        the host's namespaces (nsenter -t 1, needs hostPID);
#                        otherwise nothing is restarted and a warning says so:
#                        restart containerd by hand, or set a command here.
#   LABEL                node label set when installed [pykata.io/runtime=true]
#   KEEP_IMAGE           1: uninstall keeps $IMAGE_DIR [0]
#
# The containerd config is edited idempotently: pykata's runtime table sits
# between the marker lines below; configure replaces an existing block, and
# unconfigure removes exactly those lines.
set -euo pipefail

ARTIFACTS=${ARTIFACTS:-/opt/pykata-artifacts}
PREFIX=${PREFIX:-/opt/pykata}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
IMAGE_DIR=${IMAGE_DIR:-/var/lib/pykata}
CONTAINERD_CONFIG=${CONTAINERD_CONFIG:-/etc/containerd/config.toml}
RESTART_CONTAINERD=${RESTART_CONTAINERD:-auto}
LABEL=${LABEL:-pykata.io/runtime=true}
KEEP_IMAGE=${KEEP_IMAGE:-0}
BUILD_IMAGE=${BUILD_IMAGE:-1}
NODE_NAME=${NODE_NAME:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${SNIPPET_DIR:-}" ]; then
  if [ -d "$ARTIFACTS/share/containerd" ]; then
    SNIPPET_DIR=$ARTIFACTS/share/containerd
  else
    SNIPPET_DIR=$HERE/../containerd  # a checkout of the repository
  fi
fi

BEGIN_MARK="# BEGIN pykata-deploy (managed block: removed by 'pykata-deploy uninstall')"
END_MARK="# END pykata-deploy"
CREATED_MARK="# Created by pykata-deploy (uninstall removes this file if nothing else is added)."
COMMANDS=(containerd-shim-pykata-v2 pykata)

log() { printf 'pykata-deploy: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- containerd configuration -------------------------------------------------------

# The config's schema version: 1 (no version line), 2 (containerd 1.x) or 3 (2.x).
config_version() {
  local v
  v=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9]\+\).*/\1/p' "$1" | head -1)
  echo "${v:-1}"
}

# Print the config without pykata's managed block.
strip_block() {
  awk -v b="$BEGIN_MARK" -v e="$END_MARK" '
    $0 == b {skip = 1; next}
    skip && $0 == e {skip = 0; next}
    !skip {print}' "$1"
}

configure() {
  local cfg=$CONTAINERD_CONFIG tmp snippet version
  mkdir -p "$(dirname "$cfg")"
  tmp=$(mktemp "$cfg.pykata.XXXXXX")
  if [ -s "$cfg" ]; then
    strip_block "$cfg" >"$tmp"
  else
    # No config: containerd runs on its defaults; start a version 2 file, which
    # containerd 1.5+ reads and 2.x migrates on load.
    printf '%s\nversion = 2\n' "$CREATED_MARK" >"$tmp"
  fi
  version=$(config_version "$tmp")
  case $version in
    2) snippet=$SNIPPET_DIR/pykata.toml ;;
    3) snippet=$SNIPPET_DIR/pykata-v2.toml ;;
    *) rm -f "$tmp"
       die "$cfg is a version $version config; convert it to version 2 first" \
           "(containerd config default, or containerd config migrate)" ;;
  esac
  [ -f "$snippet" ] || { rm -f "$tmp"; die "missing $snippet"; }
  if grep -q 'runtimes\.pykata\]' "$tmp"; then
    rm -f "$tmp"
    die "$cfg already defines a 'pykata' runtime outside pykata-deploy's block; remove it first"
  fi
  # Keep the file's own last line intact, then the block.
  [ -z "$(tail -c1 "$tmp")" ] || printf '\n' >>"$tmp"
  {
    printf '%s\n' "$BEGIN_MARK"
    sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' -e "s|/opt/pykata/|$PREFIX/|g" "$snippet"
    printf '%s\n' "$END_MARK"
  } >>"$tmp"
  chmod --reference="$cfg" "$tmp" 2>/dev/null || chmod 0644 "$tmp"
  mv -f "$tmp" "$cfg"
  log "runtime 'pykata' in $cfg (config version $version)"
}

unconfigure() {
  local cfg=$CONTAINERD_CONFIG tmp
  [ -f "$cfg" ] || return 0
  grep -qxF "$BEGIN_MARK" "$cfg" || return 0
  tmp=$(mktemp "$cfg.pykata.XXXXXX")
  strip_block "$cfg" >"$tmp"
  if [ "$(cat "$tmp")" = "$(printf '%s\nversion = 2' "$CREATED_MARK")" ]; then
    rm -f "$tmp" "$cfg"  # configure created it: back to no file
  else
    chmod --reference="$cfg" "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$cfg"
  fi
  log "runtime 'pykata' removed from $cfg"
}

restart_containerd() {
  case $RESTART_CONTAINERD in
    none) log "not restarting containerd (RESTART_CONTAINERD=none)" ;;
    auto|systemctl)
      if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
        log "restarting containerd (systemctl, host namespaces)"
        nsenter -t 1 -m -u -i -n -p -- systemctl restart containerd
      elif [ "$RESTART_CONTAINERD" = systemctl ]; then
        die "PID 1 is not systemd (is the pod missing hostPID: true?)"
      else
        log "warning: the host's PID 1 is not systemd: restart containerd yourself" \
            "(or set RESTART_CONTAINERD to a command) for the change to take effect"
      fi ;;
    *) log "restarting containerd: $RESTART_CONTAINERD"
       sh -c "$RESTART_CONTAINERD" ;;
  esac
}

# --- node label -----------------------------------------------------------------------

label_node() {  # $1: the label argument for kubectl ("k=v" or "k-")
  if [ -z "$NODE_NAME" ]; then
    log "NODE_NAME is not set: not labelling the node"; return 0
  fi
  if ! command -v kubectl >/dev/null; then
    log "warning: no kubectl: node $NODE_NAME not labelled ($1)"; return 0
  fi
  kubectl label node "$NODE_NAME" "$1" --overwrite >/dev/null
  log "node $NODE_NAME: label $1"
}

# --- install / uninstall --------------------------------------------------------------

install_files() {
  [ -d "$ARTIFACTS" ] || die "no artifacts at $ARTIFACTS"
  mkdir -p "$PREFIX"
  if [ "$(cd "$ARTIFACTS" && pwd -P)" != "$(cd "$PREFIX" && pwd -P)" ]; then
    # Unlink before writing: running shims keep the files they have open.
    cp -a --remove-destination "$ARTIFACTS/." "$PREFIX/"
  fi
  mkdir -p "$BIN_DIR"
  for c in "${COMMANDS[@]}"; do
    [ -e "$PREFIX/bin/$c" ] && ln -sfn "$PREFIX/bin/$c" "$BIN_DIR/$c"
  done
  log "installed $PREFIX, commands linked in $BIN_DIR"
}

build_image() {
  # `pykata image build` is cached by a hash of its inputs: it builds only what is
  # missing or out of date. It runs here (the installer has the build tools) and
  # writes to the host's $IMAGE_DIR.
  mkdir -p "$IMAGE_DIR"
  log "guest image in $IMAGE_DIR"
  PYKATA_CONFIG=$PREFIX/share/defaults/pykata/configuration.toml "$PREFIX/bin/pykata" image build
}

do_install() {
  install_files
  if [ "$BUILD_IMAGE" = 1 ]; then build_image; fi
  configure
  restart_containerd
  label_node "$LABEL"
  log "pykata is installed on ${NODE_NAME:-this node}"
}

do_uninstall() {
  # First no new pods (label), then no runtime (config), then the files.
  label_node "${LABEL%%=*}-"
  unconfigure
  restart_containerd
  PYKATA_CONFIG=$PREFIX/share/defaults/pykata/configuration.toml \
    "$PREFIX/bin/pykata" cleanup >/dev/null 2>&1 || true
  for c in "${COMMANDS[@]}"; do
    if [ -L "$BIN_DIR/$c" ] && [[ $(readlink "$BIN_DIR/$c") == "$PREFIX"/* ]]; then
      rm -f "$BIN_DIR/$c"
    fi
  done
  # $PREFIX may be a mount point in the installer: empty it, do not remove it.
  if [ -d "$PREFIX" ]; then
    find "$PREFIX" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  fi
  if [ "$KEEP_IMAGE" != 1 ] && [ -d "$IMAGE_DIR" ]; then
    find "$IMAGE_DIR" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  fi
  log "pykata is removed from ${NODE_NAME:-this node}"
}

wait_for_term() {
  local pid
  sleep infinity &
  pid=$!
  trap 'log "stopping"; kill "$pid" 2>/dev/null; exit 0' TERM INT
  wait "$pid"
}

main() {
  local cmd=${1:-install}
  case $cmd in
    install)
      do_install
      if [ "${2:-}" = --wait ]; then wait_for_term; fi ;;
    uninstall) do_uninstall ;;
    configure) configure ;;
    unconfigure) unconfigure ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (install [--wait] | uninstall | configure | unconfigure)" ;;
  esac
}

main "$@"
