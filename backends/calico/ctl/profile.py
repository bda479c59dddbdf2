"""netpluginctl's profiles: listing, adding and removing them, their tags and rules
(``profile ...``), and naming a profile by its Docker network's name.

Profiles live at ``/calico/v1/policy/profile/<name>/{tags,rules,labels}``; the
calico driver names them by Docker network ID.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

from netplugin.datastore import KeyExists, KeyNotFound
from netplugin.docker import DockerClient, DockerUnavailable

from backends.calico import model
from backends.calico.ctl import base
from backends.calico.ctl.base import NAME_RE, CtlError, check_name, format_table
from backends.calico.ctl.endpoint import Endpoint, EndpointCommands
from backends.calico.ctl.rules import rule_key, check_rule, rule_text, validate_rules

log = logging.getLogger("netpluginctl")


class ProfileCommands(EndpointCommands):
    def profile_names(self) -> List[str]:
        names = set()
        for item in self.store.list_prefix(model.PROFILE_ROOT + "/"):
            parsed = model.parse_profile_key(item.key)
            if parsed is not None:
                names.add(parsed[0])
        return sorted(names)

    def profile_exists(self, name: str) -> bool:
        return bool(self.store.list_prefix(model.profile_dir(name) + "/"))

    def resolve_profile(self, name: str) -> str:
        """An existing profile: the name itself, or the ID of the Docker
        network of that name (when dockerd answers); else CtlError."""
        if NAME_RE.match(name) and self.profile_exists(name):
            return name
        nid = self._docker_network_id(name)
        if nid and self.profile_exists(nid):
            return nid
        raise CtlError(f"profile {name} not found")

    def _docker_network_id(self, name: str) -> Optional[str]:
        endpoint = self.cfg.calico.docker_endpoint
        if endpoint.startswith("unix://") and not os.path.exists(endpoint[len("unix://"):]):
            return None
        try:
            with DockerClient(endpoint, min(base.DOCKER_TIMEOUT, self.cfg.calico.docker_timeout)
                              ) as docker:
                info = docker.network(name)
        except DockerUnavailable as exc:  # dockerd absent or slow
            log.debug("no Docker network %s: %s", name, exc)
            return None
        nid = info.get("Id") if isinstance(info, dict) else None
        return nid if isinstance(nid, str) and nid else None

    def profile_show(self, detailed: bool) -> int:
        names = self.profile_names()
        if not detailed:
            self.emit(format_table(["Name"], [[n] for n in names]),
                      [{"name": n} for n in names])
            return 0
        members: Dict[str, List[Endpoint]] = {n: [] for n in names}
        for ep in self.endpoints():
            for p in ep.profiles:
                if p in members:
                    members[p].append(ep)
        rows = []
        for n in names:
            if not members[n]:
                rows.append([n, "None", "None", "None", "None", "None"])
            for ep in members[n]:
                rows.append([n, ep.host, ep.orchestrator, ep.workload, ep.endpoint_id,
                             ep.state or ""])
        self.emit(format_table(["Name", "Host", "Orchestrator ID", "Workload ID",
                                "Endpoint ID", "State"], rows),
                  [{"name": n, "endpoints": [ep.summary() for ep in members[n]]}
                   for n in names])
        return 0

    def profile_add(self, name: str) -> int:
        check_name(name, "profile")
        if self.profile_exists(name):
            self.emit(f"Profile {name} already exists.", {"profile": name, "created": False})
            return 0
        try:
            # tags first with prevExist=false (as libcalico-go): a concurrent
            # add of the same profile loses here and leaves the winner's data
            profile = model.Profile.default(name)
            self.store.create(profile.tags_key, profile.tags_json())
        except KeyExists:
            self.emit(f"Profile {name} already exists.", {"profile": name, "created": False})
            return 0
        self.store.put(profile.rules_key, profile.rules_json())
        self.store.put(model.profile_labels(name), json.dumps({}))
        self.emit(f"Created profile {name}", {"profile": name, "created": True})
        return 0

    def profile_remove(self, name: str, no_check: bool) -> int:
        name = self.resolve_profile(name)
        if not no_check:
            users = [ep for ep in self.endpoints() if name in ep.profiles]
            if users:
                eg = ", ".join(f"{ep.host}/{ep.endpoint_id[:12]}" for ep in users[:3])
                raise CtlError(f"profile {name} is in use by {len(users)} endpoint(s) "
                               f"({eg}); remove it from them first or pass --no-check")
            try:
                self.store.get(model.network(name))
                raise CtlError(f"profile {name} belongs to an existing Docker network "
                               f"(record {model.network(name)}); remove the network with "
                               "'docker network rm' or pass --no-check")
            except KeyNotFound:
                pass
            refs = self.store.list_prefix(model.profile_refs(name))
            if refs:
                hosts = sorted({i.key[len(model.profile_refs(name)):].split("/")[0]
                                for i in refs})
                raise CtlError(f"profile {name} belongs to Docker networks on host(s) "
                               f"{', '.join(hosts)}; remove them with 'docker network rm' "
                               "or pass --no-check")
        self.store.delete_prefix(model.profile_dir(name))
        self.emit(f"Deleted profile {name}", {"profile": name, "deleted": True})
        return 0

    def _tags(self, name: str) -> List[str]:
        value, _ = self._read_json(model.profile_tags(name), [])
        return [str(t) for t in value] if isinstance(value, list) else []

    def tag_show(self, name: str) -> int:
        name = self.resolve_profile(name)
        tags = self._tags(name)
        self.emit("\n".join(tags) if tags else None, tags)
        return 0

    def tag_add(self, name: str, tag: str) -> int:
        check_name(tag, "tag")
        name = self.resolve_profile(name)
        state = {}

        def mutate(value):
            tags = list(value) if isinstance(value, list) else []
            state["present"] = tag in tags
            return None if tag in tags else tags + [tag]

        tags = self._update_json(model.profile_tags(name), mutate, f"tags of profile {name}",
                                 default=[])
        msg = (f"Tag {tag} is already on profile {name}" if state.get("present")
               else f"Tag {tag} added to profile {name}")
        self.emit(msg, {"profile": name, "tags": tags})
        return 0

    def tag_remove(self, name: str, tag: str) -> int:
        name = self.resolve_profile(name)

        def mutate(value):
            tags = list(value) if isinstance(value, list) else []
            if tag not in tags:
                raise CtlError(f"tag {tag} is not on profile {name}")
            return [t for t in tags if t != tag]

        tags = self._update_json(model.profile_tags(name), mutate, f"tags of profile {name}",
                                 default=[])
        self.emit(f"Tag {tag} removed from profile {name}", {"profile": name, "tags": tags})
        return 0

    def _rules(self, name: str) -> Dict[str, Any]:
        value, _ = self._read_json(model.profile_rules(name), {})
        return value if isinstance(value, dict) else {}

    def rule_show(self, name: str) -> int:
        name = self.resolve_profile(name)
        rules = self._rules(name)
        lines = []
        for direction in ("inbound", "outbound"):
            lines.append(f"{direction.capitalize()} rules:")
            for i, rule in enumerate(rules.get(f"{direction}_rules") or [], start=1):
                lines.append(f" {i:3d} {rule_text(rule) if isinstance(rule, dict) else rule}")
        self.emit("\n".join(lines), rules)
        return 0

    def rule_json(self, name: str) -> int:
        name = self.resolve_profile(name)
        print(json.dumps(self._rules(name), indent=2), file=self.out)
        return 0

    def rule_update(self, name: str, text: str) -> int:
        name = self.resolve_profile(name)
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CtlError(f"rules JSON on stdin is invalid: {exc}") from None
        rules = validate_rules(data)
        self._update_json(model.profile_rules(name), lambda _old: rules,
                          f"rules of profile {name}", default={})
        self.emit(f"Successfully updated rules on profile {name}",
                  {"profile": name, "rules": rules})
        return 0

    def rule_add(self, name: str, direction: str, position: Optional[int],
                 rule: Dict[str, Any]) -> int:
        name = self.resolve_profile(name)
        check_rule(rule, f"rule {rule_text(rule)}")
        field = f"{direction}_rules"
        state: Dict[str, Any] = {}

        def mutate(value):
            value = dict(value) if isinstance(value, dict) else {}
            rules = list(value.get(field) or [])
            if any(isinstance(r, dict) and rule_key(r) == rule_key(rule) for r in rules):
                state["present"] = True
                return None
            pos = len(rules) + 1 if position is None else position
            if not 0 <= pos <= len(rules) + 1:
                raise CtlError(f"position {pos} is out of range (1-{len(rules) + 1})")
            rules.insert(max(pos - 1, 0), rule)
            value[field] = rules
            value.setdefault("inbound_rules", [])
            value.setdefault("outbound_rules", [])
            return value

        self._update_json(model.profile_rules(name), mutate, f"rules of profile {name}",
                          default={})
        if state.get("present"):
            self.emit("Rule already present, skipping.",
                      {"profile": name, "added": False, "rule": rule})
        else:
            self.emit(f"Added {direction} rule to profile {name}: {rule_text(rule)}",
                      {"profile": name, "added": True, "rule": rule})
        return 0

    def rule_remove(self, name: str, direction: str, position: Optional[int],
                    rule: Optional[Dict[str, Any]]) -> int:
        name = self.resolve_profile(name)
        field = f"{direction}_rules"
        removed: Dict[str, Any] = {}

        def mutate(value):
            value = dict(value) if isinstance(value, dict) else {}
            rules = list(value.get(field) or [])
            if position is not None:
                if not 1 <= position <= len(rules):
                    raise CtlError(f"{direction} rule position {position} is out of range"
                                   + (f" (1-{len(rules)})" if rules else " (no rules)"))
                removed["rule"] = rules.pop(position - 1)
            else:
                for i, r in enumerate(rules):
                    if isinstance(r, dict) and rule_key(r) == rule_key(rule):
                        removed["rule"] = rules.pop(i)
                        break
                else:
                    raise CtlError(f"rule not found in the {direction} rules of profile "
                                   f"{name}: {rule_text(rule)}")
            value[field] = rules
            return value

        self._update_json(model.profile_rules(name), mutate, f"rules of profile {name}")
        r = removed["rule"]
        self.emit(f"Removed {direction} rule from profile {name}: "
                  f"{rule_text(r) if isinstance(r, dict) else r}",
                  {"profile": name, "removed": r})
        return 0
