"""netpluginctl's ``status``: the datastore, the plugin's socket and ``/health``,
this host's endpoints with their links and routes, cross-host routes and hosts.

Exit status 1 when the datastore or the plugin does not answer, or when the
plugin says it is unhealthy.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
from typing import Any, Dict, List

from netplugin import unixhttp
from netplugin.errors import PluginError

from backends.calico import model
from backends.calico.ctl import base
from backends.calico.ctl.base import CtlError, format_table, ip_json
from backends.calico.ctl.endpoint import EndpointCommands
from backends.calico.routes import RTPROT_NETPLUGIN


def plugin_activate(path: str, timeout: float = base.PLUGIN_TIMEOUT) -> Dict[str, Any]:
    """POST /Plugin.Activate on the plugin socket, as dockerd does."""
    result: Dict[str, Any] = {"socket": path, "ok": False}
    try:
        status, body = unixhttp.post(
            path, "/Plugin.Activate", timeout=timeout,
            headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        if status != 200:
            result["error"] = f"HTTP {status}: {body[:200].decode(errors='replace')}"
            return result
        data = json.loads(body or b"{}")
        result["implements"] = list(data.get("Implements") or [])
        result["ok"] = True
    except FileNotFoundError:
        result["error"] = "socket not found (is the plugin running?)"
    except ConnectionRefusedError:
        result["error"] = "connection refused (stale socket: the plugin is not running)"
    except socket.timeout:
        result["error"] = f"no answer within {timeout:g} s"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def plugin_health(path: str, timeout: float = base.PLUGIN_TIMEOUT) -> Dict[str, Any]:
    """GET /health on the plugin socket: {"healthy": bool, "checks": {...}}."""
    try:
        status, body = unixhttp.get(path, "/health", timeout)
        data = json.loads(body or b"{}")
        if status not in (200, 503) or not isinstance(data.get("checks"), dict):
            return {"healthy": False, "error": f"HTTP {status}: "
                                               f"{body[:200].decode(errors='replace')}"}
        return {"healthy": bool(data.get("healthy")), "checks": data["checks"]}
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return {"healthy": False, "error": f"{type(exc).__name__}: {exc}"}



class StatusCommands(EndpointCommands):
    def datastore_description(self) -> str:
        d = self.cfg.datastore
        where = {"embedded": d.path, "etcd": ", ".join(d.endpoints),
                 "etcdv3": ", ".join(d.endpoints),
                 "consul": d.address}.get(d.type, "")
        return f"{d.type} {where}".strip()

    def collect_status(self) -> Dict[str, Any]:
        status: Dict[str, Any] = {"hostname": self.hostname, "config": self.cfg.path}
        ds: Dict[str, Any] = {"type": self.cfg.datastore.type,
                              "address": self.datastore_description(), "ok": False}
        try:
            self.store.ping()
            ds["ok"] = True
        except PluginError as exc:
            ds["error"] = str(exc)
        status["datastore"] = ds
        status["plugin"] = plugin_activate(self.cfg.socket)
        status["health"] = (plugin_health(self.cfg.socket) if status["plugin"]["ok"]
                            else {"healthy": False, "error": "the plugin does not answer"})
        links: Dict[str, Dict[str, Any]] = {}
        routes: List[Dict[str, Any]] = []
        errors: List[str] = []
        try:
            links = {l.get("ifname"): l for l in ip_json("link", "show")}
        except CtlError as exc:
            errors.append(str(exc))
        for family, args in ((4, ("route", "show")), (6, ("-6", "route", "show"))):
            try:
                for r in ip_json(*args):
                    # every veth has a link-local fe80::/64: not an endpoint route
                    if str(r.get("dev", "")).startswith(model.HOST_PREFIX) \
                            and not str(r.get("dst", "")).startswith("fe80:"):
                        routes.append({"family": family, "dst": r.get("dst"),
                                       "dev": r.get("dev"), "scope": r.get("scope")})
            except CtlError as exc:
                errors.append(str(exc))
        status["routes"] = routes
        # Cross-host routes the agent keeps (backends/calico/routes.py), and the
        # addresses hosts publish as bird_ip (calicoctl status shows BGP peers).
        cross: List[Dict[str, Any]] = []
        try:
            for r in ip_json("route", "show", "proto", str(RTPROT_NETPLUGIN)):
                cross.append({"dst": r.get("dst"), "via": r.get("gateway"),
                              "dev": r.get("dev")})
        except CtlError as exc:
            errors.append(str(exc))
        status["cross_host_routes"] = cross
        peers: List[Dict[str, Any]] = []
        if ds["ok"]:
            try:
                for item in self.store.list_prefix(model.HOST_ROOT + "/"):
                    parsed = model.parse_bird_ip_key(item.key)
                    host = parsed[0] if parsed is not None and parsed[1] == 4 else None
                    if host is not None:
                        peers.append({"host": host, "ip": item.value,
                                      "self": host == self.hostname})
            except PluginError as exc:
                ds.update(ok=False, error=str(exc))
        status["hosts"] = sorted(peers, key=lambda p: p["host"])
        endpoints = []
        if ds["ok"]:
            try:
                eps = self.endpoints(host=self.hostname)
            except PluginError as exc:
                ds.update(ok=False, error=str(exc))
                eps = []
            routed = {(r["dst"], r["dev"]) for r in routes}
            for ep in eps:
                entry = ep.summary()
                name = entry.get("name") or ""
                link = links.get(name)
                entry["link"] = ("missing" if link is None
                                 else str(link.get("operstate", "unknown")).lower())
                missing = []
                for net in ep.nets:
                    try:
                        iface = ipaddress.ip_interface(net)
                    except ValueError:
                        continue
                    plen = iface.network.prefixlen
                    dst = str(iface.ip)
                    if (dst, name) not in routed and (f"{dst}/{plen}", name) not in routed:
                        missing.append(net)
                entry["routed"] = not missing
                entry["missing_routes"] = missing
                endpoints.append(entry)
        status["endpoints"] = endpoints
        if errors:
            status["errors"] = errors
        status["ok"] = bool(ds["ok"] and status["plugin"]["ok"] and status["health"]["healthy"])
        return status

    def status(self) -> int:
        st = self.collect_status()
        if self.as_json:
            self.emit(None, st)
            return 0 if st["ok"] else 1
        ds, plugin = st["datastore"], st["plugin"]
        lines = [f"netplugin status for host {st['hostname']} (config {st['config']})",
                 f"Datastore: {ds['address']}: "
                 + ("reachable" if ds["ok"] else f"NOT reachable: {ds.get('error')}"),
                 f"Plugin:    {plugin['socket']}: "
                 + (f"answering (implements {', '.join(plugin.get('implements') or []) or '-'})"
                    if plugin["ok"] else f"NOT answering: {plugin.get('error')}"),
                 "Health:    " + ("healthy" if st["health"]["healthy"] else "UNHEALTHY")
                 + (f" ({st['health']['error']})" if st["health"].get("error") else "")]
        for name, check in sorted((st["health"].get("checks") or {}).items()):
            lines.append(f"  {name + ':':<10} {'ok' if check.get('ok') else 'FAILING'}: "
                         f"{check.get('detail', '')}")
        lines += ["",
                 f"Endpoints on {st['hostname']}: {len(st['endpoints'])}"]
        if st["endpoints"]:
            lines.append(format_table(
                ["Endpoint ID", "Interface", "Addresses", "Profiles", "State", "Link",
                 "Routed"],
                [[e["endpoint_id"][:12], e.get("name") or "", "\n".join(e["addresses"]),
                  "\n".join(e["profile_ids"]), e.get("state") or "", e["link"],
                  "yes" if e["routed"] else "NO: " + ", ".join(e["missing_routes"])]
                 for e in st["endpoints"]]))
        lines += ["", f"Routes via cali* interfaces: {len(st['routes'])}"]
        if st["routes"]:
            lines.append(format_table(["Destination", "Interface"],
                                      [[r["dst"], r["dev"]] for r in st["routes"]]))
        lines += ["", f"Hosts publishing an address (bird_ip): {len(st['hosts'])}"]
        if st["hosts"]:
            lines.append(format_table(["Host", "Address", ""],
                                      [[h["host"], h["ip"], "(this host)" if h["self"] else ""]
                                       for h in st["hosts"]]))
        lines += ["", f"Cross-host routes (proto {RTPROT_NETPLUGIN}): "
                      f"{len(st['cross_host_routes'])}"]
        if st["cross_host_routes"]:
            lines.append(format_table(["Destination", "Via", "Interface"],
                                      [[r["dst"], r["via"] or "", r["dev"] or ""]
                                       for r in st["cross_host_routes"]]))
        for err in st.get("errors", []):
            lines.append(f"warning: {err}")
        self.emit("\n".join(lines))
        return 0 if st["ok"] else 1

