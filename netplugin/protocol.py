"""The libnetwork remote driver protocol: typed requests and responses.
Owns the wire shapes and their bounds; no backend logic.

Every request body Docker sends is validated here into a frozen dataclass
before any backend sees it; a body of the wrong shape raises
``InvalidRequest`` with a message naming the field.  Responses are
dataclasses with ``to_json()``.  Field names follow libnetwork's
``drivers/remote/api`` and ``ipams/remote/api`` packages.
"""
from __future__ import annotations

import base64
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from netplugin.errors import InvalidRequest

GENERIC_OPTIONS = "com.docker.network.generic"
ENABLE_IPV6 = "com.docker.network.enable_ipv6"
MAC_OPTION = "com.docker.network.endpoint.macaddress"
REQUEST_ADDRESS_TYPE = "RequestAddressType"
GATEWAY_ADDRESS_TYPE = "com.docker.network.gateway"

# Docker IDs are 64 hex characters (swarm network IDs 25 alphanumerics);
# accept any non-empty [A-Za-z0-9_.-] token of at most 64 characters (tests
# and other orchestrators use shorter ones) but nothing that could escape a
# datastore key or an interface name.
MAX_ID = 64
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}$" % (MAX_ID - 1))

# Bounds of every other field (Docker's are far smaller; the body as a
# whole is capped at 1 MiB by the app).
MAX_STRING = 4096        # option values, SandboxKey (a path)
MAX_KEY = 256            # option names, PoolID, AddressSpace, addresses
MAX_ENTRIES = 256        # entries of one object or list
MAX_DEPTH = 8            # nesting of option values
_MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")


# --------------------------------------------------------------------------
# field readers


