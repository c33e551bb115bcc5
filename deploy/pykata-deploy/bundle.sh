#!/usr/bin/env bash
# Build a self-contained pykata tree under PREFIX (default /opt/pykata) from a
# Debian bookworm system that has python3, python3-pip, qemu-system-x86,
# patchelf and the pykata source. Used by the Dockerfile's build stage.
#
# The tree does not depend on the host's libraries: every ELF binary in it
# (Python, QEMU, virtiofsd) is patched to use the glibc loader and the shared
# libraries copied into PREFIX/lib (DT_RPATH, which also covers the Python
# extension modules and QEMU's modules that they dlopen). The host only needs
# a Linux kernel with KVM (or TCG), and containerd or CRI-O.
#
#   PREFIX/python/   Debian's Python 3.11 and its standard library
#   PREFIX/venv/     pykata and its dependencies (entry points in venv/bin)
#   PREFIX/qemu/     qemu-system-x86_64 with its modules and firmware, laid out
#                    like /usr so QEMU's relocatable paths find them
#   PREFIX/libexec/  virtiofsd
#   PREFIX/lib/      the glibc loader and every shared library the above need
#   PREFIX/bin/      links to the commands
#   PREFIX/share/defaults/pykata/configuration.toml
#
# Usage: bundle.sh SRC_DIR [PREFIX]
set -euo pipefail

SRC=${1:?usage: bundle.sh SRC_DIR [PREFIX]}
PREFIX=${2:-/opt/pykata}
PYVER=3.11
MULTIARCH=x86_64-linux-gnu
LOADER=/lib64/ld-linux-x86-64.so.2
HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf 'bundle: %s\n' "$*" >&2; }

rm -rf "$PREFIX"
mkdir -p "$PREFIX"/{bin,lib,libexec,python/bin,python/lib,qemu/bin,share/defaults/pykata}
cp -L "$LOADER" "$PREFIX/lib/ld-linux-x86-64.so.2"

# Copy the shared libraries that ELF file $1 needs into PREFIX/lib (not the loader).
copy_deps() {
  local f=$1 lib
  ldd "$f" 2>/dev/null | awk '/=> \// {print $3}' | while read -r lib; do
    [ -e "$PREFIX/lib/$(basename "$lib")" ] || cp -L "$lib" "$PREFIX/lib/"
  done
}

# Patch executable $1 (already copied into PREFIX) to run on the bundled libraries.
patch_exe() {
  patchelf --set-interpreter "$PREFIX/lib/ld-linux-x86-64.so.2" \
           --force-rpath --set-rpath "$PREFIX/lib" "$1"
}

# 1. Python: binary + stdlib (lib-dynload included), found relative to the binary.
log "python $PYVER"
cp -L "/usr/bin/python$PYVER" "$PREFIX/python/bin/python$PYVER"
ln -sfn "python$PYVER" "$PREFIX/python/bin/python3"
cp -a "/usr/lib/python$PYVER" "$PREFIX/python/lib/python$PYVER"
rm -rf "$PREFIX/python/lib/python$PYVER/test" "$PREFIX/python/lib/python$PYVER"/*/__pycache__
copy_deps "/usr/bin/python$PYVER"
for so in "$PREFIX/python/lib/python$PYVER/lib-dynload"/*.so; do copy_deps "$so"; done
patch_exe "$PREFIX/python/bin/python$PYVER"

# 2. pykata in a venv of that Python (pip of the build system installs into it).
log "venv"
"$PREFIX/python/bin/python$PYVER" -m venv --without-pip "$PREFIX/venv"
python3 -m pip --python "$PREFIX/venv/bin/python" install --no-cache-dir --no-compile \
  --disable-pip-version-check "$SRC"
"$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/python/lib/python$PYVER" \
  "$PREFIX/venv/lib" >/dev/null || true
"$PREFIX/venv/bin/python" -c "import pykata, pykata.shim.main, pykata.config"

# 3. QEMU, laid out like /usr (QEMU finds its modules and firmware relative to
#    its binary); symlinked firmware is copied as files.
log "qemu"
cp -L /usr/bin/qemu-system-x86_64 "$PREFIX/qemu/bin/"
mkdir -p "$PREFIX/qemu/lib/$MULTIARCH" "$PREFIX/qemu/share" "$PREFIX/qemu/lib/ipxe"
cp -rL "/usr/lib/$MULTIARCH/qemu" "$PREFIX/qemu/lib/$MULTIARCH/qemu"
for d in /usr/share/qemu /usr/share/seabios /usr/share/ovmf; do
  [ -d "$d" ] && cp -rL "$d" "$PREFIX/qemu/share/"
done
[ -d /usr/lib/ipxe/qemu ] && cp -rL /usr/lib/ipxe/qemu "$PREFIX/qemu/lib/ipxe/qemu"
copy_deps /usr/bin/qemu-system-x86_64
for so in "$PREFIX/qemu/lib/$MULTIARCH/qemu"/*.so; do copy_deps "$so"; done
patch_exe "$PREFIX/qemu/bin/qemu-system-x86_64"

# 4. virtiofsd (the C one shipped with QEMU 7.2).
log "virtiofsd"
cp -L /usr/lib/qemu/virtiofsd "$PREFIX/libexec/virtiofsd"
copy_deps /usr/lib/qemu/virtiofsd
patch_exe "$PREFIX/libexec/virtiofsd"

# glibc dlopens libgcc_s for thread cancellation; be sure it is there.
for extra in "/lib/$MULTIARCH/libgcc_s.so.1"; do
  [ -e "$extra" ] && cp -nL "$extra" "$PREFIX/lib/"
done

# 5. Commands and the default configuration.
for b in pykata containerd-shim-pykata-v2 pykata-agent pykata-monitor; do
  [ -x "$PREFIX/venv/bin/$b" ] && ln -sfn "../venv/bin/$b" "$PREFIX/bin/$b"
done
ln -sfn ../qemu/bin/qemu-system-x86_64 "$PREFIX/bin/qemu-system-x86_64"
sed "s|@PREFIX@|$PREFIX|g" "$HERE/configuration.toml" \
  > "$PREFIX/share/defaults/pykata/configuration.toml"

# 6. Check: everything runs on the bundled loader, nothing resolves outside PREFIX.
for exe in "$PREFIX/python/bin/python$PYVER" "$PREFIX/qemu/bin/qemu-system-x86_64" \
           "$PREFIX/libexec/virtiofsd"; do
  outside=$(ldd "$exe" | awk '/=> \// && $1 !~ /ld-linux/ {print $3}' | grep -v "^$PREFIX/lib/" || true)
  if [ -n "$outside" ]; then
    log "$exe resolves libraries outside $PREFIX/lib: $outside"; exit 1
  fi
done
"$PREFIX/qemu/bin/qemu-system-x86_64" --version | head -1 >&2
"$PREFIX/bin/pykata" --help >/dev/null
log "done: $(du -sh "$PREFIX" | cut -f1) in $PREFIX"
