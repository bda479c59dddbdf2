"""Calico profiles (tags, rules) and what a valid profile rule is: Profile,
parse_rule / validate_rules for user input, parse_profiles for stored ones.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from backends.calico.model.common import (MAX_ID_LEN, IPNetwork, _warn, parse_profile_key,
                                          profile_dir, profile_rules, profile_tags, valid_id)

# profile rules


class InvalidRule(ValueError):
    """A profile rule the policy compiler cannot (or must not) turn into nftables."""


PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "udplite": 136}
PORT_PROTOCOLS = {"tcp": "tcp", "udp": "udp", "sctp": "sctp", "udplite": "udplite"}
#: Rule keys the compiler knows (Felix rejects rules with any other key).
MATCH_KEYS = ("protocol", "src_tag", "dst_tag", "src_net", "dst_net",
              "src_ports", "dst_ports", "icmp_type", "icmp_code")
RULE_KEYS = frozenset(("action", "ip_version") + MATCH_KEYS
                      + tuple("!" + k for k in MATCH_KEYS))
ALLOW_ACTIONS = ("allow", "next-tier")
RULE_DIRECTIONS = ("inbound", "outbound")


@dataclass(frozen=True)
class Rule:
    """A valid Felix rule, parsed: ``version`` is the IP version it is
    restricted to (None: both); ``nets``/``ports``/``icmp``/``tags`` keep the
    rule's order of keys (``!`` prefixes for negations)."""
    action: str                                          # "allow" or "deny"
    version: Optional[int]
    nets: Tuple[Tuple[str, IPNetwork], ...] = ()         # (key, network)
    protocol: Optional[Tuple[int, Optional[str]]] = None  # (number, name)
    not_protocol: Optional[Tuple[int, Optional[str]]] = None
    ports: Tuple[Tuple[str, Tuple[Tuple[int, int], ...]], ...] = ()  # merged ranges
    icmp: Tuple[Tuple[str, int], ...] = ()
    tags: Tuple[Tuple[str, str], ...] = ()               # (key, tag)


def rule_action(rule: Any) -> Optional[str]:
    """"allow", "deny", or None if the action is unknown."""
    if not isinstance(rule, dict):
        return None
    action = rule.get("action")
    if action is None or action in ALLOW_ACTIONS:
        return "allow"
    if action == "deny":
        return "deny"
    return None


def _ver(value: Any, what: str) -> int:
    if value in (4, 6) and not isinstance(value, bool):
        return value
    raise InvalidRule(f"{what} must be 4 or 6, got {value!r}")


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRule(f"{what} must be an integer {lo}-{hi}, got {value!r}")
    return value


def _protocol(value: Any) -> Tuple[int, Optional[str]]:
    """-> (number, name or None)."""
    if isinstance(value, str):
        name = value.lower()
        if name in PROTOCOLS:
            return PROTOCOLS[name], name
        if value.isdigit():
            value = int(value)
        else:
            raise InvalidRule(f"unknown protocol {value!r}")
    num = _int(value, 1, 255, "protocol")
    for name, n in PROTOCOLS.items():
        if n == num:
            return num, name
    return num, None