def _body(body: Any) -> Mapping[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _str(body: Mapping[str, Any], name: str, required: bool = False,
         limit: int = MAX_KEY) -> str:
    value = body.get(name)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{name} must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidRequest(f"{name} is required")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is too long ({len(value)} characters, at most {limit})")
    return value


def _bounded(value: Any, what: str, depth: int = 0) -> Any:
    """A JSON value within the bounds above (option values may nest)."""
    if depth > MAX_DEPTH:
        raise InvalidRequest(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise InvalidRequest(f"{what} is too long ({len(value)} characters, "
                                 f"at most {MAX_STRING})")
    elif isinstance(value, dict):
        if len(value) > MAX_ENTRIES:
            raise InvalidRequest(f"{what} has too many entries ({len(value)}, "
                                 f"at most {MAX_ENTRIES})")
        for k, v in value.items():
            if len(k) > MAX_KEY:
                raise InvalidRequest(f"{what} has a key of {len(k)} characters "
                                     f"(at most {MAX_KEY})")
            _bounded(v, f"{what}[{k[:40]!r}]", depth + 1)
    elif isinstance(value, list):
        if len(value) > MAX_ENTRIES:
            raise InvalidRequest(f"{what} has too many entries ({len(value)}, "
                                 f"at most {MAX_ENTRIES})")
        for i, v in enumerate(value):
            _bounded(v, f"{what}[{i}]", depth + 1)
    return value


def _id(body: Mapping[str, Any], name: str) -> str:
    value = _str(body, name, required=True)
    if not _ID_RE.match(value):
        raise InvalidRequest(f"{name} is not a valid ID: {value!r}")
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def _map(body: Mapping[str, Any], name: str) -> Dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be an object, got {type(value).__name__}")
    return dict(_bounded(value, name))


def _str_map(body: Mapping[str, Any], name: str) -> Dict[str, str]:
    value = _map(body, name)
    for k, v in value.items():
        if not isinstance(v, str):
            raise InvalidRequest(
                f"{name}[{k!r}] must be a string, got {type(v).__name__}")
    return value


def _cidr(value: str, what: str, version: Optional[int] = None,
          strict: bool = False) -> str:
    """Validate ``ip/prefix`` (an interface address or, with strict, a network)."""
    try:
        if strict:
            net = ipaddress.ip_network(value, strict=True)
        else:
            net = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidRequest(f"{what} is not a valid CIDR: {value!r}") from None
    if "/" not in value:
        raise InvalidRequest(f"{what} must have a prefix length: {value!r}")
    if version is not None and net.version != version:
        raise InvalidRequest(f"{what} must be an IPv{version} CIDR: {value!r}")
    return value


def _ip(value: str, what: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidRequest(f"{what} is not a valid IP address: {value!r}") from None
    return value


def _mac(value: str, what: str) -> str:
    if value and not _MAC_RE.match(value):
        raise InvalidRequest(f"{what} is not a valid MAC address: {value!r}")
    return value.lower().replace("-", ":")


# --------------------------------------------------------------------------
# network driver requests


@dataclass(frozen=True)
class IPAMData:
    address_space: str
    pool: str
    gateway: str = ""
    aux_addresses: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any, what: str, version: int) -> "IPAMData":
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{what} entries must be objects")
        pool = _cidr(_str(raw, "Pool", required=True), f"{what}.Pool", version)
        gateway = _str(raw, "Gateway")
        if gateway:
            _cidr(gateway, f"{what}.Gateway", version)
        aux = _str_map(raw, "AuxAddresses")
        return cls(_str(raw, "AddressSpace"), pool, gateway, aux)

    def to_json(self) -> Dict[str, Any]:
        return {"AddressSpace": self.address_space, "Pool": self.pool,
                "Gateway": self.gateway, "AuxAddresses": dict(self.aux_addresses)}


def _ipam_list(body: Mapping[str, Any], name: str, version: int) -> Tuple[IPAMData, ...]:
    raw = body.get(name)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{name} must be a list, got {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise InvalidRequest(f"{name} has too many entries ({len(raw)}, at most {MAX_ENTRIES})")
    return tuple(IPAMData.parse(item, name, version) for item in raw)


@dataclass(frozen=True)
class CreateNetworkRequest:
    network_id: str
    options: Dict[str, Any]
    generic_options: Dict[str, str]
    ipv4_data: Tuple[IPAMData, ...]
    ipv6_data: Tuple[IPAMData, ...]
    raw: Dict[str, Any] = field(compare=False, repr=False, default_factory=dict)

    @property
    def enable_ipv6(self) -> bool:
        return bool(self.ipv6_data) or self.options.get(ENABLE_IPV6) is True

    @classmethod
    def parse(cls, body: Any) -> "CreateNetworkRequest":
        body = _body(body)
        options = _map(body, "Options")
        generic = options.get(GENERIC_OPTIONS) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"Options[{GENERIC_OPTIONS!r}] must be an object")
        for k, v in generic.items():
            if not isinstance(v, str):
                raise InvalidRequest(
                    f"network option {k!r} must be a string, got {type(v).__name__}")
        return cls(network_id=_id(body, "NetworkID"), options=options,
                   generic_options=dict(generic),
                   ipv4_data=_ipam_list(body, "IPv4Data", 4),
                   ipv6_data=_ipam_list(body, "IPv6Data", 6),
                   raw=dict(body))


@dataclass(frozen=True)
class GwAllocCheckRequest:
    """Docker >= 28 (when GetCapabilities says ``GwAllocChecker``), before
    CreateNetwork: may the network do without a gateway address?"""
    options: Dict[str, Any]
    generic_options: Dict[str, Any]

    @classmethod
    def parse(cls, body: Any) -> "GwAllocCheckRequest":
        options = _map(_body(body), "Options")
        generic = options.get(GENERIC_OPTIONS) or {}
        if not isinstance(generic, dict):
            raise InvalidRequest(f"Options[{GENERIC_OPTIONS!r}] must be an object")
        return cls(options, dict(generic))


@dataclass(frozen=True)
class GwAllocCheckResponse:
    skip_ipv4: bool = False
    skip_ipv6: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"SkipIPv4": self.skip_ipv4, "SkipIPv6": self.skip_ipv6}


@dataclass(frozen=True)
class NetworkRequest:
    """DeleteNetwork, FreeNetwork."""
    network_id: str

    @classmethod
    def parse(cls, body: Any) -> "NetworkRequest":
        return cls(_id(_body(body), "NetworkID"))


@dataclass(frozen=True)
class AllocateNetworkRequest:
    network_id: str
    options: Dict[str, str]
    ipv4_data: Tuple[IPAMData, ...]
    ipv6_data: Tuple[IPAMData, ...]

    @classmethod
    def parse(cls, body: Any) -> "AllocateNetworkRequest":
        body = _body(body)
        return cls(_id(body, "NetworkID"), _str_map(body, "Options"),
                   _ipam_list(body, "IPv4Data", 4), _ipam_list(body, "IPv6Data", 6))


@dataclass(frozen=True)
class EndpointInterface:
    address: str = ""        # "ip/prefix" or ""
    address_ipv6: str = ""   # "ip/prefix" or ""
    mac_address: str = ""    # "aa:bb:..." or ""

    @classmethod
    def parse(cls, raw: Any) -> "EndpointInterface":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidRequest("Interface must be an object")
        address = _str(raw, "Address")
        if address:
            _cidr(address, "Interface.Address", 4)
        address6 = _str(raw, "AddressIPv6")
        if address6:
            _cidr(address6, "Interface.AddressIPv6", 6)
        mac = _mac(_str(raw, "MacAddress"), "Interface.MacAddress")
        return cls(address, address6, mac)


@dataclass(frozen=True)
class CreateEndpointRequest:
    network_id: str
    endpoint_id: str
    interface: EndpointInterface
    options: Dict[str, Any]

    @property
    def mac_option(self) -> str:
        """The MAC in Options (Docker sends it base64 encoded), or ""."""
        raw = self.options.get(MAC_OPTION)
        if not raw:
            return ""
        if not isinstance(raw, str):
            raise InvalidRequest(f"Options[{MAC_OPTION!r}] must be a string")
        try:
            mac = base64.b64decode(raw, validate=True)
        except ValueError:
            raise InvalidRequest(f"Options[{MAC_OPTION!r}] is not base64") from None
        if len(mac) != 6:
            raise InvalidRequest(f"Options[{MAC_OPTION!r}] is not a MAC address")
        return ":".join(f"{b:02x}" for b in mac)

    @classmethod
    def parse(cls, body: Any) -> "CreateEndpointRequest":
        body = _body(body)
        req = cls(_id(body, "NetworkID"), _id(body, "EndpointID"),
                  EndpointInterface.parse(body.get("Interface")), _map(body, "Options"))
        req.mac_option  # validate now, not in the backend
        return req


@dataclass(frozen=True)
class EndpointRequest:
    """DeleteEndpoint, EndpointOperInfo, Leave, RevokeExternalConnectivity."""
    network_id: str
    endpoint_id: str

    @classmethod
    def parse(cls, body: Any) -> "EndpointRequest":
        body = _body(body)
        return cls(_id(body, "NetworkID"), _id(body, "EndpointID"))


@dataclass(frozen=True)
class JoinRequest:
    network_id: str
    endpoint_id: str
    sandbox_key: str
    options: Dict[str, Any]

    @classmethod
    def parse(cls, body: Any) -> "JoinRequest":
        body = _body(body)
        return cls(_id(body, "NetworkID"), _id(body, "EndpointID"),
                   _str(body, "SandboxKey", required=True, limit=MAX_STRING),
                   _map(body, "Options"))


@dataclass(frozen=True)
class ProgramExternalConnectivityRequest:
    network_id: str
    endpoint_id: str
    options: Dict[str, Any]

    @classmethod
    def parse(cls, body: Any) -> "ProgramExternalConnectivityRequest":
        body = _body(body)
        return cls(_id(body, "NetworkID"), _id(body, "EndpointID"), _map(body, "Options"))


@dataclass(frozen=True)
class DiscoveryRequest:
    discovery_type: int
    discovery_data: Any

    @classmethod
    def parse(cls, body: Any) -> "DiscoveryRequest":
        body = _body(body)
        dtype = body.get("DiscoveryType", 0)
        if isinstance(dtype, bool) or not isinstance(dtype, int):
            raise InvalidRequest("DiscoveryType must be an integer")
        return cls(dtype, _bounded(body.get("DiscoveryData"), "DiscoveryData"))


# --------------------------------------------------------------------------
# network driver responses


@dataclass(frozen=True)
class CreateEndpointResponse:
    """Only fields the request left empty may be filled (Docker refuses the rest)."""
    address: str = ""
    address_ipv6: str = ""
    mac_address: str = ""

    def to_json(self) -> Dict[str, Any]:
        iface = {}
        if self.address:
            iface["Address"] = self.address
        if self.address_ipv6:
            iface["AddressIPv6"] = self.address_ipv6
        if self.mac_address:
            iface["MacAddress"] = self.mac_address
        return {"Interface": iface} if iface else {}


@dataclass(frozen=True)
class StaticRoute:
    destination: str
    route_type: int  # 0 = next hop, 1 = connected
    next_hop: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"Destination": self.destination, "RouteType": self.route_type,
                "NextHop": self.next_hop}


