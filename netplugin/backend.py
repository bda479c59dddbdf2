"""The backend interface: one class per backend, registered by name.

A backend receives validated request objects from ``netplugin.protocol`` and
returns response objects (or None for ``{}``).  It raises ``PluginError``
subclasses with user-facing messages; anything else is reported to Docker as
an internal error.  The front-end knows no backend by name: ``load_backend``
imports ``backends.<name>``, whose import registers the class.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import TYPE_CHECKING, Dict, Optional, Type

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


def available_backends() -> list:
    """Names of the packages under ``backends/`` (without importing them)."""
    import backends
    return sorted(m.name for m in pkgutil.iter_modules(backends.__path__) if m.ispkg)


def load_backend(name: str) -> Type["Backend"]:
    if name not in _REGISTRY:
        importlib.import_module(f"backends.{name}")
    return _REGISTRY[name]


class Backend:
    """Base class: every call not overridden is a no-op or 'not supported'."""

    name = "abstract"
    #: True when the backend also implements the IpamDriver calls.
    implements_ipam = False

    def __init__(self, config: "Config", datastore: "Datastore"):
        self.config = config
        self.datastore = datastore

    # lifecycle --------------------------------------------------------
    def start(self) -> None:
        """Called once per worker process before serving (connect, audit...)."""

    def stop(self) -> None:
        """Called on shutdown."""

    #: True when the backend has a per-host agent (``run_agent``): the
    #: launcher then runs it once per host in its own supervised process,
    #: whatever the number of workers serving Docker.
    has_agent = False

    def run_agent(self, stop: "threading.Event") -> None:
        """Keep the host in line with the datastore (watch, reconcile) until
        ``stop`` is set.  Runs in a dedicated process with its own backend
        instance; an exception ends it and the launcher restarts it."""

    def audit(self, dry_run: bool = False) -> dict:
        """Find state Docker no longer knows (endpoints, devices, addresses
        leaked by a crash or a dockerd restart) and remove it, touching nothing
        in use; with ``dry_run`` only report.  Returns a summary dict (what was
        found/removed).  Run by the agent at start-up and by ``--audit``."""
        return {}

    # NetworkDriver -----------------------------------------------------
    def create_network(self, req: p.CreateNetworkRequest) -> None:
        raise NotSupported(f"{self.name}: CreateNetwork is not implemented")

    def delete_network(self, req: p.NetworkRequest) -> None:
        raise NotSupported(f"{self.name}: DeleteNetwork is not implemented")

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

    # IpamDriver (only when implements_ipam) ----------------------------
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
