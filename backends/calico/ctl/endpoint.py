"""netpluginctl's workload endpoints: the endpoint records as stored (``Endpoint``),
finding them, and ``endpoint show`` / ``endpoint <ID> profile ...``.

A record lives at
``/calico/v1/host/<host>/workload/<orchestrator>/<workload>/endpoint/<id>``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from backends.calico import model
from backends.calico.ctl.base import CtlBase, CtlError, format_table

log = logging.getLogger("netpluginctl")


@dataclass
class Endpoint:
    """A stored endpoint record: its key, version and ``model.Endpoint``
    (None when the value cannot be read: the record is still listed)."""
    key: str
    version: int
    record: Optional[model.Endpoint]
    host: str = field(init=False)
    orchestrator: str = field(init=False)
    workload: str = field(init=False)
    endpoint_id: str = field(init=False)

    def __post_init__(self) -> None:
        parsed = model.parse_endpoint_key(self.key)
        if parsed is None:
            raise ValueError(f"{self.key} is not an endpoint key")
        self.host, self.orchestrator, self.workload, self.endpoint_id = parsed

    @classmethod
    def from_item(cls, key: str, value: str, version: int) -> "Endpoint":
        try:
            record: Optional[model.Endpoint] = model.Endpoint.from_json(key, value)
        except (ValueError, TypeError) as exc:    # model.CorruptRecord, mostly
            if _is_object(value):
                log.warning("endpoint %s: %s", key, exc)
            else:
                log.warning("endpoint %s is not a JSON object", key)
            record = None
        return cls(key, version, record)

    @property
    def nets(self) -> List[str]:
        return list(self.record.nets()) if self.record else []

    @property
    def profiles(self) -> List[str]:
        return list(self.record.profile_ids or ()) if self.record else []

    @property
    def name(self) -> Optional[str]:
        return self.record.name if self.record else None

    @property
    def mac(self) -> Optional[str]:
        return self.record.mac if self.record else None

    @property
    def state(self) -> Optional[str]:
        return self.record.state if self.record else None

    def summary(self) -> Dict[str, Any]:
        return {"hostname": self.host, "orchestrator_id": self.orchestrator,
                "workload_id": self.workload, "endpoint_id": self.endpoint_id,
                "key": self.key, "name": self.name, "addresses": self.nets,
                "mac": self.mac, "profile_ids": self.profiles, "state": self.state}


def _is_object(value: str) -> bool:
    try:
        return isinstance(json.loads(value), dict)
    except ValueError:
        return False


def profiles_of(key: str, value: Any) -> List[str]:
    """The profile list of the endpoint record ``value`` (decoded JSON) at ``key``."""
    if not isinstance(value, dict):
        raise CtlError(f"endpoint {key} is not a JSON object")
    try:
        return list(model.Endpoint.from_json(key, json.dumps(value)).profile_ids or ())
    except (ValueError, TypeError) as exc:    # model.CorruptRecord, mostly
        raise CtlError(f"endpoint {key}: {exc}") from None


class EndpointCommands(CtlBase):
    def endpoints(self, host: Optional[str] = None, orchestrator: Optional[str] = None,
                  workload: Optional[str] = None, endpoint: Optional[str] = None
                  ) -> List[Endpoint]:
        """Stored workload endpoints (filters: exact host/orchestrator/workload,
        endpoint ID or its prefix)."""
        prefix = f"{model.host_workloads(host)}/" if host else model.HOST_ROOT + "/"
        found = []
        for item in self.store.list_prefix(prefix):
            parsed = model.parse_endpoint_key(item.key)
            if parsed is None:
                continue
            _, o, w, e = parsed
            if (orchestrator and o != orchestrator) or (workload and w != workload) \
                    or (endpoint and not e.startswith(endpoint)):
                continue
            found.append(Endpoint.from_item(item.key, item.value, item.version))
        found.sort(key=lambda ep: (ep.host, ep.orchestrator, ep.workload, ep.endpoint_id))
        return found

    def find_endpoint(self, endpoint_id: str, host: Optional[str] = None,
                      orchestrator: Optional[str] = None,
                      workload: Optional[str] = None) -> Endpoint:
        matches = self.endpoints(host, orchestrator, workload, endpoint_id)
        exact = [ep for ep in matches if ep.endpoint_id == endpoint_id]
        matches = exact or matches
        if not matches:
            raise CtlError(f"endpoint {endpoint_id} not found")
        if len(matches) > 1:
            where = ", ".join(f"{ep.host}/{ep.endpoint_id[:12]}" for ep in matches[:5])
            raise CtlError(f"endpoint {endpoint_id} is ambiguous ({len(matches)} matches: "
                           f"{where}); give more of the ID or --host")
        return matches[0]

    def endpoint_show(self, host, orchestrator, workload, endpoint, detailed) -> int:
        eps = self.endpoints(host, orchestrator, workload, endpoint)
        if detailed:
            rows = [[ep.host, ep.orchestrator, ep.workload, ep.endpoint_id,
                     "\n".join(ep.nets), ep.mac or "", ",".join(ep.profiles),
                     ep.state or ""] for ep in eps]
            self.emit(format_table(["Hostname", "Orchestrator ID", "Workload ID",
                                    "Endpoint ID", "Addresses", "MAC", "Profiles", "State"],
                                   rows), [ep.summary() for ep in eps])
            return 0
        counts: Dict[Tuple[str, str], int] = {}
        for ep in eps:
            counts[(ep.host, ep.orchestrator)] = counts.get((ep.host, ep.orchestrator), 0) + 1
        self.emit(format_table(["Hostname", "Orchestrator ID", "Number of Endpoints"],
                               [[h, o, n] for (h, o), n in sorted(counts.items())]),
                  [{"hostname": h, "orchestrator_id": o, "endpoints": n}
                   for (h, o), n in sorted(counts.items())])
        return 0

    def endpoint_profile_show(self, endpoint_id, host, orchestrator, workload) -> int:
        ep = self.find_endpoint(endpoint_id, host, orchestrator, workload)
        self.emit(format_table(["Name"], [[p] for p in ep.profiles]), ep.profiles)
        return 0

    def endpoint_profile_change(self, op: str, endpoint_id: str, profiles: Sequence[str],
                                host, orchestrator, workload) -> int:
        ep = self.find_endpoint(endpoint_id, host, orchestrator, workload)
        if op != "set" and not profiles:
            raise CtlError(f"endpoint profile {op}: name at least one profile")
        names = []
        for p in profiles:
            if op == "remove":   # a profile already deleted can still be dropped
                names.append(p if p in ep.profiles else self.resolve_profile(p))
            else:
                names.append(self.resolve_profile(p))
        if len(set(names)) != len(names):
            raise CtlError("a profile is named twice")

        def mutate(value):
            current = profiles_of(ep.key, value)
            if op == "append":
                dup = [n for n in names if n in current]
                if dup:
                    raise CtlError(f"profile {', '.join(dup)} is already in the profile "
                                   f"list of endpoint {ep.endpoint_id}")
                new = current + names
            elif op == "remove":
                missing = [n for n in names if n not in current]
                if missing:
                    raise CtlError(f"profile {', '.join(missing)} is not in the profile "
                                   f"list of endpoint {ep.endpoint_id}")
                new = [p for p in current if p not in names]
            else:
                new = list(names)
            value = dict(value)
            value.pop("profile_id", None)
            value["profile_ids"] = new
            return value

        value = self._update_json(ep.key, mutate, f"endpoint {ep.endpoint_id}")
        profiles_now = value.get("profile_ids", [])
        verb = {"append": "Appended", "remove": "Removed", "set": "Set"}[op]
        self.emit(f"{verb} profiles for endpoint {ep.endpoint_id}: now "
                  f"{', '.join(profiles_now) or '(none)'}",
                  {"endpoint_id": ep.endpoint_id, "hostname": ep.host,
                   "profile_ids": profiles_now})
        return 0
