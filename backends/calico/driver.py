"""Calico network driver: Docker's NetworkDriver calls on the Calico v1 data
model (``model``); addresses from Docker's IPAM or Calico IPAM (``ipam_driver``).

Profile name = the Docker network's *name* (one network on every host, also
without a cluster store, where each dockerd has its own NetworkID), or
``-o profile=NAME``; learnt from Docker (``GET /networks/<id>``) at the first
CreateEndpoint and kept in the network record.  Global scope (a cluster
store): the NetworkID, as before.  Each host's network holds a reference
``/calico/libnetwork/refs/<profile>/<host>/<nid>``; the last one deleted
removes the profile.  Global scope (swarm, cluster store): one NetworkID and
one record on every host that has the network; the first host's
CreateNetwork writes the record, each host its reference, and the record
(with its pools) goes with the last host's DeleteNetwork.  Endpoint key
host = ``[calico] hostname``.

Ownership: a Docker-IPAM subnet overlapping a Calico pool, or (local scope)
another host's Docker-IPAM subnet, is refused; a network deletes only the
pools it wrote; CreateEndpoint takes only addresses of the network's subnet
(Docker IPAM) or allocated by Calico IPAM; Leave/DeleteEndpoint of an
endpoint this host has no record of touch no interface.

Per-call datastore budget (R reads / W writes / D deletes):

============== ======================================================
CreateNetwork  2R 2W (one IPv4 subnet; +1R 1W for an IPv6 subnet); Calico IPAM: 0R 1W;
               -o profile or global scope: +1R 3W (reference, profile);
               global scope: +1R (is there a record another host wrote?
               then only 2R 1W: this host's reference, +2W if the profile
               is gone)
DeleteNetwork  1R 2D (one subnet; +1D per extra subnet); Calico IPAM: 1R 1D;
               with a profile: +1R 2D (reference, and the profile if last);
               global scope, still on another host: 2R 1D (the reference)
CreateEndpoint 2R 1W (+1R with Calico IPAM: the block); the first one of a
               network: +4W (name learnt from Docker, reference, profile)
Join           1R
Leave          1R
DeleteEndpoint 1R 1D
============== ======================================================

Containers are routed, not bridged: Join creates a veth pair ``cali<eid[:11]>``
(host) / ``tmp<eid[:11]>`` (handed to Docker), a /32 (/128) host route per
address and proxy ARP on the host side, and answers the fixed next hop
169.254.1.1 (IPv6: ``fe80::1`` on the host side), each with an on-link
host route in StaticRoutes (see ``join_routes``).
"""
from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Dict, List, Optional, Tuple, Union

from netplugin import linux
from netplugin import protocol as p
from netplugin.backend import Backend, NetworkDriver, register
from netplugin.datastore import CompareFailed, KeyNotFound
from netplugin.docker import DockerClient, DockerUnavailable
from netplugin.errors import Conflict, InvalidRequest, NotFound, PluginError

from backends.calico import barrier, model
from backends.calico.gateways import GatewayTable
from backends.calico.ipam_driver import ANY_POOL, CalicoIpamDriver
from backends.calico.model import (FIXED_MAC, CorruptRecord, Endpoint, NetworkRecord, Pool,
                                   Profile, block_cidr_for, cidr_from_key, host_veth_name,
                                   is_calico_ipam, temp_veth_name)

log = logging.getLogger(__name__)

__all__ = ["FIXED_MAC", "host_veth_name", "is_calico_ipam", "temp_veth_name"]

#: The container's IPv6 next hop, put on the host side of the veth (the IPv4
#: one, 169.254.1.1, is the gateway table's).
GATEWAY_V6 = "fe80::1"
GATEWAY_V6_CIDR = "fe80::1/64"

