"""Nuage VRS network driver (Docker's IPAM), written the way Nuage's own
libnetwork plugins plug containers into the local VRS, through OVSDB.

Per call (datastore cost in brackets):

================ ===========================================================
CreateNetwork    validate the five ``-o`` options and the IPAM subnet; store
                 the network [1W].  Nothing in OVSDB (as the seed plugin).
CreateEndpoint   the network must be known; store the endpoint (Docker's
                 address, Docker's MAC or a generated one) [1R 1W].
Join             ask Docker which container it is (name + ID, short timeout,
                 falls back to the EndpointID); mark the endpoint joined [2R 1W];
                 veth ``nuv<id>``/``nut<id>``; one OVSDB transaction: OVS
                 Port+Interface on the VRS bridge, Nuage_Port_Table and
                 Nuage_VM_Table rows; wait (bounded) until VRS resolves the
                 vPort; the container gets VRS's gateway.  Any failure undoes
                 everything.
Leave            remove the rows, the port and the veth [1R 1W].
DeleteEndpoint   the same (Docker skips Leave after a failed Join) and forget
                 the endpoint [1R 1D].
DeleteNetwork    forget the network [1D].
================ ===========================================================

Every removal is idempotent.  Host-wide work runs once per host, in the
HostAgent role (backends/nuage/host_agent.py, run by the agent process), not
in every gunicorn worker: when its OVSDB connection comes back (ovsdb-server
restarted, connection dropped) the rows of every joined endpoint are
re-asserted and rows this plugin owns without a live endpoint are removed;
and the audit loop removes the endpoints Docker no longer has (the one-shot
``--audit`` is ``audit`` below, with the same two-look rule).  Per-endpoint
work is serialised host-wide (workers and agent) by a lock file under the
driver's state directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from netplugin import linux as _linux
from netplugin import protocol as p
from netplugin.backend import Backend, NetworkDriver, register
from netplugin.datastore import DatastoreError, KeyNotFound
from netplugin.errors import InvalidRequest, NotFound, NotSupported, PluginError

from backends.nuage import keys
from backends.nuage.docker_api import DockerApi, DockerUnavailable
from backends.nuage.network import NuageNetwork, network_from_request
from backends.nuage.vport import EndpointRecord, VPort, generated_mac, port_name
from backends.nuage.vrs import VrsClient, VrsError, VrsUnavailable, vrs_remote

log = logging.getLogger(__name__)

#: An endpoint created after the agent started is judged only once its record
#: is this old (seconds): Docker lists an endpoint as soon as it is created.
MIN_AGE = 30.0
LOCK_BUCKETS = 256


@register("nuage")
class NuageBackend(Backend, NetworkDriver):
    """Containers as vPorts of the local Nuage VRS; Docker's IPAM supplies addresses."""

    implements_ipam = False

    def __init__(self, config, datastore, vrs: Optional[VrsClient] = None,
                 docker: Optional[DockerApi] = None, linux=None):
        super().__init__(config, datastore)
        n = config.nuage
        self.bridge = n.vrs_bridge
        self.driver = config.driver_name or "nuage"
        self.hostname = n.hostname
        self.resolve_timeout = n.resolve_timeout
        self.vrs = vrs
        self.docker = docker if docker is not None else DockerApi(n.docker_endpoint,
                                                                  n.docker_timeout)
        self.linux = linux if linux is not None else _linux
        self._locks: Dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._started_at = time.time()
        #: Set by the running host agent: called on every VRS (re)connection.
        self.on_vrs_connect: Optional[Callable[[int], None]] = None
        self._stopped = False

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Before serving (every worker): connect to VRS in the background.
        Re-assertion and the audit run once per host, in the host agent."""
        self._started_at = time.time()
        try:
            self._vrs()
        except VrsUnavailable as exc:
            log.error("%s (every Join will fail until this is fixed)", exc)

    def host_agent(self):
        """Once per host (agent process): re-assertion on VRS connections and
        the audit loop (backends/nuage/host_agent.py)."""
        from backends.nuage.host_agent import NuageHostAgent
        n = self.config.nuage
        return NuageHostAgent(self, self.docker, driver=self.driver,
                              audit_interval=n.audit_interval, audit_grace=n.audit_grace)

    def stop(self) -> None:
        self._stopped = True
        if self.vrs is not None:
            self.vrs.stop()
        self.docker.close()

    def docker_endpoint(self):
        return self.config.nuage.docker_endpoint

    def health_checks(self):
        """VRS's OVSDB connected and its replica loaded, and Docker (``/health``)."""
        from netplugin import health
        vrs = self._vrs()
        n = self.config.nuage
        remote = vrs_remote(n.vrs_endpoint, n.vrs_port)
        if vrs.ready:
            ovsdb = (True, f"VRS OVSDB at {remote} connected")
        else:
            ovsdb = (False, f"VRS OVSDB at {remote} not connected: {vrs.last_error}")
        return {"vrs": ovsdb,
                "docker": health.check_docker(n.docker_endpoint, min(n.docker_timeout, 3.0))}

    def _vrs(self) -> VrsClient:
        """The VRS client, created (and started) on first use."""
        if self.vrs is None:
            n = self.config.nuage
            remote = vrs_remote(n.vrs_endpoint, n.vrs_port)
            with self._locks_guard:
                if self.vrs is None:
                    self.vrs = VrsClient(remote, self.bridge, timeout=n.vrs_timeout,
                                         on_connect=self._on_vrs_connect)
                    self.vrs.start()
        return self.vrs

    @contextmanager
    def _endpoint_lock(self, eid: str) -> Iterator[None]:
        """Serialise Join/Leave/DeleteEndpoint/re-assert/audit of one endpoint,
        host-wide: a thread lock in this process, and an flock on one of
        LOCK_BUCKETS files under the driver's state directory against the
        other workers and the agent."""
        with self._locks_guard:
            lock = self._locks.setdefault(eid, threading.Lock())
        with lock:
            fd = self._lock_fd(eid)
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                if fd is not None:
                    os.close(fd)            # releases the flock

    def _lock_fd(self, eid: str) -> Optional[int]:
        bucket = int(hashlib.sha1(eid.encode()).hexdigest(), 16) % LOCK_BUCKETS
        directory = os.path.join(self.config.driver_state_dir, "locks")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            return os.open(os.path.join(directory, f"{bucket:02x}"),
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if not getattr(self, "_lock_warned", False):
                self._lock_warned = True
                log.warning("no host-wide endpoint lock (%s): %s; locking within this "
                            "process only", directory, exc)
            return None

    # ---- datastore records ------------------------------------------------------
    def _read_network(self, nid: str) -> NuageNetwork:
        key = keys.network(nid)
        try:
            raw = self.datastore.get(key).value
        except KeyNotFound:
            raise NotFound(f"network {nid} is not known to the nuage plugin (was it created "
                           "with --driver=nuage? with scope global, do all hosts share the "
                           "datastore?)") from None
        return NuageNetwork.from_json(key, raw)

    def _read_endpoint(self, eid: str) -> Optional[EndpointRecord]:
        key = keys.endpoint(self.hostname, eid)
        try:
            raw = self.datastore.get(key).value
        except KeyNotFound:
            return None
        return EndpointRecord.from_json(key, raw)

    def _write_endpoint(self, rec: EndpointRecord) -> None:
        self.datastore.put(keys.endpoint(self.hostname, rec.endpoint_id), rec.to_json())

    def _delete_endpoint_record(self, eid: str) -> None:
        try:
            self.datastore.delete(keys.endpoint(self.hostname, eid))
        except KeyNotFound:
            pass

    def _local_records(self) -> List[EndpointRecord]:
        out = []
        for item in self.datastore.list_prefix(keys.endpoint_dir(self.hostname)):
            try:
                out.append(EndpointRecord.from_json(item.key, item.value))
            except PluginError as exc:
                log.warning("%s; ignoring it", exc)
        return out

    # ---- networks -------------------------------------------------------------
    def create_network(self, req: p.CreateNetworkRequest) -> None:
        net = network_from_request(req)
        self.datastore.put(keys.network(net.network_id), net.to_json())
        log.info("created network %s: enterprise %r domain %r zone %r subnet %r user %r, "
                 "pool %s gateway %s", net.network_id, net.organization, net.domain,
                 net.zone, net.subnet, net.user, net.pool, net.gateway or "-")

    def delete_network(self, req: p.NetworkRequest) -> None:
        try:
            self.datastore.delete(keys.network(req.network_id))
        except KeyNotFound:
            log.info("network %s was not known; nothing to delete", req.network_id)
            return
        log.info("deleted network %s", req.network_id)

    # ---- endpoints --------------------------------------------------------------
    def create_endpoint(self, req: p.CreateEndpointRequest
                        ) -> Optional[p.CreateEndpointResponse]:
        nid, eid = req.network_id, req.endpoint_id
        net = self._read_network(nid)
        iface = req.interface
        if iface.address_ipv6:
            raise NotSupported("the nuage driver is IPv4 only: the endpoint got an IPv6 "
                               f"address {iface.address_ipv6}")
        if not iface.address:
            raise InvalidRequest("CreateEndpoint has no Interface.Address: the nuage driver "
                                 "pushes Docker's IPAM address to VRS as the static IP")
        if ipaddress.ip_interface(iface.address).ip not in ipaddress.ip_network(net.pool):
            raise InvalidRequest(f"address {iface.address} is outside the network's subnet "
                                 f"{net.pool}")
        docker_mac = iface.mac_address or req.mac_option
        rec = EndpointRecord.new(nid, eid, iface.address, docker_mac or generated_mac(eid),
                                 bool(docker_mac))
        self._write_endpoint(rec)
        log.info("created endpoint %s on network %s (%s, mac %s)", eid, nid, rec.address,
                 rec.mac)
        if docker_mac:
            return p.CreateEndpointResponse()   # Docker refuses a repeated field
        return p.CreateEndpointResponse(mac_address=rec.mac)

    def _identify(self, rec: EndpointRecord) -> Tuple[str, str, str]:
        """(vm_uuid, vm_name, source) of the container behind the endpoint."""
        try:
            found = self.docker.container_for_endpoint(rec.network_id, rec.endpoint_id)
        except DockerUnavailable as exc:
            log.warning("%s; the VM row of endpoint %s uses the EndpointID instead of the "
                        "container", exc, rec.endpoint_id[:12])
            found = None
        else:
            if found is None:
                log.warning("Docker does not list endpoint %s; its VM row uses the "
                            "EndpointID instead of the container", rec.endpoint_id[:12])
        if found is not None:
            return found.id, found.name, "docker"
        return rec.endpoint_id, rec.endpoint_id[:12], "endpoint"

    def join(self, req: p.JoinRequest) -> p.JoinResponse:
        eid = req.endpoint_id
        with self._endpoint_lock(eid):
            rec = self._read_endpoint(eid)
            if rec is None:
                raise NotFound(f"endpoint {eid} is not known to the nuage plugin on host "
                               f"{self.hostname}")
            if rec.network_id != req.network_id:
                raise InvalidRequest(f"endpoint {eid} belongs to network {rec.network_id}, "
                                     f"not {req.network_id}")
            net = self._read_network(rec.network_id)
            vrs = self._vrs()
            vrs.wait_ready()          # fail before touching anything
            if not vrs.bridge_exists():
                raise VrsError(f"bridge {self.bridge} does not exist in VRS OVSDB at "
                               f"{vrs.remote}: set [nuage] vrs_bridge to the VRS bridge")
            rec.vm_uuid, rec.vm_name, rec.identity = self._identify(rec)
            rec.joined = rec.vport = True
            # The record first: reconnect and audit logic trust it.
            self._write_endpoint(rec)
            started = time.monotonic()
            try:
                self.linux.create_veth(rec.port, rec.peer, peer_mac=rec.mac)
                self.linux.set_link_up(rec.port)
                vrs.ensure_vport(VPort.of(rec, net, self.bridge, self.driver), fresh=True)
                res = vrs.wait_resolved(rec.port, self.resolve_timeout)
                res.check(rec)
            except BaseException as exc:
                log.warning("join of endpoint %s failed (%s); undoing it", eid[:12], exc)
                clean, _ = self._teardown(eid, rec)
                rec.joined = False
                rec.vport = not clean
                try:
                    self._write_endpoint(rec)
                except DatastoreError as exc2:
                    log.warning("rollback: cannot update endpoint %s: %s", eid[:12], exc2)
                raise
        log.info("joined endpoint %s: vPort %s of VM %s (%s, from %s) resolved by VRS in "
                 "%.2fs: %s/%s gw %s vrf %s evpn %s", eid[:12], rec.port, rec.vm_name,
                 rec.vm_uuid[:12], rec.identity, time.monotonic() - started, res.ip,
                 res.mask, res.gateway, res.vrf_id, res.evpn_id)
        return p.JoinResponse(src_name=rec.peer, dst_prefix="eth", gateway=res.gateway,
                              disable_gateway_service=False)

    def _teardown(self, eid: str, rec: Optional[EndpointRecord],
                  vrs_wait: float = 1.0) -> Tuple[bool, List[str]]:
        """Remove the vPort's rows, OVS port and veth; try every step.  Returns
        (OVSDB is clean, problems).  OVSDB is skipped when the record says
        nothing was ever written there; a VRS not ready within ``vrs_wait``
        seconds is not waited for (the rows go when it is back: remove_orphans
        runs on every connection)."""
        name = port_name(eid)
        problems = []
        ovsdb_clean = True
        try:
            if rec is None or rec.vport:
                vrs = self._vrs()
                vrs.wait_ready(min(vrs_wait, vrs.timeout))
                vrs.remove_vport(name)
        except PluginError as exc:
            ovsdb_clean = False
            problems.append(f"cannot remove vPort {name} from VRS ({exc}); it will be "
                            "removed when VRS is reachable again")
        try:
            self.linux.delete_link(name)
        except PluginError as exc:
            problems.append(str(exc))
        for msg in problems:
            log.warning("endpoint %s: %s", eid[:12], msg)
        return ovsdb_clean, problems

    def leave(self, req: p.EndpointRequest) -> None:
        eid = req.endpoint_id
        with self._endpoint_lock(eid):
            rec = self._read_endpoint(eid)
            clean, problems = self._teardown(eid, rec)
            if rec is not None and (rec.joined or rec.vport):
                rec.joined = False
                rec.vport = not clean
                self._write_endpoint(rec)
        if problems:
            raise PluginError("; ".join(problems))
        log.info("left endpoint %s", eid[:12])

    def delete_endpoint(self, req: p.EndpointRequest) -> None:
        eid = req.endpoint_id
        with self._endpoint_lock(eid):
            rec = self._read_endpoint(eid)
            _, problems = self._teardown(eid, rec)
            if rec is not None:
                self._delete_endpoint_record(eid)
        with self._locks_guard:
            self._locks.pop(eid, None)
        if problems:
            raise PluginError("; ".join(problems))
        log.info("deleted endpoint %s", eid[:12])

    def endpoint_oper_info(self, req: p.EndpointRequest) -> dict:
        return {}

    # ---- reconnect, audit -------------------------------------------------------
    def _on_vrs_connect(self, n: int) -> None:
        """Every time the OVSDB replica is (re)loaded: handled by the host agent
        when one runs on this instance (``on_vrs_connect``); workers and a
        one-shot ``--audit`` ignore it."""
        listener = self.on_vrs_connect
        if self._stopped or listener is None:
            return
        listener(n)

    def reassert(self) -> int:
        """Write back the rows of every joined endpoint of this host (idempotent);
        returns how many were checked."""
        vrs = self._vrs()
        count = 0
        networks: Dict[str, NuageNetwork] = {}
        for stale in self._local_records():
            if not stale.joined:
                continue
            eid = stale.endpoint_id
            with self._endpoint_lock(eid):
                rec = self._read_endpoint(eid)
                if rec is None or not rec.joined:
                    continue
                if not self.linux.link_exists(rec.port):
                    log.warning("endpoint %s is joined but its veth %s is gone; not "
                                "re-asserting it", eid[:12], rec.port)
                    continue
                try:
                    if rec.network_id not in networks:
                        networks[rec.network_id] = self._read_network(rec.network_id)
                    vrs.ensure_vport(VPort.of(rec, networks[rec.network_id], self.bridge,
                                              self.driver),
                                     fresh=False)
                    count += 1
                except PluginError as exc:
                    log.warning("cannot re-assert vPort %s of endpoint %s: %s", rec.port,
                                eid[:12], exc)
        if count:
            log.info("re-asserted %d vPort(s)", count)
        return count

    def _orphans(self) -> Tuple[Dict[str, str], List[EndpointRecord], Dict[str, dict]]:
        """({vPort name: EndpointID} of the OVS ports this plugin instance owns
        (marked with our driver name) whose endpoint is not joined here, the
        endpoint records, every OVS port)."""
        ports = self._vrs().snapshot_ports()   # OVSDB first, then the records
        records = self._local_records()
        joined = {r.port for r in records if r.joined}
        orphans = {name: info["endpoint"] for name, info in sorted(ports.items())
                   if info["endpoint"] and info["driver"] == self.driver
                   and name not in joined}
        return orphans, records, ports

    def remove_orphans(self) -> List[str]:
        """Remove the vPorts (OVS port + Nuage rows) this plugin instance owns
        whose endpoint is not joined here, and forget the endpoints the audit
        found stale once their vPort is gone."""
        vrs = self._vrs()
        if not vrs.ready:
            return []
        orphans, records, ports = self._orphans()
        removed = []
        for name, eid in orphans.items():
            with self._endpoint_lock(eid):
                rec = self._read_endpoint(eid)
                if rec is not None and rec.joined:
                    continue
                try:
                    vrs.remove_vport(name)
                    if rec is None or rec.stale:
                        self.linux.delete_link(name)
                    if rec is not None and rec.stale:
                        self._delete_endpoint_record(eid)
                    elif rec is not None and rec.vport:
                        rec.vport = False
                        self._write_endpoint(rec)
                    removed.append(name)
                except PluginError as exc:
                    log.warning("cannot remove orphan vPort %s: %s", name, exc)
        for rec in records:
            if rec.stale and rec.port not in ports:
                with self._endpoint_lock(rec.endpoint_id):
                    current = self._read_endpoint(rec.endpoint_id)
                    if current is not None and current.stale and not current.joined:
                        self._delete_endpoint_record(rec.endpoint_id)
        if removed:
            log.info("removed %d orphan vPort(s): %s", len(removed), ", ".join(removed))
        return removed

    def _endpoint_items(self) -> Dict[str, Tuple[EndpointRecord, int]]:
        """``{eid: (record, datastore version)}`` of this host's endpoints."""
        out: Dict[str, Tuple[EndpointRecord, int]] = {}
        for item in self.datastore.list_prefix(keys.endpoint_dir(self.hostname)):
            try:
                rec = EndpointRecord.from_json(item.key, item.value)
            except PluginError as exc:
                log.warning("%s; ignoring it", exc)
                continue
            out[rec.endpoint_id] = (rec, item.version)
        return out

    def _stale(self, items: Dict[str, Tuple[EndpointRecord, int]], known: Set[str],
               now: float) -> Dict[str, Tuple[EndpointRecord, int]]:
        """Records Docker does not know, old enough to be judged: created
        before this process started, or at least MIN_AGE seconds ago."""
        return {e: v for e, v in items.items() if e not in known
                and (v[0].created < self._started_at or v[0].created < now - MIN_AGE)}

    @staticmethod
    def _agree(first: Dict[str, Tuple[EndpointRecord, int]],
               second: Dict[str, Tuple[EndpointRecord, int]]
               ) -> Dict[str, Tuple[EndpointRecord, int]]:
        """Stale at both looks, with the same record version."""
        return {e: v for e, v in first.items() if e in second and second[e][1] == v[1]}

    def _look(self) -> Dict[str, Tuple[EndpointRecord, int]]:
        items = self._endpoint_items()               # our state first, then Docker
        known = self.docker.endpoint_ids(self.driver)
        return self._stale(items, known, time.time())

    def audit(self, dry_run: bool = False, grace: Optional[float] = None) -> dict:
        """Remove what Docker no longer knows: endpoints of this host Docker does
        not list at two looks ``grace`` seconds apart (``[nuage] audit_grace``)
        whose record did not change in between lose their rows, OVS port, veth
        and record (if VRS is not reachable, the record is marked stale and the
        rest happens when it connects); then orphan vPorts go.  Endpoints
        created after this process started are left alone (Docker may not list
        them yet).  Raises a PluginError when Docker or the datastore cannot be
        asked (nothing is deleted then).  With ``dry_run`` only reports.

        Summary: ``stale_endpoints`` (EndpointIDs), ``pending`` (those whose
        OVSDB cleanup waits for VRS), ``orphan_vports`` (vPort names), ``vrs``
        ("connected" or why not), ``dry_run``."""
        vrs = self._vrs()
        try:
            vrs.wait_ready(min(2.0, vrs.timeout))
            vrs_state = "connected"
        except VrsUnavailable as exc:
            vrs_state = str(exc)
        grace = self.config.nuage.audit_grace if grace is None else grace
        stale = self._look()
        if stale:
            time.sleep(grace)
            stale = self._agree(stale, self._look())
        summary = {"dry_run": dry_run, "vrs": vrs_state, "pending": [],
                   "stale_endpoints": sorted(stale), "orphan_vports": []}
        if dry_run:
            if vrs.ready:
                orphans, _, ports = self._orphans()
                stale_ports = {r.port for r, _ in stale.values() if r.vport} & set(ports)
                summary["orphan_vports"] = sorted(set(orphans) | stale_ports)
            return summary
        summary["pending"] = self._remove_stale(stale)
        summary["orphan_vports"] = self.remove_orphans()
        return summary

    def _remove_stale(self, stale: Dict[str, Tuple[EndpointRecord, int]]) -> List[str]:
        """Remove the endpoints ``stale`` names, each only if its record is
        still at the version seen; returns those whose OVSDB cleanup waits."""
        pending = []
        for eid, (_, version) in sorted(stale.items()):
            with self._endpoint_lock(eid):
                try:
                    item = self.datastore.get(keys.endpoint(self.hostname, eid))
                except KeyNotFound:
                    continue
                if item.version != version:
                    log.info("audit: endpoint %s changed since it was looked at; kept",
                             eid[:12])
                    continue
                rec = EndpointRecord.from_json(item.key, item.value)
                if not rec.stale or rec.joined:
                    rec.stale, rec.joined = True, False
                    self._write_endpoint(rec)   # never re-asserted from now on
                clean, problems = self._teardown(eid, rec, vrs_wait=0.0)
                if clean and not problems:
                    self._delete_endpoint_record(eid)
                else:
                    pending.append(eid)
            log.info("audit: endpoint %s (vPort %s) is gone from Docker: %s", eid[:12],
                     rec.port, "removed" if clean and not problems else
                     "removing it when VRS is reachable")
        return pending
