"""Leak audit of the Calico backend: find and remove the endpoint records, veths
and Calico IPAM addresses Docker no longer knows (Auditor, and AuditLoop).

dockerd forgets endpoints it could not delete through us (the plugin was down
or failing while dockerd restarted and removed its stale sandboxes; a crash
between two calls), and a remote driver is never told again: libnetwork
calls a driver only for what it still has, and Calico's datastore keeps an
endpoint until someone deletes it.  ``CalicoBackend.audit``
(``netplugin --audit [--dry-run]``) and ``AuditLoop`` (the agent's reconciler:
at start, every ``[calico] audit_interval`` seconds and when Docker answers
again; see its docstring) find,
on THIS host only:

* endpoint records ``/calico/v1/host/<hostname>/workload/libnetwork/libnetwork/
  endpoint/<eid>`` whose EndpointID Docker does not know -> the record is
  deleted (compare-and-delete) and its gateway entry forgotten;
* ``cali<11 hex>`` veths (with their ``tmp<11 hex>`` peer while it is still on
  the host) that belong to no endpoint Docker knows nor to another workload
  record of this host -> deleted (their routes go with them);
* Calico IPAM allocations without a handle (the libnetwork kind) or with
  one of our IPAM driver's handles (``netplugin.*``, model.IPAM_HANDLE_PREFIX) that no
  workload record of any host, no tunnel address and nothing Docker knows
  refers to: in blocks affine to this host, plus the addresses of the
  endpoints removed above when their network used Calico IPAM (or is gone)
  -> released.

Safety rules (never delete on uncertainty):

1. Docker is asked first-hand over ``[calico] docker_endpoint``; if it cannot
   be reached, or answers anything unexpected, NOTHING is changed and the
   summary says ``"docker": "unreachable: ..."``.
2. Everything is looked at twice, ``grace`` seconds apart (``[calico]
   audit_grace``, default the datastore timeout + 5 s; ``$NETPLUGIN_AUDIT_GRACE``
   overrides it): only what was orphaned at both looks, with both Docker
   answers, and unchanged in between is removed, at the version of the first
   look (records compare-and-deleted, blocks compare-and-swapped).  RequestAddress precedes CreateEndpoint,
   which precedes dockerd storing the endpoint, so a fresh allocation or
   record is briefly known to nobody; it is known at the second look.  When
   the first look finds nothing there is no second look (no wait).
3. Our state is read before Docker is asked, so whatever appears meanwhile is
   not a candidate of that look.
4. An endpoint whose network Docker does not know while our network record
   still exists is kept and reported (wrong ``docker_endpoint``? lost Docker
   state?): only networks Docker lists prove it is the right dockerd.
   Corrupt records are kept and reported, and while any workload record is
   corrupt no address is released (it may refer to any address).
5. Addresses Docker knows (any network, any driver: containers, gateways,
   auxiliary addresses), allocations with a handle (other orchestrators), the
   IPIP tunnel addresses and the addresses of every other workload record
   are never released; other hosts' blocks are swept only for the addresses
   of the endpoints removed here.
6. Only ``cali<11 hex>`` veths whose alias is Join's marker
   (``netplugin:calico:<eid>``, model.veth_marker) are deleted: Calico CNI
   names its veths ``cali*`` too.  An endpoint record is removed only when
   its veth is gone or is such a marked veth (and a ``tmp<11 hex>`` veth only
   as the host-side peer of one of them).

The auditor gets what it works on through its constructor (the datastore,
the host name, the gateway table, a callable giving Docker's view);
``auditor_for`` builds one from a CalicoBackend's configuration.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from netplugin.datastore import KeyNotFound
from netplugin.datastore.base import CompareFailed
from netplugin.docker import DockerClient, DockerUnavailable
from netplugin.reconcile import Reconciler

from backends.calico import hosts
from backends.calico import ipam as calico_ipam
from backends.calico import model
from backends.calico.model import (HOST_DEVICE_RE, ID_CHARS, CorruptRecord, Endpoint,
                                   NetworkRecord, host_veth_name as host_device_name)

log = logging.getLogger(__name__)

GRACE_ENV = "NETPLUGIN_AUDIT_GRACE"
DEFAULT_GRACE = 5.0

IPAddress = model.IPAddress


# --------------------------------------------------------------------------
# what Docker knows


@dataclass(frozen=True)
class DockerView:
    """What one dockerd knows: endpoint IDs, network IDs (every driver) and
    addresses (containers, gateways, auxiliary addresses of every network)."""
    endpoints: FrozenSet[str] = frozenset()
    networks: FrozenSet[str] = frozenset()
    addresses: FrozenSet[IPAddress] = frozenset()
    our_networks: int = 0

    def __or__(self, other: "DockerView") -> "DockerView":
        return DockerView(self.endpoints | other.endpoints, self.networks | other.networks,
                          self.addresses | other.addresses,
                          max(self.our_networks, other.our_networks))


def _address(text: Any, what: str) -> Optional[IPAddress]:
    """``10.0.0.5/24``, ``10.0.0.5`` or "" -> address or None; else garbage."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise DockerUnavailable(f"unexpected answer from Docker: {what} is {text!r}")
    try:
        return ipaddress.ip_interface(text.strip()).ip
    except ValueError:
        raise DockerUnavailable(f"unexpected answer from Docker: {what} is {text!r}") from None


