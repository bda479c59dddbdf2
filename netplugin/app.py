"""The Flask app that speaks Docker's remote network and IPAM driver protocol:
one route table, each call dispatched to the backend role that serves it.

Each route validates the body into a typed request (``netplugin.protocol``),
calls the backend role that serves it (``NetworkDriver.*`` the backend's
network driver, ``IpamDriver.*`` its IPAM driver), and serialises the answer.  Every failure is answered
HTTP 500 with ``{"Err": msg, "Error": msg}`` (the network side reads ``Err``,
the IPAM side ``Error``), logged once, and the app keeps serving.  Every call
gets a request id, in its log line and at the end of its ``Err`` (so the
error a user sees leads to the log), and feeds the call metrics; ``GET
/metrics`` and ``GET /health`` serve the operator, not Docker.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable, Dict, Optional, Tuple

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from netplugin import health, metrics
from netplugin import protocol as p
from netplugin.backend import Backend, IpamDriver, NetworkDriver
from netplugin.datastore import CountingDatastore
from netplugin.errors import BodyTooLarge, InvalidRequest, NotSupported, PluginError

log = logging.getLogger("netplugin.app")

# Media type of the plugin protocol (what Docker's plugin client sends/expects).
PLUGIN_MEDIA_TYPE = "application/vnd.docker.plugins.v1.2+json"

#: Largest request body accepted (Docker's are a few KiB): larger ones are
#: answered HTTP 413 without being read (Content-Length), or as soon as a
#: body without a length (chunked) goes past it.
MAX_BODY = 1024 * 1024
#: What of a refused body is read (and thrown away, 64 KiB at a time) so the
#: client, still sending, gets to read the 413; beyond it the connection is
#: closed under the sender.
DRAIN_LIMIT = 32 * 1024 * 1024


def _empty(_result) -> Dict[str, Any]:
    return {}


def _to_json(result) -> Dict[str, Any]:
    return result.to_json() if result is not None else {}


def _routes(network: NetworkDriver, ipam: Optional[IpamDriver]
            ) -> Dict[str, Tuple[Optional[Callable], Callable, Callable]]:
    """path -> (request parser or None, role call, answer builder).  Without an
    IPAM driver the IpamDriver paths stay routed (and answer 'not offered')."""
    b = network
    i = ipam if ipam is not None else IpamDriver()
    return {
        "/NetworkDriver.CreateNetwork": (p.CreateNetworkRequest.parse, b.create_network, _empty),
        "/NetworkDriver.DeleteNetwork": (p.NetworkRequest.parse, b.delete_network, _empty),
        "/NetworkDriver.GwAllocCheck": (p.GwAllocCheckRequest.parse, b.gw_alloc_check, _to_json),
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
        "/IpamDriver.GetCapabilities": (None, i.ipam_capabilities, _to_json),
        "/IpamDriver.GetDefaultAddressSpaces": (None, i.get_default_address_spaces, _to_json),
        "/IpamDriver.RequestPool": (p.RequestPoolRequest.parse, i.request_pool, _to_json),
        "/IpamDriver.ReleasePool": (p.ReleasePoolRequest.parse, i.release_pool, _empty),
        "/IpamDriver.RequestAddress": (p.RequestAddressRequest.parse, i.request_address, _to_json),
        "/IpamDriver.ReleaseAddress": (p.ReleaseAddressRequest.parse, i.release_address, _empty),
    }


def _reply(body: Dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=PLUGIN_MEDIA_TYPE)


def _error(msg: str, status: int = 500) -> Response:
    return _reply({"Err": msg, "Error": msg}, status)


def _too_large(length: Optional[int]) -> BodyTooLarge:
    size = f"of {length} bytes " if length is not None else ""
    return BodyTooLarge(f"request body {size}is over the plugin's limit of "
                        f"{MAX_BODY} bytes (1 MiB)")


def _read_body() -> Any:
    """Docker sends no reliable Content-Type and sometimes no body at all.
    At most MAX_BODY bytes are read: a declared length over it is refused
    unread, a body without a length (chunked) as soon as it goes past it."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise _too_large(length)
    if length is None and request.environ.get("wsgi.input_terminated"):
        raw = _read_capped(request.environ["wsgi.input"])
    else:
        try:
            raw = request.get_data(cache=True)
        except RequestEntityTooLarge:
            raise _too_large(None) from None
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("request body is not valid JSON") from None


def _discard_rest() -> bool:
    """Read and drop what is left of a refused body (at most DRAIN_LIMIT);
    True if it was all read."""
    stream = request.environ.get("wsgi.input")
    length = request.content_length
    if stream is None or (length is None and not request.environ.get("wsgi.input_terminated")):
        return True
    if length is not None and length > DRAIN_LIMIT:
        return False
    left = DRAIN_LIMIT if length is None else length
    try:
        while left > 0:
            chunk = stream.read(min(65536, left))
            if not chunk:
                return True
            left -= len(chunk)
    except (OSError, ValueError):
        return False
    return length is not None


