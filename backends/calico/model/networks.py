"""Network records (``/calico/libnetwork/v1/<nid>``): the CreateNetwork request
the driver keeps, with its own part (host, profile, pools), as NetworkRecord.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional

from backends.calico.model.common import _object, network

log = logging.getLogger(__name__)

# network records

#: The plugin's own part of a network record: ``{"host": the creating host,
#: "profile": the Calico profile ("" until learnt), "pools": the pool keys
#: this network wrote}``.
META = "Netplugin"

LOCAL_ADDRESS_SPACE = "CalicoLocalAddressSpace"
GLOBAL_ADDRESS_SPACE = "CalicoGlobalAddressSpace"
ADDRESS_SPACES = (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)
#: Gateway marker of a Calico IPAM network (what RequestPool answers in its
#: Data, and what CreateNetwork then sees as the Gateway).
GATEWAY_MARKER = {4: "0.0.0.0/0", 6: "::/0"}
CALICO_IPAM_GATEWAYS = (GATEWAY_MARKER[4], GATEWAY_MARKER[6])


def is_calico_ipam(address_space: Any, gateway: Any) -> bool:
    """IPvXData of a network whose addresses come from Calico IPAM: the gateway
    marker (what our RequestPool answers), or one of our address spaces."""
    return gateway in CALICO_IPAM_GATEWAYS or address_space in ADDRESS_SPACES


@dataclass
class NetworkRecord:
    """``/calico/libnetwork/v1/<nid>``: the CreateNetwork request as Docker sent
    it, plus the plugin's ``Netplugin`` object (``host``, ``profile``,
    ``pools``).  Records of older plugins have no ``Netplugin`` (``legacy``):
    their profile is the NetworkID and every Docker-IPAM pool they name is
    theirs.  ``body`` is the whole stored object, kept as it is."""
    network_id: str
    body: Dict[str, Any]
    version: Optional[int] = None

    @classmethod
    def create(cls, network_id: str, request: Mapping[str, Any], host: str, profile: str,
               pools: List[str]) -> "NetworkRecord":
        """A new record: the request with this plugin's part."""
        return cls(network_id, dict(request, **{META: {"host": host, "profile": profile,
                                                       "pools": pools}}))

    @classmethod
    def from_json(cls, network_id: str, value: str, version: Optional[int] = None
                  ) -> "NetworkRecord":
        """CorruptRecord unless the value is a JSON object."""
        return cls(network_id, _object(value), version)

    def to_json(self) -> str:
        return json.dumps(self.body)

    @property
    def key(self) -> str:
        return network(self.network_id)

    # -- the plugin's part -----------------------------------------------------
    @property
    def meta(self) -> Optional[Dict[str, Any]]:
        meta = self.body.get(META)
        return meta if isinstance(meta, dict) else None

    @property
    def legacy(self) -> bool:
        return self.meta is None

    @property
    def host(self) -> Optional[str]:
        """The host that created the network (None: unknown)."""
        host = (self.meta or {}).get("host")
        return host if isinstance(host, str) and host else None

    @property
    def profile(self) -> str:
        """The Calico profile ("" until learnt); a legacy record's NetworkID."""
        meta = self.meta
        if meta is None:
            return self.network_id
        name = meta.get("profile")
        return name if isinstance(name, str) else ""

    def with_profile(self, name: str) -> "NetworkRecord":
        """The same record with its profile learnt."""
        meta = dict(self.meta or {}, profile=name)
        return replace(self, body=dict(self.body, **{META: meta}))

    # -- Docker's part -------------------------------------------------------------
    def address_data(self) -> List[Dict[str, Any]]:
        """The IPv4Data then IPv6Data entries that are objects."""
        out: List[Dict[str, Any]] = []
        for field_name in ("IPv4Data", "IPv6Data"):
            entries = self.body.get(field_name)
            if isinstance(entries, list):
                out.extend(e for e in entries if isinstance(e, dict))
        return out

    @property
    def calico_ipam(self) -> bool:
        """Its addresses come from Calico IPAM."""
        return any(is_calico_ipam(e.get("AddressSpace"), e.get("Gateway"))
                   for e in self.address_data())

    @property
    def generic_options(self) -> Dict[str, Any]:
        """The ``-o`` options ({} when absent or not an object)."""
        options = self.body.get("Options")
        generic = (options or {}).get("com.docker.network.generic") \
            if isinstance(options, dict) else None
        return generic if isinstance(generic, dict) else {}

    def named_pools(self) -> List[str]:
        """Pool CIDRs (Docker IPAM) the request names; lenient."""
        cidrs = []
        for entry in self.address_data():
            cidr = entry.get("Pool")
            if not isinstance(cidr, str) or is_calico_ipam(entry.get("AddressSpace"),
                                                           entry.get("Gateway")):
                continue
            try:
                cidrs.append(str(ipaddress.ip_network(cidr, strict=False)))
            except ValueError:
                log.warning("ignoring invalid pool %r in a network record", cidr)
        return cidrs

    def owned_pools(self) -> List[str]:
        """Pools the network wrote (legacy records: every pool they name)."""
        meta = self.meta
        if meta is None:
            return self.named_pools()
        pools = meta.get("pools")
        return [c for c in pools if isinstance(c, str)] if isinstance(pools, list) else []
