"""Calico profile policy as one nftables table: the compiler from endpoints and
profiles (``model``'s records) to the table, and ``apply``.

Felix's model of Calico v1 policy, enforced with nftables:

* every *local* endpoint (key host = this host) gets a ``to-<if>`` chain
  (inbound rules: traffic sent to the container) and a ``from-<if>`` chain
  (outbound rules: traffic the container sends), ``<if>`` being its host-side
  veth (``cali…``);
* the endpoint's profiles apply in ``profile_ids`` order, inside a profile the
  rules in list order; the first ``allow`` (or ``next-tier``) or ``deny`` that
  matches decides; after the last profile the packet is dropped;
* ``src_tag``/``dst_tag`` match named sets ``t4-<tag>``/``t6-<tag>`` holding
  the addresses of every endpoint, on any host, whose profiles carry the tag;
* rules of the other IP version are skipped (a rule is IPv4-only when it names
  an IPv4 net, ``protocol: icmp`` or ``ip_version: 4``; likewise for IPv6).

Shape of the table (``table inet netplugin_calico``)::

    chain forward { type filter hook forward priority filter; policy accept;
        iifname "cali*" jump from-wl        # the sender's outbound policy
        oifname "cali*" jump to-wl          # then the receiver's inbound policy
    }
    chain input   { type filter hook input priority filter; policy accept;
        iifname "cali*" jump from-wl-host }
    chain from-wl { ct state established,related accept; ct state invalid drop
        iifname vmap { "cali27d4e97367f" : goto from-cali27d4e97367f, … }
        drop }                              # a cali* interface without a chain
    chain to-wl   { … oifname vmap { … : goto to-cali… } drop }
    chain from-wl-host { icmpv6 type { nd-router-solicit, nd-neighbor-solicit,
                                       nd-neighbor-advert } accept
                         jump from-wl ; accept }
    chain from-cali27d4e97367f {
        ether saddr != ee:ee:ee:ee:ee:ee drop        # Felix's source MAC check
        ip saddr != { 10.0.0.5 } drop                # anti-spoofing
        ip6 saddr != { fe80::/10 } drop
        return comment "profile 3df319… outbound 0"  # allow = on to the receiver
        drop }
    chain to-cali27d4e97367f {
        ip saddr @t4-3df319… accept comment "profile 3df319… inbound 0"
        ip6 saddr @t6-3df319… accept comment "profile 3df319… inbound 0"
        drop }

An outbound ``allow`` is a ``return``: in the forward path the packet goes on
to the receiving endpoint's ``to`` chain (if the receiver is local), in the
input path (traffic to the host itself) ``from-wl-host`` accepts it.  Traffic
from the host to its containers (output hook) is not policed, as with Felix.
Nothing outside ``cali*`` interfaces is touched.

Multi-network containers: Docker gives a container one interface per network
and a single routing table, so a container attached to several networks may
send from its address on one network through its interface on another.  The
caller passes ``groups`` (host interface -> container, read from the kernel:
veths whose peers share a network namespace), and every address of the
container is then used for anti-spoofing and for tag membership of any of
its local endpoints.  Remote endpoints are known one by one (the datastore
does not say which belong to one container).

Invalid input never breaks the ruleset: a rule that cannot be compiled is
skipped with a warning when its action is ``allow`` (skipping only narrows
access); an invalid ``deny`` rule becomes a deny of everything at its position
(fail closed); a rule with an unknown action is skipped.  A corrupt endpoint or
profile is ignored with a warning (a local endpoint that cannot be read has no
chain, so its interface falls into the default drop).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from backends.calico import model
from backends.calico.model import (Endpoint, InvalidRule, Profile, is_endpoint_key,
                                   parse_profiles, parse_rule, rule_action)

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "netplugin_calico"
IFACE_PREFIX = model.HOST_PREFIX
PROFILE_ROOT, HOST_ROOT = model.PROFILE_ROOT, model.HOST_ROOT

IFNAME_RE = re.compile(r"^%s[A-Za-z0-9_.\-]{1,%d}$" % (IFACE_PREFIX, 15 - len(IFACE_PREFIX)))

PORT_PROTOCOLS = model.PORT_PROTOCOLS

#: What happens to traffic from a container to the host itself once the
#: container's outbound rules allowed it: "accept" (like a Docker bridge; the
#: host is one more destination) or "drop" (Felix's DefaultEndpointToHostAction
#: default).  Neighbour discovery is accepted either way.
ENDPOINT_TO_HOST = "accept"

#: IPv6 neighbour discovery from a container to the host (its fe80::1 gateway
#: and the NS/NA exchange for the container's own address): always accepted.
NDP_TYPES = ("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")

__all__ = ["Endpoint", "InvalidRule", "Profile", "is_endpoint_key", "parse_profiles",
           "rule_action"]


# --------------------------------------------------------------------------
# endpoints as the compiler needs them


def parse_endpoint(key: str, value: str) -> Endpoint:
    """One endpoint item -> ``Endpoint``; ValueError when the compiler cannot
    use it (no interface name or profile list, a bad MAC or address)."""
    ep = Endpoint.from_json(key, value)
    problem = ep.policy_problem()
    if problem is not None:
        raise ValueError(problem)
    return ep


def parse_endpoints(items: Mapping[str, str], warnings: Optional[List[str]] = None
                    ) -> List[Endpoint]:
    """Every usable endpoint among ``items`` (key -> value), sorted by key;
    other keys under /calico/v1/host (BGP config...) are ignored quietly."""
    out = []
    for key in sorted(items):
        if not is_endpoint_key(key):
            continue
        try:
            out.append(parse_endpoint(key, items[key]))
        except (ValueError, TypeError) as exc:
            if warnings is not None:
                warnings.append(f"ignoring endpoint {key}: {exc}")
    return out


# --------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class CompiledRule:
    """One profile rule: ``versions`` maps None (both), 4 or 6 to the nft
    match text for that version ("" = matches everything)."""
    action: str                     # "allow" or "deny"
    versions: Tuple[Tuple[Optional[int], str], ...]
    tags: Tuple[str, ...] = ()


def set_name(tag: str, version: int) -> str:
    return f"t{version}-{tag}"


def _port_set(ranges: Sequence[Tuple[int, int]]) -> str:
    """Merged port ranges -> nft set text ``{ 80, 1000-2000 }``."""
    return "{ " + ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges) + " }"


def compile_rule(rule: Any) -> CompiledRule:
    """A Felix rule -> its nft match text per IP version; InvalidRule if it
    is not valid (``model.parse_rule`` says what valid is)."""
    r = parse_rule(rule)
    proto, neg_proto = r.protocol, r.not_protocol
    common: List[str] = []      # version-independent matches, in order
    if proto:
        common.append(f"meta l4proto {proto[1] or proto[0]}")
    if neg_proto:
        common.append(f"meta l4proto != {neg_proto[1] or neg_proto[0]}")
    for k, ranges in r.ports:
        op = "!= " if k.startswith("!") else ""
        port = "sport" if "src" in k else "dport"
        common.append(f"{PORT_PROTOCOLS[proto[1]]} {port} {op}{_port_set(ranges)}")
    for k, value in r.icmp:
        what = "type" if k.endswith("type") else "code"
        op = "!= " if k.startswith("!") else ""
        common.append(f"{proto[1]} {what} {op}{value}")
    nets = dict(r.nets)
    tag_matches = [("saddr" if "src" in k else "daddr", k.startswith("!"), tag)
                   for k, tag in r.tags]

    def per_version(v: int) -> str:
        ip = "ip" if v == 4 else "ip6"
        parts = []
        for k in ("src_net", "!src_net", "dst_net", "!dst_net"):
            if k in nets:
                op = "!= " if k.startswith("!") else ""
                addr = "saddr" if "src" in k else "daddr"
                parts.append(f"{ip} {addr} {op}{nets[k].with_prefixlen}")
        for addr, negated, tag in tag_matches:
            parts.append(f"{ip} {addr} {'!= ' if negated else ''}@{set_name(tag, v)}")
        if not parts:
            parts.append(f"meta nfproto {'ipv4' if v == 4 else 'ipv6'}")
        return " ".join(parts + common)

    if r.version is not None:
        out: Tuple[Tuple[Optional[int], str], ...] = ((r.version, per_version(r.version)),)
    elif tag_matches:
        out = ((4, per_version(4)), (6, per_version(6)))
    else:
        out = ((None, " ".join(common)),)
    return CompiledRule(action=r.action, versions=out, tags=tuple(t for _, t in r.tags))


# --------------------------------------------------------------------------
# the ruleset


@dataclass
class Ruleset:
    text: str                                   # the table definition
    chains: Dict[str, List[str]]                # name -> rule lines (for tests)
    sets: Dict[str, Tuple[str, Tuple[str, ...]]]  # name -> (type, elements)
    endpoints: Dict[str, str]                   # local interface -> endpoint key
    warnings: List[str]

    def script(self) -> str:
        """An ``nft -f`` script that atomically replaces our table with this one."""
        return (f"table {FAMILY} {TABLE}\n"
                f"delete table {FAMILY} {TABLE}\n" + self.text)


def _quote(text: str) -> str:
    return '"' + re.sub(r'[^A-Za-z0-9_.:\- ]', "_", text)[:120] + '"'


def _addr_set(addrs: Sequence[str]) -> str:
    return "{ " + ", ".join(addrs) + " }"


def endpoint_groups(local: Sequence[Endpoint], groups: Optional[Mapping[str, Any]]
                    ) -> Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """interface -> (ipv4, ipv6) of the whole container it belongs to."""
    by_group: Dict[Any, List[Endpoint]] = {}
    for ep in local:
        g = groups.get(ep.name) if groups else None
        by_group.setdefault(("group", g) if g is not None else ("own", ep.key), []).append(ep)
    out = {}
    for members in by_group.values():
        v4: List[str] = []
        v6: List[str] = []
        for ep in members:
            v4 += [a for a in ep.ipv4 if a not in v4]
            v6 += [a for a in ep.ipv6 if a not in v6]
        for ep in members:
            out[ep.name] = (tuple(v4), tuple(v6))
    return out


def _endpoint_rules(ep: Endpoint, profiles: Mapping[str, Profile], direction: str,
                    warnings: List[str], used_tags: set) -> List[str]:
    """The profile part of one endpoint chain (``direction``: inbound/outbound)."""
    allow = "accept" if direction == "inbound" else "return"
    lines = []
    for pid in ep.profile_ids:
        prof = profiles.get(pid)
        if prof is None:
            continue                    # missing profile: no rules (falls through)
        for i, rule in enumerate(getattr(prof, direction)):
            comment = f"comment {_quote(f'profile {pid} {direction} {i}')}"
            try:
                compiled = compile_rule(rule)
            except InvalidRule as exc:
                if rule_action(rule) == "deny":
                    warnings.append(f"profile {pid} {direction} rule {i} ({exc}): "
                                    f"invalid deny rule, denying everything from here "
                                    f"for {ep.name}")
                    lines.append(f"drop {comment}")
                else:
                    warnings.append(f"profile {pid} {direction} rule {i} skipped: {exc}")
                continue
            used_tags.update(compiled.tags)
            verdict = allow if compiled.action == "allow" else "drop"
            for _v, match in compiled.versions:
                lines.append(" ".join(x for x in (match, verdict, comment) if x))
    return lines


def compile_ruleset(local: Sequence[Endpoint], endpoints: Iterable[Endpoint],
                    profiles: Mapping[str, Profile],
                    groups: Optional[Mapping[str, Any]] = None) -> Ruleset:
    """Our whole table for ``local`` endpoints (this host's), with tag sets
    computed over ``endpoints`` (all hosts, local ones included)."""
    warnings: List[str] = []
    chains: Dict[str, List[str]] = {}
    used_tags: set = set()

    mine: List[Endpoint] = []
    seen: Dict[str, str] = {}
    for ep in sorted(local, key=lambda e: e.key):
        if not IFNAME_RE.match(ep.name):
            warnings.append(f"endpoint {ep.key}: interface name {ep.name!r} does not "
                            f"match {IFACE_PREFIX}*; no chain")
            continue
        if ep.name in seen:
            warnings.append(f"endpoint {ep.key}: interface {ep.name} already used by "
                            f"{seen[ep.name]}; ignored")
            continue
        seen[ep.name] = ep.key
        mine.append(ep)
    container = endpoint_groups(mine, groups)

    for ep in mine:
        v4, v6 = container[ep.name]
        out = []
        if ep.active:
            if ep.mac:
                out.append(f"ether saddr != {ep.mac.lower()} drop")
            out.append(f"ip saddr != {_addr_set(v4)} drop" if v4 else "meta nfproto ipv4 drop")
            out.append(f"ip6 saddr != {_addr_set(v6 + ('fe80::/10',))} drop")
            out += _endpoint_rules(ep, profiles, "outbound", warnings, used_tags)
            inbound = _endpoint_rules(ep, profiles, "inbound", warnings, used_tags)
        else:
            inbound = []
        chains[f"from-{ep.name}"] = out + ["drop"]
        chains[f"to-{ep.name}"] = inbound + ["drop"]

    # Tag sets: the addresses of every endpoint carrying the tag (for a local
    # endpoint: of its whole container).
    members: Dict[Tuple[str, int], List[str]] = {
        (t, v): [] for t in sorted(used_tags) for v in (4, 6)}
    if used_tags:
        for ep in sorted(endpoints, key=lambda e: e.key):
            tags = set()
            for pid in ep.profile_ids:
                prof = profiles.get(pid)
                if prof is not None:
                    tags.update(t for t in prof.tags if t in used_tags)
            if not tags:
                continue
            local_ep = seen.get(ep.name) == ep.key
            v4, v6 = container[ep.name] if local_ep else (ep.ipv4, ep.ipv6)
            for t in tags:
                for v, addrs in ((4, v4), (6, v6)):
                    bucket = members[(t, v)]
                    bucket += [a for a in addrs if a not in bucket]
    sets = {set_name(t, v): ("ipv4_addr" if v == 4 else "ipv6_addr",
                             tuple(sorted(addrs, key=ipaddress.ip_address)))
            for (t, v), addrs in members.items()}

    def dispatch(match: str, prefix: str) -> List[str]:
        lines = ["ct state established,related accept", "ct state invalid drop"]
        if mine:
            entries = ", ".join(f'"{ep.name}" : goto {prefix}-{ep.name}' for ep in mine)
            lines.append(f"{match} vmap {{ {entries} }}")
        lines.append("drop")
        return lines

    chains["from-wl"] = dispatch("iifname", "from")
    chains["to-wl"] = dispatch("oifname", "to")
    chains["from-wl-host"] = [
        f"icmpv6 type {{ {', '.join(NDP_TYPES)} }} accept",
        "jump from-wl",
        "accept" if ENDPOINT_TO_HOST == "accept" else "drop",
    ]
    base = {
        "forward": ["type filter hook forward priority filter; policy accept;",
                    f'iifname "{IFACE_PREFIX}*" jump from-wl',
                    f'oifname "{IFACE_PREFIX}*" jump to-wl'],
        "input": ["type filter hook input priority filter; policy accept;",
                  f'iifname "{IFACE_PREFIX}*" jump from-wl-host'],
    }

    text = [f"table {FAMILY} {TABLE} {{"]
    for name, (typ, elements) in sets.items():
        body = f"type {typ};"
        if elements:
            body += f" elements = {_addr_set(elements)}"
        text.append(f"\tset {name} {{ {body} }}")
    for name, lines in list(chains.items()) + list(base.items()):
        text.append(f"\tchain {name} {{")
        text += [f"\t\t{line}" for line in lines]
        text.append("\t}")
    text.append("}")
    chains.update({k: v[1:] for k, v in base.items()})
    return Ruleset(text="\n".join(text) + "\n", chains=chains, sets=sets,
                   endpoints={ep.name: ep.key for ep in mine}, warnings=warnings)


def compile_items(profile_items: Mapping[str, str], host_items: Mapping[str, str],
                  hostname: str, groups: Optional[Mapping[str, Any]] = None) -> Ruleset:
    """Datastore items (key -> value under /calico/v1/policy/profile and
    /calico/v1/host) -> the ruleset for ``hostname``."""
    warnings: List[str] = []
    profiles = parse_profiles(profile_items, warnings)
    endpoints = parse_endpoints(host_items, warnings)
    local = [ep for ep in endpoints if ep.host == hostname]
    rs = compile_ruleset(local, endpoints, profiles, groups)
    rs.warnings[:0] = warnings
    return rs


# --------------------------------------------------------------------------
# applying


class NftError(RuntimeError):
    """``nft`` failed (or is missing)."""


def nft_binary() -> str:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin") or "nft"


def run_nft(args: Sequence[str], input: Optional[str] = None, timeout: float = 30
            ) -> subprocess.CompletedProcess:
    argv = [nft_binary(), *args]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise NftError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()}")
    return proc


def apply(ruleset: Ruleset) -> None:
    """Replace our table with ``ruleset`` in one nftables transaction."""
    run_nft(["-f", "-"], input=ruleset.script())


def table_exists() -> bool:
    try:
        run_nft(["list", "table", FAMILY, TABLE])
    except NftError:
        return False
    return True


def delete_table() -> bool:
    """Remove our table (tests, uninstall); False if it was not there."""
    if not table_exists():
        return False
    run_nft(["delete", "table", FAMILY, TABLE])
    return True


def installed_chains() -> List[str]:
    """Names of the chains of our table in the kernel ([] without the table)."""
    try:
        out = run_nft(["-j", "list", "table", FAMILY, TABLE]).stdout
    except NftError:
        return []
    data = json.loads(out)
    return [obj["chain"]["name"] for obj in data.get("nftables", []) if "chain" in obj]
