"""``netpluginctl``: a ``calicoctl`` (v0.x)-style command for the Calico data
the calico backend keeps in its datastore (calico-datastore.md §2).

It reads the plugin's own config file (``-f FILE``, default
``$NETPLUGIN_CONFIG``, else ``./plugin.cfg``) so the datastore and the host
name are the plugin's.  Subcommands and flags follow calicoctl v0.x::

    netpluginctl pool add <CIDRS>... [--ipip] [--nat-outgoing]
    netpluginctl pool remove <CIDRS>...
    netpluginctl pool show [--ipv4 | --ipv6]
    netpluginctl profile show [--detailed]
    netpluginctl profile add <PROFILE>
    netpluginctl profile remove <PROFILE> [--no-check]
    netpluginctl profile <PROFILE> tag show
    netpluginctl profile <PROFILE> tag (add|remove) <TAG>
    netpluginctl profile <PROFILE> rule show
    netpluginctl profile <PROFILE> rule json
    netpluginctl profile <PROFILE> rule update            (rules JSON on stdin)
    netpluginctl profile <PROFILE> rule add (inbound|outbound) [--at=<POS>] <RULE>
    netpluginctl profile <PROFILE> rule remove (inbound|outbound) (--at=<POS> | <RULE>)
    netpluginctl endpoint show [--host=<H>] [--orchestrator=<O>] [--workload=<W>]
                               [--endpoint=<E>] [--detailed]
    netpluginctl endpoint <ID> profile show
    netpluginctl endpoint <ID> profile (append|remove|set) <PROFILES>...
    netpluginctl ipam info <IP>
    netpluginctl ipam release (<IP> | --ip=<IP>) [--force]
    netpluginctl status
    netpluginctl diags [--output DIR] [--log FILE]...

    <RULE> = (allow|deny) [(tcp|udp|icmp|icmpv6)] [type <T> [code <C>]]
             [from [ports <P>] [tag <TAG>] [cidr <CIDR> | <CIDR>]]
             [to   [ports <P>] [tag <TAG>] [cidr <CIDR> | <CIDR>]]

Global options (anywhere on the line): ``-f/--config FILE``, ``--json``
(machine-readable output of every command).  Errors are one line
``netpluginctl: error: <message>`` on stderr and exit status 1; usage errors
exit 2.  ``status`` exits 1 when the datastore or the plugin does not answer.

Profiles are named by Docker network ID (``driver.py``); where a profile is
expected, a Docker network name is accepted too when dockerd answers at
``[calico] docker_endpoint``.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from netplugin import __version__, unixhttp
from netplugin.config import Config, load_config
from netplugin.datastore import (CompareFailed, Datastore, KeyExists, KeyNotFound,
                                 open_datastore)
from netplugin.errors import ConfigError, PluginError

from backends.calico import ipam as ci
from backends.calico import keys
from backends.calico.routes import RTPROT_NETPLUGIN, bird_ip_host

log = logging.getLogger("netpluginctl")

PROG = "netpluginctl"
#: Profile names and tags Felix accepts (calico-datastore.md §2.3).
NAME_RE = re.compile(r"^[a-zA-Z0-9_.\-]+$")
#: Seconds ``pool remove`` waits between disabling a pool and releasing its
#: blocks' affinities, for allocations already in flight (calicoctl: 3 s).
POOL_REMOVE_GRACE = 1.0
#: Attempts of one read-modify-compare-and-swap.
CAS_RETRIES = 20
#: Seconds for the plugin socket, dockerd and each external command.
PLUGIN_TIMEOUT = 3.0
DOCKER_TIMEOUT = 2.0
COMMAND_TIMEOUT = 10.0
IPIP_CONFIG_KEY = "/calico/v1/config/IpInIpEnabled"
RULE_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
PORT_RE = re.compile(r"^(\d+([:-]\d+)?)(,\d+([:-]\d+)?)*$")
#: Keys dumped by ``diags``.
DUMP_PREFIXES = ("/calico",)


class CtlError(PluginError):
    """A user-facing failure of a command (one line)."""


class _Usage(Exception):
    """Bad command line for a hand-parsed subcommand (exit 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


# --------------------------------------------------------------------------
# output


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A prettytable-style table (``+---+`` borders, like calicoctl's);
    cells may hold several lines."""
    grid = [[("" if c is None else str(c)).split("\n") for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in grid:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in lines))
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, "| " + " | ".join(h.center(w) for h, w in zip(headers, widths)) + " |", rule]
    for row in grid:
        height = max((len(lines) for lines in row), default=1)
        for n in range(height):
            out.append("| " + " | ".join(
                (lines[n] if n < len(lines) else "").ljust(w)
                for lines, w in zip(row, widths)) + " |")
    out.append(rule)
    return "\n".join(out)


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------
# parsing helpers


def parse_cidr(text: str) -> ci.IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CtlError(f"{text!r} is not a valid CIDR (e.g. 192.168.0.0/16)") from None
    raise CtlError(f"{text} has host bits set; did you mean {net}?")


def parse_ip(text: str) -> ci.IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CtlError(f"{text!r} is not a valid IP address") from None


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise CtlError(f"invalid {what} name {name!r}: use letters, digits, '_', '.' "
                       "and '-' only")
    return name


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
    """calicoctl's rule syntax -> a Calico rule object (calico-datastore.md §4)."""
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


def _rule_key(rule: Dict[str, Any]) -> Dict[str, Any]:
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


def validate_rules(data: Any) -> Dict[str, Any]:
    """Rules JSON given to ``rule update``: the shape Felix accepts."""
    if not isinstance(data, dict):
        raise CtlError("rules JSON must be an object with inbound_rules and outbound_rules")
    for name in ("inbound_rules", "outbound_rules"):
        rules = data.get(name, [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise CtlError(f"rules JSON: {name} must be a list of rule objects")
        for r in rules:
            if r.get("action", "allow") not in ("allow", "deny", "next-tier"):
                raise CtlError(f"rules JSON: unknown action {r.get('action')!r} in {name}")
    return {"inbound_rules": data.get("inbound_rules", []),
            "outbound_rules": data.get("outbound_rules", []),
            **{k: v for k, v in data.items() if k not in ("inbound_rules", "outbound_rules")}}


# --------------------------------------------------------------------------
# external commands and the plugin socket (module level so tests can replace them)


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT
                ) -> Tuple[int, str, str]:
    """(returncode, stdout, stderr); returncode 127 when the binary is missing."""
    if shutil.which(argv[0]) is None:
        return 127, "", f"{argv[0]}: command not found"
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: no answer within {timeout:g} s"
    except OSError as exc:
        return 126, "", f"{argv[0]}: {exc}"
    return proc.returncode, proc.stdout, proc.stderr


def ip_json(*args: str) -> List[Dict[str, Any]]:
    """``ip -j <args>`` decoded; CtlError when it fails."""
    rc, out, err = run_command(["ip", "-j", *args])
    if rc != 0:
        raise CtlError(f"ip -j {' '.join(args)} failed: {(err or out).strip() or rc}")
    if not out.strip():
        return []
    try:
        data = json.loads(out)
    except ValueError:
        raise CtlError(f"ip -j {' '.join(args)}: output is not JSON") from None
    return data if isinstance(data, list) else []


def plugin_activate(path: str, timeout: float = PLUGIN_TIMEOUT) -> Dict[str, Any]:
    """POST /Plugin.Activate on the plugin socket, as dockerd does."""
    result: Dict[str, Any] = {"socket": path, "ok": False}
    try:
        status, body = unixhttp.post(
            path, "/Plugin.Activate", timeout=timeout,
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        if status != 200:
            result["error"] = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            return result
        data = json.loads(body or b"{}")
        result["implements"] = list(data.get("Implements") or [])
        result["ok"] = True
    except FileNotFoundError:
        result["error"] = "socket not found (is the plugin running?)"
    except ConnectionRefusedError:
        result["error"] = "connection refused (stale socket: the plugin is not running)"
    except socket.timeout:
        result["error"] = f"no answer within {timeout:g} s"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


# --------------------------------------------------------------------------
# endpoints as stored


@dataclass
class Endpoint:
    host: str
    orchestrator: str
    workload: str
    endpoint_id: str
    key: str
    version: int
    data: Dict[str, Any]

    @property
    def nets(self) -> List[str]:
        out = []
        for name in ("ipv4_nets", "ipv6_nets"):
            value = self.data.get(name) or []
            out += [str(n) for n in value] if isinstance(value, list) else []
        return out

    @property
    def profiles(self) -> List[str]:
        value = self.data.get("profile_ids")
        if value is None and isinstance(self.data.get("profile_id"), str):
            return [self.data["profile_id"]]        # legacy single profile
        return [str(p) for p in value] if isinstance(value, list) else []

    def summary(self) -> Dict[str, Any]:
        return {"hostname": self.host, "orchestrator_id": self.orchestrator,
                "workload_id": self.workload, "endpoint_id": self.endpoint_id,
                "key": self.key, "name": self.data.get("name"), "addresses": self.nets,
                "mac": self.data.get("mac"), "profile_ids": self.profiles,
                "state": self.data.get("state")}


# --------------------------------------------------------------------------
# the commands


class Ctl:
    def __init__(self, cfg: Config, datastore: Datastore, as_json: bool = False,
                 out=None):
        self.cfg = cfg
        self.store = datastore
        self.ipam = ci.CalicoIpam(datastore)
        self.as_json = as_json
        self.out = out or sys.stdout

    @property
    def hostname(self) -> str:
        return self.cfg.calico.hostname

    def emit(self, text: Optional[str] = None, data: Any = None) -> None:
        """Print ``data`` as JSON with --json, else ``text``."""
        if self.as_json:
            print(_json_text(data), file=self.out)
        elif text is not None:
            print(text, file=self.out)

    # -- shared datastore helpers ----------------------------------------------
    def _read_json(self, key: str, default: Any = None) -> Tuple[Any, Optional[int]]:
        try:
            item = self.store.get(key)
        except KeyNotFound:
            return default, None
        try:
            return json.loads(item.value) if item.value else default, item.version
        except ValueError:
            raise CtlError(f"datastore key {key} does not hold valid JSON") from None

    def _update_json(self, key: str, mutate: Callable[[Any], Any], what: str,
                     default: Any = None) -> Any:
        """Read-modify-compare-and-swap ``key``.  ``mutate`` gets a copy of the
        value (``default`` when absent, else KeyNotFound -> CtlError) and returns
        the new value, or None for "no change"."""
        for _ in range(CAS_RETRIES):
            value, version = self._read_json(key)
            if version is None:
                if default is None:
                    raise CtlError(f"{what} not found")
                value = json.loads(json.dumps(default))
            new = mutate(value)
            if new is None:
                return value
            try:
                if version is None:
                    self.store.create(key, json.dumps(new))
                else:
                    self.store.compare_and_swap(key, json.dumps(new), version)
                return new
            except (CompareFailed, KeyExists, KeyNotFound):
                time.sleep(0.01)
                continue
        raise CtlError(f"{what} kept changing concurrently; try again")

    def endpoints(self, host: Optional[str] = None, orchestrator: Optional[str] = None,
                  workload: Optional[str] = None, endpoint: Optional[str] = None
                  ) -> List[Endpoint]:
        """Stored workload endpoints (filters: exact host/orchestrator/workload,
        endpoint ID or its prefix)."""
        root = keys.HOST_ROOT + "/"
        prefix = f"{keys.host_workloads(host)}/" if host else root
        found = []
        for item in self.store.list_prefix(prefix):
            parts = item.key[len(root):].split("/")
            if len(parts) != 6 or parts[1] != "workload" or parts[4] != "endpoint":
                continue
            h, _, o, w, _, e = parts
            if (orchestrator and o != orchestrator) or (workload and w != workload) \
                    or (endpoint and not e.startswith(endpoint)):
                continue
            try:
                data = json.loads(item.value)
                if not isinstance(data, dict):
                    raise ValueError
            except ValueError:
                log.warning("endpoint %s is not a JSON object", item.key)
                data = {}
            found.append(Endpoint(h, o, w, e, item.key, item.version, data))
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

    def profile_names(self) -> List[str]:
        root = keys.PROFILE_ROOT + "/"
        return sorted({item.key[len(root):].split("/")[0]
                       for item in self.store.list_prefix(root)
                       if "/" in item.key[len(root):]})

    def profile_exists(self, name: str) -> bool:
        return bool(self.store.list_prefix(keys.profile_dir(name) + "/"))

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
            import docker
            client = docker.APIClient(base_url=endpoint, version="auto",
                                      timeout=min(DOCKER_TIMEOUT, self.cfg.calico.docker_timeout))
            try:
                info = client.inspect_network(name)
            finally:
                client.close()
        except Exception as exc:  # dockerd absent, slow or without that network
            log.debug("no Docker network %s: %s", name, exc)
            return None
        nid = info.get("Id") if isinstance(info, dict) else None
        return nid if isinstance(nid, str) and nid else None

    # -- pools ---------------------------------------------------------------------
    def _all_pools(self) -> List[ci.Pool]:
        return self.ipam.pools(4) + self.ipam.pools(6)

    def pool_add(self, cidrs: Sequence[str], ipip: bool, nat_outgoing: bool) -> int:
        nets = [parse_cidr(c) for c in cidrs]
        existing = {p.cidr: p for p in self._all_pools()}
        for i, net in enumerate(nets):
            if ipip and net.version == 6:
                raise CtlError(f"{net}: IPIP is not supported on IPv6 pools")
            for other in nets[:i]:
                if other.version == net.version and other.overlaps(net):
                    raise CtlError(f"pools {other} and {net} given together overlap")
            same = existing.get(net)
            if (same is None or same.ipam) and net.prefixlen > ci.BLOCK_PREFIXLEN[net.version]:
                raise CtlError(f"{net} is smaller than one IPAM block: IPv{net.version} pools "
                               f"need a prefix of /{ci.BLOCK_PREFIXLEN[net.version]} or "
                               "shorter")
            for cidr in existing:
                if cidr != net and cidr.version == net.version and cidr.overlaps(net):
                    raise CtlError(f"cannot add pool {net}: it overlaps the existing pool "
                                   f"{cidr} (only an identical CIDR can be updated)")
        done = []
        for net in nets:
            key = keys.pool(net)

            def mutate(value, net=net):
                value = dict(value) if isinstance(value, dict) else {}
                value["cidr"] = str(net)
                value.pop("disabled", None)
                value.pop("ipip", None)
                value.pop("masquerade", None)
                if ipip:
                    value["ipip"] = "tunl0"
                if nat_outgoing:
                    value["masquerade"] = True
                return value

            updated = net in existing
            self._update_json(key, mutate, f"pool {net}", default={"cidr": str(net)})
            done.append({"cidr": str(net), "action": "updated" if updated else "added",
                         "ipip": ipip, "nat_outgoing": nat_outgoing})
        if ipip:
            self.store.put(IPIP_CONFIG_KEY, "true")  # as libcalico's add_ip_pool does
        self.emit("\n".join(f"{d['action'].capitalize()} pool {d['cidr']}" for d in done),
                  done)
        return 0

    def pool_remove(self, cidrs: Sequence[str]) -> int:
        nets = [parse_cidr(c) for c in cidrs]
        existing = {p.cidr: p for p in self._all_pools()}
        for net in nets:
            if net not in existing:
                raise CtlError(f"pool {net} not found (see '{PROG} pool show')")
        # 1. disable: no new blocks are claimed from these pools
        for net in nets:
            def disable(value, net=net):
                value = dict(value) if isinstance(value, dict) else {"cidr": str(net)}
                if value.get("disabled") is True:
                    return None
                value["disabled"] = True
                return value
            self._update_json(keys.pool(net), disable, f"pool {net}")
        # 2. let allocations already in flight finish, then release affinities
        if POOL_REMOVE_GRACE > 0:
            time.sleep(POOL_REMOVE_GRACE)
        results = []
        for net in nets:
            released = self._release_pool_affinities(net)
            try:
                self.store.delete(keys.pool(net))
            except KeyNotFound:
                pass
            # a claim that raced with step 2 (rare): sweep once more
            released += self._release_pool_affinities(net)
            results.append({"cidr": str(net), "released_affinities": released})
        lines = []
        for r in results:
            lines.append(f"Removed pool {r['cidr']}")
            for a in r["released_affinities"]:
                what = "deleted empty block" if a["block_deleted"] else "block kept"
                lines.append(f"  released affinity of host {a['host']} to block "
                             f"{a['block']} ({what})")
        self.emit("\n".join(lines), results)
        return 0

    def _release_pool_affinities(self, pool: ci.IPNetwork) -> List[Dict[str, Any]]:
        """Release every (host, block) affinity whose block lies in ``pool``
        (calico-datastore.md §5.8)."""
        root = ci.HOST_ROOT + "/"
        released = []
        for item in self.store.list_prefix(root):
            parts = item.key[len(root):].split("/")
            if len(parts) != 4 or parts[2] != "block" or parts[1] != f"ipv{pool.version}":
                continue
            try:
                block = ci.cidr_from_key(item.key)
            except ValueError:
                continue
            if block.version != pool.version or not block.subnet_of(pool):
                continue
            deleted = self._release_block_affinity(parts[0], block)
            released.append({"host": parts[0], "block": str(block), "block_deleted": deleted})
        return released

    def _release_block_affinity(self, host: str, cidr: ci.IPNetwork) -> bool:
        """Drop ``host``'s affinity to ``cidr``: delete the block when it is
        empty, else clear its affinity (CAS); then delete the affinity key.
        True when the block was deleted."""
        deleted = False
        for attempt in range(ci.RETRIES):
            try:
                block = self.ipam.read_block(cidr)
            except KeyNotFound:
                break
            if block.host != host:
                break          # another host's block (or none): only our key is stale
            try:
                if block.empty:
                    self.store.delete(block.key, block.version)
                    deleted = True
                else:
                    block.affinity = None
                    self.store.compare_and_swap(block.key, block.to_json(), block.version)
                break
            except (CompareFailed, KeyNotFound):
                time.sleep(0.005 * min(attempt + 1, 10))
                continue
        else:
            raise CtlError(f"block {cidr} kept changing concurrently; try again")
        try:
            self.store.delete(ci.host_affinity_key(host, cidr))
        except KeyNotFound:
            pass
        return deleted

    def pool_show(self, version: Optional[int]) -> int:
        versions = [version] if version else [4, 6]
        data = []
        tables = []
        for v in versions:
            rows = []
            for pool in self.ipam.pools(v):
                raw = pool.raw
                entry = {"cidr": str(pool.cidr), "version": v,
                         "ipip": bool(raw.get("ipip")),
                         "nat_outgoing": ci._truthy(raw.get("masquerade"), False),
                         "ipam": pool.ipam, "disabled": pool.disabled,
                         "state": pool.state()}
                data.append(entry)
                options = [name for name, on in (("ipip", entry["ipip"]),
                                                 ("nat-outgoing", entry["nat_outgoing"]),
                                                 ("disabled", pool.disabled),
                                                 ("no-ipam", not pool.ipam)) if on]
                rows.append([str(pool.cidr), ",".join(options)])
            tables.append(format_table([f"IPv{v} CIDR", "Options"], rows))
        self.emit("\n".join(tables), data)
        return 0

    # -- profiles --------------------------------------------------------------------
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
                             ep.data.get("state", "")])
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
            self.store.create(keys.profile_tags(name), json.dumps([name]))
        except KeyExists:
            self.emit(f"Profile {name} already exists.", {"profile": name, "created": False})
            return 0
        self.store.put(keys.profile_rules(name), json.dumps({
            "inbound_rules": [{"action": "allow", "src_tag": name}],
            "outbound_rules": [{"action": "allow"}]}))
        self.store.put(keys.profile_labels(name), json.dumps({}))
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
                self.store.get(keys.network(name))
                raise CtlError(f"profile {name} belongs to an existing Docker network "
                               f"(record {keys.network(name)}); remove the network with "
                               "'docker network rm' or pass --no-check")
            except KeyNotFound:
                pass
        self.store.delete_prefix(keys.profile_dir(name))
        self.emit(f"Deleted profile {name}", {"profile": name, "deleted": True})
        return 0

    def _tags(self, name: str) -> List[str]:
        value, _ = self._read_json(keys.profile_tags(name), [])
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

        tags = self._update_json(keys.profile_tags(name), mutate, f"tags of profile {name}",
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

        tags = self._update_json(keys.profile_tags(name), mutate, f"tags of profile {name}",
                                 default=[])
        self.emit(f"Tag {tag} removed from profile {name}", {"profile": name, "tags": tags})
        return 0

    def _rules(self, name: str) -> Dict[str, Any]:
        value, _ = self._read_json(keys.profile_rules(name), {})
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
        self._update_json(keys.profile_rules(name), lambda _old: rules,
                          f"rules of profile {name}", default={})
        self.emit(f"Successfully updated rules on profile {name}",
                  {"profile": name, "rules": rules})
        return 0

    def rule_add(self, name: str, direction: str, position: Optional[int],
                 rule: Dict[str, Any]) -> int:
        name = self.resolve_profile(name)
        field = f"{direction}_rules"
        state: Dict[str, Any] = {}

        def mutate(value):
            value = dict(value) if isinstance(value, dict) else {}
            rules = list(value.get(field) or [])
            if any(isinstance(r, dict) and _rule_key(r) == _rule_key(rule) for r in rules):
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

        self._update_json(keys.profile_rules(name), mutate, f"rules of profile {name}",
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
                    if isinstance(r, dict) and _rule_key(r) == _rule_key(rule):
                        removed["rule"] = rules.pop(i)
                        break
                else:
                    raise CtlError(f"rule not found in the {direction} rules of profile "
                                   f"{name}: {rule_text(rule)}")
            value[field] = rules
            return value

        self._update_json(keys.profile_rules(name), mutate, f"rules of profile {name}")
        r = removed["rule"]
        self.emit(f"Removed {direction} rule from profile {name}: "
                  f"{rule_text(r) if isinstance(r, dict) else r}",
                  {"profile": name, "removed": r})
        return 0

    # -- endpoints -----------------------------------------------------------------
    def endpoint_show(self, host, orchestrator, workload, endpoint, detailed) -> int:
        eps = self.endpoints(host, orchestrator, workload, endpoint)
        if detailed:
            rows = [[ep.host, ep.orchestrator, ep.workload, ep.endpoint_id,
                     "\n".join(ep.nets), ep.data.get("mac", ""), ",".join(ep.profiles),
                     ep.data.get("state", "")] for ep in eps]
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
            if not isinstance(value, dict):
                raise CtlError(f"endpoint {ep.key} is not a JSON object")
            current = Endpoint(ep.host, ep.orchestrator, ep.workload, ep.endpoint_id,
                               ep.key, 0, value).profiles
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

    # -- IPAM --------------------------------------------------------------------------
    def _users_of(self, ip: ci.IPAddress) -> List[Endpoint]:
        users = []
        for ep in self.endpoints():
            for net in ep.nets:
                try:
                    if ipaddress.ip_interface(net).ip == ip:
                        users.append(ep)
                except ValueError:
                    continue
        return users

    def ipam_info(self, text: str) -> int:
        ip = parse_ip(text)
        cidr = ci.block_cidr_for(ip)
        pools = [p for p in self.ipam.pools(ip.version) if ip in p.cidr]
        try:
            block: Optional[ci.Block] = self.ipam.read_block(cidr)
        except KeyNotFound:
            block = None
        info: Dict[str, Any] = {"ip": str(ip), "pool": str(pools[0].cidr) if pools else None,
                                "block": str(cidr) if block else None,
                                "block_affinity": block.host if block else None,
                                "assigned": False}
        if block is None and not pools:
            raise CtlError(f"IP {ip} is not in any configured Calico pool")
        index = block.allocations[block.ordinal(ip)] if block else None
        if index is None:
            self.emit(f"IP {ip} is not currently assigned", info)
            return 0
        attr = block.attributes[index]
        info.update(assigned=True, handle_id=attr.get("handle_id"),
                    attributes=attr.get("secondary"),
                    endpoints=[ep.summary() for ep in self._users_of(ip)])
        attrs = attr.get("secondary")
        rows = [["IP", str(ip)], ["Pool", info["pool"] or "(none: pool removed)"],
                ["Block", str(cidr)], ["Block affinity", info["block_affinity"] or "(none)"],
                ["Handle", attr.get("handle_id") or "(none)"],
                ["Attributes", json.dumps(attrs) if attrs else f"No attributes defined "
                 f"for {ip}"],
                ["Endpoints", "\n".join(f"{e['hostname']}/{e['endpoint_id']}"
                                        for e in info["endpoints"]) or "(none)"]]
        self.emit(f"IP {ip} is in use\n" + format_table(["Field", "Value"], rows), info)
        return 0

    def ipam_release(self, text: str, force: bool) -> int:
        ip = parse_ip(text)
        if not force:
            users = self._users_of(ip)
            if users:
                ep = users[0]
                raise CtlError(f"IP {ip} belongs to endpoint {ep.endpoint_id} on host "
                               f"{ep.host} ({ep.key}); delete that endpoint first or pass "
                               "--force")
        not_allocated = self.ipam.release_ips([ip])
        if not_allocated:
            raise CtlError(f"IP {ip} is not assigned")
        self.emit("Address successfully released", {"ip": str(ip), "released": True})
        return 0

    # -- status and diags ---------------------------------------------------------------
    def datastore_description(self) -> str:
        d = self.cfg.datastore
        where = {"embedded": d.path, "etcd": ", ".join(d.endpoints),
                 "consul": d.address}.get(d.type, "")
        return f"{d.type} {where}".strip()

    def collect_status(self) -> Dict[str, Any]:
        status: Dict[str, Any] = {"hostname": self.hostname, "config": self.cfg.path}
        ds: Dict[str, Any] = {"type": self.cfg.datastore.type,
                              "address": self.datastore_description(), "ok": False}
        try:
            self.store.ping()
            ds["ok"] = True
        except PluginError as exc:
            ds["error"] = str(exc)
        status["datastore"] = ds
        status["plugin"] = plugin_activate(self.cfg.socket)
        links: Dict[str, Dict[str, Any]] = {}
        routes: List[Dict[str, Any]] = []
        errors: List[str] = []
        try:
            links = {l.get("ifname"): l for l in ip_json("link", "show")}
        except CtlError as exc:
            errors.append(str(exc))
        for family, args in ((4, ("route", "show")), (6, ("-6", "route", "show"))):
            try:
                for r in ip_json(*args):
                    # every veth has a link-local fe80::/64: not an endpoint route
                    if str(r.get("dev", "")).startswith("cali") \
                            and not str(r.get("dst", "")).startswith("fe80:"):
                        routes.append({"family": family, "dst": r.get("dst"),
                                       "dev": r.get("dev"), "scope": r.get("scope")})
            except CtlError as exc:
                errors.append(str(exc))
        status["routes"] = routes
        # Cross-host routes the agent keeps (backends/calico/routes.py), and the
        # addresses hosts publish as bird_ip (calicoctl status shows BGP peers).
        cross: List[Dict[str, Any]] = []
        try:
            for r in ip_json("route", "show", "proto", str(RTPROT_NETPLUGIN)):
                cross.append({"dst": r.get("dst"), "via": r.get("gateway"),
                              "dev": r.get("dev")})
        except CtlError as exc:
            errors.append(str(exc))
        status["cross_host_routes"] = cross
        peers: List[Dict[str, Any]] = []
        if ds["ok"]:
            try:
                for item in self.store.list_prefix(keys.HOST_ROOT + "/"):
                    host = bird_ip_host(item.key)
                    if host is not None:
                        peers.append({"host": host, "ip": item.value,
                                      "self": host == self.hostname})
            except PluginError as exc:
                ds.update(ok=False, error=str(exc))
        status["hosts"] = sorted(peers, key=lambda p: p["host"])
        endpoints = []
        if ds["ok"]:
            try:
                eps = self.endpoints(host=self.hostname)
            except PluginError as exc:
                ds.update(ok=False, error=str(exc))
                eps = []
            routed = {(r["dst"], r["dev"]) for r in routes}
            for ep in eps:
                entry = ep.summary()
                name = entry.get("name") or ""
                link = links.get(name)
                entry["link"] = ("missing" if link is None
                                 else str(link.get("operstate", "unknown")).lower())
                missing = []
                for net in ep.nets:
                    try:
                        iface = ipaddress.ip_interface(net)
                    except ValueError:
                        continue
                    plen = iface.network.prefixlen
                    dst = str(iface.ip)
                    if (dst, name) not in routed and (f"{dst}/{plen}", name) not in routed:
                        missing.append(net)
                entry["routed"] = not missing
                entry["missing_routes"] = missing
                endpoints.append(entry)
        status["endpoints"] = endpoints
        if errors:
            status["errors"] = errors
        status["ok"] = bool(ds["ok"] and status["plugin"]["ok"])
        return status

    def status(self) -> int:
        st = self.collect_status()
        if self.as_json:
            self.emit(None, st)
            return 0 if st["ok"] else 1
        ds, plugin = st["datastore"], st["plugin"]
        lines = [f"netplugin status for host {st['hostname']} (config {st['config']})",
                 f"Datastore: {ds['address']}: "
                 + ("reachable" if ds["ok"] else f"NOT reachable: {ds.get('error')}"),
                 f"Plugin:    {plugin['socket']}: "
                 + (f"answering (implements {', '.join(plugin.get('implements') or []) or '-'})"
                    if plugin["ok"] else f"NOT answering: {plugin.get('error')}"),
                 "",
                 f"Endpoints on {st['hostname']}: {len(st['endpoints'])}"]
        if st["endpoints"]:
            lines.append(format_table(
                ["Endpoint ID", "Interface", "Addresses", "Profiles", "State", "Link",
                 "Routed"],
                [[e["endpoint_id"][:12], e.get("name") or "", "\n".join(e["addresses"]),
                  "\n".join(e["profile_ids"]), e.get("state") or "", e["link"],
                  "yes" if e["routed"] else "NO: " + ", ".join(e["missing_routes"])]
                 for e in st["endpoints"]]))
        lines += ["", f"Routes via cali* interfaces: {len(st['routes'])}"]
        if st["routes"]:
            lines.append(format_table(["Destination", "Interface"],
                                      [[r["dst"], r["dev"]] for r in st["routes"]]))
        lines += ["", f"Hosts publishing an address (bird_ip): {len(st['hosts'])}"]
        if st["hosts"]:
            lines.append(format_table(["Host", "Address", ""],
                                      [[h["host"], h["ip"], "(this host)" if h["self"] else ""]
                                       for h in st["hosts"]]))
        lines += ["", f"Cross-host routes (proto {RTPROT_NETPLUGIN}): "
                      f"{len(st['cross_host_routes'])}"]
        if st["cross_host_routes"]:
            lines.append(format_table(["Destination", "Via", "Interface"],
                                      [[r["dst"], r["via"] or "", r["dev"] or ""]
                                       for r in st["cross_host_routes"]]))
        for err in st.get("errors", []):
            lines.append(f"warning: {err}")
        self.emit("\n".join(lines))
        return 0 if st["ok"] else 1

    def diags(self, output: Optional[str], logs: Sequence[str]) -> int:
        out_dir = output or tempfile.gettempdir()
        if not os.path.isdir(out_dir):
            raise CtlError(f"output directory {out_dir} does not exist")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        safe_host = re.sub(r"[^A-Za-z0-9_.-]", "_", self.hostname)
        base = f"netplugin-diags-{safe_host}-{stamp}"
        path = os.path.join(out_dir, base + ".tar.gz")
        errors: List[str] = []
        with tempfile.TemporaryDirectory(prefix="netpluginctl-diags-") as work:
            top = os.path.join(work, base)
            os.makedirs(top)

            def write(name: str, text: str) -> None:
                full = os.path.join(top, name)
                os.makedirs(os.path.dirname(full), exist_ok=True)
                with open(full, "w") as f:
                    f.write(text)

            # configuration
            try:
                os.makedirs(os.path.join(top, "config"))
                shutil.copyfile(self.cfg.path, os.path.join(
                    top, "config", os.path.basename(self.cfg.path)))
            except OSError as exc:
                errors.append(f"config {self.cfg.path}: {exc}")
            # datastore
            dump: Dict[str, Any] = {"datastore": self.datastore_description(), "keys": []}
            for prefix in DUMP_PREFIXES:
                try:
                    dump["keys"] += [{"key": i.key, "value": i.value, "version": i.version}
                                     for i in self.store.list_prefix(prefix)]
                except PluginError as exc:
                    errors.append(f"datastore dump of {prefix}: {exc}")
            write("datastore.json", _json_text(dump))
            # status summary
            try:
                write("status.json", _json_text(self.collect_status()))
            except PluginError as exc:
                errors.append(f"status: {exc}")
            # kernel state
            commands = [("ip-route.json", ["ip", "-j", "route", "show"]),
                        ("ip-6-route.json", ["ip", "-j", "-6", "route", "show"]),
                        ("ip-link.json", ["ip", "-j", "link", "show"]),
                        ("ip-addr.json", ["ip", "-j", "addr", "show"])]
            if shutil.which("nft"):
                commands += [("nft-ruleset.json", ["nft", "-j", "list", "ruleset"]),
                             ("nft-ruleset.txt", ["nft", "list", "ruleset"])]
            else:
                errors.append("nft: command not found (no ruleset collected)")
            for name, argv in commands:
                rc, out, err = run_command(argv)
                if rc != 0:
                    errors.append(f"{' '.join(argv)}: exit {rc}: {(err or out).strip()}")
                write(name, out)
            # host-local state of the driver (gateway table, ...)
            state = self.cfg.driver_state_dir
            if os.path.isdir(state):
                try:
                    shutil.copytree(state, os.path.join(top, "state"), symlinks=True)
                except (OSError, shutil.Error) as exc:
                    errors.append(f"state directory {state}: {exc}")
            # logs
            if logs:
                os.makedirs(os.path.join(top, "logs"))
            for i, log_path in enumerate(logs):
                try:
                    shutil.copyfile(log_path, os.path.join(
                        top, "logs", f"{i}-{os.path.basename(log_path)}"))
                except OSError as exc:
                    errors.append(f"log {log_path}: {exc.strerror or exc}")
            write("errors.txt", "".join(f"{e}\n" for e in errors))
            write("README.txt", f"netpluginctl {__version__} diagnostics of host "
                  f"{self.hostname}, {stamp}\nconfig: {self.cfg.path}\n"
                  f"datastore: {self.datastore_description()}\n")
            try:
                with tarfile.open(path, "w:gz") as tar:
                    tar.add(top, arcname=base)
            except OSError as exc:
                raise CtlError(f"cannot write {path}: {exc.strerror or exc}") from None
        for err in errors:
            print(f"{PROG}: warning: {err}", file=sys.stderr)
        self.emit(f"Diagnostics saved to {path}", {"path": path, "errors": errors})
        return 0


# --------------------------------------------------------------------------
# command line


USAGE = __doc__[__doc__.index("    netpluginctl pool add"):__doc__.index("Global options")]


def _parser(prog: str, **kw) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = _parser(PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="calicoctl-style management of the Calico data used by the "
                             "netplugin calico backend.",
                 epilog="usage of the subcommands:\n" + USAGE)
    ap.add_argument("-f", "--config", default=None,
                    help="the plugin's TOML config (default: $NETPLUGIN_CONFIG, "
                         "else ./plugin.cfg)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pool = sub.add_parser("pool", help="IP pools").add_subparsers(dest="op", metavar="OP")
    pool.required = True
    p = pool.add_parser("add", help="add pools, or update an identical pool's flags")
    p.add_argument("cidrs", nargs="+", metavar="CIDR")
    p.add_argument("--ipip", action="store_true", help="IP-in-IP to other hosts (IPv4 only)")
    p.add_argument("--nat-outgoing", action="store_true",
                   help="masquerade traffic leaving the pools")
    p = pool.add_parser("remove", help="disable, release block affinities, delete")
    p.add_argument("cidrs", nargs="+", metavar="CIDR")
    p = pool.add_parser("show", help="list pools")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ipv4", dest="version", action="store_const", const=4)
    g.add_argument("--ipv6", dest="version", action="store_const", const=6)

    p = sub.add_parser("profile", help="profiles, their tags and rules", add_help=False,
                       usage=f"{PROG} profile (show|add|remove|<PROFILE> (tag|rule)) ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p = sub.add_parser("endpoint", help="workload endpoints", add_help=False,
                       usage=f"{PROG} endpoint (show|<ENDPOINT_ID> profile) ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    ipam = sub.add_parser("ipam", help="IP address management").add_subparsers(
        dest="op", metavar="OP")
    ipam.required = True
    p = ipam.add_parser("info", help="who holds an address")
    p.add_argument("ip", metavar="IP")
    p = ipam.add_parser("release", help="free an address (leaked by a crash)")
    p.add_argument("ip", nargs="?", metavar="IP")
    p.add_argument("--ip", dest="ip_opt", metavar="IP")
    p.add_argument("--force", action="store_true",
                   help="release even when an endpoint still uses the address")

    sub.add_parser("status", help="datastore, plugin socket, this host's endpoints and "
                                  "routes")
    p = sub.add_parser("diags", help="collect a diagnostics tarball")
    p.add_argument("--output", metavar="DIR", help="directory for the tarball (default: "
                                                    "the temporary directory)")
    p.add_argument("--log", action="append", default=[], metavar="FILE",
                   help="a plugin log file to include (repeatable)")
    return ap


def _command_help(command: str) -> None:
    """``profile --help`` (anywhere on the line): that command's usage lines."""
    lines, take = [], False
    for line in USAGE.splitlines():
        if line.strip().startswith(PROG):
            take = line.strip().startswith(f"{PROG} {command} ")
        elif not line.startswith("      "):
            take = False
        if take:
            lines.append(line)
    if command == "profile":
        lines += [""] + USAGE[USAGE.index("    <RULE>"):].rstrip().splitlines()
    print("usage:\n" + "\n".join(lines))
    raise SystemExit(0)


def _profile_command(rest: List[str]) -> Tuple[str, Dict[str, Any]]:
    """Hand parser of ``profile ...`` (``profile NAME ...`` and ``profile
    add|show|remove`` share the first word)."""
    if "-h" in rest or "--help" in rest:
        _command_help("profile")
    base = f"{PROG} profile"
    top = _parser(base, usage=f"{base} (show [--detailed] | add <PROFILE> | remove "
                              f"<PROFILE> [--no-check] | <PROFILE> tag ... | "
                              f"<PROFILE> rule ...)")
    if not rest:
        raise _Usage(top, "expected show, add, remove or a profile name")
    head, args = rest[0], rest[1:]
    if head == "show":
        p = _parser(f"{base} show")
        p.add_argument("--detailed", action="store_true")
        return "profile_show", vars(p.parse_args(args))
    if head == "add":
        p = _parser(f"{base} add")
        p.add_argument("name", metavar="PROFILE")
        return "profile_add", vars(p.parse_args(args))
    if head == "remove":
        p = _parser(f"{base} remove")
        p.add_argument("name", metavar="PROFILE")
        p.add_argument("--no-check", action="store_true",
                       help="remove even when endpoints or a Docker network use it")
        return "profile_remove", vars(p.parse_args(args))
    if head.startswith("-"):
        raise _Usage(top, f"unrecognized argument {head}")
    name = head
    what = args[0] if args else None
    args = args[1:]
    if what == "tag":
        p = _parser(f"{base} {name} tag")
        p.add_argument("op", choices=("show", "add", "remove"))
        p.add_argument("tag", nargs="?", metavar="TAG")
        ns = p.parse_args(args)
        if ns.op == "show":
            if ns.tag is not None:
                raise _Usage(p, f"unrecognized argument {ns.tag}")
            return "tag_show", {"name": name}
        if ns.tag is None:
            raise _Usage(p, f"tag {ns.op} needs a TAG")
        return f"tag_{ns.op}", {"name": name, "tag": ns.tag}
    if what == "rule":
        p = _parser(f"{base} {name} rule",
                    usage=f"{base} {name} rule (show | json | update | add (inbound|outbound) "
                          f"[--at=<POS>] <RULE> | remove (inbound|outbound) "
                          f"(--at=<POS> | <RULE>))")
        if not args:
            raise _Usage(p, "expected show, json, update, add or remove")
        op, args = args[0], args[1:]
        if op in ("show", "json", "update"):
            if args:
                raise _Usage(p, f"unrecognized argument {args[0]}")
            return f"rule_{op}", {"name": name}
        if op not in ("add", "remove"):
            raise _Usage(p, f"unknown rule operation {op!r}")
        position = None
        tokens: List[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--at" or a.startswith("--at="):
                if a == "--at":
                    if i + 1 >= len(args):
                        raise _Usage(p, "--at needs a position")
                    value, i = args[i + 1], i + 2
                else:
                    value, i = a[len("--at="):], i + 1
                try:
                    position = int(value)
                except ValueError:
                    raise _Usage(p, f"--at: position must be an integer, got {value!r}") \
                        from None
                continue
            tokens.append(a)
            i += 1
        if not tokens or tokens[0] not in ("inbound", "outbound"):
            raise _Usage(p, "expected inbound or outbound")
        direction, spec = tokens[0], tokens[1:]
        if op == "remove" and position is not None:
            if spec:
                raise _Usage(p, "rule remove takes --at=<POS> or a rule, not both")
            return "rule_remove", {"name": name, "direction": direction,
                                   "position": position, "spec": None}
        if not spec:
            raise _Usage(p, f"rule {op} needs a rule (allow|deny ...)"
                         + (" or --at=<POS>" if op == "remove" else ""))
        return f"rule_{op}", {"name": name, "direction": direction, "position": position,
                              "spec": spec}
    raise _Usage(top, f"expected 'tag' or 'rule' after the profile name {name!r}")


def _endpoint_command(rest: List[str]) -> Tuple[str, Dict[str, Any]]:
    if "-h" in rest or "--help" in rest:
        _command_help("endpoint")
    base = f"{PROG} endpoint"
    top = _parser(base, usage=f"{base} (show [--host=<H>] [--orchestrator=<O>] "
                              f"[--workload=<W>] [--endpoint=<E>] [--detailed] | "
                              f"<ENDPOINT_ID> profile (show | append|remove|set "
                              f"<PROFILES>...))")
    if not rest:
        raise _Usage(top, "expected show or an endpoint ID")

    def filters(p: argparse.ArgumentParser, endpoint: bool) -> None:
        p.add_argument("--host", metavar="HOSTNAME")
        p.add_argument("--orchestrator", metavar="ORCHESTRATOR_ID")
        p.add_argument("--workload", metavar="WORKLOAD_ID")
        if endpoint:
            p.add_argument("--endpoint", metavar="ENDPOINT_ID")

    head, args = rest[0], rest[1:]
    if head == "show":
        p = _parser(f"{base} show")
        filters(p, True)
        p.add_argument("--detailed", action="store_true")
        return "endpoint_show", vars(p.parse_args(args))
    if head.startswith("-"):
        raise _Usage(top, f"unrecognized argument {head}")
    if not args or args[0] != "profile":
        raise _Usage(top, f"expected 'profile' after the endpoint ID {head!r}")
    p = _parser(f"{base} {head} profile")
    p.add_argument("op", choices=("show", "append", "remove", "set"))
    p.add_argument("profiles", nargs="*", metavar="PROFILE")
    filters(p, False)
    ns = p.parse_intermixed_args(args[1:])
    common = {"endpoint_id": head, "host": ns.host, "orchestrator": ns.orchestrator,
              "workload": ns.workload}
    if ns.op == "show":
        if ns.profiles:
            raise _Usage(p, f"unrecognized argument {ns.profiles[0]}")
        return "endpoint_profile_show", common
    if ns.op != "set" and not ns.profiles:
        raise _Usage(p, f"profile {ns.op} needs at least one PROFILE")
    return "endpoint_profile_change", {"op": ns.op, "profiles": ns.profiles, **common}


def _hoist_globals(argv: List[str]) -> List[str]:
    """Move the global options (``-f FILE``, ``--config[=]FILE``, ``--json``,
    ``--debug``) to the front, wherever they were written."""
    front: List[str] = []
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a in ("--json", "--debug"):
            front.append(a)
        elif a in ("-f", "--config"):
            front += argv[i:i + 2]
            i += 1
        elif a.startswith("--config=") or (a.startswith("-f") and len(a) > 2):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def _dispatch(args: argparse.Namespace) -> Tuple[str, Dict[str, Any]]:
    if args.command == "pool":
        if args.op == "add":
            return "pool_add", {"cidrs": args.cidrs, "ipip": args.ipip,
                                "nat_outgoing": args.nat_outgoing}
        if args.op == "remove":
            return "pool_remove", {"cidrs": args.cidrs}
        return "pool_show", {"version": args.version}
    if args.command == "profile":
        return _profile_command(list(args.rest))
    if args.command == "endpoint":
        return _endpoint_command(list(args.rest))
    if args.command == "ipam":
        if args.op == "info":
            return "ipam_info", {"text": args.ip}
        if (args.ip is None) == (args.ip_opt is None):
            raise _Usage(argparse.ArgumentParser(prog=f"{PROG} ipam release"),
                         "give the address once: <IP> or --ip=<IP>")
        return "ipam_release", {"text": args.ip or args.ip_opt, "force": args.force}
    if args.command == "status":
        return "status", {}
    return "diags", {"output": args.output, "logs": args.log}


def _run(ctl: Ctl, name: str, kw: Dict[str, Any]) -> int:
    if name == "profile_show":
        return ctl.profile_show(kw["detailed"])
    if name == "profile_remove":
        return ctl.profile_remove(kw["name"], kw["no_check"])
    if name == "rule_update":
        return ctl.rule_update(kw["name"], sys.stdin.read())
    if name in ("rule_add", "rule_remove"):
        rule = parse_rule(kw["spec"]) if kw["spec"] is not None else None
        method = getattr(ctl, name)
        return method(kw["name"], kw["direction"], kw["position"], rule)
    if name == "endpoint_show":
        return ctl.endpoint_show(kw["host"], kw["orchestrator"], kw["workload"],
                                 kw["endpoint"], kw["detailed"])
    return getattr(ctl, name)(**kw)


def default_config_path() -> str:
    return os.environ.get("NETPLUGIN_CONFIG") or "plugin.cfg"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


_QUIET_LOGGERS = ("urllib3", "etcd", "docker", "consul")


def _setup_logging(debug: bool) -> Callable[[], None]:
    """Warnings of the libraries as ``netpluginctl: warning: ...`` lines on
    stderr; returns the function restoring the previous logging setup (main()
    is also called in-process, by the tests)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in _QUIET_LOGGERS})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # the datastore adapters turn their failures into one DatastoreError;
        # the HTTP libraries' own retry chatter would only add lines
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def restore() -> None:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)

    return restore


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            argv = _hoist_globals(argv)
            words = [a for i, a in enumerate(argv) if not a.startswith("-")
                     and (i == 0 or argv[i - 1] not in ("-f", "--config"))]
            if words and words[0] in ("profile", "endpoint") and \
                    ("-h" in argv or "--help" in argv):
                _command_help(words[0])
            args = parser.parse_args(argv)
            name, kw = _dispatch(args)
        except _Usage as exc:
            exc.parser.error(str(exc))     # prints the usage, exits 2
    except SystemExit as exc:              # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    restore_logging = _setup_logging(args.debug)
    store = None
    try:
        path = args.config or default_config_path()
        cfg = load_config(path)
        if cfg.backend != "calico":
            raise ConfigError(f"{path}: backend is {cfg.backend!r}; {PROG} manages the "
                              "calico backend's data only")
        store = open_datastore(cfg.datastore)
        ctl = Ctl(cfg, store, as_json=args.json)
        return _run(ctl, name, kw)
    except (PluginError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback for the operator
        if args.debug:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc} (run with --debug "
              "for a traceback)", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:
                pass
        restore_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
