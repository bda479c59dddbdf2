"""Datastore keys of the Nuage backend.
Owns the Nuage datastore layout (network and per-host endpoint keys).

Networks are shared by every host (scope global: all plugins use the same
datastore); endpoints are kept per host, so that each host's start-up audit
and reconnect logic only ever sees its own vPorts.
"""
from __future__ import annotations

ROOT = "/netplugin/nuage/v1"


def network_dir() -> str:
    return f"{ROOT}/network"


def network(nid: str) -> str:
    """``/netplugin/nuage/v1/network/<nid>``: the ``NuageNetwork`` JSON."""
    return f"{network_dir()}/{nid}"


def endpoint_dir(host: str) -> str:
    """``/netplugin/nuage/v1/host/<host>/endpoint``."""
    return f"{ROOT}/host/{host}/endpoint"


def endpoint(host: str, eid: str) -> str:
    """``/netplugin/nuage/v1/host/<host>/endpoint/<eid>``: the endpoint JSON."""
    return f"{endpoint_dir(host)}/{eid}"
