"""Calico network driver, Calico v1 data model; Docker's IPAM or Calico IPAM
(``--ipam-driver calico``, see ``ipam_driver``).

Profile name = Docker NetworkID; endpoint key host = ``[calico] hostname``.
Per-call datastore budget (R reads / W writes / D deletes), as the Python
libnetwork plugin's README counts them:

============== ======================================================
CreateNetwork  0R 4W (one IPv4 subnet; +1W for an IPv6 subnet); Calico IPAM: 0R 3W
DeleteNetwork  1R 3D (one subnet; +1D per extra subnet); Calico IPAM: 1R 2D
CreateEndpoint 1R 1W
Join           1R
Leave          0
DeleteEndpoint 1D
============== ======================================================

Containers are routed, not bridged: Join creates a veth pair ``cali<eid[:11]>``
(host) / ``tmp<eid[:11]>`` (handed to Docker), a /32 (/128) host route per
address and proxy ARP on the host side, and answers the fixed next hop
169.254.1.1 (IPv6: ``fe80::1`` on the host side).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

from netplugin import linux
from netplugin import protocol as p
from netplugin.backend import Backend, register
from netplugin.datastore import KeyNotFound
from netplugin.errors import InvalidRequest, NotFound, PluginError

from backends.calico import keys
from backends.calico.gateways import GatewayTable
from backends.calico.ipam_driver import ADDRESS_SPACES, CalicoIpamDriver

log = logging.getLogger(__name__)

#: Docker IPAM's gateway value when the pool came from Calico IPAM.
CALICO_IPAM_GATEWAYS = ("0.0.0.0/0", "::/0")
#: The MAC every container gets unless Docker chose one (see calico-datastore §6.6).
FIXED_MAC = "ee:ee:ee:ee:ee:ee"
#: The container's IPv4 next hop; nothing owns it, proxy ARP answers for it.
GATEWAY_V4 = "169.254.1.1"
#: The container's IPv6 next hop, put on the host side of the veth.
GATEWAY_V6 = "fe80::1"
GATEWAY_V6_CIDR = "fe80::1/64"

HOST_PREFIX = "cali"
TEMP_PREFIX = "tmp"
ID_CHARS = 11  # "cali" + 11 = 15 characters, the Linux limit

#: ``-o`` options of ``docker network create``: booleans, and the veth MTU
#: (``mtu``, or Docker's own ``com.docker.network.driver.mtu``).
BOOL_OPTIONS = ("ipip", "nat-outgoing")
MTU_OPTIONS = ("mtu", "com.docker.network.driver.mtu")
OPTIONS = BOOL_OPTIONS + MTU_OPTIONS
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def host_veth_name(endpoint_id: str) -> str:
    return HOST_PREFIX + endpoint_id[:ID_CHARS]


def temp_veth_name(endpoint_id: str) -> str:
    return TEMP_PREFIX + endpoint_id[:ID_CHARS]


def parse_bool_option(name: str, value: str) -> bool:
    """``true/false/yes/no/on/off/1/0`` (any case) -> bool, else InvalidRequest."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidRequest(f"network option {name!r} must be true or false, got {value!r}")


def parse_network_options(generic: Dict[str, Any]) -> Dict[str, Any]:
    """Validate the generic (``-o``) options; return ``{"ipip": bool,
    "nat-outgoing": bool, "mtu": int or None}``."""
    unknown = sorted(k for k in generic if k not in OPTIONS)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise InvalidRequest(
            f"unknown network option{plural} {names} for the calico driver; "
            f"known options: {', '.join(OPTIONS[:3])}")
    out: Dict[str, Any] = {name: parse_bool_option(name, generic[name])
                           if name in generic else False for name in BOOL_OPTIONS}
    out["mtu"] = None
    for name in MTU_OPTIONS:
        if name in generic:
            out["mtu"] = parse_mtu_option(name, generic[name])
    return out


def parse_mtu_option(name: str, value: Any) -> int:
    try:
        mtu = int(str(value).strip())
    except ValueError:
        mtu = 0
    if not 68 <= mtu <= 65535:
        raise InvalidRequest(f"network option {name!r} must be an MTU between 68 and "
                             f"65535, got {value!r}")
    return mtu


def network_mtu(record: Dict[str, Any]) -> Optional[int]:
    """The ``-o mtu`` of a stored CreateNetwork body, or None (lenient)."""
    generic = (record.get("Options") or {}).get("com.docker.network.generic") or {}
    try:
        return parse_network_options(generic)["mtu"] if isinstance(generic, dict) else None
    except InvalidRequest:
        return None


