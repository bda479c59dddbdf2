"""Cross-host routes without IPIP or VXLAN: the desired routes from the
datastore, their diff with the kernel's, and the Calico HostAgent's RouteAgent.

Every host publishes its address as Calico's ``/calico/v1/host/<h>/bird_ip``
(``[calico] ip``, auto-detected when absent).  ``RouteAgent`` runs in the
per-host agent process beside the policy agent (fed by the host agent's one
watch, backends/calico/host_agent.py) and keeps this host's main routing
table in line with the datastore:

* a block another host has affinity to (``/calico/ipam/v2/host/<h>/ipv4/block/
  <cidr-dash>``, Calico IPAM) is routed ``via <that host's bird_ip>``;
* every IPv4 address of another host's endpoints (``/calico/v1/host/<h>/
  workload/.../endpoint/<eid>``) that is not inside one of that host's own
  blocks gets a /32 ``via <that host's bird_ip>``: addresses from Docker's
  IPAM, and Calico IPAM addresses borrowed from a block of some other host;
* this host's own blocks are never routed (its endpoints have their
  ``/32 dev cali...`` routes, made by Join) and neither is an address one of
  this host's endpoints holds.

The next hop must be on a directly connected subnet (one L2 segment between
the hosts); the kernel resolves the outgoing interface.  Our routes carry the
private routing protocol number ``RTPROT_NETPLUGIN`` (``ip route show proto
78``): the agent only ever deletes or replaces routes with that protocol and
never overwrites somebody else's route for the same destination.

The agent lists both prefixes and reconciles (desired set vs. the routes with
our protocol; a ``netplugin.reconcile.Reconciler``) at start, after every
burst of watch events (``quiet`` seconds without a further one, at most
``debounce`` after the first), every ``resync_interval`` seconds and after a
failure (backoff from 0.5 s doubling to ``max_retry``).  On stop the routes
stay: cross-host traffic keeps flowing while the plugin restarts.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from netplugin.datastore.base import Event, watching
from netplugin.reconcile import Reconciler

from backends.calico import model

log = logging.getLogger(__name__)

#: Our routing protocol number (rtnetlink ``rtm_protocol``): "N" for netplugin.
RTPROT_NETPLUGIN = 0x4e
MAIN_TABLE = 254

HOST_ROOT = model.HOST_ROOT + "/"                 # /calico/v1/host/
AFFINITY_ROOT = model.AFFINITY_ROOT + "/"         # /calico/ipam/v2/host/

#: The only prefix lengths a route from the datastore may have: a Calico
#: block, or a host route (``Endpoint.host_routes``): a bad writer must not
#: install 0.0.0.0/1.
BLOCK_PREFIXLEN = model.BLOCK_PREFIXLEN

bird_ip_key = model.bird_ip_key
bird6_ip_key = model.bird6_ip_key


def bird_ip_host(key: str) -> Optional[str]:
    """The host name of a ``/calico/v1/host/<host>/bird_ip`` key, else None."""
    parsed = model.parse_bird_ip_key(key)
    return parsed[0] if parsed is not None and parsed[1] == 4 else None


def relevant_key(key: str) -> bool:
    """True for the keys the route table depends on."""
    return (model.parse_bird_ip_key(key) is not None or model.is_endpoint_key(key)
            or model.parse_affinity_key(key) is not None)


def _pairs(items: Iterable[Any]) -> Iterable[Tuple[str, str]]:
    for item in items:
        if isinstance(item, tuple):
            yield item[0], item[1]
        else:
            yield item.key, item.value


Net = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_state(host_items: Iterable[Any], affinity_items: Iterable[Any]
                ) -> Tuple[Dict[str, str], Dict[str, List[Net]], Dict[str, List[Net]]]:
    """``(next_hops, blocks, endpoint_nets)`` keyed by host name, from the items
    under ``/calico/v1/host/`` and ``/calico/ipam/v2/host/`` (``Item`` objects
    or ``(key, value)`` pairs).  ``next_hops[host]`` is its ``bird_ip``;
    ``next_hops[host + "/6"]`` its ``bird6_ip``.  Malformed entries, and
    prefixes that are neither a host route nor a Calico block, are skipped
    with a warning."""
    hops: Dict[str, str] = {}
    blocks: Dict[str, List[Net]] = {}
    endpoints: Dict[str, List[Net]] = {}
    for key, value in _pairs(host_items):
        bird = model.parse_bird_ip_key(key)
        if bird is not None and bird[1] == 4:
            try:
                hops[bird[0]] = str(ipaddress.IPv4Address((value or "").strip()))
            except ValueError:
                log.warning("ignoring %s: %r is not an IPv4 address", key, value)
            continue
        if bird is not None:
            try:
                addr = ipaddress.IPv6Address((value or "").strip())
                if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
                    raise ValueError
                hops[bird[0] + "/6"] = str(addr)
            except ValueError:
                log.warning("ignoring %s: %r is not a global IPv6 address", key, value)
            continue
        if not model.is_endpoint_key(key):
            continue
        try:
            ep = model.Endpoint.from_json(key, value)
            parsed: List[Net] = ep.host_routes()
        except (ValueError, TypeError) as exc:
            log.warning("ignoring endpoint %s: %s", key, exc)
            continue
        endpoints.setdefault(ep.host, []).extend(parsed)
    for key, _ in _pairs(affinity_items):
        affinity = model.parse_affinity_key(key)
        if affinity is None:
            continue
        host, version, name = affinity
        try:
            net = ipaddress.ip_network(name.replace("-", "/"))
            if net.version != version or net.prefixlen != BLOCK_PREFIXLEN[version]:
                raise ValueError
        except ValueError:
            log.warning("ignoring affinity key %s: not a /%d Calico block", key,
                        BLOCK_PREFIXLEN[version])
            continue
        blocks.setdefault(host, []).append(net)
    return hops, blocks, endpoints


def desired_routes(hostname: str, host_items: Iterable[Any], affinity_items: Iterable[Any],
                   own_ip: Optional[str] = None, own_ip6: Optional[str] = None
                   ) -> Dict[str, str]:
    """``{destination CIDR: next hop}`` this host should have (pure function):
    IPv4 destinations via the owner's ``bird_ip``, IPv6 ones via its
    ``bird6_ip``.  ``own_ip``/``own_ip6`` (this host's addresses) are never
    used as a next hop."""
    hops, blocks, endpoints = parse_state(host_items, affinity_items)
    own_blocks = set(blocks.get(hostname, ()))
    local_addrs = set(endpoints.get(hostname, ()))
    out: Dict[str, str] = {}
    owner: Dict[str, str] = {}

    def want(dst: Net, host: str, via: str) -> None:
        key = str(dst)
        if key in out and out[key] != via:
            log.warning("%s is claimed by hosts %s and %s; routing it via %s", key,
                        owner[key], host, out[key])
            return
        out.setdefault(key, via)
        owner.setdefault(key, host)

    for host in sorted(set(blocks) | set(endpoints)):
        if host == hostname:
            continue
        vias = {4: hops.get(host), 6: hops.get(host + "/6")}
        if vias[4] == own_ip:
            vias[4] = None
        if own_ip6 and vias[6] == own_ip6:
            vias[6] = None
        if vias[4] is None and vias[6] is None:
            log.debug("host %s has no bird_ip; not routing its addresses", host)
            continue
        host_blocks = sorted(set(blocks.get(host, ())), key=lambda n: (n.version, n))
        for block in host_blocks:
            if block in own_blocks or vias[block.version] is None:
                continue        # both claim it: our own block is never routed away
            want(block, host, vias[block.version])
        for net in sorted(set(endpoints.get(host, ())), key=lambda n: (n.version, n)):
            if net in local_addrs or vias[net.version] is None:
                continue        # one of our endpoints holds it: keep our dev cali route
            if any(net.version == b.version and net.subnet_of(b)
                   for b in host_blocks if b not in own_blocks):
                continue        # the block route covers it
            want(net, host, vias[net.version])
    return out


# --------------------------------------------------------------------------
# the kernel side


def _route_dst(msg) -> str:
    default = "::" if msg["family"] == socket.AF_INET6 else "0.0.0.0"
    return f"{msg.get_attr('RTA_DST') or default}/{msg['dst_len']}"


def _family(dst: str) -> int:
    return socket.AF_INET6 if ":" in dst else socket.AF_INET


def current_routes(ipr) -> Dict[str, str]:
    """Our routes (IPv4 and IPv6) in the main table: ``{destination CIDR: next hop}``."""
    out: Dict[str, str] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family):
            if msg["proto"] != RTPROT_NETPLUGIN or msg.get_attr("RTA_TABLE") not in (
                    None, MAIN_TABLE):
                continue
            out[_route_dst(msg)] = msg.get_attr("RTA_GATEWAY") or ""
    return out


def apply_routes(desired: Dict[str, str], ipr=None) -> Dict[str, List[str]]:
    """Make the routes with our protocol exactly ``desired`` (in the current
    netns).  Never touches a route of another protocol: a destination someone
    else already routes is skipped (``"skipped"``).  Returns what was done:
    ``{"added", "replaced", "deleted", "skipped", "failed"}`` (lists of CIDRs)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    own = ipr is None
    ipr = ipr or IPRoute()
    done: Dict[str, List[str]] = {k: [] for k in
                                  ("added", "replaced", "deleted", "skipped", "failed")}
    try:
        current = current_routes(ipr)
        for dst, via in sorted(current.items()):
            if dst in desired:
                continue
            try:
                ipr.route("del", dst=dst, gateway=via or None, proto=RTPROT_NETPLUGIN,
                          table=MAIN_TABLE, family=_family(dst))
                done["deleted"].append(dst)
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    log.warning("cannot delete route %s via %s: %s", dst, via, exc)
                    done["failed"].append(dst)
        for dst, via in sorted(desired.items()):
            if current.get(dst) == via:
                continue
            verb = "replace" if dst in current else "add"
            try:
                ipr.route(verb, dst=dst, gateway=via, proto=RTPROT_NETPLUGIN,
                          table=MAIN_TABLE, family=_family(dst))
                done["replaced" if verb == "replace" else "added"].append(dst)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    log.warning("not routing %s via %s: another route for it exists",
                                dst, via)
                    done["skipped"].append(dst)
                else:
                    log.warning("cannot %s route %s via %s: %s", verb, dst, via, exc)
                    done["failed"].append(dst)
    finally:
        if own:
            ipr.close()
    return done


def detect_host_ip(ipr=None) -> Optional[str]:
    """The IPv4 address of the interface holding the default route, else the
    first global IPv4 address of any interface; None if there is none."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        addrs = [(a["index"], a.get_attr("IFA_ADDRESS")) for a in
                 ipr.get_addr(family=socket.AF_INET) if a["scope"] == 0]
        for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
            if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                oif = route.get_attr("RTA_OIF")
                for index, addr in addrs:
                    if index == oif:
                        return addr
        return addrs[0][1] if addrs else None
    finally:
        if own:
            ipr.close()


def detect_host_ip6(ipr=None) -> Optional[str]:
    """A global IPv6 address of this host (the interface of the IPv6 default
    route first, else the interface holding the IPv4 address), else None."""
    from pyroute2 import IPRoute

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        addrs = []
        for a in ipr.get_addr(family=socket.AF_INET6):
            addr = a.get_attr("IFA_ADDRESS")
            if a["scope"] == 0 and addr and not ipaddress.IPv6Address(addr).is_link_local \
                    and addr != "::1":
                addrs.append((a["index"], addr))
        if not addrs:
            return None
        oifs = [r.get_attr("RTA_OIF") for r in ipr.get_routes(family=socket.AF_INET6,
                                                              table=MAIN_TABLE)
                if r["dst_len"] == 0 and r.get_attr("RTA_OIF")]
        oifs += [a["index"] for a in ipr.get_addr(family=socket.AF_INET) if a["scope"] == 0]
        for oif in oifs:
            for index, addr in addrs:
                if index == oif:
                    return addr
        return addrs[0][1]
    finally:
        if own:
            ipr.close()


# --------------------------------------------------------------------------
# the agent


class RouteAgent:
    """Publishes this host's ``bird_ip`` and keeps the cross-host routes."""

    def __init__(self, datastore, hostname: str, ip: str = "",
                 resync_interval: float = 30.0, quiet: float = 0.2,
                 max_retry: float = 10.0, ip6: Optional[str] = "",
                 debounce: float = 10.0):
        self.datastore = datastore
        self.hostname = hostname
        self.ip = ip
        #: "" = auto-detect at run(); None = no IPv6 next hop published.
        self.ip6 = ip6
        self.resync_interval = resync_interval
        self.quiet = quiet
        self.max_retry = max_retry
        self.syncs = 0
        self.last_done: Dict[str, List[str]] = {}
        self.reconciler = Reconciler(
            "routes", observe=lambda: None, desired=self._desired, diff=_Routes,
            apply=self._apply, interval=resync_interval, retry=min(0.5, max_retry),
            max_retry=max_retry, quiet=quiet, debounce=max(debounce, quiet))

    def stop(self) -> None:
        self.reconciler.stop()

    #: What the agent follows (the host agent's watch feeds ``on_event``).
    watch_prefixes = (HOST_ROOT, AFFINITY_ROOT)

    def on_event(self, prefix: str, ev: Event) -> None:
        """A watch event under ``prefix`` (one of ``watch_prefixes``)."""
        self._on_event(ev)

    def _on_event(self, ev: Event) -> None:
        if relevant_key(ev.key):
            self.reconciler.notify()

    # -- the reconciler's steps (observe: the kernel, read by apply_routes) ------
    def _desired(self) -> Dict[str, str]:
        """List both prefixes, (re)publish our bird_ip; the routes wanted."""
        host_items = self.datastore.list_prefix(HOST_ROOT)
        affinity_items = self.datastore.list_prefix(AFFINITY_ROOT)
        key = bird_ip_key(self.hostname)
        if not any(i.key == key and i.value == self.ip for i in host_items):
            self.datastore.put(key, self.ip)
            log.info("published %s = %s", key, self.ip)
        if self.ip6:
            key6 = bird6_ip_key(self.hostname)
            if not any(i.key == key6 and i.value == self.ip6 for i in host_items):
                self.datastore.put(key6, self.ip6)
                log.info("published %s = %s", key6, self.ip6)
        return desired_routes(self.hostname, host_items, affinity_items, self.ip,
                              self.ip6 or None)

    def _apply(self, routes: "_Routes") -> Dict[str, int]:
        done = apply_routes(routes.desired)
        self.syncs += 1
        self.last_done = done
        changed = {k: v for k, v in done.items() if v}
        if changed:
            log.info("routes: %s (%d wanted)", ", ".join(
                f"{k} {' '.join(v)}" for k, v in changed.items()), len(routes.desired))
        return {k: len(done[k]) for k in ("added", "replaced", "deleted")}   # repairs

    def sync(self) -> Dict[str, List[str]]:
        """One full reconcile: list, (re)publish our bird_ip, program routes."""
        self._apply(_Routes(self._desired()))
        return self.last_done

    def run(self, stop: threading.Event, watched: bool = False) -> None:
        """Until ``stop`` or ``self.stop()``.  ``watched``: the caller's watch
        feeds ``on_event``; else the agent watches its prefixes."""
        if not self.ip:
            self.ip = detect_host_ip() or ""
            if not self.ip:
                log.error("no IPv4 address to publish as bird_ip (set [calico] ip); "
                          "cross-host routes are off")
                return
            log.info("auto-detected this host's address %s (set [calico] ip to choose)",
                     self.ip)
        if self.ip6 == "":
            self.ip6 = detect_host_ip6() or None
            if self.ip6 is None:
                log.info("this host has no global IPv6 address (set [calico] ip6): "
                         "other hosts' IPv6 addresses are not routed to it")
        log.info("route agent for host %s (%s%s) starting", self.hostname, self.ip,
                 f", {self.ip6}" if self.ip6 else "")
        try:
            if watched:
                self.reconciler.run(stop)
            else:
                with watching(self.datastore, {HOST_ROOT: self._on_event,
                                               AFFINITY_ROOT: self._on_event}):
                    self.reconciler.run(stop)
        finally:
            log.info("route agent stopped (routes left in place)")


class _Routes:
    """The routes wanted: always applied (``apply_routes`` diffs them against
    the kernel's routes of our protocol, and deletes ours not wanted)."""

    def __init__(self, desired: Dict[str, str], _observed: Any = None):
        self.desired = desired

    def __bool__(self) -> bool:
        return True