@dataclass(frozen=True)
class JoinResponse:
    src_name: str
    dst_prefix: str
    gateway: str = ""
    gateway_ipv6: str = ""
    static_routes: Tuple[StaticRoute, ...] = ()
    disable_gateway_service: bool = False

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "InterfaceName": {"SrcName": self.src_name, "DstPrefix": self.dst_prefix},
            "DisableGatewayService": self.disable_gateway_service,
        }
        if self.gateway:
            out["Gateway"] = self.gateway
        if self.gateway_ipv6:
            out["GatewayIPv6"] = self.gateway_ipv6
        if self.static_routes:
            out["StaticRoutes"] = [r.to_json() for r in self.static_routes]
        return out


# --------------------------------------------------------------------------
# IPAM requests and responses


@dataclass(frozen=True)
class RequestPoolRequest:
    address_space: str
    pool: str        # "" = let the driver choose
    sub_pool: str
    options: Dict[str, str]
    v6: bool

    @classmethod
    def parse(cls, body: Any) -> "RequestPoolRequest":
        body = _body(body)
        v6 = _bool(body, "V6")
        pool = _str(body, "Pool")
        if pool:
            _cidr(pool, "Pool", 6 if v6 else 4)
        sub_pool = _str(body, "SubPool")
        if sub_pool:
            _cidr(sub_pool, "SubPool", 6 if v6 else 4)
        return cls(_str(body, "AddressSpace"), pool, sub_pool,
                   _str_map(body, "Options"), v6)


