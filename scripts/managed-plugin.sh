#!/bin/sh
# Build netplugin as a managed Docker plugin without any container registry:
#   build/managed-plugin/config.json   (from config/managed-plugin/)
#   build/managed-plugin/rootfs/       (Debian minbase + python3, nftables,
#                                       iproute2 + the project and its deps)
# The Debian base comes from debootstrap against the machine's own mirror and
# is cached in build/managed-plugin-cache/ (a second run only reinstalls the
# project).  Run as root.  Usage: scripts/managed-plugin.sh [PYTHON]
set -eu
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
OUT=build/managed-plugin
CACHE=build/managed-plugin-cache
SUITE=${SUITE:-bookworm}
PACKAGES=python3,iproute2,nftables,mount

mirror() {
    # The first Debian archive URI of the apt sources (deb822 or one-line).
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
    done | head -n1 | grep . && return 0
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|file):/) { print $i; exit } }' \
        | head -n1 | grep .
}

command -v debootstrap >/dev/null || {
    echo "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap; }
}

start=$(date +%s)
mkdir -p "$CACHE"
base="$CACHE/base-$SUITE-$(echo "$PACKAGES" | md5sum | cut -c1-8).tar"
if [ ! -s "$base" ]; then
    url=$(mirror) || { echo "managed-plugin: no Debian mirror in the apt sources" >&2; exit 1; }
    echo "debootstrap $SUITE from $url (cached in $base)"
    tmp="$CACHE/debootstrap.$$"
    rm -rf "$tmp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$url" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$tmp"; exit 1; }
    # What a plugin never needs: apt's lists and caches, docs, man pages, locales.
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/* "$tmp"/usr/share/doc \
        "$tmp"/usr/share/man "$tmp"/usr/share/info "$tmp"/usr/share/locale \
        "$tmp"/var/log/* "$tmp"/usr/lib/python3*/test
    tar -C "$tmp" -cf "$base.part" . && mv "$base.part" "$base"
    rm -rf "$tmp"
fi

rm -rf "$OUT"
mkdir -p "$OUT/rootfs"
tar -C "$OUT/rootfs" -xf "$base"
# The project and its dependencies, installed by the build machine's pip
# for the rootfs' python3 (same minor version: both are Debian's or close).
want=$(chroot "$OUT/rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "managed-plugin: $PYTHON is Python $have, the rootfs has $want" >&2
    exit 1
fi
"$PYTHON" -m pip install -q --no-compile --target "$OUT/rootfs/opt/netplugin/lib" .
rm -rf "$OUT/rootfs/opt/netplugin/lib/bin"
find "$OUT/rootfs/opt/netplugin/lib" -name tests -type d -prune -exec rm -rf {} +
install -m 0755 config/managed-plugin/entrypoint.sh "$OUT/rootfs/opt/netplugin/entrypoint.sh"
mkdir -p "$OUT/rootfs/etc/netplugin" "$OUT/rootfs/run/docker/plugins"
cp config/managed-plugin/config.json "$OUT/config.json"
size=$(du -sm "$OUT/rootfs" | cut -f1)
echo "built $OUT (rootfs ${size} MB) in $(( $(date +%s) - start )) s"
