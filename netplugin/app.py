"""The Flask app that speaks Docker's remote network and IPAM driver protocol.

Each route validates the body into a typed request (``netplugin.protocol``),
calls the backend, and serialises the answer.  Every failure is answered
HTTP 500 with ``{"Err": msg, "Error": msg}`` (the network side reads ``Err``,
the IPAM side ``Error``), logged once, and the app keeps serving.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

from flask import Flask, Response, request

from netplugin import protocol as p
from netplugin.backend import Backend
from netplugin.datastore import CountingDatastore
from netplugin.errors import InvalidRequest, NotSupported, PluginError

log = logging.getLogger("netplugin.app")

# Media type of the plugin protocol (what Docker's plugin client sends/expects).
PLUGIN_MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"


def _empty(_result) -> Dict[str, Any]:
    return {}


def _to_json(result) -> Dict[str, Any]:
    return result.to_json() if result is not None else {}


def _routes(backend: Backend) -> Dict[str, Tuple[Optional[Callable], Callable, Callable]]:
    """path -> (request parser or None, backend call, answer builder)."""
    b = backend
    return {
        "/NetworkDriver.CreateNetwork": (p.CreateNetworkRequest.parse, b.create_network, _empty),
        "/NetworkDriver.DeleteNetwork": (p.NetworkRequest.parse, b.delete_network, _empty),
        "/NetworkDriver.AllocateNetwork": (p.AllocateNetworkRequest.parse, b.allocate_network,
                                           lambda r: {"Options": r or {}}),
        "/NetworkDriver.FreeNetwork": (p.NetworkRequest.parse, b.free_network, _empty),
        "/NetworkDriver.CreateEndpoint": (p.CreateEndpointRequest.parse, b.create_endpoint, _to_json),
        "/NetworkDriver.EndpointOperInfo": (p.EndpointRequest.parse, b.endpoint_oper_info,
                                            lambda r: {"Value": r or {}}),
        "/NetworkDriver.DeleteEndpoint": (p.EndpointRequest.parse, b.delete_endpoint, _empty),
        "/NetworkDriver.Join": (p.JoinRequest.parse, b.join, _to_json),
        "/NetworkDriver.Leave": (p.EndpointRequest.parse, b.leave, _empty),
        "/NetworkDriver.DiscoverNew": (p.DiscoveryRequest.parse, b.discover_new, _empty),
        "/NetworkDriver.DiscoverDelete": (p.DiscoveryRequest.parse, b.discover_delete, _empty),
        "/NetworkDriver.ProgramExternalConnectivity": (
            p.ProgramExternalConnectivityRequest.parse, b.program_external_connectivity, _empty),
        "/NetworkDriver.RevokeExternalConnectivity": (
            p.EndpointRequest.parse, b.revoke_external_connectivity, _empty),
        "/IpamDriver.GetCapabilities": (None, b.ipam_capabilities, _to_json),
        "/IpamDriver.GetDefaultAddressSpaces": (None, b.get_default_address_spaces, _to_json),
        "/IpamDriver.RequestPool": (p.RequestPoolRequest.parse, b.request_pool, _to_json),
        "/IpamDriver.ReleasePool": (p.ReleasePoolRequest.parse, b.release_pool, _empty),
        "/IpamDriver.RequestAddress": (p.RequestAddressRequest.parse, b.request_address, _to_json),
        "/IpamDriver.ReleaseAddress": (p.ReleaseAddressRequest.parse, b.release_address, _empty),
    }


def _reply(body: Dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=PLUGIN_MEDIA_TYPE)


def _error(msg: str) -> Response:
    return _reply({"Err": msg, "Error": msg}, 500)


def _read_body() -> Any:
    """Docker sends no reliable Content-Type and sometimes no body at all."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise InvalidRequest("request body is not valid JSON")
    return body


def _summary(req: Any) -> str:
    """Short identification of a request for the log line."""
    parts = []
    for attr, label in (("network_id", "net"), ("endpoint_id", "ep"),
                        ("pool_id", "pool"), ("pool", "pool"), ("address", "addr")):
        value = getattr(req, attr, "")
        if value and isinstance(value, str):
            parts.append(f"{label}={value[:12]}")
    return " ".join(parts)


def create_app(backend: Backend, scope: str) -> Flask:
    """Build the app for one backend instance; ``scope`` is "local"/"global"."""
    app = Flask("netplugin")
    routes = _routes(backend)
    store = backend.datastore if isinstance(backend.datastore, CountingDatastore) else None

    @app.post("/Plugin.Activate")
    def activate():
        implements = ["NetworkDriver"]
        if backend.implements_ipam:
            implements.append("IpamDriver")
        return _reply({"Implements": implements})

    @app.post("/NetworkDriver.GetCapabilities")
    def capabilities():
        return _reply({"Scope": scope, "ConnectivityScope": scope})

    def dispatch(path: str) -> Response:
        call = path.lstrip("/")
        started = time.monotonic()
        if store is not None:
            store.reset()
        req = None
        try:
            parse, handler, answer = routes[path]
            if path.startswith("/IpamDriver.") and not backend.implements_ipam:
                raise NotSupported(f"the {backend.name} plugin does not offer an IPAM driver")
            body = _read_body()
            if parse is None:
                result = handler()
            else:
                req = parse(body)
                result = handler(req)
            out = answer(result)
        except PluginError as exc:
            msg = str(exc) or exc.__class__.__name__
            log.warning("%s %s failed: %s%s", call, _summary(req), msg, _cost(store))
            return _error(msg)
        except Exception as exc:  # a bug: keep serving, tell Docker something useful
            log.exception("%s %s crashed", call, _summary(req))
            return _error(f"{call}: internal error in the {backend.name} plugin: "
                          f"{exc.__class__.__name__}: {exc}")
        log.info("%s %s ok in %.1f ms%s", call, _summary(req),
                 (time.monotonic() - started) * 1000, _cost(store))
        return _reply(out)

    for path in routes:
        app.add_url_rule(path, endpoint=path, view_func=lambda path=path: dispatch(path),
                         methods=["POST"])

    @app.errorhandler(404)
    def unknown(_exc):
        msg = f"unknown plugin call {request.path}"
        log.warning("%s", msg)
        return _reply({"Err": msg, "Error": msg}, 404)

    @app.errorhandler(405)
    def bad_method(_exc):
        msg = f"{request.path} must be called with POST"
        return _reply({"Err": msg, "Error": msg}, 405)

    return app


def _cost(store: Optional[CountingDatastore]) -> str:
    return f" (datastore {store.summary()})" if store is not None else ""