def _refused(exc: BodyTooLarge, rid: str = "") -> Response:
    complete = _discard_rest()
    msg = f"{exc} (request {rid})" if rid else str(exc)
    response = _error(msg, 413)
    if not complete:
        response.headers["Connection"] = "close"
    return response


def _read_capped(stream) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = stream.read(min(65536, MAX_BODY + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_BODY:
            raise _too_large(None)
        chunks.append(chunk)


def _summary(req: Any) -> str:
    """Short identification of a request for the log line."""
    parts = []
    for attr, label in (("network_id", "net"), ("endpoint_id", "ep"),
                        ("pool_id", "pool"), ("pool", "pool"), ("address", "addr")):
        value = getattr(req, attr, "")
        if value and isinstance(value, str):
            parts.append(f"{label}={value[:12]}")
    return " ".join(parts)


def add_operator_routes(app: Flask, backend: Backend) -> Flask:
    """``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON, HTTP 503
    when unhealthy): on the plugin socket, and on ``metrics_address``."""
    @app.get("/metrics")
    def scrape():
        text, content_type = metrics.render(backend.metric_collectors())
        return Response(text, status=200, content_type=content_type)

    @app.get("/health")
    def healthz():
        healthy, checks = health.report(backend)
        return Response(json.dumps({"healthy": healthy, "checks": checks}, sort_keys=True),
                        status=200 if healthy else 503, mimetype="application/json")
    return app


def create_operator_app(backend: Backend) -> Flask:
    """Only the operator routes (the TCP ``metrics_address`` listener)."""
    return add_operator_routes(Flask("netplugin-metrics"), backend)


def create_app(backend: Backend, scope: str) -> Flask:
    """Build the app for one backend instance; ``scope`` is "local"/"global"."""
    app = Flask("netplugin")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    network, ipam = backend.network_driver, backend.ipam_driver
    routes = _routes(network, ipam)
    store = backend.datastore if isinstance(backend.datastore, CountingDatastore) else None

    @app.post("/Plugin.Activate")
    def activate():
        implements = ["NetworkDriver"]
        if ipam is not None:
            implements.append("IpamDriver")
        return _reply({"Implements": implements})

    @app.post("/NetworkDriver.GetCapabilities")
    def capabilities():
        # GwAllocChecker: Docker >= 28 then asks GwAllocCheck before CreateNetwork.
        return _reply({"Scope": scope, "ConnectivityScope": scope, "GwAllocChecker": True})

    add_operator_routes(app, backend)

    @app.before_request
    def refuse_large_bodies():
        """Every route (also those that read no body): a declared length over
        the limit is refused before anything is read."""
        length = request.content_length
        if length is not None and length > MAX_BODY:
            exc = _too_large(length)
            log.warning("%s refused: %s", request.path.lstrip("/"), exc)
            if request.path in routes:    # no metric label for made-up paths
                metrics.observe_call(request.path.lstrip("/"), 0.0, exc.__class__.__name__)
            return _refused(exc)
        return None

    def dispatch(path: str) -> Response:
        call = path.lstrip("/")
        started = time.monotonic()
        rid = uuid.uuid4().hex[:8]
        if store is not None:
            store.reset()
        req = None
        try:
            parse, handler, answer = routes[path]
            if path.startswith("/IpamDriver.") and ipam is None:
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
            log.warning("[%s] %s %s %s: %s%s", rid, call, _summary(req),
                        "refused" if isinstance(exc, BodyTooLarge) else "failed", msg,
                        _cost(store))
            metrics.observe_call(call, time.monotonic() - started, exc.__class__.__name__)
            if isinstance(exc, BodyTooLarge):
                return _refused(exc, rid)
            return _error(f"{msg} (request {rid})")
        except Exception as exc:  # a bug: keep serving, tell Docker something useful
            log.exception("[%s] %s %s crashed", rid, call, _summary(req))
            metrics.observe_call(call, time.monotonic() - started, "internal")
            return _error(f"{call}: internal error in the {backend.name} plugin: "
                          f"{exc.__class__.__name__}: {exc} (request {rid})")
        elapsed = time.monotonic() - started
        metrics.observe_call(call, elapsed)
        log.info("[%s] %s %s ok in %.1f ms%s", rid, call, _summary(req), elapsed * 1000,
                 _cost(store))
        return _reply(out)

    for path in routes:
        app.add_url_rule(path, endpoint=path, view_func=lambda path=path: dispatch(path),
                         methods=["POST"])

    @app.errorhandler(404)
    def unknown(_exc):
        msg = f"unknown plugin call {request.path}"
        log.warning("%s", msg)
        return _reply({"Err": msg, "Error": msg}, 404)

    @app.errorhandler(413)
    def too_large(_exc):
        exc = _too_large(request.content_length)
        log.warning("%s refused: %s", request.path.lstrip("/"), exc)
        return _reply({"Err": str(exc), "Error": str(exc)}, 413)

    @app.errorhandler(405)
    def bad_method(_exc):
        msg = f"{request.path} must be called with POST"
        return _reply({"Err": msg, "Error": msg}, 405)

    return app


def _cost(store: Optional[CountingDatastore]) -> str:
    return f" (datastore {store.summary()})" if store is not None else ""