def _endpoint_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DockerUnavailable(f"unexpected answer from Docker: {what} has EndpointID "
                                f"{value!r}")
    return value.strip()


def parse_docker_view(networks: Any, containers: Any, driver: str) -> DockerView:
    """Docker's answers (inspected networks, ``GET /containers/json``)
    -> DockerView; DockerUnavailable if they are not what Docker sends."""
    if not isinstance(networks, list) or not isinstance(containers, list):
        raise DockerUnavailable("unexpected answer from Docker: not a list")
    endpoints: Set[str] = set()
    nets: Set[str] = set()
    addresses: Set[IPAddress] = set()
    ours = 0
    for net in networks:
        if not isinstance(net, dict) or not isinstance(net.get("Id"), str) or not net["Id"]:
            raise DockerUnavailable(f"unexpected answer from Docker: network {net!r:.200}")
        nid = net["Id"]
        nets.add(nid)
        if net.get("Driver") == driver:
            ours += 1
        members = net.get("Containers") or {}
        if not isinstance(members, dict):
            raise DockerUnavailable(f"unexpected answer from Docker: network {nid[:12]} "
                                    f"Containers is {members!r:.200}")
        for key, ep in members.items():
            if not isinstance(ep, dict):
                raise DockerUnavailable(f"unexpected answer from Docker: network {nid[:12]} "
                                        f"member {key} is {ep!r:.200}")
            what = f"network {nid[:12]} member {str(key)[:12]}"
            endpoints.add(_endpoint_id(ep.get("EndpointID"), what))
            for name in ("IPv4Address", "IPv6Address"):
                ip = _address(ep.get(name), f"{what} {name}")
                if ip is not None:
                    addresses.add(ip)
        ipam_cfg = (net.get("IPAM") or {}).get("Config") or []
        if not isinstance(ipam_cfg, list):
            raise DockerUnavailable(f"unexpected answer from Docker: network {nid[:12]} IPAM")
        for cfg in ipam_cfg:
            if not isinstance(cfg, dict):
                raise DockerUnavailable(f"unexpected answer from Docker: network {nid[:12]} "
                                        f"IPAM config {cfg!r:.200}")
            ip = _address(cfg.get("Gateway"), f"network {nid[:12]} gateway")
            if ip is not None:
                addresses.add(ip)
            aux = cfg.get("AuxiliaryAddresses") or {}
            if not isinstance(aux, dict):
                raise DockerUnavailable(f"unexpected answer from Docker: network {nid[:12]} "
                                        f"AuxiliaryAddresses {aux!r:.200}")
            for name, value in aux.items():
                ip = _address(value, f"network {nid[:12]} auxiliary address {name}")
                if ip is not None:
                    addresses.add(ip)
    for c in containers:
        if not isinstance(c, dict):
            raise DockerUnavailable(f"unexpected answer from Docker: container {c!r:.200}")
        settings = ((c.get("NetworkSettings") or {}).get("Networks")) or {}
        if not isinstance(settings, dict):
            raise DockerUnavailable("unexpected answer from Docker: container networks")
        for name, ep in settings.items():
            if not isinstance(ep, dict):
                raise DockerUnavailable("unexpected answer from Docker: container network "
                                        f"{name!r}")
            if ep.get("EndpointID"):    # "" once the container stopped
                endpoints.add(_endpoint_id(ep["EndpointID"], f"container network {name}"))
            for key in ("IPAddress", "GlobalIPv6Address"):
                ip = _address(ep.get(key), f"container network {name} {key}")
                if ip is not None:
                    addresses.add(ip)
    return DockerView(frozenset(endpoints), frozenset(nets), frozenset(addresses), ours)


