#!/bin/sh
# Install what fleece needs from Debian when it is missing.
#   install-peers.sh build   the Python venv module, headers and a C compiler (to build _fast)
#   install-peers.sh peers   the real NBD/QEMU peers the interop tests run
# Runs apt-get only for what is missing, and only as root; otherwise it says what to install.
set -eu

want_build() {
    missing=""
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$missing python3-venv"
    inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || missing="$missing python3-dev"
    command -v cc >/dev/null 2>&1 || missing="$missing gcc"
    echo "$missing"
}

want_peers() {
    missing=""
    command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1 \
        || missing="$missing qemu-utils"
    command -v qemu-storage-daemon >/dev/null 2>&1 || missing="$missing qemu-system-common"
    command -v nbdinfo >/dev/null 2>&1 && command -v nbdcopy >/dev/null 2>&1 \
        && command -v nbdsh >/dev/null 2>&1 || missing="$missing libnbd-bin python3-libnbd"
    command -v nbdkit >/dev/null 2>&1 || missing="$missing nbdkit"
    command -v fio >/dev/null 2>&1 || missing="$missing fio"
    command -v certtool >/dev/null 2>&1 || missing="$missing gnutls-bin"
    echo "$missing"
}

case "${1:-}" in
    build) missing=$(want_build) ;;
    peers) missing=$(want_peers) ;;
    *) echo "usage: $0 build|peers" >&2; exit 2 ;;
esac

[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "fleece needs these Debian packages:$missing (run as root, or install them)" >&2
    exit 1
fi
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # the list is meant to split
apt-get install -y -qq --no-install-recommends $missing