@dataclass(frozen=True)
class RequestPoolResponse:
    pool_id: str
    pool: str
    data: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"PoolID": self.pool_id, "Pool": self.pool, "Data": dict(self.data)}


@dataclass(frozen=True)
class ReleasePoolRequest:
    pool_id: str

    @classmethod
    def parse(cls, body: Any) -> "ReleasePoolRequest":
        return cls(_str(_body(body), "PoolID", required=True))


@dataclass(frozen=True)
class RequestAddressRequest:
    pool_id: str
    address: str     # "" = any
    options: Dict[str, str]

    @property
    def is_gateway(self) -> bool:
        return self.options.get(REQUEST_ADDRESS_TYPE) == GATEWAY_ADDRESS_TYPE

    @classmethod
    def parse(cls, body: Any) -> "RequestAddressRequest":
        body = _body(body)
        address = _str(body, "Address")
        if address:
            _ip(address, "Address")
        return cls(_str(body, "PoolID", required=True), address,
                   _str_map(body, "Options"))


@dataclass(frozen=True)
class RequestAddressResponse:
    address: str     # "ip/prefix"
    data: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"Address": self.address, "Data": dict(self.data)}


@dataclass(frozen=True)
class ReleaseAddressRequest:
    pool_id: str
    address: str

    @classmethod
    def parse(cls, body: Any) -> "ReleaseAddressRequest":
        body = _body(body)
        address = _str(body, "Address", required=True)
        _ip(address, "Address")
        return cls(_str(body, "PoolID", required=True), address)


@dataclass(frozen=True)
class AddressSpaces:
    local: str
    global_: str

    def to_json(self) -> Dict[str, Any]:
        return {"LocalDefaultAddressSpace": self.local,
                "GlobalDefaultAddressSpace": self.global_}


@dataclass(frozen=True)
class IpamCapabilities:
    requires_mac_address: bool = False
    requires_request_replay: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"RequiresMACAddress": self.requires_mac_address,
                "RequiresRequestReplay": self.requires_request_replay}

