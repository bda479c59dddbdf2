"""The Calico policy agent: keeps our nftables table in line with the
datastore's profiles and endpoints (a part of the Calico HostAgent).

The Calico host agent (backends/calico/host_agent.py) runs
``PolicyAgent(...).run(stop, watched=True)`` once per host (netplugin/agent.py
supervises it).  It

* follows ``/calico/v1/policy/profile/`` and ``/calico/v1/host/`` (endpoints
  of every host: local ones get chains, all of them fill the tag sets) and
  keeps a local copy of both prefixes: the host agent's one watch feeds
  ``on_event`` (``run(stop)`` alone watches them itself);
* recompiles (backends/calico/policy.py) and applies the table when something
  changed: the first change is applied after ``quiet`` seconds without a
  further change, at most ``debounce`` seconds after it arrived (a change run
  of its ``netplugin.reconcile.Reconciler``, from the local copy);
* re-lists both prefixes (full resync: the reconciler's full run) at start,
  every ``resync_interval`` seconds and after a failure (backoff from
  ``retry_interval`` doubling to ``MAX_RETRY``), and re-applies the table on
  every resync even when nothing changed (someone may have flushed the
  ruleset);
* polls the host's ``cali*`` veths every ``link_interval`` seconds to learn
  which of them lead into the same container (multi-network containers, see
  policy.py), recompiling when that changes; Join's sandbox table
  (``sandbox_groups``) says the same before the veth has moved;
* answers the barrier (backends/calico/barrier.py): told of a new endpoint
  (CreateEndpoint, Join) it reads it first-hand and applies at once, without
  the quiet period (a change run at once); Join is told when the endpoint's
  chain is in place.

Start-up: if our table is missing, a table with no endpoint chain is installed
at once (it drops everything on ``cali*`` interfaces: fail closed until the
datastore answers); an existing table is kept until the first successful list
replaces it.  On stop the table stays: containers keep their isolation while
the plugin restarts.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from netplugin.reconcile import Reconciler
from netplugin.datastore.base import DatastoreError, Event, KeyNotFound, watching

from backends.calico import barrier, model, ndp, policy
from backends.calico.model import Endpoint

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
    from netplugin import linux

    return {link.name: link.peer_netnsid for link in linux.list_links((policy.IFACE_PREFIX,))
            if link.peer_netnsid is not None and link.peer_netnsid >= 0}


def merge_groups(*maps: Dict[str, Any]) -> Dict[str, Any]:
    """Several ``{interface: container token}`` views -> one: interfaces that
    share a token in any view are one container (named by its first member;
    an interface alone in its container is left out)."""
    parent: Dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, groups in enumerate(maps):
        first: Dict[Any, str] = {}
        for name in sorted(groups):
            token = (i, groups[name])
            if token in first:
                a, b = root(first[token]), root(name)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[token] = name
                root(name)
    roots = {name: root(name) for name in parent}
    sizes: Dict[str, int] = {}
    for r in roots.values():
        sizes[r] = sizes.get(r, 0) + 1
    return {name: r for name, r in roots.items() if sizes[r] > 1}


class PolicyAgent:
    def __init__(self, datastore, hostname: str, *,
                 apply: Callable[[policy.Ruleset], None] = policy.apply,
                 table_exists: Callable[[], bool] = policy.table_exists,
                 link_groups: Optional[Callable[[], Dict[str, Any]]] = cali_link_groups,
                 quiet: float = 0.02, debounce: float = 0.1,
                 resync_interval: float = 30.0, link_interval: float = 1.0,
                 retry_interval: float = 1.0,
                 sandbox_groups: Optional[Callable[[], Dict[str, Any]]] = None,
                 barrier_dir: Optional[str] = None):
        self.datastore = datastore
        self.hostname = hostname
        self._apply = apply
        self._table_exists = table_exists
        self._link_groups = link_groups
        self.quiet, self.debounce = quiet, debounce
        self.resync_interval = resync_interval
        self.link_interval = link_interval
        self.retry_interval = retry_interval
        self._sandbox_groups = sandbox_groups
        self.barrier_dir = barrier_dir

        self._lock = threading.Lock()
        self._data = {p: _Prefix() for p in PREFIXES}
        self._groups: Dict[str, Any] = {}
        self._links: Dict[str, Any] = {}  # the last link poll
        self._groups_gen = 0              # counts every change of _groups
        self._applied_text: Optional[str] = None
        self._synced = False              # a full list succeeded at least once
        self.applied_count = 0            # for tests and logs
        self._applied_keys: frozenset = frozenset()   # endpoints of the applied table
        self._waiters: list = []          # barrier requests the next apply answers
        self._taken: list = []            # those the current run answers
        self._fail_closed_done = False
        self.reconciler = Reconciler(
            "policy", observe=self._observe, desired=self._desired, diff=self._diff,
            apply=self._apply_ruleset, interval=resync_interval, retry=retry_interval,
            max_retry=max(MAX_RETRY, retry_interval), quiet=quiet, debounce=debounce)

    # -- watch callbacks (datastore threads) -------------------------------
    #: What the agent follows (the host agent's watch feeds ``on_event``).
    watch_prefixes = PREFIXES

    def on_event(self, prefix: str, ev: Event) -> None:
        """A watch event under ``prefix`` (one of ``watch_prefixes``)."""
        self._on_event(prefix, ev)

    def _on_event(self, prefix: str, ev: Event) -> None:
        with self._lock:
            changed = self._data[prefix].event(ev)
        if changed:
            self.reconciler.notify()

    # -- main loop -------------------------------------------------------------
    def run(self, stop: threading.Event, watched: bool = False) -> None:
        """Until ``stop``.  ``watched``: the caller's watch feeds ``on_event``
        (started before this call); else the agent watches its prefixes."""
        self.fail_closed_start()
        if self.barrier_dir is not None:
            barrier.BarrierServer(self.barrier_dir, self.barrier).start(stop)
        with contextlib.ExitStack() as stack:
            if not watched:
                stack.enter_context(watching(
                    self.datastore, {p: (lambda ev, p=p: self._on_event(p, ev))
                                     for p in PREFIXES}))
            if self._link_groups is not None:
                threading.Thread(target=self._poll_links_every, args=(stop,),
                                 name="policy-links", daemon=True).start()
            self.reconciler.run(stop)

    def fail_closed_start(self) -> None:
        """Install a table without endpoint chains if ours is missing (once;
        the host agent calls it before opening its watch)."""
        if self._fail_closed_done:
            return
        self._fail_closed_done = True
        try:
            if not self._table_exists():
                self._apply(policy.compile_ruleset([], [], {}))
                log.info("installed an empty policy table (cali* traffic dropped "
                         "until the datastore is read)")
        except Exception as exc:
            log.error("cannot install the initial policy table: %s", exc)

    # -- the reconciler's steps -------------------------------------------------
    def _observe(self) -> Optional[str]:
        """The table we applied last; None on a full run (re-applied even when
        unchanged: someone may have flushed the ruleset)."""
        return None if self.reconciler.full else self._applied_text

    def _desired(self) -> policy.Ruleset:
        """The table the local copy asks for; a full run (or any run before the
        first successful list) re-lists both prefixes first."""
        if self.reconciler.full or not self._synced:
            self._resync()
            if self.reconciler.full and (self._link_groups is not None
                                         or self._sandbox_groups is not None):
                self._poll_links(notify=False)
        with self._lock:
            profiles = self._data[policy.PROFILE_ROOT].values()
            hosts = self._data[policy.HOST_ROOT].values()
            groups = dict(self._groups)
            self._taken, self._waiters = self._waiters, []
        try:
            ndp.sync(ndp.desired_entries(hosts, self.hostname))
        except Exception as exc:  # IPv6 neighbours must not stop the policy
            log.warning("cannot sync IPv6 proxy neighbours: %s", exc)
        try:
            return policy.compile_items(profiles, hosts, self.hostname, groups)
        except Exception:   # a compiler bug must not take the agent down
            log.exception("cannot compile the policy table; keeping the current one")
            self._answer(False)
            raise

    def _diff(self, ruleset: policy.Ruleset, applied: Optional[str]
              ) -> Optional[policy.Ruleset]:
        if ruleset.text == applied:
            self._set_applied(ruleset)
            self._answer(True)
            return None
        if ruleset.text != self._applied_text:
            for message in ruleset.warnings:
                log.warning("policy: %s", message)
        return ruleset

    def _apply_ruleset(self, ruleset: policy.Ruleset) -> None:
        started = time.monotonic()
        try:
            self._apply(ruleset)
        except Exception as exc:
            self._applied_text = None
            log.error("cannot apply the policy table: %s", exc)
            self._answer(False)
            raise
        if ruleset.text != self._applied_text:
            log.info("applied policy table: %d local endpoint(s), %d tag set(s) in %.0f ms",
                     len(ruleset.endpoints), len(ruleset.sets) // 2,
                     (time.monotonic() - started) * 1000)
        self._applied_text = ruleset.text
        self._set_applied(ruleset)
        self.applied_count += 1
        self._answer(True)

    def _set_applied(self, ruleset: policy.Ruleset) -> None:
        with self._lock:
            self._applied_keys = frozenset(ruleset.endpoints.values())

    def _answer(self, applied: bool) -> None:
        """The barrier requests this run took: answered when it applied,
        else kept for the next run."""
        taken, self._taken = self._taken, []
        if applied:
            for w in taken:
                w.set()
        elif taken:
            with self._lock:
                self._waiters[:0] = taken

    def _resync(self) -> None:
        """List both prefixes and merge; raises when the datastore failed."""
        with self._lock:
            gens = {p: self._data[p].gen for p in PREFIXES}
        try:
            listed = {p: self.datastore.list_prefix(p) for p in PREFIXES}
        except DatastoreError as exc:
            raise DatastoreError(f"resync failed: {exc}; keeping the current "
                                 f"rules") from None
        with self._lock:
            changed = False
            for p in PREFIXES:
                changed |= self._data[p].relist(listed[p], gens[p])
            if changed and self._synced:
                log.info("policy resync: the datastore differed from the local copy")
            self._synced = True

    def _poll_links_every(self, stop: threading.Event) -> None:
        while not stop.wait(self.link_interval):
            self._poll_links()

    def _current_groups(self, poll_links: bool = True) -> Optional[Dict[str, Any]]:
        """Links (polled, or as last polled) merged with the sandbox table."""
        try:
            if poll_links and self._link_groups is not None:
                self._links = self._link_groups()
            sandboxes = self._sandbox_groups() if self._sandbox_groups is not None else {}
        except Exception as exc:
            log.warning("cannot list cali* links or sandboxes: %s", exc)
            return None
        return merge_groups(self._links, sandboxes)

    def _refresh_groups(self, poll_links: bool = True) -> bool:
        """Recompute the container groups; True when they changed.  A result
        computed while another caller stored newer groups is computed again,
        so a slow link poll never puts back what a barrier replaced."""
        for _ in range(5):
            with self._lock:
                gen = self._groups_gen
            groups = self._current_groups(poll_links)
            if groups is None:
                return False
            with self._lock:
                if gen != self._groups_gen:
                    continue
                if groups == self._groups:
                    return False
                self._groups = groups
                self._groups_gen += 1
                return True
        return False

    def _poll_links(self, notify: bool = True) -> None:
        if self._refresh_groups() and notify:
            self.reconciler.notify(at_once=True)

    def _profile_items(self, key: str, value: str) -> list:
        """The datastore items of the profiles the endpoint record names that
        the local copy lacks (a profile it has is kept up to date by the watch)."""
        try:
            ids = Endpoint.from_json(key, value).profile_ids or ()
        except ValueError:
            return []                     # the compiler reports a corrupt record
        with self._lock:
            known = self._data[policy.PROFILE_ROOT].items
            missing = [pid for pid in ids if model.valid_id(pid) and not (
                model.profile_tags(pid) in known and model.profile_rules(pid) in known)]
        items: list = []
        for pid in missing:
            items.extend(self.datastore.list_prefix(model.profile_dir(pid) + "/"))
        return items

    def barrier(self, key: str, timeout: Optional[float]) -> bool:
        """Enforce the endpoint ``key`` of this host now: True once the applied
        table has its chain (with its container's current addresses), False
        after ``timeout`` or while the datastore was never read.  With
        ``timeout`` None: only start the apply, True at once."""
        if not key.startswith(policy.HOST_ROOT + "/" + self.hostname + "/"):
            return False
        try:
            item = self.datastore.get(key)
            self._on_event(policy.HOST_ROOT, Event("put", key, item.value, item.version))
            # Its profiles too: a watch that is still backing off after a
            # datastore outage may not have delivered a new network's tags.
            for part in self._profile_items(key, item.value):
                self._on_event(policy.PROFILE_ROOT,
                               Event("put", part.key, part.value, part.version))
        except KeyNotFound:
            return True                   # deleted meanwhile: nothing to enforce
        except DatastoreError as exc:     # the local copy may still have it
            log.warning("policy barrier: cannot read %s: %s", key, exc)
        regroup = self._refresh_groups(poll_links=False)
        done = threading.Event()
        with self._lock:
            if not self._synced:
                return False
            if (not regroup and self.reconciler.change_due() is None
                    and key in self._applied_keys):
                return True
            if timeout is not None:
                self._waiters.append(done)
        self.reconciler.notify(at_once=True)   # a change run now, no quiet period
        return True if timeout is None else done.wait(timeout)
