"""Cross-host routes for Calico networks, without IPIP or VXLAN.

Every host publishes its address as Calico's ``/calico/v1/host/<h>/bird_ip``
(``[calico] ip``, auto-detected when absent).  ``RouteAgent`` runs in the
per-host agent process beside the policy agent and keeps this host's main
routing table in line with the datastore:

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
our protocol) at start, after every burst of watch events, every
``resync_interval`` seconds and after a failure.  On stop the routes stay:
cross-host traffic keeps flowing while the plugin restarts.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import socket
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from netplugin.datastore.base import DatastoreError, Event, watching

from backends.calico import ipam, keys

log = logging.getLogger(__name__)

#: Our routing protocol number (rtnetlink ``rtm_protocol``): "N" for netplugin.
RTPROT_NETPLUGIN = 0x4e
MAIN_TABLE = 254

HOST_ROOT = keys.HOST_ROOT + "/"                 # /calico/v1/host/
AFFINITY_ROOT = ipam.HOST_ROOT + "/"             # /calico/ipam/v2/host/

_BIRD_IP_RE = re.compile(r"^/calico/v1/host/([^/]+)/bird_ip$")
_ENDPOINT_RE = re.compile(r"^/calico/v1/host/([^/]+)/workload/[^/]+/[^/]+/endpoint/[^/]+$")
_AFFINITY_RE = re.compile(r"^/calico/ipam/v2/host/([^/]+)/ipv4/block/([^/]+)$")


def bird_ip_key(host: str) -> str:
    """``/calico/v1/host/<host>/bird_ip``."""
    return f"{keys.HOST_ROOT}/{host}/bird_ip"


def bird_ip_host(key: str) -> Optional[str]:
    """The host name of a ``/calico/v1/host/<host>/bird_ip`` key, else None."""
    m = _BIRD_IP_RE.match(key)
    return m.group(1) if m else None


def relevant_key(key: str) -> bool:
    """True for the keys the route table depends on."""
    return bool(_BIRD_IP_RE.match(key) or _ENDPOINT_RE.match(key) or _AFFINITY_RE.match(key))


def _pairs(items: Iterable[Any]) -> Iterable[Tuple[str, str]]:
    for item in items:
        if isinstance(item, tuple):
            yield item[0], item[1]
        else:
            yield item.key, item.value


def parse_state(host_items: Iterable[Any], affinity_items: Iterable[Any]
                ) -> Tuple[Dict[str, str], Dict[str, List[ipaddress.IPv4Network]],
                           Dict[str, List[ipaddress.IPv4Network]]]:
    """``(bird_ips, blocks, endpoint_nets)`` keyed by host name, from the items
    under ``/calico/v1/host/`` and ``/calico/ipam/v2/host/`` (``Item`` objects
    or ``(key, value)`` pairs).  Malformed entries are skipped with a warning;
    IPv6 is left out (``bird_ip`` is IPv4)."""
    bird_ips: Dict[str, str] = {}
    blocks: Dict[str, List[ipaddress.IPv4Network]] = {}
    endpoints: Dict[str, List[ipaddress.IPv4Network]] = {}
    for key, value in _pairs(host_items):
        m = _BIRD_IP_RE.match(key)
        if m:
            try:
                bird_ips[m.group(1)] = str(ipaddress.IPv4Address((value or "").strip()))
            except ValueError:
                log.warning("ignoring %s: %r is not an IPv4 address", key, value)
            continue
        m = _ENDPOINT_RE.match(key)
        if not m:
            continue
        try:
            ep = json.loads(value)
            nets = ep.get("ipv4_nets") or [] if isinstance(ep, dict) else None
            if not isinstance(nets, list):
                raise ValueError("ipv4_nets is not a list")
            parsed = [ipaddress.IPv4Network(n, strict=False) for n in nets]
        except (ValueError, TypeError) as exc:
            log.warning("ignoring endpoint %s: %s", key, exc)
            continue
        endpoints.setdefault(m.group(1), []).extend(parsed)
    for key, _ in _pairs(affinity_items):
        m = _AFFINITY_RE.match(key)
        if not m:
            continue
        try:
            net = ipaddress.IPv4Network(m.group(2).replace("-", "/"))
        except ValueError:
            log.warning("ignoring malformed affinity key %s", key)
            continue
        blocks.setdefault(m.group(1), []).append(net)
    return bird_ips, blocks, endpoints


def desired_routes(hostname: str, host_items: Iterable[Any], affinity_items: Iterable[Any],
                   own_ip: Optional[str] = None) -> Dict[str, str]:
    """``{destination CIDR: next hop}`` this host should have (pure function).

    ``own_ip`` (this host's address) is never used as a next hop."""
    bird_ips, blocks, endpoints = parse_state(host_items, affinity_items)
    own_blocks = set(blocks.get(hostname, ()))
    local_addrs = set(endpoints.get(hostname, ()))
    out: Dict[str, str] = {}
    owner: Dict[str, str] = {}

    def want(dst: ipaddress.IPv4Network, host: str, via: str) -> None:
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
        via = bird_ips.get(host)
        if via is None or via == own_ip:
            if via is None:
                log.debug("host %s has no bird_ip; not routing its addresses", host)
            continue
        host_blocks = sorted(set(blocks.get(host, ())))
        for block in host_blocks:
            if block in own_blocks:
                continue        # both claim it: our own block is never routed away
            want(block, host, via)
        for net in sorted(set(endpoints.get(host, ()))):
            if net in local_addrs:
                continue        # one of our endpoints holds it: keep our dev cali route
            if any(net.subnet_of(b) for b in host_blocks if b not in own_blocks):
                continue        # the block route covers it
            want(net, host, via)
    return out


# --------------------------------------------------------------------------
# the kernel side


def _route_dst(msg) -> str:
    return f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}"


