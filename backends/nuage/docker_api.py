"""What the Nuage backend asks Docker (over ``docker_endpoint``), safely.
Owns the Nuage backend's two questions to Docker, on top of netplugin.docker.

Two questions, both with a short per-call timeout and never a call that takes
the container's lock (``docker inspect <container>`` would wait for the very
``docker run`` whose Join we are serving):

* ``container_for_endpoint``: which container an endpoint belongs to, for the
  VM row (VRS entity = container: ID and name).  During Join the container is
  not attached yet, but ``GET /networks/<id>`` already lists the endpoint
  (key ``ep-<EndpointID>``) with the container's name, and the container list
  (a lock-free snapshot) maps that name to the ID.
* ``endpoint_ids``: every EndpointID Docker knows on this host's networks of
  our driver (the start-up audit).

Failures raise ``DockerUnavailable``; callers decide the fallback.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Set

from netplugin.docker import DockerClient, DockerUnavailable

__all__ = ["Container", "DockerApi", "DockerUnavailable"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Container:
    id: str
    name: str


class DockerApi:
    """The Nuage backend's two questions, over ``netplugin.docker.DockerClient``."""

    def __init__(self, endpoint: str, timeout: float = 3.0, factory=None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.docker = DockerClient(endpoint, timeout, factory=factory)

    def _call(self, what: str, fn, *args, **kwargs):
        return self.docker.call(what, lambda client: fn(client, *args, **kwargs))

    def close(self) -> None:
        self.docker.close()

    # ------------------------------------------------------------------
    def container_for_endpoint(self, network_id: str, endpoint_id: str) -> Optional[Container]:
        """The container owning ``endpoint_id`` on ``network_id``, or None if
        Docker does not list the endpoint.  Raises DockerUnavailable."""
        net = self._call(f"inspect network {network_id[:12]}",
                         lambda c: c.inspect_network(network_id))
        containers = (net or {}).get("Containers") or {}
        for key, ep in containers.items():
            if not isinstance(ep, dict) or ep.get("EndpointID") != endpoint_id:
                continue
            name = ep.get("Name") or ""
            if key and not key.startswith("ep-"):
                return Container(key, name)          # already attached (a sandbox)
            if not name:
                return None
            found = self._call(f"list container {name}", lambda c: c.containers(
                all=True, filters={"name": f"^/{name}$"}))
            for item in found or []:
                if f"/{name}" in (item.get("Names") or []):
                    return Container(item["Id"], name)
            return None
        return None

    def endpoint_ids(self, driver: str) -> Set[str]:
        """EndpointIDs of every endpoint (attached or not) Docker has on its
        networks of driver ``driver``.  Raises DockerUnavailable."""
        nets = self._call("list networks", lambda c: c.networks(filters={"driver": driver}))
        out: Set[str] = set()
        for net in nets or []:
            nid = net.get("Id")
            if not nid:
                continue
            full = self._call(f"inspect network {nid[:12]}", lambda c: c.inspect_network(nid))
            for ep in ((full or {}).get("Containers") or {}).values():
                if isinstance(ep, dict) and ep.get("EndpointID"):
                    out.add(ep["EndpointID"])
        return out

