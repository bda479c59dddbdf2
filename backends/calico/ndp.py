"""Proxy NDP for IPv6 peers: the proxy entries each local Calico veth needs
(desired_entries) and their sync with the kernel.

With Docker's IPAM a container's IPv6 address comes with its subnet (a /64),
so the container looks its peers up on the link (neighbour solicitation)
instead of sending to its gateway.  Nothing answers on a routed veth unless
the host side proxies: each local Calico veth with IPv6 gets a proxy entry for
every other endpoint's IPv6 address (any host); the host then routes the
packets (/128 routes), and the nftables policy decides what may pass.
Entries die with their veth; the agent adds and removes the rest.
"""
from __future__ import annotations

import logging
from typing import Dict, Set, Tuple

from netplugin import linux
from netplugin.errors import PluginError

from backends.calico import model

log = logging.getLogger(__name__)

Entry = Tuple[str, str]  # (host-side interface, IPv6 address)


def desired_entries(hosts: Dict[str, str], hostname: str) -> Set[Entry]:
    """From the endpoint records under ``/calico/v1/host/`` (key -> JSON)."""
    local = []
    addresses: Set[str] = set()
    for key, raw in hosts.items():
        if not model.is_endpoint_key(key):
            continue
        try:
            ep = model.Endpoint.from_json(key, raw)
        except (ValueError, TypeError):
            continue  # the policy compiler reports corrupt records
        own = set(ep.ipv6)
        addresses |= own
        if ep.host == hostname and own and ep.name and ep.name.startswith(model.HOST_PREFIX):
            local.append((ep.name, own))
    return {(ifname, addr) for ifname, own in local for addr in addresses - own}


def sync(desired: Set[Entry]) -> None:
    """Make the proxy entries on ``cali*`` links exactly ``desired`` (entries
    for links that don't exist yet are added when the agent sees the link)."""
    current = {(i, a) for i, a in linux.list_proxy_neighbours() if i.startswith(model.HOST_PREFIX)}
    for ifname, addr in sorted(desired - current):
        if not linux.link_exists(ifname):
            continue
        try:
            linux.add_proxy_neighbour(addr, ifname)
        except PluginError as exc:
            log.warning("%s", exc)
    for ifname, addr in sorted(current - desired):
        try:
            linux.delete_proxy_neighbour(addr, ifname)
        except PluginError as exc:
            log.warning("%s", exc)
