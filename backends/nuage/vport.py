"""One container interface as VRS sees it: names, enums, and the OVSDB rows.
Owns the interface names, the VRS enums and the OVSDB rows of one vPort.

Per endpoint the backend creates a veth pair ``nuv<id>`` (host end, an OVS
port of the VRS bridge, also the vPort name in ``Nuage_Port_Table``) /
``nut<id>`` (handed to Docker, which moves it into the container and renames
it ``eth<N>``), where ``<id>`` is the first 12 characters of the EndpointID
(Docker IDs are random hex, so names are unique and fit Linux's 15-character
limit; other IDs are hashed).

The integers are libvrsdk's (``api/entity/*.go``): a Docker container is
entity type 4 (Container) on platform 4 (Docker), inserted already
Started/Booted and Running/Booted (libvrsdk's VRS-8345 pattern).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from netplugin.errors import PluginError

from backends.nuage.network import NuageNetwork

HOST_PREFIX = "nuv"       # host end = OVS port = vPort name
PEER_PREFIX = "nut"       # container end until Docker renames it
ID_CHARS = 12
_HEX12 = re.compile(r"^[0-9a-f]{12}")

# libvrsdk enums
DOMAIN_DOCKER = 4          # Nuage_VM_Table.domain, Nuage_Port_Table.vm_domain
TYPE_CONTAINER = 4         # Nuage_VM_Table.type
EVENT_STARTED = 2          # EventCategory Started
EVENT_TYPE_BOOTED = 0      # Started/Booted
STATE_RUNNING = 1          # State Running
REASON_BOOTED = 1          # Running/Booted
NETWORK_TYPE = "ipv4"

# keys of Port/Interface external_ids
EXT_VM_UUID = "vm-uuid"
EXT_VM_NAME = "vm-name"
EXT_ENDPOINT = "netplugin-endpoint"   # marks the ports this plugin owns
EXT_NETWORK = "netplugin-network"
EXT_DRIVER = "netplugin-driver"       # the plugin instance (Docker driver name) owning it

# metadata keys (libvrsdk api/port/Metadata.go, api/entity/Metadata.go)
MD_DOMAIN = "nuage-enterprise-domain"
MD_NETWORK = "nuage-enterprise-network"
MD_ZONE = "nuage-enterprise-zone"
MD_NETWORK_TYPE = "nuage-enterprise-network-type"
MD_STATIC_IP = "static-ip"
MD_USER = "user"
MD_ENTERPRISE = "enterprise"

UNRESOLVED_IPS = ("", "0.0.0.0")


def _short_id(endpoint_id: str) -> str:
    eid = endpoint_id.lower()
    if _HEX12.match(eid):
        return eid[:ID_CHARS]
    return hashlib.sha1(endpoint_id.encode()).hexdigest()[:ID_CHARS]


def port_name(endpoint_id: str) -> str:
    """Host end of the veth = OVS Port/Interface = Nuage_Port_Table.name."""
    return HOST_PREFIX + _short_id(endpoint_id)


def peer_name(endpoint_id: str) -> str:
    """Container end of the veth (Join's SrcName)."""
    return PEER_PREFIX + _short_id(endpoint_id)


def generated_mac(endpoint_id: str) -> str:
    """The seed's ``7a:42:`` locally administered prefix + 4 bytes derived from
    the EndpointID (deterministic, so a retried CreateEndpoint answers the same)."""
    digest = hashlib.sha1(endpoint_id.encode()).digest()[:4]
    return "7a:42:" + ":".join(f"{b:02x}" for b in digest)


@dataclass
class EndpointRecord:
    """What the backend keeps per endpoint on this host (JSON in the datastore)."""

    network_id: str
    endpoint_id: str
    address: str                 # "ip/prefix" from Docker's IPAM
    mac: str
    docker_mac: bool = False     # Docker chose the MAC (we must not answer it back)
    created: float = 0.0
    joined: bool = False         # joined: the vPort must exist (re-asserted on reconnect)
    vport: bool = False          # rows/port may exist in OVSDB (set before writing them)
    stale: bool = False          # Docker no longer has it (audit): delete once OVSDB is clean
    vm_uuid: str = ""
    vm_name: str = ""
    identity: str = ""           # "docker" or "endpoint" (Docker did not say)

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_interface(self.address).network.prefixlen

    @property
    def port(self) -> str:
        return port_name(self.endpoint_id)

    @property
    def peer(self) -> str:
        return peer_name(self.endpoint_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def new(cls, network_id: str, endpoint_id: str, address: str, mac: str,
            docker_mac: bool) -> "EndpointRecord":
        return cls(network_id, endpoint_id, address, mac.lower(), docker_mac, time.time())

    @classmethod
    def from_json(cls, key: str, raw: str) -> "EndpointRecord":
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            rec = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
            for name in ("network_id", "endpoint_id", "address", "mac", "vm_uuid",
                         "vm_name", "identity"):
                if not isinstance(getattr(rec, name), str):
                    raise ValueError(f"{name} is not a string")
            ipaddress.ip_interface(rec.address)
        except (ValueError, TypeError, KeyError) as exc:
            raise PluginError(f"endpoint record {key} is corrupt: {exc}") from None
        return rec


@dataclass(frozen=True)
class VPort:
    """Everything written to OVSDB for one endpoint."""

    name: str
    mac: str
    bridge: str
    ip: str                      # static IP (Docker IPAM), no prefix
    network: NuageNetwork
    endpoint_id: str
    vm_uuid: str
    vm_name: str
    driver: str = "nuage"

    @classmethod
    def of(cls, rec: EndpointRecord, net: NuageNetwork, bridge: str,
           driver: str = "nuage") -> "VPort":
        return cls(rec.port, rec.mac, bridge, rec.ip, net, rec.endpoint_id,
                   rec.vm_uuid or rec.endpoint_id, rec.vm_name or rec.endpoint_id[:12],
                   driver)

    def external_ids(self) -> Dict[str, str]:
        return {EXT_VM_UUID: self.vm_uuid, EXT_VM_NAME: self.vm_name,
                EXT_ENDPOINT: self.endpoint_id, EXT_NETWORK: self.network.network_id,
                EXT_DRIVER: self.driver}

    def port_columns(self) -> Dict[str, Any]:
        """Nuage_Port_Table columns the plugin owns (never the resolved ones)."""
        n = self.network
        return {
            "name": self.name, "mac": self.mac, "bridge": self.bridge,
            "vm_domain": DOMAIN_DOCKER, "nuage_domain": n.domain, "nuage_zone": n.zone,
            "nuage_network": n.subnet, "nuage_network_type": NETWORK_TYPE,
            "metadata": {MD_DOMAIN: n.domain, MD_ZONE: n.zone, MD_NETWORK: n.subnet,
                         MD_NETWORK_TYPE: NETWORK_TYPE, MD_STATIC_IP: self.ip},
        }

    def vm_columns(self) -> Dict[str, Any]:
        """Nuage_VM_Table columns except ``ports`` (managed with add/delvalue)."""
        n = self.network
        return {
            "vm_uuid": self.vm_uuid, "vm_name": self.vm_name,
            "type": TYPE_CONTAINER, "domain": DOMAIN_DOCKER,
            "event": EVENT_STARTED, "event_type": EVENT_TYPE_BOOTED,
            "state": STATE_RUNNING, "reason": REASON_BOOTED,
            "nuage_user": n.user, "nuage_enterprise": n.organization,
            "metadata": {MD_USER: n.user, MD_ENTERPRISE: n.organization},
        }


@dataclass(frozen=True)
class Resolution:
    """What VRS wrote back into the vPort's row."""

    ip: str
    mask: str
    gateway: str
    vrf_id: int = 0
    evpn_id: int = 0

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(f"0.0.0.0/{self.mask}").prefixlen

    @classmethod
    def from_row(cls, ip: str, mask: str, gateway: str, vrf_id: int = 0,
                 evpn_id: int = 0) -> Optional["Resolution"]:
        """A Resolution if the row is resolved, else None ("" / 0.0.0.0 = not yet)."""
        if ip in UNRESOLVED_IPS or not mask or not gateway:
            return None
        return cls(ip, mask, gateway, int(vrf_id or 0), int(evpn_id or 0))

    def check(self, rec: EndpointRecord) -> None:
        """VRS must agree with what Docker configures in the container."""
        try:
            ipaddress.ip_address(self.ip)
            ipaddress.ip_address(self.gateway)
            prefix = self.prefixlen
        except ValueError:
            raise PluginError(f"VRS resolved vPort {rec.port} to garbage: ip_addr="
                              f"{self.ip!r} subnet_mask={self.mask!r} gateway="
                              f"{self.gateway!r}") from None
        if self.ip != rec.ip or prefix != rec.prefixlen:
            raise PluginError(
                f"VRS resolved vPort {rec.port} to {self.ip}/{prefix}, but Docker's IPAM "
                f"gave the container {rec.address}: the network's --subnet must be the VSD "
                "subnet's CIDR and the address must be free on VSD")
