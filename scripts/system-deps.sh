#!/bin/sh
# Install the Debian packages the test suite needs, only those missing.
# Run as root.  Used by `make test` (and so by .ci/run).
set -eu
PKGS="docker.io etcd-server openvswitch-switch busybox-static nftables iproute2 util-linux python3-venv"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