def _ports(value: Any, what: str) -> Tuple[Tuple[int, int], ...]:
    """Felix port list -> sorted, merged (lo, hi) ranges."""
    if not isinstance(value, list) or not value:
        raise InvalidRule(f"{what} must be a non-empty list")
    ranges = []
    for item in value:
        if isinstance(item, str):
            lo_s, sep, hi_s = item.partition(":")
            if not lo_s.isdigit() or (sep and not hi_s.isdigit()):
                raise InvalidRule(f"{what}: invalid port {item!r}")
            lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        else:
            lo = hi = _int(item, 0, 65535, f"{what} entry")
        if not (0 <= lo <= hi <= 65535):
            raise InvalidRule(f"{what}: invalid port range {item!r}")
        ranges.append((lo, hi))
    ranges.sort()
    merged: List[List[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _tag(value: Any, what: str) -> str:
    if not valid_id(value):
        raise InvalidRule(f"{what} is not a valid tag: {value!r}")
    return value


def _net(value: Any, what: str) -> IPNetwork:
    if not isinstance(value, str):
        raise InvalidRule(f"{what} must be a CIDR string, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidRule(f"{what} is not a valid CIDR: {value!r}") from None


def parse_rule(rule: Any) -> Rule:
    """A Felix rule -> ``Rule``; InvalidRule (saying why) if it is not valid."""
    if not isinstance(rule, dict):
        raise InvalidRule(f"rule is not an object: {rule!r}")
    unknown = sorted(k for k in rule if k not in RULE_KEYS)
    if unknown:
        raise InvalidRule(f"unknown rule field(s) {', '.join(unknown)}")
    r = {k: v for k, v in rule.items() if v is not None}
    action = rule_action(r)
    if action is None:
        raise InvalidRule(f"unknown action {r.get('action')!r}")

    versions = set()            # IP versions the rule is restricted to
    if "ip_version" in r:
        versions.add(_ver(r["ip_version"], "ip_version"))
    nets = []
    for k in ("src_net", "dst_net", "!src_net", "!dst_net"):
        if k in r:
            net = _net(r[k], k)
            nets.append((k, net))
            versions.add(net.version)

    proto = neg_proto = None
    if "protocol" in r:
        proto = _protocol(r["protocol"])
    if "!protocol" in r:
        neg_proto = _protocol(r["!protocol"])
    if proto and proto[1] == "icmp":
        versions.add(4)
    if proto and proto[1] == "icmpv6":
        versions.add(6)
    if len(versions) > 1:
        raise InvalidRule("rule mixes IPv4 and IPv6 matches")

    ports = []
    for side in ("src", "dst"):
        for neg in ("", "!"):
            k = f"{neg}{side}_ports"
            if k not in r:
                continue
            if not proto or proto[1] not in PORT_PROTOCOLS:
                raise InvalidRule(f"{k} needs protocol tcp, udp, sctp or udplite")
            ports.append((k, _ports(r[k], k)))

    icmp = []
    for k in ("icmp_type", "!icmp_type", "icmp_code", "!icmp_code"):
        if k not in r:
            continue
        if not proto or proto[1] not in ("icmp", "icmpv6"):
            raise InvalidRule(f"{k} needs protocol icmp or icmpv6")
        if k.endswith("icmp_code") and "icmp_type" not in r:
            raise InvalidRule(f"{k} needs icmp_type")
        icmp.append((k, _int(r[k], 0, 255, k)))

    tags = []
    for k in ("src_tag", "!src_tag", "dst_tag", "!dst_tag"):
        if k in r:
            tags.append((k, _tag(r[k], k)))
    (version,) = versions if versions else (None,)
    return Rule(action=action, version=version, nets=tuple(nets), protocol=proto,
                not_protocol=neg_proto, ports=tuple(ports), icmp=tuple(icmp),
                tags=tuple(tags))


def validate_rules(rules: Any, what: str = "rules") -> List[Dict[str, Any]]:
    """User input: a list of Felix rules each of which the policy compiler
    accepts; returns it (InvalidRule naming the first bad rule otherwise)."""
    if not isinstance(rules, list):
        raise InvalidRule(f"{what} must be a list of rules, got {rules!r:.100}")
    for i, rule in enumerate(rules):
        try:
            parse_rule(rule)
        except InvalidRule as exc:
            raise InvalidRule(f"{what} {i}: {exc}") from None
    return rules


# --------------------------------------------------------------------------
# profiles


@dataclass
class Profile:
    """A Calico profile: ``tags`` (``.../tags``, a JSON list) and the rules
    (``.../rules``, ``{"inbound_rules": [...], "outbound_rules": [...]}``);
    ``labels`` (``.../labels``) is not read."""
    name: str
    tags: Tuple[str, ...] = ()
    inbound: List[Any] = field(default_factory=list)
    outbound: List[Any] = field(default_factory=list)

    @property
    def key(self) -> str:
        return profile_dir(self.name)

    @property
    def tags_key(self) -> str:
        return profile_tags(self.name)

    @property
    def rules_key(self) -> str:
        return profile_rules(self.name)

    @classmethod
    def default(cls, name: str) -> "Profile":
        """The profile the driver makes for a network: members talk to each
        other, anything may go out."""
        return cls(name, (name,), [{"action": "allow", "src_tag": name}],
                   [{"action": "allow"}])

    @classmethod
    def from_user(cls, name: str, tags: Iterable[str] = (), inbound: Any = (),
                  outbound: Any = ()) -> "Profile":
        """A profile from user input: name, tags and rules validated
        (InvalidRule / ValueError saying what is wrong)."""
        if not valid_id(name):
            raise ValueError(f"invalid profile name {name!r}: letters, digits, '_', '.', "
                             f"'-', at most {MAX_ID_LEN}")
        tags = list(tags)
        for t in tags:
            if not valid_id(t):
                raise ValueError(f"invalid tag {t!r}: letters, digits, '_', '.', '-', "
                                 f"at most {MAX_ID_LEN}")
        return cls(name, tuple(dict.fromkeys(tags)),
                   validate_rules(list(inbound), "inbound rule"),
                   validate_rules(list(outbound), "outbound rule"))

    def tags_json(self) -> str:
        return json.dumps(list(self.tags))

    def rules_json(self) -> str:
        return json.dumps({"inbound_rules": self.inbound, "outbound_rules": self.outbound})

    def to_json(self) -> Dict[str, str]:
        """``{key: value}`` of the profile's two keys (tags, then rules)."""
        return {self.tags_key: self.tags_json(), self.rules_key: self.rules_json()}

    @classmethod
    def from_json(cls, name: str, tags: Optional[str], rules: Optional[str],
                  warnings: Optional[List[str]] = None) -> "Profile":
        """The profile from its stored tags and rules values (None: absent),
        leniently: corrupt parts are dropped with a warning."""
        prof = cls(name)
        if tags is not None:
            prof._read_tags(tags, warnings)
        if rules is not None:
            prof._read_rules(rules, warnings)
        return prof

    def _load(self, what: str, value: str, kind: type, warnings: Optional[List[str]],
              otherwise: str) -> Any:
        """The JSON value of the profile's ``what`` key if it is a ``kind``,
        else None (with a warning ending in ``otherwise``)."""
        try:
            data = json.loads(value)
        except (ValueError, TypeError) as exc:
            _warn(warnings, f"profile {self.name}: {what} is not JSON ({exc}); ignored")
            return None
        if not isinstance(data, kind):
            article = "an object" if kind is dict else "a list"
            _warn(warnings, f"profile {self.name}: {what} is not {article}; {otherwise}")
            return None
        return data

    def _read_tags(self, value: str, warnings: Optional[List[str]]) -> None:
        data = self._load("tags", value, list, warnings, "ignored")
        if data is None:
            return
        tags: List[str] = []
        for t in data:
            if valid_id(t):
                if t not in tags:
                    tags.append(t)
            else:
                _warn(warnings, f"profile {self.name}: ignoring invalid tag {t!r}")
        self.tags = tuple(tags)

    def _read_rules(self, value: str, warnings: Optional[List[str]]) -> None:
        data = self._load("rules", value, dict, warnings, "no rules")
        if data is None:
            return
        for direction in RULE_DIRECTIONS:
            rules = data.get(f"{direction}_rules")
            if rules is None:
                rules = []
            if not isinstance(rules, list):
                _warn(warnings, f"profile {self.name}: {direction}_rules is not a list; "
                                "no rules")
                rules = []
            setattr(self, direction, rules)


def parse_profiles(items: Mapping[str, str], warnings: Optional[List[str]] = None
                   ) -> Dict[str, Profile]:
    """Profiles from the items under /calico/v1/policy/profile (key -> value).

    A profile exists as soon as one of its keys does; a missing or corrupt
    ``rules`` key means no rules, a missing or corrupt ``tags`` key no tags.
    Rules are kept as stored: the compiler skips (or, for a deny, fails
    closed on) the ones ``parse_rule`` rejects."""
    profiles: Dict[str, Profile] = {}
    for key in sorted(items):
        parsed = parse_profile_key(key)
        if parsed is None:
            continue
        name, what = parsed
        if not valid_id(name):
            _warn(warnings, f"ignoring profile with invalid name {name!r}")
            continue
        prof = profiles.setdefault(name, Profile(name))
        if what == "tags":
            prof._read_tags(items[key], warnings)
        elif what == "rules":
            prof._read_rules(items[key], warnings)
    return profiles