def fetch_docker_view(base_url: str, timeout: float, driver: str) -> DockerView:
    """Ask dockerd (netplugin.docker, API version negotiated): every network,
    inspected, and the running containers.  DockerUnavailable on any failure."""
    with DockerClient(base_url, timeout) as docker:
        listed = docker.call("list networks", lambda api: api.networks())
        if not isinstance(listed, list):
            raise DockerUnavailable("unexpected answer from Docker: network list")
        inspected = []
        for net in listed:
            nid = net.get("Id") if isinstance(net, dict) else None
            if not isinstance(nid, str) or not nid:
                raise DockerUnavailable(f"unexpected answer from Docker: network {net!r:.200}")
            found = docker.call(f"inspect network {nid[:12]}",
                                lambda api: api.inspect_network(nid), not_found=None)
            if found is not None:     # else removed since the list: Docker knows nothing of it
                inspected.append(found)
        # Running containers only: an exited one keeps the EndpointID and
        # address of an endpoint dockerd failed to delete (observed with
        # 20.10); starting it again creates a new endpoint.
        containers = docker.call("list containers", lambda api: api.containers())
        return parse_docker_view(inspected, containers, driver)


# --------------------------------------------------------------------------
# host devices


@dataclass(frozen=True)
class Device:
    name: str
    kind: Optional[str] = "veth"
    index: int = 0
    peer_index: Optional[int] = None       # IFLA_LINK
    peer_elsewhere: bool = False           # the peer is in another netns
    alias: Optional[str] = None            # IFLA_IFALIAS: Join's marker on our veths


def list_devices() -> List[Device]:
    """``cali*`` / ``tmp*`` links of the current network namespace."""
    from netplugin import linux

    return [Device(name=link.name, kind=link.kind, index=link.index,
                   peer_index=link.peer_index,
                   peer_elsewhere=link.peer_netnsid is not None and link.peer_netnsid >= 0,
                   alias=link.alias)
            for link in linux.list_links(("cali", "tmp"))]


def delete_device(name: str) -> bool:
    from netplugin import linux
    return linux.delete_link(name)


def delete_device_default() -> Callable[[str], bool]:
    return delete_device     # looked up at call time (tests replace it)


# --------------------------------------------------------------------------
# our state


@dataclass
class Record:
    """A workload endpoint record (any host, any orchestrator)."""
    key: str
    host: str
    libnetwork: bool
    eid: str
    version: int
    name: Optional[str] = None
    network: Optional[str] = None
    addresses: Tuple[IPAddress, ...] = ()
    corrupt: Optional[str] = None      # why it cannot be read


def parse_record(key: str, value: str, version: int) -> Record:
    """The audit's view of one workload endpoint item (``corrupt`` says why
    it cannot be read)."""
    host, orchestrator, workload, eid = model.parse_endpoint_key(key)
    rec = Record(key, host, orchestrator == model.ORCHESTRATOR
                 and workload == model.WORKLOAD, eid, version)
    try:
        ep = Endpoint.from_json(key, value)
    except CorruptRecord as exc:
        rec.corrupt = str(exc)
        return rec
    rec.addresses = ep.ip_addresses()
    rec.name = ep.name
    rec.network = ep.network            # network_id, else a profile named after it
    return rec


@dataclass
class Snapshot:
    """One look at the datastore, the host's devices and Docker."""
    records: List[Record]                      # every workload endpoint, every host
    tunnel_addresses: Set[IPAddress]
    network_records: Dict[str, Optional[NetworkRecord]]  # nid -> record (None: corrupt)
    blocks: Dict[Any, calico_ipam.Block]       # affine blocks (+ others read on demand)
    affine: Set[Any]                           # cidrs of blocks affine to this host
    problems: List[str]                        # reasons found while reading
    devices: List[Device]
    docker: DockerView = field(default_factory=DockerView)

    def host_records(self, host: str) -> List[Record]:
        return [r for r in self.records if r.host == host]


@dataclass
class Verdict:
    endpoints: Dict[str, Record]               # eid -> record to remove
    devices: Dict[str, List[str]]              # cali name -> [cali name, tmp peer?]
    addresses: Set[IPAddress]
    kept: int
    skipped: List[str]


def is_calico_ipam_network(record: Optional[NetworkRecord]) -> bool:
    return record is not None and record.calico_ipam


# --------------------------------------------------------------------------
# the audit


