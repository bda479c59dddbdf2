"""The Calico model's keys: every key root and key function, the veth names,
and the helpers the record modules share (CorruptRecord, truthy, valid_id).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
from typing import Any, Dict, List, Optional, Tuple, Union

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class CorruptRecord(ValueError):
    """A datastore value that cannot be understood (the message says why)."""


log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


# --------------------------------------------------------------------------
# key roots and keys

ORCHESTRATOR = "libnetwork"
WORKLOAD = "libnetwork"

PROFILE_ROOT = "/calico/v1/policy/profile"
POOL_ROOT = "/calico/v1/ipam"            # + /v4/pool/<cidr> or /v6/pool/<cidr>
HOST_ROOT = "/calico/v1/host"
NETWORK_ROOT = "/calico/libnetwork/v1"   # plugin-private network records
#: Which hosts still have a network of a profile: one key per (host, network).
PROFILE_REF_ROOT = "/calico/libnetwork/refs"
#: Tombstones of hosts removed with ``netpluginctl host remove``.
REMOVED_ROOT = "/calico/libnetwork/removed-hosts"

IPAM_ROOT = "/calico/ipam/v2"
IPAM_CONFIG_KEY = f"{IPAM_ROOT}/config"
HANDLE_ROOT = f"{IPAM_ROOT}/handle"
AFFINITY_ROOT = f"{IPAM_ROOT}/host"      # + /<host>/ipv4/block/<cidr>
BLOCK_ROOT = f"{IPAM_ROOT}/assignment"   # + /ipv4/block/<cidr>

_ENDPOINT_KEY_RE = re.compile(r"^%s/([^/]+)/workload/([^/]+)/([^/]+)/endpoint/([^/]+)$"
                              % re.escape(HOST_ROOT))
_PROFILE_KEY_RE = re.compile(r"^%s/([^/]+)/(tags|rules|labels)$" % re.escape(PROFILE_ROOT))
_BIRD_IP_KEY_RE = re.compile(r"^%s/([^/]+)/(bird_ip|bird6_ip)$" % re.escape(HOST_ROOT))
_TUNNEL_KEY_RE = re.compile(r"^%s/([^/]+)/config/IpInIpTunnelAddr$" % re.escape(HOST_ROOT))
_AFFINITY_KEY_RE = re.compile(r"^%s/([^/]+)/ipv([46])/block/([^/]+)$"
                              % re.escape(AFFINITY_ROOT))


def cidr_in_key(cidr) -> str:
    """``192.168.0.0/16`` -> ``192.168.0.0-16`` (Calico puts CIDRs in keys this
    way); ``cidr`` is a string or an ``ipaddress`` network."""
    return str(cidr).replace("/", "-")


def cidr_from_key(key: str) -> IPNetwork:
    """Last path component ``192.168.0.0-26`` / ``fd80::40-122`` -> network."""
    name = key.rstrip("/").rsplit("/", 1)[-1]
    addr, _, plen = name.rpartition("-")
    return ipaddress.ip_network(f"{addr}/{plen}")


def profile_dir(name: str) -> str:
    """``/calico/v1/policy/profile/<name>`` (its keys: tags, rules, labels)."""
    return f"{PROFILE_ROOT}/{name}"


def profile_tags(name: str) -> str:
    return f"{profile_dir(name)}/tags"


def profile_rules(name: str) -> str:
    return f"{profile_dir(name)}/rules"


def profile_labels(name: str) -> str:
    return f"{profile_dir(name)}/labels"


def parse_profile_key(key: str) -> Optional[Tuple[str, str]]:
    """``(profile name, "tags"|"rules"|"labels")`` of a profile key, else None."""
    m = _PROFILE_KEY_RE.match(key)
    return (m.group(1), m.group(2)) if m else None


def pool_dir(version: int) -> str:
    """``/calico/v1/ipam/v4/pool/`` (or ``/v6/``): every pool of that family."""
    return f"{POOL_ROOT}/v{version}/pool/"


def pool(cidr) -> str:
    """``/calico/v1/ipam/v4/pool/10.0.0.0-24`` (or ``/v6/``); ``cidr`` is
    normalised to its network address first."""
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{pool_dir(net.version)}{cidr_in_key(net)}"


pool_key = pool


def network(nid: str) -> str:
    """``/calico/libnetwork/v1/<nid>``: the network's record (NetworkRecord)."""
    return f"{NETWORK_ROOT}/{nid}"


network_key = network


def host_workloads(host: str) -> str:
    """``/calico/v1/host/<host>/workload``."""
    return f"{HOST_ROOT}/{host}/workload"


def endpoint_dir(host: str) -> str:
    """``/calico/v1/host/<host>/workload/libnetwork/libnetwork/endpoint``."""
    return f"{host_workloads(host)}/{ORCHESTRATOR}/{WORKLOAD}/endpoint"


def endpoint(host: str, eid: str) -> str:
    """``/calico/v1/host/<host>/workload/libnetwork/libnetwork/endpoint/<eid>``."""
    return f"{endpoint_dir(host)}/{eid}"


endpoint_key = endpoint


def parse_endpoint_key(key: str) -> Optional[Tuple[str, str, str, str]]:
    """``(host, orchestrator, workload, eid)`` of a workload endpoint key (any
    orchestrator), else None."""
    m = _ENDPOINT_KEY_RE.match(key)
    return (m.group(1), m.group(2), m.group(3), m.group(4)) if m else None


def is_endpoint_key(key: str) -> bool:
    return _ENDPOINT_KEY_RE.match(key) is not None