#: ``-o`` options of ``docker network create``: booleans, and the veth MTU
#: (``mtu``, or Docker's own ``com.docker.network.driver.mtu``).
BOOL_OPTIONS = ("ipip", "nat-outgoing")
MTU_OPTIONS = ("mtu", "com.docker.network.driver.mtu")
#: ``-o profile=NAME``: the Calico profile (default: the Docker network's name).
PROFILE_OPTION = "profile"
OPTIONS = BOOL_OPTIONS + (PROFILE_OPTION,) + MTU_OPTIONS
#: Keys Docker itself may put among the generic options (newer dockerd
#: versions add their own ``com.docker.network.*`` labels); never refused.
DOCKER_OPTION_PREFIX = "com.docker."
_PROFILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def join_routes(gateway_v4: str, ipv6: bool) -> Tuple[p.StaticRoute, ...]:
    """Join's StaticRoutes: an on-link (connected, RouteType 1) host route to
    each gateway the container uses.

    Docker sets a default route only after ``RouteGet(gateway)`` in the
    container finds a direct route (no next hop) to it (libnetwork
    ``programGateway``: "route for the gateway ... could not be found").
    Nothing owns 169.254.1.1, so IPv4 always needs its /32.  For ``fe80::1``
    the kernel's own ``fe80::/64`` appears only once IPv6 addrconf has seen
    the link's carrier, which the kernel reports asynchronously after Docker
    raised eth0: Docker >= 26 checks in between and the container fails to
    start ("... fe80::1 could not be found: network is unreachable"); the
    /128 is there first.  Docker adds connected routes on the interface
    right after raising it, before it sets either gateway (20.10 to 28)."""
    routes = []
    if gateway_v4:
        routes.append(p.StaticRoute(f"{gateway_v4}/32", 1))
    if ipv6:
        routes.append(p.StaticRoute(f"{GATEWAY_V6}/128", 1))
    return tuple(routes)


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
    unknown = sorted(k for k in generic if k not in OPTIONS
                     and not k.startswith(DOCKER_OPTION_PREFIX))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise InvalidRequest(
            f"unknown network option{plural} {names} for the calico driver; "
            f"known options: {', '.join(OPTIONS[:4])}")
    out: Dict[str, Any] = {name: parse_bool_option(name, generic[name])
                           if name in generic else False for name in BOOL_OPTIONS}
    out[PROFILE_OPTION] = None
    if PROFILE_OPTION in generic:
        name = generic[PROFILE_OPTION]
        if not isinstance(name, str) or not _PROFILE_RE.match(name):
            raise InvalidRequest(
                f"network option 'profile' must be a Calico profile name (letters, digits, "
                f"'_', '.', '-', at most 128, not starting with a punctuation), got {name!r}")
        out[PROFILE_OPTION] = name
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


def network_mtu(record: Union[NetworkRecord, Dict[str, Any]]) -> Optional[int]:
    """The ``-o mtu`` of a network record (or a stored CreateNetwork body), or
    None (lenient)."""
    if not isinstance(record, NetworkRecord):
        record = NetworkRecord("", record if isinstance(record, dict) else {})
    try:
        return parse_network_options(record.generic_options)["mtu"]
    except InvalidRequest:
        return None