class Auditor:
    """One audit run on ``store`` for ``host``: ``gateways`` (a GatewayTable)
    forgets the removed endpoints, ``docker_view()`` asks Docker (raising
    DockerUnavailable); ``devices`` and ``delete_device`` are seams for tests."""

    def __init__(self, store, host: str, gateways, docker_view: Callable[[], DockerView], *,
                 devices: Optional[Callable[[], List[Device]]] = None,
                 delete_device: Optional[Callable[[str], bool]] = None,
                 grace: float = DEFAULT_GRACE, stop: Optional[threading.Event] = None):
        self.store = store
        self.host = host
        self.gateways = gateways
        self._docker_view = docker_view
        self._devices = devices or list_devices
        self._delete_device = delete_device or delete_device_default()
        self.grace = grace
        self.stop = stop or threading.Event()

    # -- reading ---------------------------------------------------------------
    def _read(self) -> Snapshot:
        """Our state first (datastore, devices), then Docker (rule 3)."""
        snap = self.read_ours()
        snap.docker = self._docker_view()
        return snap

    def docker_view(self) -> DockerView:
        return self._docker_view()

    def read_ours(self) -> Snapshot:
        """The datastore and this host's devices (no Docker)."""
        records: List[Record] = []
        tunnels: Set[IPAddress] = set()
        problems: List[str] = []
        for item in self.store.list_prefix(model.HOST_ROOT):
            if model.is_endpoint_key(item.key):
                records.append(parse_record(item.key, item.value, item.version))
            elif model.tunnel_address_host(item.key) is not None:
                try:
                    tunnels.add(ipaddress.ip_address(item.value.strip()))
                except ValueError:
                    if item.value.strip():
                        problems.append(f"tunnel address {item.key} = {item.value!r} "
                                        f"cannot be read")
        networks: Dict[str, Optional[NetworkRecord]] = {}
        for item in self.store.list_prefix(model.NETWORK_ROOT):
            nid = item.key.rsplit("/", 1)[-1]
            try:
                networks[nid] = NetworkRecord.from_json(nid, item.value, item.version)
            except CorruptRecord:
                networks[nid] = None
        blocks: Dict[Any, calico_ipam.Block] = {}
        affine: Set[Any] = set()
        ipam = calico_ipam.CalicoIpam(self.store)
        for version in (4, 6):
            for cidr in ipam.affine_blocks(self.host, version):
                try:
                    block = ipam.read_block(cidr)
                except KeyNotFound:
                    continue
                except calico_ipam.CorruptData as exc:
                    problems.append(f"{exc}; its addresses are left alone")
                    continue
                if block.host != self.host:
                    continue           # stale affinity key: the block is not ours
                blocks[block.cidr] = block
                affine.add(block.cidr)
        devices = list(self._devices())
        return Snapshot(records, tunnels, networks, blocks, affine, problems, devices)

    def _read_block(self, snap: Snapshot, cidr) -> Optional[calico_ipam.Block]:
        if cidr not in snap.blocks:
            try:
                snap.blocks[cidr] = calico_ipam.CalicoIpam(self.store).read_block(cidr)
            except KeyNotFound:
                return None
            except calico_ipam.CorruptData as exc:
                snap.problems.append(f"{exc}; its addresses are left alone")
                return None
        return snap.blocks[cidr]

    # -- deciding ----------------------------------------------------------------
    def _endpoint_candidates(self, snap: Snapshot, docker: DockerView
                             ) -> Tuple[Dict[str, Record], List[str]]:
        out: Dict[str, Record] = {}
        skipped: List[str] = []
        unmarked = {d.name for d in snap.devices if not model.is_our_veth(d.name, d.alias)}
        for rec in snap.host_records(self.host):
            if not rec.libnetwork or rec.eid in docker.endpoints:
                continue
            if host_device_name(rec.eid) in unmarked:
                skipped.append(f"endpoint {rec.eid}: Docker does not know it, but veth "
                               f"{host_device_name(rec.eid)} without netplugin's marker "
                               f"exists; kept")
                continue
            if rec.corrupt:
                skipped.append(f"endpoint {rec.eid}: record is corrupt ({rec.corrupt}); "
                               f"kept, delete {rec.key} by hand if it is a leak")
                continue
            if rec.network and rec.network not in docker.networks \
                    and rec.network in snap.network_records:
                skipped.append(f"endpoint {rec.eid}: Docker does not know its network "
                               f"{rec.network[:12]}, which the datastore still has; kept "
                               f"(is [calico] docker_endpoint this host's dockerd?)")
                continue
            out[rec.eid] = rec
        return out, skipped

    def _decide(self, snap: Snapshot, docker: DockerView, gone: Dict[str, Record]
                ) -> Tuple[Dict[str, List[str]], Set[IPAddress], List[str]]:
        """Devices and addresses orphaned if the endpoints ``gone`` are removed."""
        skipped: List[str] = []
        # devices ------------------------------------------------------------
        keep_ids = {e[:ID_CHARS] for e in docker.endpoints}
        keep_names: Set[str] = set()
        for rec in snap.host_records(self.host):
            if rec.eid in gone and rec.libnetwork:
                continue
            keep_ids.add(rec.eid[:ID_CHARS])
            if rec.name:
                keep_names.add(rec.name)
        by_index = {d.index: d for d in snap.devices}
        devices: Dict[str, List[str]] = {}
        for dev in snap.devices:
            m = HOST_DEVICE_RE.match(dev.name)
            if not m or dev.kind != "veth" or m.group(1) in keep_ids or dev.name in keep_names:
                continue
            if not model.is_our_veth(dev.name, dev.alias):
                # Calico CNI's, another tool's, or one made before the marker
                skipped.append(f"device {dev.name}: not marked as created by netplugin "
                               f"(alias {dev.alias!r}); left alone")
                continue
            names = [dev.name]
            peer = by_index.get(dev.peer_index) if not dev.peer_elsewhere else None
            if peer is not None and peer.name == model.temp_veth_name(m.group(1)):
                names.append(peer.name)
            devices[dev.name] = names
        # addresses ------------------------------------------------------------
        corrupt = [r for r in snap.records if r.corrupt and not (r.libnetwork and r.eid in gone)]
        if corrupt:
            skipped.append(f"no address released: workload record {corrupt[0].key} is "
                           f"corrupt ({corrupt[0].corrupt}) and may refer to any address")
            return devices, set(), skipped
        referenced: Set[IPAddress] = set(docker.addresses) | snap.tunnel_addresses
        for rec in snap.records:
            if not (rec.libnetwork and rec.host == self.host and rec.eid in gone):
                referenced.update(rec.addresses)
        candidates: Set[IPAddress] = set()
        for cidr in sorted(snap.affine, key=lambda c: (c.version, c)):
            candidates |= self._orphans(snap.blocks[cidr], referenced)
        for rec in gone.values():
            # Docker-IPAM addresses are not ours to release (rule 5)
            nrec = snap.network_records.get(rec.network, None) if rec.network else None
            if rec.network in snap.network_records and not is_calico_ipam_network(nrec):
                continue
            for ip in rec.addresses:
                cidr = calico_ipam.block_cidr_for(ip)
                if cidr in snap.affine:
                    continue
                block = self._read_block(snap, cidr)
                if block is not None:
                    candidates |= self._orphans(block, referenced) & {ip}
        return devices, candidates, skipped

    @staticmethod
    def _orphans(block: calico_ipam.Block, referenced: Set[IPAddress]) -> Set[IPAddress]:
        out = set()
        for ordinal, index in enumerate(block.allocations):
            if index is None:
                continue
            attr = block.attributes[index] if index < len(block.attributes) else {}
            handle = attr.get("handle_id")
            if handle is not None and not model.is_our_ipam_handle(handle):
                continue            # someone else's allocation, or swarm's (rule 5)
            ip = block.address(ordinal)
            if ip not in referenced:
                out.add(ip)
        return out

    def _verdict(self, snap: Snapshot, docker: DockerView,
                 only: Optional[Set[str]] = None) -> Verdict:
        endpoints, skipped = self._endpoint_candidates(snap, docker)
        if only is not None:
            endpoints = {e: r for e, r in endpoints.items() if e in only}
        devices, addresses, more = self._decide(snap, docker, endpoints)
        kept = sum(1 for r in snap.host_records(self.host)
                   if r.libnetwork and r.eid not in endpoints)
        return Verdict(endpoints, devices, addresses, kept,
                       skipped + more + snap.problems)

    # -- running -------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> Dict[str, Any]:
        summary: Dict[str, Any] = {"docker": "ok", "dry_run": dry_run,
                                   "endpoints_removed": [], "devices_removed": [],
                                   "addresses_released": [], "kept": 0, "skipped": [],
                                   "errors": []}
        try:
            first = self._read()
        except DockerUnavailable as exc:
            return self._unreachable(summary, exc)
        v1 = self._verdict(first, first.docker)
        summary["kept"] = v1.kept
        if not (v1.endpoints or v1.devices or v1.addresses):
            summary["skipped"] = v1.skipped
            log.info("audit: nothing leaked (%d endpoint record(s) of host %s in use)",
                     v1.kept, self.host)
            return summary
        log.info("audit: %d endpoint(s), %d device(s), %d address(es) look leaked; "
                 "checking again in %.1f s", len(v1.endpoints), len(v1.devices),
                 len(v1.addresses), self.grace)
        if self.stop.wait(self.grace):
            summary["skipped"] = v1.skipped + ["interrupted before the second look"]
            return summary
        try:
            second = self._read()
        except DockerUnavailable as exc:
            return self._unreachable(summary, exc)
        endpoints, devices, addresses, v2 = self.confirm(first, v1, second)
        summary["kept"] = v2.kept
        summary["skipped"] = v2.skipped
        if dry_run:
            summary["endpoints_removed"] = sorted(endpoints)
            summary["devices_removed"] = sorted(n for names in devices.values() for n in names)
            summary["addresses_released"] = [str(a) for a in _sorted_ips(addresses)]
            for eid, rec in sorted(endpoints.items()):
                log.info("audit (dry run): would remove endpoint %s (network %s, %s)", eid,
                         (rec.network or "?")[:12], _describe(rec.addresses))
            return summary
        self._remove(summary, endpoints, devices, addresses, first.blocks)
        return summary

    def confirm(self, first: Snapshot, v1: Verdict, second: Snapshot
                ) -> Tuple[Dict[str, Record], Dict[str, List[str]], Set[IPAddress], Verdict]:
        """What both looks found orphaned, unchanged in between: endpoint
        records at the same version (removed at that version), devices, and
        addresses no Docker answer of either look knows."""
        docker = first.docker | second.docker
        v2 = self._verdict(second, docker, only=set(v1.endpoints))
        endpoints = {e: v1.endpoints[e] for e, r in v2.endpoints.items()
                     if e in v1.endpoints and v1.endpoints[e].version == r.version}
        devices = {n: v for n, v in v2.devices.items() if n in v1.devices}
        addresses = (v1.addresses & v2.addresses) - docker.addresses
        return endpoints, devices, addresses, v2

    def _unreachable(self, summary: Dict[str, Any], exc: Exception) -> Dict[str, Any]:
        summary["docker"] = f"unreachable: {exc}"
        log.warning("audit: Docker cannot be asked (%s); nothing removed", exc)
        return summary

    def _remove(self, summary: Dict[str, Any], endpoints: Dict[str, Record],
                devices: Dict[str, List[str]], addresses: Set[IPAddress],
                seen_blocks: Dict[Any, calico_ipam.Block]) -> None:
        """Apply: records (compare-and-delete at the version of the first look),
        devices, then addresses (each block compare-and-swapped against the
        version of the first look: a block that changed since is left for the
        next run)."""
        errors = summary["errors"]
        for eid, rec in sorted(endpoints.items()):
            try:
                self.store.delete(rec.key, rec.version)
            except KeyNotFound:
                continue                       # someone (DeleteEndpoint) was faster
            except Exception as exc:
                # kept: so are its device and addresses
                why = ("record changed during the audit" if isinstance(exc, CompareFailed)
                       else str(exc))
                errors.append(f"endpoint {eid}: {why}; kept")
                devices.pop(host_device_name(eid), None)
                addresses = addresses - set(rec.addresses)
                continue
            try:
                self.gateways.release(eid)
            except Exception as exc:  # host-local bookkeeping, best effort
                log.debug("audit: gateway entry of %s: %s", eid, exc)
            summary["endpoints_removed"].append(eid)
            log.info("audit: removed endpoint %s (network %s, %s): Docker no longer knows it",
                     eid, (rec.network or "?")[:12], _describe(rec.addresses))
        for name, names in sorted(devices.items()):
            try:
                deleted = self._delete_device(name)
            except Exception as exc:
                errors.append(f"device {name}: {exc}")
                continue
            if deleted:
                summary["devices_removed"].extend(names)
                log.info("audit: deleted device %s: it belongs to no endpoint Docker knows",
                         "/".join(names))
        by_block: Dict[Any, Set[IPAddress]] = {}
        for ip in addresses:
            by_block.setdefault(calico_ipam.block_cidr_for(ip), set()).add(ip)
        for cidr, ips in sorted(by_block.items(), key=lambda kv: (kv[0].version, kv[0])):
            try:
                released = self._release_at_version(cidr, ips, seen_blocks.get(cidr))
            except Exception as exc:
                errors.append(f"addresses {_describe(_sorted_ips(ips))}: {exc}")
                continue
            if released is None:
                summary["skipped"].append(
                    f"addresses {_describe(_sorted_ips(ips))}: block {cidr} changed since "
                    f"the first look; kept for the next run")
                continue
            for ip in _sorted_ips(released):
                summary["addresses_released"].append(str(ip))
                log.info("audit: released Calico IPAM address %s: no endpoint and "
                         "nothing Docker knows uses it", ip)
        summary["devices_removed"].sort()
        for line in errors:
            log.warning("audit: %s", line)

    def _release_at_version(self, cidr, ips: Set[IPAddress],
                            seen: Optional[calico_ipam.Block]) -> Optional[Set[IPAddress]]:
        """Free ``ips`` in block ``cidr`` only if the block is still at the
        version ``seen`` had and they are ours (rule 5); the addresses freed,
        or None (it changed)."""
        if seen is None:
            return None
        return calico_ipam.CalicoIpam(self.store).release_at_version(
            cidr, ips, seen.version, may_release=model.is_our_ipam_handle)


