"""Nuage networks: the ``-o`` options, their validation and the stored record.
Owns the network options, their validation and the network record's JSON.

``docker network create --driver=nuage -o organization=Enterprise -o domain=Domain
-o zone=Zone -o subnet="Subnet 2" -o user=admin --subnet=10.21.59.0/24 MyNet``
maps the Docker network onto a VSD subnet: ``organization`` (VSD enterprise),
``domain``, ``zone`` and ``subnet`` (the VSD subnet's *name*) locate it, ``user``
is the VSD user the VM entities are created for.  All five are required and
must not be empty (the seed plugin let most of them be empty, which only fails
later, in VRS).  Docker's IPAM supplies the addresses (``--subnet``).
"""
from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping

from netplugin import protocol as p
from netplugin.errors import InvalidRequest, NotSupported, PluginError

#: The ``-o`` options, in the order the messages list them.
REQUIRED_OPTIONS = ("organization", "domain", "zone", "subnet", "user")
#: Docker's own driver options (``com.docker.network.*``) are passed through.
DOCKER_OPTION_PREFIX = "com.docker."
#: IPAM gateways meaning "no real pool" (a remote IPAM that answered 0.0.0.0/0).
NO_POOL = ("0.0.0.0/0",)


@dataclass(frozen=True)
class NuageNetwork:
    """What the backend keeps per Docker network (JSON in the datastore)."""

    network_id: str
    organization: str
    domain: str
    zone: str
    subnet: str          # VSD subnet name
    user: str
    pool: str            # Docker IPAM subnet, e.g. "10.21.59.0/24"
    gateway: str = ""    # Docker IPAM gateway without prefix, "" if none
    created: float = field(default=0.0, compare=False)

    @property
    def options(self) -> Dict[str, str]:
        return {name: getattr(self, name) for name in REQUIRED_OPTIONS}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, key: str, raw: str) -> "NuageNetwork":
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            values = {name: data[name] for name in
                      ("network_id", "pool", *REQUIRED_OPTIONS)}
            values["gateway"] = data.get("gateway", "")
            values["created"] = float(data.get("created", 0.0))
            for name, value in values.items():
                if name != "created" and not isinstance(value, str):
                    raise ValueError(f"{name} is not a string")
            ipaddress.ip_network(values["pool"], strict=False)
        except (ValueError, KeyError, TypeError) as exc:
            raise PluginError(f"network record {key} is corrupt: {exc}") from None
        return cls(**values)


def parse_network_options(generic: Mapping[str, Any]) -> Dict[str, str]:
    """Validate the ``-o`` options; return the five Nuage values (stripped).

    Every problem is reported at once, naming the options, e.g.
    ``missing nuage network option(s): user (…)``."""
    unknown = sorted(k for k in generic
                     if k not in REQUIRED_OPTIONS and not k.startswith(DOCKER_OPTION_PREFIX))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise InvalidRequest(
            f"unknown nuage network option{'s' if len(unknown) > 1 else ''} {names}; "
            f"the nuage driver takes: {', '.join(REQUIRED_OPTIONS)}")
    values: Dict[str, str] = {}
    missing, empty = [], []
    for name in REQUIRED_OPTIONS:
        if name not in generic:
            missing.append(name)
            continue
        value = generic[name]
        if not isinstance(value, str):
            raise InvalidRequest(f"nuage network option {name!r} must be a string")
        value = value.strip()
        if not value:
            empty.append(name)
        values[name] = value
    problems = []
    if missing:
        problems.append(f"missing nuage network option{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}")
    if empty:
        problems.append(f"empty nuage network option{'s' if len(empty) > 1 else ''} "
                        f"{', '.join(empty)}")
    if problems:
        raise InvalidRequest(
            "; ".join(problems) + ": every nuage network needs -o organization=<enterprise> "
            "-o domain=<domain> -o zone=<zone> -o subnet=<VSD subnet name> -o user=<VSD user>")
    return values


def network_from_request(req: p.CreateNetworkRequest) -> NuageNetwork:
    """Validate a CreateNetwork request into a ``NuageNetwork`` (nothing written)."""
    options = parse_network_options(req.generic_options)
    if req.ipv6_data:
        raise NotSupported("the nuage driver is IPv4 only (VRS resolves IPv4 vPorts); "
                           "create the network without --ipv6")
    if not req.ipv4_data:
        raise InvalidRequest("the nuage driver needs the network's IPv4 subnet from Docker's "
                             "IPAM: create the network with --subnet=<cidr>")
    if len(req.ipv4_data) > 1:
        raise InvalidRequest(f"the nuage driver takes one IPv4 subnet per network, got "
                             f"{len(req.ipv4_data)}: {', '.join(d.pool for d in req.ipv4_data)}")
    data = req.ipv4_data[0]
    if data.pool in NO_POOL:
        raise NotSupported("the nuage driver needs a real subnet from Docker's IPAM "
                           "(--subnet=<cidr>), not a remote IPAM's 0.0.0.0/0")
    pool = str(ipaddress.ip_network(data.pool, strict=False))
    gateway = str(ipaddress.ip_interface(data.gateway).ip) if data.gateway else ""
    return NuageNetwork(network_id=req.network_id, pool=pool, gateway=gateway,
                        created=time.time(), **options)
