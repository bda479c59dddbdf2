"""The Calico per-host agent: keeps our nftables table in line with the datastore.

``CalicoBackend.run_agent`` runs ``PolicyAgent(...).run(stop)`` once per host
(netplugin/agent.py supervises it).  It

* watches ``/calico/v1/policy/profile/`` and ``/calico/v1/host/`` (endpoints
  of every host: local ones get chains, all of them fill the tag sets) and
  keeps a local copy of both prefixes;
* recompiles (backends/calico/policy.py) and applies the table when something
  changed: the first change is applied after ``quiet`` seconds without a
  further change, at most ``debounce`` seconds after it arrived;
* re-lists both prefixes (full resync) at start, every ``resync_interval``
  seconds and after a failure, and re-applies the table on every resync even
  when nothing changed (someone may have flushed the ruleset);
* polls the host's ``cali*`` veths every ``link_interval`` seconds to learn
  which of them lead into the same container (multi-network containers, see
  policy.py), recompiling when that changes.

Start-up: if our table is missing, a table with no endpoint chain is installed
at once (it drops everything on ``cali*`` interfaces: fail closed until the
datastore answers); an existing table is kept until the first successful list
replaces it.  On stop the table stays: containers keep their isolation while
the plugin restarts.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from netplugin.datastore.base import DatastoreError, Event, watching

from backends.calico import ndp, policy

log = logging.getLogger(__name__)

PREFIXES = (policy.PROFILE_ROOT, policy.HOST_ROOT)
MAX_RETRY = 10.0      # seconds between two resync attempts while the store is down


class _Prefix:
    """Local copy of one datastore prefix, fed by watch events and re-lists.

    Events and lists may interleave: a list is authoritative for every key
    not touched by an event delivered while it ran (``gen`` counts events);
    for a key an event touched meanwhile, the newer version wins.  Within
    the event stream an older version never replaces a newer one.  (A list
    winning outright also recovers from a store whose versions went back.)"""

    def __init__(self):
        self.items: Dict[str, Tuple[str, int]] = {}
        self.tombstones: Dict[str, int] = {}     # key -> version of its delete
        self.touched: Dict[str, int] = {}        # key -> gen of its last event
        self.gen = 0

    def event(self, ev: Event) -> bool:
        self.gen += 1
        cur = self.items.get(ev.key)
        if ev.action == "put":
            if cur is not None and cur[1] > ev.version:
                return False
            if self.tombstones.get(ev.key, -1) > ev.version:
                return False
            self.tombstones.pop(ev.key, None)
            self.touched[ev.key] = self.gen
            changed = cur is None or cur[0] != ev.value
            self.items[ev.key] = (ev.value or "", ev.version)
            return changed
        if cur is not None and cur[1] > ev.version:
            return False
        self.tombstones[ev.key] = max(ev.version, self.tombstones.get(ev.key, -1))
        self.touched[ev.key] = self.gen
        return self.items.pop(ev.key, None) is not None

    def relist(self, listed, since_gen: int) -> bool:
        """Merge a list started when ``gen`` was ``since_gen``."""
        def concurrent(key):
            return self.touched.get(key, 0) > since_gen

        new: Dict[str, Tuple[str, int]] = {}
        for item in listed:
            cur = self.items.get(item.key)
            if concurrent(item.key):
                if cur is not None and cur[1] > item.version:
                    new[item.key] = cur                   # put after the list's read
                    continue
                if cur is None and self.tombstones.get(item.key, -1) > item.version:
                    continue                              # deleted after the list's read
            new[item.key] = (item.value, item.version)
        for key, cur in self.items.items():
            if key not in new and concurrent(key):
                new[key] = cur                            # put while the list ran
        self.tombstones = {k: v for k, v in self.tombstones.items() if concurrent(k)}
        self.touched = {k: g for k, g in self.touched.items() if g > since_gen}
        changed = {k: v[0] for k, v in new.items()} != {k: v[0] for k, v in self.items.items()}
        self.items = new
        return changed

    def values(self) -> Dict[str, str]:
        return {k: v[0] for k, v in self.items.items()}


def cali_link_groups() -> Dict[str, Any]:
    """``{host veth name: peer netns id}`` for this netns' ``cali*`` veths whose
    other end is in another network namespace (i.e. inside a container)."""
    from pyroute2 import IPRoute

    out: Dict[str, Any] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get("IFLA_IFNAME") or ""
            if not name.startswith(policy.IFACE_PREFIX):
                continue
            nsid = msg.get("IFLA_LINK_NETNSID")
            if nsid is not None and nsid >= 0:
                out[name] = nsid
    return out


class PolicyAgent:
    def __init__(self, datastore, hostname: str, *,
                 apply: Callable[[policy.Ruleset], None] = policy.apply,
                 table_exists: Callable[[], bool] = policy.table_exists,
                 link_groups: Optional[Callable[[], Dict[str, Any]]] = cali_link_groups,
                 quiet: float = 0.02, debounce: float = 0.1,
                 resync_interval: float = 30.0, link_interval: float = 1.0,
                 retry_interval: float = 1.0):
        self.datastore = datastore
        self.hostname = hostname
        self._apply = apply
        self._table_exists = table_exists
        self._link_groups = link_groups
        self.quiet, self.debounce = quiet, debounce
        self.resync_interval = resync_interval
        self.link_interval = link_interval
        self.retry_interval = retry_interval

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._data = {p: _Prefix() for p in PREFIXES}
        self._dirty_since: Optional[float] = None
        self._last_event = 0.0
        self._groups: Dict[str, Any] = {}
        self._applied_text: Optional[str] = None
        self._synced = False              # a full list succeeded at least once
        self.applied_count = 0            # for tests and logs

    # -- watch callbacks (datastore threads) -------------------------------
    def _on_event(self, prefix: str, ev: Event) -> None:
        with self._wake:
            if self._data[prefix].event(ev):
                now = time.monotonic()
                if self._dirty_since is None:
                    self._dirty_since = now
                self._last_event = now
                self._wake.notify_all()

    # -- main loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._fail_closed_start()
        with watching(self.datastore, {p: (lambda ev, p=p: self._on_event(p, ev))
                                       for p in PREFIXES}):
            stopper = threading.Thread(target=self._wake_on_stop, args=(stop,),
                                       name="policy-agent-stop", daemon=True)
            stopper.start()
            self._loop(stop)

    def _wake_on_stop(self, stop: threading.Event) -> None:
        stop.wait()
        with self._wake:
            self._wake.notify_all()

    def _fail_closed_start(self) -> None:
        try:
            if not self._table_exists():
                self._apply(policy.compile_ruleset([], [], {}))
                log.info("installed an empty policy table (cali* traffic dropped "
                         "until the datastore is read)")
        except Exception as exc:
            log.error("cannot install the initial policy table: %s", exc)

    def _loop(self, stop: threading.Event) -> None:
        next_resync = 0.0                 # now
        next_links = 0.0
        force = False
        failures = 0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_resync:
                if self._resync():
                    failures = 0
                    next_resync = now + self.resync_interval
                    force = True          # re-apply even if unchanged
                else:
                    failures += 1
                    next_resync = now + min(self.retry_interval * 2 ** (failures - 1),
                                            MAX_RETRY)
            if self._link_groups is not None and now >= next_links:
                next_links = now + self.link_interval
                self._poll_links()
            with self._wake:
                now = time.monotonic()
                if not (self._synced and (force or self._ready(now))):
                    wake_at = next_resync
                    if self._link_groups is not None:
                        wake_at = min(wake_at, next_links)
                    if self._synced and self._dirty_since is not None:
                        wake_at = min(wake_at, self._due())
                    if wake_at > now and not stop.is_set():
                        self._wake.wait(wake_at - now)
                    continue
                self._dirty_since = None
                profiles = self._data[policy.PROFILE_ROOT].values()
                hosts = self._data[policy.HOST_ROOT].values()
                groups = dict(self._groups)
            forced, force = force, False
            if not self._recompute(profiles, hosts, groups, forced):
                # retry soon with a full resync (and a forced apply)
                next_resync = min(next_resync, time.monotonic() + self.retry_interval)

    def _due(self) -> float:
        assert self._dirty_since is not None
        return min(self._last_event + self.quiet, self._dirty_since + self.debounce)

    def _ready(self, now: float) -> bool:
        return self._dirty_since is not None and now >= self._due()

    def _resync(self) -> bool:
        """List both prefixes and merge; False when the datastore failed."""
        with self._lock:
            gens = {p: self._data[p].gen for p in PREFIXES}
        try:
            listed = {p: self.datastore.list_prefix(p) for p in PREFIXES}
        except DatastoreError as exc:
            log.warning("policy resync failed: %s; keeping the current rules", exc)
            return False
        with self._wake:
            changed = False
            for p in PREFIXES:
                changed |= self._data[p].relist(listed[p], gens[p])
            if changed and self._synced:
                log.info("policy resync: the datastore differed from the local copy")
            self._synced = True
        return True

    def _poll_links(self) -> None:
        try:
            groups = self._link_groups()
        except Exception as exc:
            log.warning("cannot list cali* links: %s", exc)
            return
        with self._wake:
            if groups != self._groups:
                self._groups = groups
                if self._dirty_since is None:
                    self._dirty_since = time.monotonic()
                self._last_event = 0.0

    def _recompute(self, profiles, hosts, groups, force: bool) -> bool:
        """Compile and apply (unless unchanged and not ``force``); False on failure."""
        started = time.monotonic()
        try:
            ndp.sync(ndp.desired_entries(hosts, self.hostname))
        except Exception as exc:  # IPv6 neighbours must not stop the policy
            log.warning("cannot sync IPv6 proxy neighbours: %s", exc)
        try:
            ruleset = policy.compile_items(profiles, hosts, self.hostname, groups)
        except Exception:   # a compiler bug must not take the agent down
            log.exception("cannot compile the policy table; keeping the current one")
            return False
        if ruleset.text == self._applied_text and not force:
            return True
        if ruleset.text != self._applied_text:
            for message in ruleset.warnings:
                log.warning("policy: %s", message)
        try:
            self._apply(ruleset)
        except Exception as exc:
            self._applied_text = None
            log.error("cannot apply the policy table: %s", exc)
            return False
        if ruleset.text != self._applied_text:
            log.info("applied policy table: %d local endpoint(s), %d tag set(s) in %.0f ms",
                     len(ruleset.endpoints), len(ruleset.sets) // 2,
                     (time.monotonic() - started) * 1000)
        self._applied_text = ruleset.text
        self.applied_count += 1
        return True
