"""The Calico HostAgent: once per host, in the agent process, one watch of the
datastore feeding the policy and route agents, the leak audit loop, restarts.

``CalicoBackend.host_agent()`` builds it (``CalicoHostAgent.of``) with its
parts injected:

* ``policy``: the ``PolicyAgent`` (backends/calico/agent.py), enforcing the
  profiles with nftables; runs in the calling thread;
* ``routes``: the ``RouteAgent`` (routes.py, cross-host routes), in both
  scopes (local scope: the same network on several hosts is one profile);
  None with an embedded datastore (no other host);
* ``audit``: the leak audit loop (audit.py ``AuditLoop``), beside the policy
  agent so isolation is enforced from the first moment;
* ``restart``: starts the loop restarting containers dockerd gave up on while
  this plugin could not serve them (netplugin/restarter.py).

Both agents depend on ``/calico/v1/host/`` (endpoints of every host, the
hosts' addresses): one watch of it feeds both, so each event is read once;
the profile watch feeds the policy agent, the IPAM affinity watch the route
agent.  A run ends when ``stop`` is set or the policy agent ends; the route
agent is stopped with it, so a restarted host agent never runs two of them.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional, Sequence

from netplugin.backend import HostAgent
from netplugin.datastore.base import Event, normalize_prefix, watching

log = logging.getLogger(__name__)


def fan_out(consumers: Sequence) -> Dict[str, Callable[[Event], None]]:
    """One watch callback per distinct prefix (``/a/b`` and ``/a/b/`` are the
    same) of the consumers' ``watch_prefixes``, calling each consumer that
    watches it, in order, with its own spelling of the prefix: ``{normalized
    prefix: callback(event)}``."""
    wanted: Dict[str, List] = {}
    for consumer in consumers:
        for prefix in consumer.watch_prefixes:
            wanted.setdefault(normalize_prefix(prefix), []).append((consumer, prefix))

    def callback(targets):
        def deliver(ev: Event) -> None:
            for consumer, prefix in targets:
                try:
                    consumer.on_event(prefix, ev)
                except Exception:  # one consumer's bug must not starve the other
                    log.exception("%s: cannot handle the event for %s",
                                  type(consumer).__name__, ev.key)
        return deliver

    return {prefix: callback(targets) for prefix, targets in wanted.items()}


class CalicoHostAgent(HostAgent):
    def __init__(self, datastore, *, policy, routes=None, audit=None,
                 restart: Optional[Callable[[threading.Event], None]] = None):
        self.datastore = datastore
        self.policy = policy
        self.routes = routes
        self.audit = audit
        self.restart = restart

    @classmethod
    def of(cls, backend, sandbox_groups: Optional[Callable[[], Dict[str, str]]] = None
           ) -> "CalicoHostAgent":
        """The host agent of a ``CalicoBackend`` (its datastore, host name,
        ``[calico]`` settings); ``sandbox_groups``: ``{host veth: sandbox}``
        from Join's table, for the policy agent."""
        from netplugin import restarter

        from backends.calico import agent as policy_agent
        from backends.calico.audit import AuditLoop
        from backends.calico.routes import RouteAgent

        calico = backend.config.calico
        routes = None
        if backend.config.datastore.type != "embedded":
            routes = RouteAgent(backend.datastore, backend.hostname, calico.ip, ip6=calico.ip6)
        return cls(
            backend.datastore,
            policy=policy_agent.PolicyAgent(
                backend.datastore, backend.hostname,
                barrier_dir=backend.config.driver_state_dir, sandbox_groups=sandbox_groups),
            routes=routes, audit=AuditLoop(backend),
            restart=lambda stop: restarter.start_thread(
                backend.docker_endpoint(), backend.config.driver_name, backend.datastore,
                stop))

    def run(self, stop: threading.Event) -> None:
        # Fail closed before anything may wait on the datastore.
        self.policy.fail_closed_start()
        if self.restart is not None:
            self.restart(stop)
        audit_thread = None
        if self.audit is not None:           # logs failures, never raises
            audit_thread = threading.Thread(target=self.audit.run, args=(stop,),
                                            name="audit-loop", daemon=True)
            audit_thread.start()
        consumers = [self.policy] + ([self.routes] if self.routes is not None else [])
        route_thread = None
        try:
            with watching(self.datastore, fan_out(consumers)):
                if self.routes is not None:
                    route_thread = threading.Thread(target=self.routes.run, args=(stop,),
                                                    kwargs={"watched": True},
                                                    name="route-agent", daemon=True)
                    route_thread.start()
                self.policy.run(stop, watched=True)
        finally:
            if self.routes is not None:
                self.routes.stop()
                if route_thread is not None:
                    route_thread.join(10)
            if audit_thread is not None and stop.is_set():
                audit_thread.join(10)
