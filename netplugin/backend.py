"""Backend roles and registry: the NetworkDriver, IpamDriver and HostAgent
interfaces, the Backend class that composes them, and the backends by name.

NetworkDriver and IpamDriver serve Docker per request, in any worker;
HostAgent runs once per host, in the agent process (``netplugin.agent``).
A backend's drivers receive validated request objects from
``netplugin.protocol`` and return response objects (or None for ``{}``).
They raise ``PluginError`` subclasses with user-facing messages; anything
else is reported to Docker as an internal error.  The front-end knows no
backend by name: ``load_backend`` imports ``backends.<name>.driver``, whose
import registers the class.
"""
from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Tuple, Type

from netplugin import protocol as p
from netplugin.errors import NotSupported

if TYPE_CHECKING:  # pragma: no cover
    from netplugin.config import Config
    from netplugin.datastore import Datastore

_REGISTRY: Dict[str, Type["Backend"]] = {}


def register(name: str):
    """Class decorator: ``@register("calico")``."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def load_backend(name: str) -> Type["Backend"]:
    if name not in _REGISTRY:
        importlib.import_module(f"backends.{name}.driver")   # registers the class
    return _REGISTRY[name]


class NetworkDriver:
    """The NetworkDriver calls.  Served per request, by any worker process:
    keep nothing between calls but what the datastore (or the host) holds.
    Every call not overridden is a no-op or 'not supported'."""

    name = "abstract"

    def create_network(self, req: p.CreateNetworkRequest) -> None:
        raise NotSupported(f"{self.name}: CreateNetwork is not implemented")

    def delete_network(self, req: p.NetworkRequest) -> None:
        raise NotSupported(f"{self.name}: DeleteNetwork is not implemented")

    def gw_alloc_check(self, req: p.GwAllocCheckRequest) -> p.GwAllocCheckResponse:
        """Docker >= 28: whether a network with these options needs no gateway
        address (default: it does)."""
        return p.GwAllocCheckResponse()

    def allocate_network(self, req: p.AllocateNetworkRequest) -> Optional[dict]:
        """Swarm-mode network allocation; ``{}`` means nothing to add."""
        return None

    def free_network(self, req: p.NetworkRequest) -> None:
        return None

    def create_endpoint(self, req: p.CreateEndpointRequest) -> Optional[p.CreateEndpointResponse]:
        raise NotSupported(f"{self.name}: CreateEndpoint is not implemented")

    def endpoint_oper_info(self, req: p.EndpointRequest) -> dict:
        return {}

    def delete_endpoint(self, req: p.EndpointRequest) -> None:
        raise NotSupported(f"{self.name}: DeleteEndpoint is not implemented")

    def join(self, req: p.JoinRequest) -> p.JoinResponse:
        raise NotSupported(f"{self.name}: Join is not implemented")

    def leave(self, req: p.EndpointRequest) -> None:
        raise NotSupported(f"{self.name}: Leave is not implemented")

    def discover_new(self, req: p.DiscoveryRequest) -> None:
        return None

    def discover_delete(self, req: p.DiscoveryRequest) -> None:
        return None

    def program_external_connectivity(self, req: p.ProgramExternalConnectivityRequest) -> None:
        return None

    def revoke_external_connectivity(self, req: p.EndpointRequest) -> None:
        return None


class IpamDriver:
    """The IpamDriver calls (``--ipam-driver``).  Served per request, by any
    worker process, like ``NetworkDriver``."""

    name = "abstract"

    def _no_ipam(self):
        raise NotSupported(f"the {self.name} backend does not offer an IPAM driver")

    def ipam_capabilities(self) -> p.IpamCapabilities:
        return p.IpamCapabilities()

    def get_default_address_spaces(self) -> p.AddressSpaces:
        self._no_ipam()

    def request_pool(self, req: p.RequestPoolRequest) -> p.RequestPoolResponse:
        self._no_ipam()

    def release_pool(self, req: p.ReleasePoolRequest) -> None:
        self._no_ipam()

    def request_address(self, req: p.RequestAddressRequest) -> p.RequestAddressResponse:
        self._no_ipam()

    def release_address(self, req: p.ReleaseAddressRequest) -> None:
        self._no_ipam()


class HostAgent:
    """Once per host: keep the host in line with the datastore (watches,
    route/policy sync, audits, re-assertion).  Run by the agent process
    (``netplugin.agent``), never by a worker serving Docker."""

    def run(self, stop: "threading.Event") -> None:
        """Work until ``stop`` is set.  An exception ends the run; the agent
        process then builds the backend anew and runs a new host agent."""
        raise NotImplementedError


class Backend:
    """One backend: its configuration and datastore, the lifecycle and
    operator parts (health, metrics, one-shot audit), and the roles it
    provides.

    The roles: ``network_driver`` (always), ``ipam_driver`` (None unless
    the backend is an ``IpamDriver`` and ``implements_ipam``) and
    ``host_agent()`` (None unless overridden).  A backend class provides a
    driver role by inheriting its interface (the default accessors return
    the backend itself), or overrides the accessor to hand out another
    object.  ``implements_ipam`` and ``has_agent`` are derived from what the
    class provides (the launcher reads them on the class)."""

    name = "abstract"
    #: True when the backend provides the IpamDriver role (set for each
    #: subclass from whether it is an ``IpamDriver``).
    implements_ipam = False
    #: True when ``host_agent()`` gives a per-host agent: the launcher then
    #: runs it once per host in its own supervised process, whatever the
    #: number of workers serving Docker (set for each subclass).
    has_agent = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "implements_ipam" not in cls.__dict__:
            cls.implements_ipam = issubclass(cls, IpamDriver)
        if "has_agent" not in cls.__dict__:
            cls.has_agent = cls.host_agent is not Backend.host_agent

    def __init__(self, config: "Config", datastore: "Datastore"):
        self.config = config
        self.datastore = datastore

    # the roles ------------------------------------------------------------
    @property
    def network_driver(self) -> NetworkDriver:
        """The NetworkDriver role (per request, any worker)."""
        if not isinstance(self, NetworkDriver):
            raise TypeError(f"backend {self.name} provides no NetworkDriver")
        return self

    @property
    def ipam_driver(self) -> Optional[IpamDriver]:
        """The IpamDriver role (per request, any worker), or None."""
        return self if self.implements_ipam and isinstance(self, IpamDriver) else None

    def host_agent(self) -> Optional[HostAgent]:
        """A new per-host agent for this backend (built in the agent process),
        or None when the backend has none."""
        return None

    # lifecycle --------------------------------------------------------
    def start(self) -> None:
        """Called once per worker process before serving (connect...)."""

    def stop(self) -> None:
        """Called on shutdown."""

    def docker_endpoint(self) -> Optional[str]:
        """The dockerd this backend asks (``unix://...``), if any: the agent
        then starts again containers Docker gave up on after a failed call."""
        return None

    def health_checks(self) -> Dict[str, Tuple[bool, str]]:
        """Backend-specific parts of ``/health``: name -> (healthy, words)."""
        return {}

    def metric_collectors(self) -> List[Callable[[], Iterable]]:
        """Callables yielding prometheus_client metric families, evaluated at
        each scrape (state read from the datastore: endpoints, pools...)."""
        return []

    def audit(self, dry_run: bool = False) -> dict:
        """Find state Docker no longer knows (endpoints, devices, addresses
        leaked by a crash or a dockerd restart) and remove it, touching nothing
        in use; with ``dry_run`` only report.  Returns a summary dict (what was
        found/removed).  Run by ``--audit``; a backend's host agent runs its
        audit as a loop (``netplugin.reconcile.Reconciler``)."""
        return {}