def current_routes(ipr) -> Dict[str, str]:
    """Our routes in the main table: ``{destination CIDR: next hop}``."""
    out: Dict[str, str] = {}
    for msg in ipr.get_routes(family=socket.AF_INET):
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
                          table=MAIN_TABLE)
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
                          table=MAIN_TABLE)
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


# --------------------------------------------------------------------------
# the agent


class RouteAgent:
    """Publishes this host's ``bird_ip`` and keeps the cross-host routes."""

    def __init__(self, datastore, hostname: str, ip: str = "",
                 resync_interval: float = 30.0, quiet: float = 0.2,
                 max_retry: float = 10.0):
        self.datastore = datastore
        self.hostname = hostname
        self.ip = ip
        self.resync_interval = resync_interval
        self.quiet = quiet
        self.max_retry = max_retry
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.syncs = 0

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def _on_event(self, ev: Event) -> None:
        if relevant_key(ev.key):
            self._wake.set()

    def _stopping(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._halt.is_set()

    def _sleep(self, stop: threading.Event, seconds: float) -> bool:
        """Wait up to ``seconds`` for a watch event; True if woken early."""
        waited = 0.0
        while waited < seconds and not self._stopping(stop):
            step = min(1.0, seconds - waited)
            if self._wake.wait(step):
                return True
            waited += step
        return False

    def sync(self) -> Dict[str, List[str]]:
        """One full reconcile: list, (re)publish our bird_ip, program routes."""
        host_items = self.datastore.list_prefix(HOST_ROOT)
        affinity_items = self.datastore.list_prefix(AFFINITY_ROOT)
        key = bird_ip_key(self.hostname)
        if not any(i.key == key and i.value == self.ip for i in host_items):
            self.datastore.put(key, self.ip)
            log.info("published %s = %s", key, self.ip)
        desired = desired_routes(self.hostname, host_items, affinity_items, self.ip)
        done = apply_routes(desired)
        self.syncs += 1
        changed = {k: v for k, v in done.items() if v}
        if changed:
            log.info("routes: %s (%d wanted)", ", ".join(
                f"{k} {' '.join(v)}" for k, v in changed.items()), len(desired))
        return done

    def run(self, stop: threading.Event) -> None:
        if not self.ip:
            self.ip = detect_host_ip() or ""
            if not self.ip:
                log.error("no IPv4 address to publish as bird_ip (set [calico] ip); "
                          "cross-host routes are off")
                return
            log.info("auto-detected this host's address %s (set [calico] ip to choose)",
                     self.ip)
        log.info("route agent for host %s (%s) starting", self.hostname, self.ip)
        try:
            with watching(self.datastore, {HOST_ROOT: self._on_event,
                                           AFFINITY_ROOT: self._on_event}):
                self._loop(stop)
        finally:
            log.info("route agent stopped (routes left in place)")

    def _loop(self, stop: threading.Event) -> None:
        """Reconcile now, after every burst of events, every
        ``resync_interval`` and (with back-off) after a failure."""
        retry = 0.5
        while not self._stopping(stop):
            self._wake.clear()
            try:
                self.sync()
                retry = 0.5
                woken = self._sleep(stop, self.resync_interval)
            except (DatastoreError, OSError) as exc:
                log.warning("route sync failed (%s); retrying in %.1f s", exc, retry)
                woken = self._sleep(stop, retry)
                retry = min(retry * 2, self.max_retry)
            except Exception:
                log.exception("route sync crashed; retrying in %.1f s", retry)
                woken = self._sleep(stop, retry)
                retry = min(retry * 2, self.max_retry)
            if woken and not self._stopping(stop):
                # let a burst of events settle (one reconcile for many)
                for _ in range(50):     # at most ~50 quiet periods
                    if not self._wake.is_set() or self._stopping(stop):
                        break
                    self._wake.clear()
                    (stop if stop.is_set() else self._halt).wait(self.quiet)
