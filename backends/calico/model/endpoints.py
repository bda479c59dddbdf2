"""Workload endpoints (``/calico/v1/host/<host>/workload/.../endpoint/<eid>``):
the Endpoint record, its JSON, and the checks of its stricter readers.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Mapping, Optional, Tuple

from backends.calico.model.common import (HOST_ROOT, MAC_RE, ORCHESTRATOR, WORKLOAD,
                                          CorruptRecord, IPAddress, IPNetwork, _object, _warn,
                                          is_endpoint_key, parse_endpoint_key)

# --------------------------------------------------------------------------
# endpoints

_ENDPOINT_FIELDS = ("state", "name", "mac", "profile_ids", "labels", "ipv4_nets",
                    "ipv6_nets", "mtu", "network_id")
_HOST_PREFIXLEN = {4: 32, 6: 128}


@dataclass(frozen=True)
class Endpoint:
    """A workload endpoint ``/calico/v1/host/<host>/workload/<orchestrator>/
    <workload>/endpoint/<eid>``.  ``ipv4_nets``/``ipv6_nets`` hold the stored
    strings (``10.0.0.5/32``); fields a reader does not need to be valid are
    None when absent or unusable (``problems`` says why, for the readers that
    need them)."""
    host: str
    endpoint_id: str
    name: Optional[str] = None                  # host-side interface
    profile_ids: Optional[Tuple[str, ...]] = ()
    ipv4_nets: Tuple[str, ...] = ()
    ipv6_nets: Tuple[str, ...] = ()
    mac: Optional[str] = None
    state: str = "active"
    mtu: Optional[int] = None                   # the network's -o mtu (plugin-private)
    network_id: Optional[str] = None            # when the profile is not the NetworkID
    labels: Dict[str, Any] = field(default_factory=dict, compare=False)
    orchestrator: str = ORCHESTRATOR
    workload: str = WORKLOAD
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    problems: Dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # -- identity --------------------------------------------------------------
    @property
    def key(self) -> str:
        return (f"{HOST_ROOT}/{self.host}/workload/{self.orchestrator}/{self.workload}"
                f"/endpoint/{self.endpoint_id}")

    @property
    def libnetwork(self) -> bool:
        """Written by a libnetwork plugin (this one or Calico's)."""
        return self.orchestrator == ORCHESTRATOR and self.workload == WORKLOAD

    @property
    def active(self) -> bool:
        return self.state == "active"

    @property
    def network(self) -> Optional[str]:
        """The NetworkID the endpoint belongs to: ``network_id``, else its first
        profile (a profile named after the NetworkID), else None."""
        if self.network_id is not None:
            return self.network_id
        if self.profile_ids:
            return self.profile_ids[0]
        return None

    # -- addresses ---------------------------------------------------------------
    def nets(self) -> Tuple[str, ...]:
        return self.ipv4_nets + self.ipv6_nets

    def ip_addresses(self) -> Tuple[IPAddress, ...]:
        """Every address, as stored (IPv4 first)."""
        return tuple(ipaddress.ip_interface(n).ip for n in self.nets())

    def addresses(self, version: int) -> Tuple[str, ...]:
        """The addresses of one IP version without prefix, each once; only
        those of the right version (``policy_problem`` reports others)."""
        out: List[str] = []
        for n in self.ipv4_nets if version == 4 else self.ipv6_nets:
            iface = ipaddress.ip_interface(n)
            if iface.version == version and str(iface.ip) not in out:
                out.append(str(iface.ip))
        return tuple(out)

    @cached_property
    def ipv4(self) -> Tuple[str, ...]:
        """IPv4 addresses without prefix, each once (computed once)."""
        return self.addresses(4)

    @cached_property
    def ipv6(self) -> Tuple[str, ...]:
        return self.addresses(6)

    # -- the stricter readers -------------------------------------------------------
    def policy_problem(self) -> Optional[str]:
        """Why the policy compiler cannot use this endpoint, or None."""
        if not self.name:
            return "no interface name"
        if self.profile_ids is None:
            return "profile_ids is not a list of strings"
        if "mac" in self.problems:
            return self.problems["mac"]
        for what, nets, version in (("ipv4_nets", self.ipv4_nets, 4),
                                    ("ipv6_nets", self.ipv6_nets, 6)):
            for n in nets:
                iface = ipaddress.ip_interface(n)
                if iface.version != version:
                    return f"{what} holds an IPv{iface.version} address {n!r}"
        return None

    def check_join(self) -> None:
        """CorruptRecord unless Join can use the endpoint: a MAC, a valid mtu."""
        if not self.mac:
            raise CorruptRecord("no mac")
        if "mtu" in self.problems:
            raise CorruptRecord(self.problems["mtu"])

    def host_routes(self) -> List[IPNetwork]:
        """The endpoint's addresses as host routes (/32, /128); CorruptRecord
        for a net that is not one (a bad writer must not route a range)."""
        out: List[IPNetwork] = []
        for what, nets, version in (("ipv4_nets", self.ipv4_nets, 4),
                                    ("ipv6_nets", self.ipv6_nets, 6)):
            for n in nets:
                net = ipaddress.ip_network(n, strict=False)
                if net.version != version or net.prefixlen != _HOST_PREFIXLEN[version]:
                    raise CorruptRecord(f"{n!r} in {what} is not a host route")
                out.append(net)
        return out

    # -- JSON -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, key: str, value: str) -> "Endpoint":
        """The endpoint of a datastore item.  CorruptRecord when the key is not
        an endpoint key, the value not a JSON object, or ``ipv4_nets`` /
        ``ipv6_nets`` not lists of addresses; other fields are lenient."""
        parsed = parse_endpoint_key(key)
        if parsed is None:
            raise CorruptRecord("not an endpoint key")
        host, orchestrator, workload, eid = parsed
        data = _object(value)
        nets: Dict[str, Tuple[str, ...]] = {}
        for what in ("ipv4_nets", "ipv6_nets"):
            raw = data.get(what)
            if raw is None:
                raw = []
            if not isinstance(raw, list):
                raise CorruptRecord(f"{what} is not a list")
            for n in raw:
                if not isinstance(n, str):
                    raise CorruptRecord(f"{what} holds a non-string {n!r}")
                try:
                    ipaddress.ip_interface(n)
                except ValueError as exc:
                    raise CorruptRecord(str(exc)) from None
            nets[what] = tuple(raw)
        problems: Dict[str, str] = {}
        extra = {k: v for k, v in data.items() if k not in _ENDPOINT_FIELDS}
        name = data.get("name")
        profile_ids: Optional[Tuple[str, ...]]
        raw_profiles = data.get("profile_ids")
        if raw_profiles is None and isinstance(data.get("profile_id"), str):
            raw_profiles = [data["profile_id"]]            # legacy single profile
        if isinstance(raw_profiles, list) and all(isinstance(p, str) for p in raw_profiles):
            profile_ids = tuple(raw_profiles)
        else:
            profile_ids = None
        mac = data.get("mac")
        if mac is not None and (not isinstance(mac, str) or not MAC_RE.match(mac)):
            problems["mac"] = f"invalid mac {mac!r}"
        mac = mac if isinstance(mac, str) and mac else None
        mtu = data.get("mtu")
        if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                                or not 68 <= mtu <= 65535):
            problems["mtu"] = f"bad mtu {mtu!r}"
            mtu = None
        network_id = data.get("network_id")
        labels = data.get("labels")
        state = data.get("state", "active")
        return cls(host=host, endpoint_id=eid,
                   name=name if isinstance(name, str) else None,
                   profile_ids=profile_ids,
                   ipv4_nets=nets["ipv4_nets"], ipv6_nets=nets["ipv6_nets"],
                   mac=mac, state=state if isinstance(state, str) else repr(state), mtu=mtu,
                   network_id=network_id if isinstance(network_id, str) else None,
                   labels=labels if isinstance(labels, dict) else {},
                   orchestrator=orchestrator, workload=workload, extra=extra,
                   problems=problems)

    def to_json(self) -> str:
        """Calico's endpoint JSON (``mtu`` and ``network_id`` only when set)."""
        data: Dict[str, Any] = {"state": self.state}
        if self.name is not None:
            data["name"] = self.name
        if self.mac is not None:
            data["mac"] = self.mac
        data["profile_ids"] = list(self.profile_ids or ())
        data["labels"] = dict(self.labels)
        data["ipv4_nets"] = list(self.ipv4_nets)
        data["ipv6_nets"] = list(self.ipv6_nets)
        if self.mtu is not None:
            data["mtu"] = self.mtu
        if self.network_id is not None:
            data["network_id"] = self.network_id
        for k, v in self.extra.items():
            data.setdefault(k, v)
        return json.dumps(data)


def parse_endpoints(items: Mapping[str, str], warnings: Optional[List[str]] = None
                    ) -> List[Endpoint]:
    """Every readable endpoint among ``items`` (key -> value), sorted by key;
    other keys under /calico/v1/host (bird_ip, config...) are skipped quietly,
    unreadable endpoints with a warning."""
    out = []
    for key in sorted(items):
        if not is_endpoint_key(key):
            continue
        try:
            out.append(Endpoint.from_json(key, items[key]))
        except (ValueError, TypeError) as exc:
            _warn(warnings, f"ignoring endpoint {key}: {exc}")
    return out
