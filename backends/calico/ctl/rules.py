"""netpluginctl's rule syntax and rule checks: calicoctl's ``allow tcp from tag A
to ports 80`` to a Calico rule object and back, and what ``rule update`` accepts.

A Calico (Felix) rule is a JSON object: ``action`` (allow, deny or
next-tier; allow when absent), ``protocol``, ``icmp_type``/``icmp_code`` and,
per side (``src_``/``dst_``), ``ports``, ``tag`` and ``net``; a profile's
rules are ``{"inbound_rules": [...], "outbound_rules": [...]}``.  Every rule
stored is one the policy compiler accepts (``backends.calico.model.parse_rule``).
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Dict, List, Sequence

from backends.calico import model
from backends.calico.ctl.base import CtlError, check_name

RULE_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
PORT_RE = re.compile(r"^(\d+([:-]\d+)?)(,\d+([:-]\d+)?)*$")
RULE_LISTS = tuple(f"{d}_rules" for d in model.RULE_DIRECTIONS)


def parse_ports(text: str) -> List[Any]:
    """``80`` ``80,443`` ``1000:2000`` ``1000-2000`` -> ``[80, 443, "1000:2000"]``."""
    if not PORT_RE.match(text):
        raise CtlError(f"ports {text!r} are invalid: expecting a comma-separated list "
                       "of ports and port ranges (e.g. 80,443,8000:8080)")
    out: List[Any] = []
    for part in text.split(","):
        m = re.match(r"^(\d+)[:-](\d+)$", part)
        low, high = (int(m.group(1)), int(m.group(2))) if m else (int(part), int(part))
        for port in (low, high):
            if not 0 <= port <= 65535:
                raise CtlError(f"port {port} is out of range (0-65535)")
        if low > high:
            raise CtlError(f"port range {part}: minimum {low} > maximum {high}")
        out.append(f"{low}:{high}" if m else low)
    return out


def _int_0_255(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise CtlError(f"{what} must be an integer 0-255, got {text!r}")
    return value


def parse_rule(tokens: Sequence[str]) -> Dict[str, Any]:
    """calicoctl's rule syntax -> a Calico rule object (the fields above)."""
    toks = list(tokens)

    def take() -> str:
        return toks.pop(0)

    def need(what: str) -> str:
        if not toks:
            raise CtlError(f"rule: {what} expected at the end")
        return take()

    if not toks or toks[0] not in ("allow", "deny"):
        raise CtlError("rule: expected 'allow' or 'deny'"
                       + (f", got {toks[0]!r}" if toks else ""))
    rule: Dict[str, Any] = {"action": take()}
    if toks and toks[0] in RULE_PROTOCOLS:
        rule["protocol"] = take()
    if toks and toks[0] == "type":
        take()
        if rule.get("protocol") not in ("icmp", "icmpv6"):
            raise CtlError("rule: 'type' needs protocol icmp or icmpv6")
        rule["icmp_type"] = _int_0_255(need("an ICMP type"), "ICMP type")
        if toks and toks[0] == "code":
            take()
            rule["icmp_code"] = _int_0_255(need("an ICMP code"), "ICMP code")
    for side, prefix in (("from", "src"), ("to", "dst")):
        if not toks or toks[0] != side:
            continue
        take()
        seen = 0
        while toks and toks[0] not in ("from", "to"):
            word = take()
            if word == "ports":
                if rule.get("protocol") not in ("tcp", "udp"):
                    raise CtlError(f"rule: ports are not valid with protocol "
                                   f"{rule.get('protocol') or '(any)'}; use tcp or udp")
                rule[f"{prefix}_ports"] = parse_ports(need("a port list"))
            elif word == "tag":
                rule[f"{prefix}_tag"] = check_name(need("a tag"), "tag")
            else:
                text = need("a CIDR") if word == "cidr" else word
                try:
                    net = ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise CtlError(f"rule: unexpected {word!r} after {side!r} (expected "
                                   "ports, tag, cidr or a CIDR)") from None
                rule[f"{prefix}_net"] = str(net)
            seen += 1
        if not seen:
            raise CtlError(f"rule: {side!r} needs ports, tag or cidr")
    if toks:
        raise CtlError(f"rule: unexpected {toks[0]!r}")
    versions = {ipaddress.ip_network(rule[k]).version for k in ("src_net", "dst_net")
                if k in rule}
    if len(versions) > 1:
        raise CtlError("rule: source and destination CIDRs are of different IP versions")
    if rule.get("protocol") == "icmp" and versions == {6}:
        raise CtlError("rule: protocol icmp with an IPv6 CIDR; use icmpv6")
    if rule.get("protocol") == "icmpv6" and versions == {4}:
        raise CtlError("rule: protocol icmpv6 with an IPv4 CIDR; use icmp")
    return rule


def rule_key(rule: Dict[str, Any]) -> Dict[str, Any]:
    """A rule for comparison (action defaults to allow)."""
    out = dict(rule)
    out.setdefault("action", "allow")
    return out


def rule_text(rule: Dict[str, Any]) -> str:
    """calicoctl's ``Rule.pprint``: ``allow tcp from tag WEB to ports 80,443``."""
    words = [str(rule.get("action", "allow"))]
    if "protocol" in rule:
        words.append(str(rule["protocol"]))
    if "icmp_type" in rule:
        words += ["type", str(rule["icmp_type"])]
        if "icmp_code" in rule:
            words += ["code", str(rule["icmp_code"])]
    for side, prefix in (("from", "src"), ("to", "dst")):
        parts: List[str] = []
        if f"{prefix}_ports" in rule:
            ports = rule[f"{prefix}_ports"]
            parts += ["ports", ",".join(str(p) for p in ports)
                      if isinstance(ports, list) else str(ports)]
        if f"{prefix}_tag" in rule:
            parts += ["tag", str(rule[f"{prefix}_tag"])]
        if f"{prefix}_net" in rule:
            parts += ["cidr", str(rule[f"{prefix}_net"])]
        if parts:
            words += [side] + parts
    known = {"action", "protocol", "icmp_type", "icmp_code", "src_ports", "src_tag",
             "src_net", "dst_ports", "dst_tag", "dst_net"}
    words += [f"{k}={json.dumps(v)}" for k, v in sorted(rule.items()) if k not in known]
    return " ".join(words)


def check_rule(rule: Any, where: str) -> None:
    """CtlError unless the policy compiler accepts ``rule`` (what Felix's
    nftables translation would refuse is never stored)."""
    try:
        model.parse_rule(rule)
    except model.InvalidRule as exc:
        raise CtlError(f"{where} is not a valid rule: {exc}") from None


def validate_rules(data: Any) -> Dict[str, Any]:
    """Rules JSON given to ``rule update``: the shape Felix accepts, every
    rule one the policy compiler accepts."""
    if not isinstance(data, dict):
        raise CtlError("rules JSON must be an object with inbound_rules and outbound_rules")
    for name in RULE_LISTS:
        rules = data.get(name, [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise CtlError(f"rules JSON: {name} must be a list of rule objects")
        for i, r in enumerate(rules, start=1):
            if r.get("action", "allow") not in ("allow", "deny", "next-tier"):
                raise CtlError(f"rules JSON: unknown action {r.get('action')!r} in {name}")
            check_rule(r, f"rules JSON: {name} rule {i} ({json.dumps(r, sort_keys=True)[:200]})")
    return {"inbound_rules": data.get("inbound_rules", []),
            "outbound_rules": data.get("outbound_rules", []),
            **{k: v for k, v in data.items() if k not in RULE_LISTS}}