def _sorted_ips(ips: Iterable[IPAddress]) -> List[IPAddress]:
    return sorted(ips, key=lambda a: (a.version, int(a)))


def _describe(addresses: Iterable[IPAddress]) -> str:
    text = ", ".join(str(a) for a in addresses)
    return text or "no address"


def default_grace(configured: Optional[float] = None) -> float:
    """``$NETPLUGIN_AUDIT_GRACE`` if set, else ``[calico] audit_grace`` (whose
    default is the datastore timeout plus a margin), else DEFAULT_GRACE."""
    fallback = DEFAULT_GRACE if configured is None else configured
    text = os.environ.get(GRACE_ENV, "").strip()
    if not text:
        return fallback
    try:
        value = float(text)
        if value < 0 or value > 600:
            raise ValueError
        return value
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds between 0 and 600; using %s",
                    GRACE_ENV, text, fallback)
        return fallback


def auditor_for(backend, *, docker_view: Optional[Callable[[], DockerView]] = None,
                grace: Optional[float] = None, **seams) -> Auditor:
    """The Auditor of a CalicoBackend: its datastore, ``[calico] hostname``,
    gateway table, and Docker over ``[calico] docker_endpoint``."""
    cfg = backend.config
    driver = cfg.driver_name
    if docker_view is None:
        def docker_view() -> DockerView:
            return fetch_docker_view(cfg.calico.docker_endpoint, cfg.calico.docker_timeout,
                                     driver)
    return Auditor(backend.datastore, cfg.calico.hostname, backend.gateways, docker_view,
                   grace=default_grace(cfg.calico.audit_grace) if grace is None else grace,
                   **seams)