def pool_value(cidr: str, version: int, ipip: bool, masquerade: bool) -> Dict[str, Any]:
    """Pool JSON the way libcalico's ``IPPool.to_json`` writes a default-IPAM pool."""
    value: Dict[str, Any] = {"cidr": cidr}
    if ipip and version == 4:  # calicoctl refuses IPIP on IPv6 pools
        value["ipip"] = "tunl0"
    if masquerade:
        value["masquerade"] = True
    value["ipam"] = False
    return value


def is_calico_ipam(address_space: Any, gateway: Any) -> bool:
    """IPvXData of a network whose addresses come from Calico IPAM: the gateway
    marker (what our RequestPool answers), or one of our address spaces."""
    return gateway in CALICO_IPAM_GATEWAYS or address_space in ADDRESS_SPACES


def _pools_of_record(record: Dict[str, Any]) -> List[str]:
    """Pool CIDRs (default IPAM) named in a stored CreateNetwork body; lenient."""
    cidrs = []
    for field_name in ("IPv4Data", "IPv6Data"):
        entries = record.get(field_name) or []
        if not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            pool, gateway = entry.get("Pool"), entry.get("Gateway")
            if not isinstance(pool, str) or is_calico_ipam(entry.get("AddressSpace"), gateway):
                continue
            try:
                cidrs.append(str(ipaddress.ip_network(pool, strict=False)))
            except ValueError:
                log.warning("ignoring invalid pool %r in a network record", pool)
    return cidrs