def bird_ip_key(host: str) -> str:
    """``/calico/v1/host/<host>/bird_ip``: the host's IPv4 next hop."""
    return f"{HOST_ROOT}/{host}/bird_ip"


def bird6_ip_key(host: str) -> str:
    """``/calico/v1/host/<host>/bird6_ip``: the host's IPv6 next hop."""
    return f"{HOST_ROOT}/{host}/bird6_ip"


def parse_bird_ip_key(key: str) -> Optional[Tuple[str, int]]:
    """``(host, 4)`` for a bird_ip key, ``(host, 6)`` for a bird6_ip key, else None."""
    m = _BIRD_IP_KEY_RE.match(key)
    if not m:
        return None
    return m.group(1), (4 if m.group(2) == "bird_ip" else 6)


def tunnel_address_host(key: str) -> Optional[str]:
    """The host of a ``/calico/v1/host/<host>/config/IpInIpTunnelAddr`` key."""
    m = _TUNNEL_KEY_RE.match(key)
    return m.group(1) if m else None


def profile_refs(name: str) -> str:
    """``/calico/libnetwork/refs/<profile>/``: the networks using the profile."""
    return f"{PROFILE_REF_ROOT}/{name}/"


def profile_ref(name: str, host: str, nid: str) -> str:
    """``/calico/libnetwork/refs/<profile>/<host>/<nid>``."""
    return f"{profile_refs(name)}{host}/{nid}"


def profile_ref_json(nid: str) -> str:
    """The value of a profile reference."""
    return json.dumps({"network": nid})


def removed_key(host: str) -> str:
    """``/calico/libnetwork/removed-hosts/<host>``: ``{"removed_at": epoch}``."""
    return f"{REMOVED_ROOT}/{host}"


def block_dir(version: int) -> str:
    return f"{BLOCK_ROOT}/ipv{version}/block/"


def block_key(cidr) -> str:
    net = ipaddress.ip_network(cidr)
    return f"{block_dir(net.version)}{cidr_in_key(net)}"


def host_affinity_dir(host: str, version: int) -> str:
    return f"{AFFINITY_ROOT}/{host}/ipv{version}/block/"


def host_affinity_key(host: str, cidr) -> str:
    net = ipaddress.ip_network(cidr)
    return f"{host_affinity_dir(host, net.version)}{cidr_in_key(net)}"


def parse_affinity_key(key: str) -> Optional[Tuple[str, int, str]]:
    """``(host, version, "<cidr-dash>")`` of a host affinity key, else None."""
    m = _AFFINITY_KEY_RE.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def handle_key(handle_id: str) -> str:
    return f"{HANDLE_ROOT}/{handle_id}"


# --------------------------------------------------------------------------
# interface names

#: Host side of a container's veth: ``cali`` + the EndpointID's first 11
#: characters (15 characters, the Linux limit); the peer handed to Docker is
#: ``tmp`` + the same 11.
HOST_PREFIX = "cali"
TEMP_PREFIX = "tmp"
ID_CHARS = 11
HOST_DEVICE_RE = re.compile(r"^cali([0-9a-f]{11})$")
TEMP_DEVICE_RE = re.compile(r"^tmp([0-9a-f]{11})$")


def host_veth_name(eid: str) -> str:
    """``cali<eid[:11]>``: the host side of the endpoint's veth."""
    return HOST_PREFIX + eid[:ID_CHARS]


def temp_veth_name(eid: str) -> str:
    """``tmp<eid[:11]>``: the container side, until Docker moves and renames it."""
    return TEMP_PREFIX + eid[:ID_CHARS]


#: The IFLA_IFALIAS Join sets on the host end of each veth it creates
#: (``netplugin:calico:<eid>``).  Cleanups delete only ``cali*`` veths that
#: carry it: Calico CNI (and anyone else) also names its veths ``cali*``.
VETH_MARKER_PREFIX = "netplugin:calico:"


def veth_marker(eid: str) -> str:
    return VETH_MARKER_PREFIX + eid


def is_our_veth(name: str, alias) -> bool:
    """``cali<11 chars>`` whose alias is our marker for an EndpointID starting
    with those 11 characters."""
    if not (isinstance(alias, str) and alias.startswith(VETH_MARKER_PREFIX)):
        return False
    eid = alias[len(VETH_MARKER_PREFIX):]
    return len(name) == 15 and name.startswith(HOST_PREFIX) and eid[:11] == name[4:]


# --------------------------------------------------------------------------
# small helpers


def truthy(value: Any, default: bool) -> bool:
    """JSON booleans, tolerating the strings Go/hand-written values may hold."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0", ""):
            return False
    if isinstance(value, (int, float)):
        return bool(value)
    return default


def _object(value: str) -> Dict[str, Any]:
    """A JSON object, else CorruptRecord."""
    try:
        data = json.loads(value)
    except (ValueError, TypeError) as exc:
        raise CorruptRecord(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptRecord("not a JSON object")
    return data


MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
#: Felix's VALID_ID_RE: profile names and tags.
VALID_ID_RE = re.compile(r"^[a-zA-Z0-9_.\-]+$")
MAX_ID_LEN = 200          # nft names are limited to 256 bytes; keep room for "t4-"
#: The MAC every container gets unless Docker chose one (Calico's convention).
FIXED_MAC = "ee:ee:ee:ee:ee:ee"


def valid_id(text: Any) -> bool:
    """A valid profile name or tag (Felix's rule, and short enough for nft)."""
    return isinstance(text, str) and bool(VALID_ID_RE.match(text)) and len(text) <= MAX_ID_LEN



def _warn(warnings: Optional[List[str]], message: str) -> None:
    if warnings is not None:
        warnings.append(message)