def audit(backend, dry_run: bool = False, **seams) -> Dict[str, Any]:
    """``CalicoBackend.audit``: one audit run, summary dict."""
    return auditor_for(backend, **seams).run(dry_run=dry_run)


# --------------------------------------------------------------------------
# the agent's periodic reconciler


@dataclass
class _Look:
    at: float                                   # time.monotonic()
    snap: Snapshot
    verdict: Verdict
    gone_hosts: Dict[str, Any]                  # removed host -> hosts.HostLeftovers


@dataclass
class AuditChanges:
    """One completed audit cycle: what two looks agree is leaked."""
    endpoints: Dict[str, Record]
    devices: Dict[str, List[str]]
    addresses: Set[IPAddress]
    seen_blocks: Dict[Any, calico_ipam.Block]   # blocks of the first look (versions)
    hosts: Dict[str, Any]                       # removed host -> confirmed leftovers
    referenced: Set[IPAddress]                  # addresses in use anywhere
    release_ok: bool = True                     # False: a corrupt record, release nothing
    kept: int = 0
    skipped: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:                 # a completed cycle is always applied
        return True


class AuditLoop:
    """The leak audit as a loop, once per host in the agent process.

    Each run is one look (``Reconciler``): our state first (observe: workload
    records, blocks, devices, removed hosts' leftovers), then Docker's
    (desired); what looks leaked is confirmed by a later look at least
    ``grace`` seconds after the first (default: the datastore timeout plus a
    margin), with the same versions, and removed at those versions (apply).
    Runs at start, every ``[calico] audit_interval`` seconds, sooner while a
    confirmation is due; while Docker cannot be asked (at boot dockerd often
    starts after the plugin) nothing is removed and the run is retried with
    backoff, so the audit runs as soon as Docker is back.  Also sweeps the
    hosts removed with ``netpluginctl host remove`` (backends/calico/hosts.py)."""

    def __init__(self, backend=None, *, auditor: Optional[Auditor] = None,
                 interval: Optional[float] = None, grace: Optional[float] = None, **seams):
        """Either ``auditor`` (and ``interval``), or a CalicoBackend to build
        them from (``auditor_for``, ``[calico] audit_interval``)."""
        self.auditor = auditor or auditor_for(backend, grace=grace, **seams)
        self.store, self.host, self.grace = (self.auditor.store, self.auditor.host,
                                             self.auditor.grace)
        if interval is None:
            interval = backend.config.calico.audit_interval
        self._first: Optional[_Look] = None
        self._cycle_started: Optional[float] = None
        self._startup = True            # the first completed cycle is logged as such
        self.cycles = 0                 # completed cycles (tests)
        self.last_summary: Optional[Dict[str, Any]] = None
        self.reconciler = Reconciler(
            "calico audit", observe=self._observe, desired=self._desired,
            diff=self._diff, apply=self._apply, interval=interval,
            retry=min(1.0, interval), max_retry=max(min(30.0, interval), min(1.0, interval)))

    def run(self, stop: threading.Event) -> None:
        self.auditor.stop = stop
        try:
            if hosts.forget_removal(self.store, self.host):
                log.warning("this host (%s) had been removed with 'netpluginctl host "
                            "remove'; its agent runs again, so it is back", self.host)
        except Exception as exc:  # the datastore may be down: the loop retries the rest
            log.warning("audit: cannot check this host's removal mark: %s", exc)
        self.reconciler.run(stop)

    # -- the four steps -------------------------------------------------------
    def _observe(self) -> Tuple[Snapshot, Dict[str, Any]]:
        if self._cycle_started is None:
            self._cycle_started = time.monotonic()
        snap = self.auditor.read_ours()
        gone = {h: hosts.look(self.store, h) for h in hosts.removed_hosts(self.store)
                if h != self.host}
        return snap, gone

    def _desired(self) -> DockerView:
        try:
            return self.auditor.docker_view()
        except DockerUnavailable as exc:       # the loop backs off and retries
            raise DockerUnavailable(f"Docker cannot be asked ({exc}); nothing "
                                    f"removed") from None

    def _diff(self, docker: DockerView, observed) -> Optional[AuditChanges]:
        snap, gone = observed
        snap.docker = docker
        now = time.monotonic()
        verdict = self.auditor._verdict(snap, docker)
        leaked = bool(verdict.endpoints or verdict.devices or verdict.addresses
                      or any(not g.empty() for g in gone.values()))
        first = self._first
        if first is not None and now - first.at < self.grace:
            self.reconciler.recheck_in(first.at + self.grace - now)
            return None                                  # confirmation not due yet
        changes: Optional[AuditChanges] = None
        if first is not None:
            endpoints, devices, addresses, v2 = self.auditor.confirm(first.snap,
                                                                     first.verdict, snap)
            confirmed = {h: hosts.confirmed(first.gone_hosts[h], g) for h, g in gone.items()
                         if h in first.gone_hosts}
            referenced, release_ok = self._referenced(first.snap, snap)
            changes = AuditChanges(endpoints, devices, addresses, first.snap.blocks,
                                   {h: c for h, c in confirmed.items() if not c.empty()},
                                   referenced, release_ok, v2.kept, v2.skipped)
        elif not leaked:
            changes = AuditChanges({}, {}, set(), {}, {}, set(), True, verdict.kept,
                                   verdict.skipped)
        self._first = None
        if leaked and changes is not None:
            # what this cycle removes is still in this look: look again at
            # once (after the removal) to start the next confirmation
            self.reconciler.recheck_in(0.0)
        elif leaked:
            self._first = _Look(now, snap, verdict, gone)   # the first look
            self.reconciler.recheck_in(self.grace)
            if changes is None:
                log.info("audit: %d endpoint(s), %d device(s), %d address(es), %d removed "
                         "host(s) look leaked; checking again in %.1f s",
                         len(verdict.endpoints), len(verdict.devices), len(verdict.addresses),
                         sum(1 for g in gone.values() if not g.empty()), self.grace)
        return changes

    @staticmethod
    def _referenced(*snaps: Snapshot) -> Tuple[Set[IPAddress], bool]:
        """(every address any look saw in use, False if a workload record is
        corrupt: it may refer to any address, so nothing may be released)."""
        out: Set[IPAddress] = set()
        ok = True
        for snap in snaps:
            ok = ok and not any(r.corrupt for r in snap.records)
            for rec in snap.records:
                out.update(rec.addresses)
            out |= snap.tunnel_addresses | set(snap.docker.addresses)
        return out, ok

    def _apply(self, changes: AuditChanges) -> Dict[str, int]:
        summary: Dict[str, Any] = {"docker": "ok", "dry_run": False,
                                   "endpoints_removed": [], "devices_removed": [],
                                   "addresses_released": [], "kept": changes.kept,
                                   "skipped": list(changes.skipped), "errors": [],
                                   "hosts_swept": {}}
        self.auditor._remove(summary, dict(changes.endpoints), dict(changes.devices),
                             set(changes.addresses), changes.seen_blocks)
        for host, leftovers in sorted(changes.hosts.items()):
            if not changes.release_ok:
                leftovers.blocks = {}          # a corrupt record: blocks wait, keys go
            try:
                summary["hosts_swept"][host] = hosts.sweep(self.store, leftovers,
                                                           changes.referenced)
            except Exception as exc:
                summary["errors"].append(f"removed host {host}: {exc}")
        self.cycles += 1
        self.last_summary = summary
        started, self._cycle_started = self._cycle_started, None
        did = (summary["endpoints_removed"] or summary["devices_removed"]
               or summary["addresses_released"] or summary["hosts_swept"])
        if self._startup:
            self._startup = False
            log.info("start-up audit done in %.1f s: %s",
                     time.monotonic() - (started or time.monotonic()),
                     json.dumps(summary, sort_keys=True))
        elif did or summary["errors"]:
            log.info("audit done: %s", json.dumps(summary, sort_keys=True))
        else:
            log.debug("audit: nothing leaked (%d endpoint record(s) in use)", changes.kept)
        return {"endpoints": len(summary["endpoints_removed"]),
                "devices": len(summary["devices_removed"]),
                "addresses": len(summary["addresses_released"]),
                "hosts": len(summary["hosts_swept"])}
