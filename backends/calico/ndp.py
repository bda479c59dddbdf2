"""Proxy NDP for IPv6 peers.

With Docker's IPAM a container's IPv6 address comes with its subnet (a /64),
so the container looks its peers up on the link (neighbour solicitation)
instead of sending to its gateway.  Nothing answers on a routed veth unless
the host side proxies: each local Calico veth with IPv6 gets a proxy entry for
every other endpoint's IPv6 address (any host); the host then routes the
packets (/128 routes), and the nftables policy decides what may pass.
Entries die with their veth; the agent adds and removes the rest.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from typing import Dict, Set, Tuple

from netplugin import linux
from netplugin.errors import PluginError

log = logging.getLogger(__name__)

Entry = Tuple[str, str]  # (host-side interface, IPv6 address)


def desired_entries(hosts: Dict[str, str], hostname: str) -> Set[Entry]:
    """From the endpoint records under ``/calico/v1/host/`` (key -> JSON)."""
    local = []
    addresses: Set[str] = set()
    for key, raw in hosts.items():
        parts = key.split("/")
        if len(parts) < 9 or parts[5] != "workload" or parts[-2] != "endpoint":
            continue
        try:
            ep = json.loads(raw)
            own = {str(ipaddress.ip_interface(n).ip) for n in ep.get("ipv6_nets") or []}
        except (ValueError, TypeError, AttributeError):
            continue  # the policy compiler reports corrupt records
        addresses |= own
        name = ep.get("name")
        if parts[4] == hostname and own and isinstance(name, str) and name.startswith("cali"):
            local.append((name, own))
    return {(ifname, addr) for ifname, own in local for addr in addresses - own}


def sync(desired: Set[Entry]) -> None:
    """Make the proxy entries on ``cali*`` links exactly ``desired`` (entries
    for links that don't exist yet are added when the agent sees the link)."""
    current = {(i, a) for i, a in linux.list_proxy_neighbours() if i.startswith("cali")}
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
