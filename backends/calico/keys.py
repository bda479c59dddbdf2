"""Datastore keys of the Calico v1 data model used by the libnetwork plugin.

``<nid>`` is Docker's NetworkID (also the Calico profile name), ``<eid>`` the
EndpointID, ``<host>`` the Calico host name (``[calico] hostname``).
"""
from __future__ import annotations

import ipaddress

ORCHESTRATOR = "libnetwork"
WORKLOAD = "libnetwork"

PROFILE_ROOT = "/calico/v1/policy/profile"
POOL_ROOT = "/calico/v1/ipam"            # + /v4/pool/<cidr> or /v6/pool/<cidr>
NETWORK_ROOT = "/calico/libnetwork/v1"   # plugin-private network records
HOST_ROOT = "/calico/v1/host"


def cidr_in_key(cidr) -> str:
    """``192.168.0.0/16`` -> ``192.168.0.0-16`` (Calico puts CIDRs in keys this
    way); ``cidr`` is a string or an ``ipaddress`` network."""
    return str(cidr).replace("/", "-")


def profile_dir(nid: str) -> str:
    """``/calico/v1/policy/profile/<nid>`` (its keys: tags, rules, labels)."""
    return f"{PROFILE_ROOT}/{nid}"


def profile_tags(nid: str) -> str:
    return f"{profile_dir(nid)}/tags"


def profile_rules(nid: str) -> str:
    return f"{profile_dir(nid)}/rules"


def profile_labels(nid: str) -> str:
    return f"{profile_dir(nid)}/labels"


def pool_dir(version: int) -> str:
    """``/calico/v1/ipam/v4/pool/`` (or ``/v6/``): every pool of that family."""
    return f"{POOL_ROOT}/v{version}/pool/"


def pool(cidr) -> str:
    """``/calico/v1/ipam/v4/pool/10.0.0.0-24`` (or ``/v6/``); ``cidr`` is
    normalised to its network address first."""
    net = ipaddress.ip_network(cidr, strict=False)
    return f"{pool_dir(net.version)}{cidr_in_key(net)}"


def network(nid: str) -> str:
    """``/calico/libnetwork/v1/<nid>``: the CreateNetwork request, verbatim."""
    return f"{NETWORK_ROOT}/{nid}"


def host_workloads(host: str) -> str:
    """``/calico/v1/host/<host>/workload``."""
    return f"{HOST_ROOT}/{host}/workload"


def endpoint_dir(host: str) -> str:
    """``/calico/v1/host/<host>/workload/libnetwork/libnetwork/endpoint``."""
    return f"{host_workloads(host)}/{ORCHESTRATOR}/{WORKLOAD}/endpoint"


def endpoint(host: str, eid: str) -> str:
    """``/calico/v1/host/<host>/workload/libnetwork/libnetwork/endpoint/<eid>``."""
    return f"{endpoint_dir(host)}/{eid}"
