#!/bin/sh
# Entry point of netplugin as a managed Docker plugin (see config.json).
# Docker mounts /proc/sys read-only in a plugin's mount namespace; the
# Calico backend writes per-interface sysctls (proxy ARP, forwarding), and
# CAP_SYS_ADMIN lets it make that mount writable again -- in its own mount
# namespace only.
set -eu
if ! mount -o remount,bind,rw /proc/sys 2>/dev/null; then
    echo "netplugin: warning: /proc/sys stays read-only; sysctls will fail" >&2
fi
mkdir -p /run/docker/plugins
export PYTHONPATH=/opt/netplugin/lib
exec python3 -m netplugin -f "${NETPLUGIN_CONFIG:-/etc/netplugin/config.cfg}" \
    --socket /run/docker/plugins/netplugin.sock
