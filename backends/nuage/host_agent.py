"""The Nuage HostAgent: once per host, in the agent process, re-asserts the
vPorts of joined endpoints on every VRS (re)connection and runs the audit loop.

Built by ``NuageBackend.host_agent()`` with what it needs injected: the
backend's endpoint operations (``reassert``, ``remove_orphans``, the
version-checked removal of stale endpoints, all under the host-wide endpoint
locks), the Docker API and the ``[nuage]`` audit settings.  The workers
serving Docker never audit nor re-assert: only the instance whose host agent
runs reacts to VRS connections.

The audit is a ``netplugin.reconcile.Reconciler``: at start, every
``audit_interval`` seconds, with backoff while Docker cannot be asked.  An
endpoint is removed only when two looks at least ``audit_grace`` seconds
apart agree that Docker does not know it and its record did not change in
between: a momentarily empty answer from Docker removes nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional, Set, Tuple

from netplugin.backend import HostAgent
from netplugin.errors import PluginError
from netplugin.reconcile import Reconciler

from backends.nuage.docker_api import DockerApi
from backends.nuage.vport import EndpointRecord
from backends.nuage.vrs import VrsUnavailable

log = logging.getLogger(__name__)

Items = Dict[str, Tuple[EndpointRecord, int]]


class NuageHostAgent(HostAgent):
    """``endpoints``: the ``NuageBackend`` whose endpoint operations it runs."""

    def __init__(self, endpoints: Any, docker: DockerApi, *, driver: str,
                 audit_interval: float, audit_grace: float):
        self.endpoints = endpoints
        self.docker = docker
        self.driver = driver
        self.grace = audit_grace
        self._first_look: Optional[Tuple[float, Items]] = None
        self._audit_cycles = 0
        self.reconciler = Reconciler(
            "nuage audit", observe=self._audit_observe,
            desired=lambda: self.docker.endpoint_ids(self.driver),
            diff=self._audit_diff, apply=self._audit_apply, interval=audit_interval,
            retry=min(1.0, audit_interval),
            max_retry=max(min(30.0, audit_interval), min(1.0, audit_interval)))

    def run(self, stop: threading.Event) -> None:
        """React to VRS (re)connections and run the audit loop until ``stop``."""
        ep = self.endpoints
        ep._started_at = time.time()     # endpoints newer than this are not judged
        ep.on_vrs_connect = self.on_vrs_connect
        try:
            try:
                ep._vrs()
            except VrsUnavailable as exc:
                log.error("%s (vPorts are re-asserted when it is reachable)", exc)
            self.reconciler.run(stop)
        finally:
            ep.on_vrs_connect = None

    # -- VRS (re)connections ------------------------------------------------------
    def on_vrs_connect(self, n: int) -> None:
        """Every time the OVSDB replica is (re)loaded: re-assert the rows of
        joined endpoints, remove rows this plugin owns without one."""
        log.info("VRS connection #%d: re-asserting the vPorts of joined endpoints", n)
        try:
            self.endpoints.reassert()
            self.endpoints.remove_orphans()
        except PluginError as exc:
            log.warning("after VRS connection #%d: %s", n, exc)

    # -- the audit loop's steps ---------------------------------------------------
    def _audit_observe(self) -> Items:
        return self.endpoints._endpoint_items()

    def _audit_diff(self, known: Set[str], items: Items) -> Optional["_AuditCycle"]:
        ep = self.endpoints
        now = time.monotonic()
        stale = ep._stale(items, known, time.time())
        first = self._first_look
        if first is not None and now - first[0] < self.grace:
            self.reconciler.recheck_in(first[0] + self.grace - now)
            return None
        cycle = _AuditCycle(ep._agree(first[1], stale) if first is not None else {})
        self._first_look = None
        if stale and first is None:
            self._first_look = (now, stale)
            self.reconciler.recheck_in(self.grace)
            log.info("audit: Docker does not list %d endpoint(s) of this host; checking "
                     "again in %.1f s", len(stale), self.grace)
            return None
        if stale and not cycle.stale:
            self.reconciler.recheck_in(0.0)      # a new candidate: start its first look
        return cycle

    def _audit_apply(self, cycle: "_AuditCycle") -> None:
        pending = self.endpoints._remove_stale(cycle.stale)
        orphans = self.endpoints.remove_orphans()
        self._audit_cycles += 1
        if cycle.stale or orphans or self._audit_cycles == 1:
            log.info("audit done: %d stale endpoint(s) removed%s, %d orphan vPort(s) removed",
                     len(cycle.stale), f" ({len(pending)} waiting for VRS)" if pending else "",
                     len(orphans))


class _AuditCycle:
    """One completed audit cycle of the agent (always applied: orphans too)."""

    def __init__(self, stale: Items):
        self.stale = stale

    def __bool__(self) -> bool:
        return True
