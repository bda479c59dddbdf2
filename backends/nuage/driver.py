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

Every removal is idempotent.  When the OVSDB connection comes back (ovsdb-
server restarted, connection dropped) the rows of every joined endpoint are
re-asserted and rows this plugin owns without a live endpoint are removed; at
start-up endpoints Docker no longer has are removed entirely.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple

from netplugin import linux as _linux
from netplugin import protocol as p
from netplugin.backend import Backend, register
from netplugin.datastore import DatastoreError, KeyNotFound
from netplugin.errors import InvalidRequest, NotFound, NotSupported, PluginError

from backends.nuage import keys
from backends.nuage.docker_api import DockerApi, DockerUnavailable
from backends.nuage.network import NuageNetwork, network_from_request
from backends.nuage.vport import EndpointRecord, VPort, generated_mac, port_name
from backends.nuage.vrs import VrsClient, VrsError, VrsUnavailable, vrs_remote

log = logging.getLogger(__name__)


@register("nuage")
class NuageBackend(Backend):
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
        self._serving = False     # start() ran: react to VRS (re)connections
        self._stopped = False

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Before serving: connect to VRS (in the background; every (re)connection
        re-asserts joined vPorts) and run the start-up audit."""
        self._started_at = time.time()
        self._serving = True
        try:
            self._vrs()
        except VrsUnavailable as exc:
            log.error("%s (every Join will fail until this is fixed)", exc)
        try:
            summary = self.audit()
            if summary["stale_endpoints"] or summary["orphan_vports"]:
                log.info("start-up audit: %s", summary)
        except PluginError as exc:
            log.warning("start-up audit skipped: %s", exc)
        except Exception:  # noqa: BLE001 - never keep the plugin from serving
            log.exception("start-up audit failed; serving anyway")

    def stop(self) -> None:
        self._stopped = True
        if self.vrs is not None:
            self.vrs.stop()
        self.docker.close()

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
        """Serialise Join/Leave/DeleteEndpoint/re-assert/audit of one endpoint."""
        with self._locks_guard:
            lock = self._locks.setdefault(eid, threading.Lock())
        with lock:
            yield

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
        """Every time the OVSDB replica is (re)loaded: re-assert the rows of
        joined endpoints, remove rows this plugin owns without one."""
        if self._stopped or not self._serving:
            return                 # e.g. a one-shot --audit run
        log.info("VRS connection #%d: re-asserting the vPorts of joined endpoints", n)
        try:
            self.reassert()
            self.remove_orphans()
        except PluginError as exc:
            log.warning("after VRS connection #%d: %s", n, exc)

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

    def audit(self, dry_run: bool = False) -> dict:
        """Remove what Docker no longer knows: endpoints of this host Docker does
        not list lose their rows, OVS port, veth and record (if VRS is not
        reachable, the record is marked stale and the rest happens when it
        connects); then orphan vPorts go.  Endpoints created after this process
        started are left alone (Docker may not list them yet).  Raises a
        PluginError when Docker or the datastore cannot be asked (nothing is
        deleted then).  With ``dry_run`` only reports.

        Summary: ``stale_endpoints`` (EndpointIDs), ``pending`` (those whose
        OVSDB cleanup waits for VRS), ``orphan_vports`` (vPort names), ``vrs``
        ("connected" or why not), ``dry_run``."""
        vrs = self._vrs()
        try:
            vrs.wait_ready(min(2.0, vrs.timeout))
            vrs_state = "connected"
        except VrsUnavailable as exc:
            vrs_state = str(exc)
        records = self._local_records()
        known = self.docker.endpoint_ids(self.driver)
        stale = [r for r in records
                 if r.endpoint_id not in known and r.created < self._started_at]
        summary = {"dry_run": dry_run, "vrs": vrs_state, "pending": [],
                   "stale_endpoints": [r.endpoint_id for r in stale], "orphan_vports": []}
        if dry_run:
            if vrs.ready:
                orphans, _, ports = self._orphans()
                stale_ports = {r.port for r in stale if r.vport} & set(ports)
                summary["orphan_vports"] = sorted(set(orphans) | stale_ports)
            return summary
        for old in stale:
            eid = old.endpoint_id
            with self._endpoint_lock(eid):
                rec = self._read_endpoint(eid)
                if rec is None:
                    continue
                if not rec.stale or rec.joined:
                    rec.stale, rec.joined = True, False
                    self._write_endpoint(rec)   # never re-asserted from now on
                clean, problems = self._teardown(eid, rec, vrs_wait=0.0)
                if clean and not problems:
                    self._delete_endpoint_record(eid)
                else:
                    summary["pending"].append(eid)
            log.info("audit: endpoint %s (vPort %s) is gone from Docker: %s", eid[:12],
                     rec.port, "removed" if clean and not problems else
                     "removing it when VRS is reachable")
        summary["orphan_vports"] = self.remove_orphans()
        return summary
