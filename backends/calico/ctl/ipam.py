"""netpluginctl's IP address management: ``ipam info`` (who holds an address)
and ``ipam release`` (free an address a crash leaked).

Addresses are Calico IPAM v2's (``backends.calico.ipam``); an address is in
use by an endpoint when a stored endpoint record lists it.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from netplugin.datastore import KeyNotFound

from backends.calico import model
from backends.calico.ctl.base import CtlError, format_table, parse_ip
from backends.calico.ctl.endpoint import Endpoint, EndpointCommands


class IpamCommands(EndpointCommands):
    def _users_of(self, ip: model.IPAddress) -> List[Endpoint]:
        """The stored endpoints listing ``ip``."""
        return [ep for ep in self.endpoints()
                if ep.record is not None and ip in ep.record.ip_addresses()]

    def ipam_info(self, text: str) -> int:
        ip = parse_ip(text)
        cidr = model.block_cidr_for(ip)
        pools = [p for p in self.ipam.pools(ip.version) if ip in p.cidr]
        try:
            block: Optional[model.Block] = self.ipam.read_block(cidr)
        except KeyNotFound:
            block = None
        info: Dict[str, Any] = {"ip": str(ip), "pool": str(pools[0].cidr) if pools else None,
                                "block": str(cidr) if block else None,
                                "block_affinity": block.host if block else None,
                                "assigned": False}
        if block is None and not pools:
            raise CtlError(f"IP {ip} is not in any configured Calico pool")
        index = block.allocations[block.ordinal(ip)] if block else None
        if index is None:
            self.emit(f"IP {ip} is not currently assigned", info)
            return 0
        attr = block.attributes[index]
        info.update(assigned=True, handle_id=attr.get("handle_id"),
                    attributes=attr.get("secondary"),
                    endpoints=[ep.summary() for ep in self._users_of(ip)])
        attrs = attr.get("secondary")
        rows = [["IP", str(ip)], ["Pool", info["pool"] or "(none: pool removed)"],
                ["Block", str(cidr)], ["Block affinity", info["block_affinity"] or "(none)"],
                ["Handle", attr.get("handle_id") or "(none)"],
                ["Attributes", json.dumps(attrs) if attrs else f"No attributes defined "
                 f"for {ip}"],
                ["Endpoints", "\n".join(f"{e['hostname']}/{e['endpoint_id']}"
                                        for e in info["endpoints"]) or "(none)"]]
        self.emit(f"IP {ip} is in use\n" + format_table(["Field", "Value"], rows), info)
        return 0

    def ipam_release(self, text: str, force: bool) -> int:
        ip = parse_ip(text)
        if not force:
            users = self._users_of(ip)
            if users:
                ep = users[0]
                raise CtlError(f"IP {ip} belongs to endpoint {ep.endpoint_id} on host "
                               f"{ep.host} ({ep.key}); delete that endpoint first or pass "
                               "--force")
        not_allocated = self.ipam.release_ips([ip])
        if not_allocated:
            raise CtlError(f"IP {ip} is not assigned")
        self.emit("Address successfully released", {"ip": str(ip), "released": True})
        return 0