@register("calico")
class CalicoBackend(CalicoIpamDriver, Backend):
    """Calico network driver; addresses from Docker's IPAM (a pool with
    ``ipam: false`` per network) or from Calico IPAM (nothing per network)."""

    implements_ipam = True

    @property
    def hostname(self) -> str:
        return self.config.calico.hostname

    @property
    def mtu(self) -> int:
        return self.config.calico.mtu

    # lifecycle ----------------------------------------------------------
    def start(self) -> None:
        # Containers are routed through this host.  IPv6 forwarding is turned
        # on only when an IPv6 endpoint joins: it makes the host ignore router
        # advertisements, which an IPv4-only user should not pay for.
        linux.ensure_sysctl("net/ipv4/ip_forward", 1)

    #: The per-host agent enforces the profiles with nftables (policy.py, agent.py).
    has_agent = True

    def run_agent(self, stop) -> None:
        from backends.calico.agent import PolicyAgent
        from backends.calico.audit import audit_at_startup  # logs failures, never raises
        # The audit waits a grace period between its two looks: run it beside
        # the policy agent, so isolation is enforced from the first moment.
        threading.Thread(target=audit_at_startup, args=(self, stop),
                         name="startup-audit", daemon=True).start()
        # Cross-host routes (routes.py) beside it, for global-scope networks
        # only (a local-scope network exists on one host); stopped with this
        # call so a restarted run_agent never runs two of them.
        from backends.calico.routes import RouteAgent
        routes = route_thread = None
        if self.config.scope == "global":
            routes = RouteAgent(self.datastore, self.hostname, self.config.calico.ip)
            route_thread = threading.Thread(target=routes.run, args=(stop,),
                                            name="route-agent", daemon=True)
            route_thread.start()
        try:
            PolicyAgent(self.datastore, self.hostname).run(stop)
        finally:
            if routes is not None:
                routes.stop()
                route_thread.join(10)

    def audit(self, dry_run: bool = False) -> dict:
        """Remove endpoint records, veths and Calico IPAM addresses Docker no
        longer knows (backends/calico/audit.py has the safety rules)."""
        from backends.calico.audit import audit
        return audit(self, dry_run=dry_run)

    # networks -------------------------------------------------------------
    def _validate_network(self, req: p.CreateNetworkRequest
                          ) -> Tuple[Dict[str, bool], List[Tuple[str, int]]]:
        if len(req.ipv4_data) > 1 or len(req.ipv6_data) > 1:
            raise InvalidRequest(
                "the calico driver supports at most one IPv4 and one IPv6 subnet per "
                f"network, got {len(req.ipv4_data)} IPv4 and {len(req.ipv6_data)} IPv6")
        data = list(req.ipv4_data) + list(req.ipv6_data)
        if not data:
            raise InvalidRequest("CreateNetwork has no IPv4Data or IPv6Data: the calico "
                                 "driver needs the network's subnet")
        options = parse_network_options(req.generic_options)
        calico = [is_calico_ipam(d.address_space, d.gateway) for d in data]
        if any(calico):
            if not all(calico):
                raise InvalidRequest("a network cannot mix Calico IPAM and Docker IPAM data")
            chosen = [name for name in BOOL_OPTIONS if options[name]]
            if chosen:
                raise InvalidRequest(
                    f"network option{'s' if len(chosen) > 1 else ''} "
                    f"{', '.join(chosen)} only apply with Docker's IPAM; with --ipam-driver "
                    f"calico set them on the Calico pool (calicoctl pool add <cidr> "
                    f"--ipip --nat-outgoing)")
            return options, []      # Calico IPAM: the pools are Calico's own
        pools = []
        for d in data:
            net = ipaddress.ip_network(d.pool, strict=False)
            pools.append((str(net), net.version))
        return options, pools

    def create_network(self, req: p.CreateNetworkRequest) -> None:
        options, pools = self._validate_network(req)
        nid = req.network_id
        writes: List[Tuple[str, str]] = [
            # The record first: if we die half-way, DeleteNetwork still finds
            # the pools to delete.
            (keys.network(nid), json.dumps(req.raw)),
            (keys.profile_tags(nid), json.dumps([nid])),
            (keys.profile_rules(nid), json.dumps({
                "inbound_rules": [{"action": "allow", "src_tag": nid}],
                "outbound_rules": [{"action": "allow"}]})),
        ]
        for cidr, version in pools:
            writes.append((keys.pool(cidr), json.dumps(
                pool_value(cidr, version, options["ipip"], options["nat-outgoing"]))))
        done: List[str] = []
        try:
            for key, value in writes:
                self.datastore.put(key, value)
                done.append(key)
        except BaseException:
            self._undo_writes(done)
            raise
        log.info("created network %s (pools %s, ipip=%s, nat-outgoing=%s, mtu=%s)", nid,
                 ", ".join(c for c, _ in pools) or "from Calico IPAM", options["ipip"],
                 options["nat-outgoing"], options["mtu"] or self.mtu)

    def _undo_writes(self, written: List[str]) -> None:
        for key in reversed(written):
            try:
                self.datastore.delete(key)
            except Exception as exc:  # best effort; the original error matters
                log.warning("rollback: cannot delete %s: %s", key, exc)

    def _delete_quietly(self, key: str) -> None:
        try:
            self.datastore.delete(key)
        except KeyNotFound:
            pass

    def delete_network(self, req: p.NetworkRequest) -> None:
        nid = req.network_id
        try:
            raw = self.datastore.get(keys.network(nid)).value
        except KeyNotFound:
            raw = None
        record: Dict[str, Any] = {}
        if raw is not None:
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                log.warning("network record %s is corrupt (%s); deleting it anyway",
                            keys.network(nid), exc)
                record = {}
        self.datastore.delete_prefix(keys.profile_dir(nid))
        if raw is None:
            log.info("network %s had no record; deleted its profile only", nid)
            return
        for cidr in _pools_of_record(record):
            self._delete_quietly(keys.pool(cidr))
        self._delete_quietly(keys.network(nid))
        log.info("deleted network %s", nid)

    # endpoints ------------------------------------------------------------
    def create_endpoint(self, req: p.CreateEndpointRequest
                        ) -> Optional[p.CreateEndpointResponse]:
        nid, eid = req.network_id, req.endpoint_id
        try:
            raw = self.datastore.get(keys.network(nid)).value
        except KeyNotFound:
            raise NotFound(f"network {nid} is not known to the calico plugin") from None
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        mtu = network_mtu(record) if isinstance(record, dict) else None
        iface = req.interface
        if not iface.address and not iface.address_ipv6:
            raise InvalidRequest("CreateEndpoint needs Interface.Address or "
                                 "Interface.AddressIPv6: the calico driver routes "
                                 "addresses, it cannot work without one")
        docker_mac = iface.mac_address or req.mac_option
        mac = docker_mac or FIXED_MAC
        ipv4 = [str(ipaddress.ip_interface(iface.address).ip) + "/32"] if iface.address else []
        ipv6 = ([str(ipaddress.ip_interface(iface.address_ipv6).ip) + "/128"]
                if iface.address_ipv6 else [])
        value = {"state": "active", "name": host_veth_name(eid), "mac": mac,
                 "profile_ids": [nid], "labels": {},
                 "ipv4_nets": ipv4, "ipv6_nets": ipv6}
        if mtu is not None:
            # The network's -o mtu travels with the endpoint, so Join needs
            # one read only (Calico's readers ignore extra endpoint fields).
            value["mtu"] = mtu
        self.datastore.put(keys.endpoint(self.hostname, eid), json.dumps(value))
        log.info("created endpoint %s on network %s (%s, mac %s)", eid, nid,
                 ", ".join(ipv4 + ipv6), mac)
        if docker_mac:
            return p.CreateEndpointResponse()   # Docker refuses a repeated field
        return p.CreateEndpointResponse(mac_address=mac)

    def _read_endpoint(self, eid: str) -> Dict[str, Any]:
        key = keys.endpoint(self.hostname, eid)
        try:
            raw = self.datastore.get(key).value
        except KeyNotFound:
            raise NotFound(f"endpoint {eid} is not known to the calico plugin "
                           f"on host {self.hostname}") from None
        try:
            ep = json.loads(raw)
            if not isinstance(ep, dict):
                raise ValueError("not an object")
            for name in ("ipv4_nets", "ipv6_nets"):
                nets = ep.get(name) or []
                if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
                    raise ValueError(f"{name} is not a list of strings")
                for n in nets:
                    ipaddress.ip_interface(n)
                ep[name] = nets
            if not isinstance(ep.get("mac"), str) or not ep["mac"]:
                raise ValueError("no mac")
            mtu = ep.get("mtu")
            if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                                    or not 68 <= mtu <= 65535):
                raise ValueError(f"bad mtu {mtu!r}")
        except ValueError as exc:
            raise PluginError(f"endpoint record {key} is corrupt: {exc}") from None
        return ep

    @property
    def gateways(self) -> GatewayTable:
        return GatewayTable(self.config.driver_state_dir)

    def join(self, req: p.JoinRequest) -> p.JoinResponse:
        eid = req.endpoint_id
        ep = self._read_endpoint(eid)
        host, temp = host_veth_name(eid), temp_veth_name(eid)
        ipv4, ipv6 = ep["ipv4_nets"], ep["ipv6_nets"]
        mtu = ep.get("mtu") or self.mtu
        gateway = ""
        if ipv4:
            # Another Calico interface of this container keeps 169.254.1.1.
            gateway = self.gateways.choose(
                req.sandbox_key, eid, alive=lambda e: linux.link_exists(host_veth_name(e)))
        linux.create_veth(host, temp, mtu=mtu, peer_mac=ep["mac"].lower())
        try:
            linux.set_link_up(host)
            linux.write_sysctl(f"net/ipv4/conf/{host}/proxy_arp", 1)
            linux.write_sysctl(f"net/ipv4/neigh/{host}/proxy_delay", 0)
            for net in ipv4:
                linux.replace_host_route(net, host)
            if ipv6:
                linux.ensure_sysctl("net/ipv6/conf/all/forwarding", 1)
                # On-link peers (Docker IPAM's /64): the agent adds a proxy
                # entry per peer address (backends/calico/ndp.py).
                linux.write_sysctl(f"net/ipv6/conf/{host}/proxy_ndp", 1)
                linux.add_address(host, GATEWAY_V6_CIDR, nodad=True)
                for net in ipv6:
                    linux.replace_host_route(net, host)
        except BaseException:
            try:
                linux.delete_link(host)
                self.gateways.release(eid)
            except Exception as exc:
                log.warning("rollback of endpoint %s failed: %s", eid, exc)
            raise
        log.info("joined endpoint %s: veth %s/%s mtu %d, gateway %s, routes %s", eid, host,
                 temp, mtu, gateway or GATEWAY_V6, ", ".join(ipv4 + ipv6))
        return p.JoinResponse(
            src_name=temp, dst_prefix="eth",
            gateway=gateway,
            gateway_ipv6=GATEWAY_V6 if ipv6 else "",
            static_routes=(p.StaticRoute(f"{gateway}/32", 1),) if ipv4 else (),
            disable_gateway_service=True)

    def leave(self, req: p.EndpointRequest) -> None:
        if linux.delete_link(host_veth_name(req.endpoint_id)):
            log.info("left endpoint %s: deleted veth", req.endpoint_id)
        self.gateways.release(req.endpoint_id)

    def delete_endpoint(self, req: p.EndpointRequest) -> None:
        eid = req.endpoint_id
        try:
            self._delete_quietly(keys.endpoint(self.hostname, eid))
        finally:
            # Docker calls DeleteEndpoint without Leave after a failed Join.
            linux.delete_link(host_veth_name(eid))
            self.gateways.release(eid)
        log.info("deleted endpoint %s", eid)

    def endpoint_oper_info(self, req: p.EndpointRequest) -> dict:
        return {}