@register("calico")
class CalicoBackend(Backend, NetworkDriver, CalicoIpamDriver):
    """Calico network driver; addresses from Docker's IPAM (a pool with
    ``ipam: false`` per network) or from Calico IPAM (nothing per network).
    Roles: this class is the NetworkDriver and (``CalicoIpamDriver``) the
    IpamDriver; ``host_agent()`` gives the per-host agent."""

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

    def host_agent(self):
        """Once per host (agent process): policy and route agents on one watch,
        the leak audit loop, restarts (backends/calico/host_agent.py)."""
        from backends.calico.host_agent import CalicoHostAgent
        table = self.gateways
        # Join's sandbox table: which interfaces are one container, before
        # the link poll can see it.
        return CalicoHostAgent.of(self, sandbox_groups=lambda: {
            host_veth_name(e): token for e, token in table.sandboxes().items()})

    def docker_endpoint(self):
        return self.config.calico.docker_endpoint

    def health_checks(self):
        from backends.calico import observe
        return observe.health_checks(self)

    def metric_collectors(self):
        from backends.calico import observe
        return [lambda: observe.collect(self)]

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

    def gw_alloc_check(self, req: p.GwAllocCheckRequest) -> p.GwAllocCheckResponse:
        """A calico network never uses Docker's gateway address (containers
        route via 169.254.1.1 / fe80::1): Docker >= 28 need not reserve it."""
        return p.GwAllocCheckResponse(skip_ipv4=True, skip_ipv6=True)

    # -- profiles ----------------------------------------------------------------
    def _ensure_profile(self, name: str) -> None:
        """Write the profile's tags and rules unless it exists (1R, +2W)."""
        try:
            self.datastore.get(model.profile_tags(name))
            return
        except KeyNotFound:
            pass
        for key, value in Profile.default(name).to_json().items():
            self.datastore.put(key, value)
        log.info("created profile %s", name)

    def _docker_network_name(self, nid: str) -> Optional[str]:
        """The Docker network's name (``GET /networks/<nid>`` over
        ``[calico] docker_endpoint``), or None when Docker does not answer."""
        endpoint = self.config.calico.docker_endpoint
        try:
            with DockerClient(endpoint, self.config.calico.docker_timeout) as docker:
                info = docker.call(f"inspect network {nid[:12]}",
                                   lambda api: api.inspect_network(nid))
            name = info.get("Name") if isinstance(info, dict) else None
        except DockerUnavailable as exc:   # refused, timeout, 404 while CreateNetwork runs...
            log.warning("cannot learn the name of network %s from Docker at %s: %s",
                        nid[:12], endpoint, exc)
            return None
        return name if isinstance(name, str) and _PROFILE_RE.match(name) else None

    def _network_profile(self, record: NetworkRecord) -> str:
        """The profile of the record's network; resolves and stores it (with
        this host's reference) the first time, when CreateNetwork could not."""
        nid = record.network_id
        if record.legacy or record.profile:
            return record.profile   # a record of an older plugin: the NetworkID
        name = self._docker_network_name(nid)
        if name is None:
            log.warning("network %s: Docker did not tell its name; its profile is its "
                        "NetworkID, so it is not shared with other hosts (set "
                        "-o profile=NAME, or [calico] docker_endpoint)", nid[:12])
            name = nid
        updated = record.with_profile(name)
        ref = model.profile_ref(name, record.host or self.hostname, nid)
        self.datastore.put(ref, model.profile_ref_json(nid))
        if record.version is None:
            self.datastore.put(record.key, updated.to_json())
        else:
            try:
                self.datastore.compare_and_swap(record.key, updated.to_json(), record.version)
            except CompareFailed:
                pass      # a concurrent CreateEndpoint stored the same name
        log.info("network %s uses profile %s", nid[:12], name)
        return name

    # networks -------------------------------------------------------------
    def _check_pools(self, nid: str, pools: List[Tuple[str, int]]) -> List[str]:
        """Refuse a Docker-IPAM subnet that overlaps an operator's (Calico IPAM)
        pool, or, in local scope, one another host's network already uses.
        Returns the pools this network must write (and later delete)."""
        if not pools:
            return []
        records: Dict[str, NetworkRecord] = {}
        for item in self.datastore.list_prefix(model.NETWORK_ROOT + "/"):
            other = item.key.rsplit("/", 1)[-1]
            if other == nid:
                continue
            try:
                records[other] = NetworkRecord.from_json(other, item.value)
            except CorruptRecord:
                continue
        owned_by: Dict[str, str] = {}
        for other, rec in records.items():
            for cidr in rec.owned_pools():
                owned_by[cidr] = other
        mine: List[str] = []
        for cidr, version in pools:
            net = ipaddress.ip_network(cidr)
            if self.config.scope == "local":
                for other, rec in sorted(records.items()):
                    host = rec.host
                    if not host or host == self.hostname:
                        continue
                    for used in rec.named_pools():
                        if ipaddress.ip_network(used).overlaps(net):
                            raise Conflict(
                                f"subnet {cidr} overlaps {used}, which a calico network of "
                                f"host {host} uses with Docker's IPAM: Docker's IPAM cannot "
                                f"share a subnet between hosts (both would hand out the "
                                f"same addresses); create the network with --ipam-driver "
                                f"calico on every host")
            exists = False
            for item in self.datastore.list_prefix(model.pool_dir(version)):
                try:
                    pool = ipaddress.ip_network(cidr_from_key(item.key))
                except ValueError:
                    continue
                if not pool.overlaps(net):
                    continue
                if str(pool) in owned_by:
                    # Another network of ours wrote it (Docker decides whether
                    # two of its networks may overlap): never ours to write.
                    exists = exists or str(pool) == cidr
                    continue
                raise Conflict(
                    f"subnet {cidr} overlaps the Calico IPAM pool {pool}: a Docker-IPAM "
                    f"calico network cannot use a Calico pool's addresses; use "
                    f"--ipam-driver calico (with --subnet {cidr} inside the pool), or a "
                    f"subnet outside every Calico pool")
            if not exists:
                mine.append(cidr)
        return mine

    def _shared_record(self, nid: str) -> Optional[NetworkRecord]:
        """Global scope: the record another host already wrote for ``nid``
        (a swarm or cluster-store network has one NetworkID on every host),
        or None (1R)."""
        try:
            record = NetworkRecord.from_json(nid, self.datastore.get(model.network(nid)).value)
        except (KeyNotFound, CorruptRecord):
            return None
        if record.legacy or not record.profile:
            return None
        return record

    def create_network(self, req: p.CreateNetworkRequest) -> None:
        options, pools = self._validate_network(req)
        nid = req.network_id
        if self.config.scope == "global":
            shared = self._shared_record(nid)
            if shared is not None:
                # Another host created this network: its record (and the pools
                # it wrote) stay as they are; this host takes its reference.
                profile = shared.profile
                self.datastore.put(model.profile_ref(profile, self.hostname, nid),
                                   model.profile_ref_json(nid))
                self._ensure_profile(profile)
                log.info("network %s (created by host %s) is now on this host too "
                         "(profile %s)", nid, shared.host, profile)
                return
        owned = self._check_pools(nid, pools)
        profile = options[PROFILE_OPTION] or (nid if self.config.scope == "global" else "")
        record = NetworkRecord.create(nid, req.raw, self.hostname, profile, owned)
        writes: List[Tuple[str, str]] = [
            # The record first: if we die half-way, DeleteNetwork still finds
            # the pools to delete.
            (record.key, record.to_json()),
        ]
        if profile:
            # Local scope without -o profile: the name is learnt from Docker at
            # the first CreateEndpoint (Docker cannot be asked while this runs).
            writes.append((model.profile_ref(profile, self.hostname, nid),
                           model.profile_ref_json(nid)))
        done: List[str] = []
        try:
            for key, value in writes:
                self.datastore.put(key, value)
                done.append(key)
            if profile:
                self._ensure_profile(profile)
            for cidr, _version in pools:
                if cidr not in owned:
                    continue
                pool = Pool.docker_ipam(cidr, options["ipip"], options["nat-outgoing"])
                self.datastore.put(pool.key, pool.to_json())
                done.append(pool.key)
        except BaseException:
            self._undo_writes(done)
            raise
        log.info("created network %s (profile %s, pools %s, ipip=%s, nat-outgoing=%s, "
                 "mtu=%s)", nid, profile or "<its Docker name>",
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
            raw = self.datastore.get(model.network(nid)).value
        except KeyNotFound:
            # Not ours (e.g. a profile made with netpluginctl): change nothing.
            log.info("network %s is not known to the calico plugin; nothing deleted", nid)
            return
        try:
            record = NetworkRecord.from_json(nid, raw)
        except CorruptRecord as exc:
            log.warning("network record %s is corrupt (%s); deleting it, its profile %s "
                        "and no pool", model.network(nid), exc, nid)
            self.datastore.delete_prefix(model.profile_dir(nid) + "/")
            self._delete_quietly(model.network(nid))
            return
        if not record.legacy:
            profile = record.profile
            if profile:
                # This host's reference (global scope: each host that has the
                # network holds one, under the same NetworkID).
                mine = {model.profile_ref(profile, self.hostname, nid)}
                if self.config.scope == "local" and record.host:
                    mine.add(model.profile_ref(profile, record.host, nid))
                for key in sorted(mine):
                    self._delete_quietly(key)
                left = self.datastore.list_prefix(model.profile_refs(profile))
                still = sorted(i.key.split("/")[-2] for i in left
                               if i.key.rsplit("/", 1)[-1] == nid)
                if still:
                    # The same network on other hosts: its record, pools and
                    # profile are theirs too; the last host's delete removes them.
                    log.info("network %s left this host; kept for host(s) %s", nid,
                             ", ".join(still))
                    return
                if left:
                    log.info("profile %s kept: %d network(s) still use it (%s)", profile,
                             len(left), ", ".join(i.key.split("/")[-2] for i in left))
                else:
                    self.datastore.delete_prefix(model.profile_dir(profile) + "/")
        else:
            self.datastore.delete_prefix(model.profile_dir(nid) + "/")   # older record
        for cidr in record.owned_pools():
            self._delete_our_pool(cidr, legacy=record.legacy)
        self._delete_quietly(model.network(nid))
        log.info("deleted network %s", nid)

    def _delete_our_pool(self, cidr: str, legacy: bool) -> None:
        key = model.pool(cidr)
        if legacy:
            # An older record names its pools without saying who wrote them:
            # delete only a pool that looks like ours (ipam false).
            try:
                pool = Pool.from_json(key, self.datastore.get(key).value)
            except KeyNotFound:
                return
            except CorruptRecord:
                pool = None
            if pool is None or not pool.written_for_docker_ipam:
                log.warning("pool %s is not a Docker-IPAM pool of ours; left alone", cidr)
                return
        self._delete_quietly(key)

    # endpoints ------------------------------------------------------------
    def _check_addresses(self, record: NetworkRecord, ips: List[Any]) -> None:
        """Refuse an address outside the network's subnet (Docker IPAM) or
        that Calico IPAM did not allocate (Calico IPAM)."""
        nid = record.network_id
        data = record.address_data()
        calico = record.calico_ipam
        for ip in ips:
            subnets = []
            for e in data:
                try:
                    net = ipaddress.ip_network(e.get("Pool"), strict=False)
                except (TypeError, ValueError):
                    continue
                if net.version == ip.version and str(net) not in ANY_POOL.values():
                    subnets.append(net)
            if not calico:
                if not any(ip in net for net in subnets):
                    raise InvalidRequest(
                        f"address {ip} is outside the subnet of network {nid[:12]} "
                        f"({', '.join(map(str, subnets)) or f'no IPv{ip.version} subnet'})")
                continue
            if subnets and not any(ip in net for net in subnets):
                raise InvalidRequest(f"address {ip} is outside the subnet of network "
                                     f"{nid[:12]} ({', '.join(map(str, subnets))})")
            try:
                block = self.ipam.read_block(block_cidr_for(ip))
            except KeyNotFound:
                block = None
            if block is None or ip not in block.allocated():
                raise InvalidRequest(f"address {ip} was not allocated by Calico IPAM: "
                                     f"network {nid[:12]} takes only the addresses its "
                                     f"IPAM driver hands out")

    def create_endpoint(self, req: p.CreateEndpointRequest
                        ) -> Optional[p.CreateEndpointResponse]:
        nid, eid = req.network_id, req.endpoint_id
        try:
            item = self.datastore.get(model.network(nid))
        except KeyNotFound:
            raise NotFound(f"network {nid} is not known to the calico plugin") from None
        try:
            record = NetworkRecord.from_json(nid, item.value, getattr(item, "version", None))
        except CorruptRecord:
            raise PluginError(f"network record {model.network(nid)} is corrupt") from None
        mtu = network_mtu(record)
        iface = req.interface
        if not iface.address and not iface.address_ipv6:
            raise InvalidRequest("CreateEndpoint needs Interface.Address or "
                                 "Interface.AddressIPv6: the calico driver routes "
                                 "addresses, it cannot work without one")
        ips = [ipaddress.ip_interface(a).ip for a in (iface.address, iface.address_ipv6) if a]
        self._check_addresses(record, ips)
        profile = self._network_profile(record)
        self._ensure_profile(profile)   # the last host's delete may have raced us
        docker_mac = iface.mac_address or req.mac_option
        mac = docker_mac or FIXED_MAC
        ipv4 = [str(ipaddress.ip_interface(iface.address).ip) + "/32"] if iface.address else []
        ipv6 = ([str(ipaddress.ip_interface(iface.address_ipv6).ip) + "/128"]
                if iface.address_ipv6 else [])
        # The network's -o mtu travels with the endpoint, so Join needs one
        # read only (Calico's readers ignore extra endpoint fields); when the
        # profile is the network's name, the audit still needs its ID.
        ep = Endpoint(host=self.hostname, endpoint_id=eid, name=host_veth_name(eid),
                      profile_ids=(profile,), ipv4_nets=tuple(ipv4), ipv6_nets=tuple(ipv6),
                      mac=mac, mtu=mtu, network_id=nid if profile != nid else None)
        self.datastore.put(ep.key, ep.to_json())
        # The agent applies the endpoint's chain now, before Join waits for it.
        barrier.notify(self.config.driver_state_dir, ep.key)
        log.info("created endpoint %s on network %s (profile %s, %s, mac %s)", eid, nid,
                 profile, ", ".join(ipv4 + ipv6), mac)
        if docker_mac:
            return p.CreateEndpointResponse()   # Docker refuses a repeated field
        return p.CreateEndpointResponse(mac_address=mac)

    def _read_endpoint(self, eid: str) -> Endpoint:
        key = model.endpoint(self.hostname, eid)
        try:
            raw = self.datastore.get(key).value
        except KeyNotFound:
            raise NotFound(f"endpoint {eid} is not known to the calico plugin "
                           f"on host {self.hostname}") from None
        try:
            ep = Endpoint.from_json(key, raw)
            ep.check_join()
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
        ipv4, ipv6 = ep.ipv4_nets, ep.ipv6_nets
        mtu = ep.mtu or self.mtu
        # Another Calico interface of this container keeps 169.254.1.1; the
        # sandbox table also tells the policy agent which interfaces are one
        # container (IPv6-only ones get no IPv4 gateway).
        gateway = self.gateways.choose(
            req.sandbox_key, eid, alive=lambda e: linux.link_exists(host_veth_name(e)),
            gateway=bool(ipv4))
        # The alias marks the veth as ours (the audit deletes no other cali*).
        linux.create_veth(host, temp, mtu=mtu, peer_mac=ep.mac.lower(),
                          alias=model.veth_marker(eid))
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
        # The container's first packet must find its chain in place: the agent
        # may not have seen the endpoint (watch lag) or its container yet.
        answer = barrier.wait_applied(self.config.driver_state_dir,
                                      model.endpoint(self.hostname, eid))
        if answer not in ("ok", "no agent"):
            log.warning("join %s: the policy agent answered %r; the container's first "
                        "packets may be dropped until it catches up", eid, answer)
        log.info("joined endpoint %s: veth %s/%s mtu %d, gateway %s, routes %s", eid, host,
                 temp, mtu, gateway or GATEWAY_V6, ", ".join(ipv4 + ipv6))
        return p.JoinResponse(
            src_name=temp, dst_prefix="eth",
            gateway=gateway,
            gateway_ipv6=GATEWAY_V6 if ipv6 else "",
            static_routes=join_routes(gateway if ipv4 else "", bool(ipv6)),
            disable_gateway_service=True)

    def _known_endpoint(self, eid: str, call: str) -> bool:
        """True if this host has a record for ``eid``; an unknown endpoint
        (a mistyped or foreign ID) is logged and touches no interface."""
        try:
            self.datastore.get(model.endpoint(self.hostname, eid))
            return True
        except KeyNotFound:
            log.warning("%s: endpoint %s is not known to the calico plugin on host %s; "
                        "no interface touched", call, eid, self.hostname)
            return False

    def leave(self, req: p.EndpointRequest) -> None:
        if not self._known_endpoint(req.endpoint_id, "Leave"):
            return
        if linux.delete_link(host_veth_name(req.endpoint_id)):
            log.info("left endpoint %s: deleted veth", req.endpoint_id)
        self.gateways.release(req.endpoint_id)

    def delete_endpoint(self, req: p.EndpointRequest) -> None:
        eid = req.endpoint_id
        if not self._known_endpoint(eid, "DeleteEndpoint"):
            return
        try:
            self._delete_quietly(model.endpoint(self.hostname, eid))
        finally:
            # Docker calls DeleteEndpoint without Leave after a failed Join.
            linux.delete_link(host_veth_name(eid))
            self.gateways.release(eid)
        log.info("deleted endpoint %s", eid)

    def endpoint_oper_info(self, req: p.EndpointRequest) -> dict:
        return {}
