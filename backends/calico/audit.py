"""Leak audit of the Calico backend: remove what Docker no longer knows.

dockerd forgets endpoints it could not delete through us (the plugin was down
or failing while dockerd restarted and removed its stale sandboxes; a crash
between two calls); it never tells us again (calico-datastore.md §7,
docker-remote-driver.md "Scope and restarts").  ``CalicoBackend.audit``
(``netplugin --audit [--dry-run]``, and once at every agent start-up) finds,
on THIS host only:

* endpoint records ``/calico/v1/host/<hostname>/workload/libnetwork/libnetwork/
  endpoint/<eid>`` whose EndpointID Docker does not know -> the record is
  deleted (compare-and-delete) and its gateway entry forgotten;
* ``cali<11 hex>`` veths (with their ``tmp<11 hex>`` peer while it is still on
  the host) that belong to no endpoint Docker knows nor to another workload
  record of this host -> deleted (their routes go with them);
* Calico IPAM allocations without a handle (the libnetwork kind) that no
  workload record of any host, no tunnel address and nothing Docker knows
  refers to: in blocks affine to this host, plus the addresses of the
  endpoints removed above when their network used Calico IPAM (or is gone)
  -> released.

Safety rules (never delete on uncertainty):

1. Docker is asked first-hand over ``[calico] docker_endpoint``; if it cannot
   be reached, or answers anything unexpected, NOTHING is changed and the
   summary says ``"docker": "unreachable: ..."``.
2. Everything is looked at twice, ``grace`` seconds apart (default 5 s,
   ``$NETPLUGIN_AUDIT_GRACE``): only what was orphaned at both looks, with
   both Docker answers, is removed.  RequestAddress precedes CreateEndpoint,
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
6. Only ``cali<11 hex>`` veths are deleted (and a ``tmp<11 hex>`` veth only
   as the host-side peer of one of them).

Docker's view is a seam (``docker_view``) so tests can feed it as data.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from netplugin.datastore import KeyNotFound
from netplugin.datastore.base import CompareFailed

from backends.calico import ipam as calico_ipam
from backends.calico import keys

log = logging.getLogger(__name__)

GRACE_ENV = "NETPLUGIN_AUDIT_GRACE"
DEFAULT_GRACE = 5.0
DOCKER_API_VERSION = "1.41"     # dockerd 20.10; later versions still serve it

HOST_DEVICE_RE = re.compile(r"^cali([0-9a-f]{11})$")
TEMP_DEVICE_RE = re.compile(r"^tmp([0-9a-f]{11})$")
ID_CHARS = 11

IPAddress = calico_ipam.IPAddress


class DockerUnavailable(Exception):
    """Docker could not be asked, or its answer made no sense."""


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
    """Ask dockerd (docker SDK, API 1.41): every network, inspected, and the
    running containers.  DockerUnavailable on any failure."""
    try:
        import docker
        from docker.errors import NotFound
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise DockerUnavailable(f"the docker SDK is not installed: {exc}") from None
    try:
        api = docker.APIClient(base_url=base_url, version=DOCKER_API_VERSION,
                               timeout=timeout)
    except Exception as exc:
        raise DockerUnavailable(f"{base_url}: {exc}") from None
    try:
        listed = api.networks()
        if not isinstance(listed, list):
            raise DockerUnavailable("unexpected answer from Docker: network list")
        inspected = []
        for net in listed:
            nid = net.get("Id") if isinstance(net, dict) else None
            if not isinstance(nid, str) or not nid:
                raise DockerUnavailable(f"unexpected answer from Docker: network {net!r:.200}")
            try:
                inspected.append(api.inspect_network(nid))
            except NotFound:
                continue          # removed since the list: Docker knows nothing of it
        # Running containers only: an exited one keeps the EndpointID and
        # address of an endpoint dockerd failed to delete (observed with
        # 20.10); starting it again creates a new endpoint.
        containers = api.containers()
        return parse_docker_view(inspected, containers, driver)
    except DockerUnavailable:
        raise
    except Exception as exc:   # connection refused, timeout, HTTP error, bad JSON...
        raise DockerUnavailable(f"{base_url}: {type(exc).__name__}: {exc}") from None
    finally:
        try:
            api.close()
        except Exception:  # pragma: no cover - best effort
            pass


# --------------------------------------------------------------------------
# host devices


@dataclass(frozen=True)
class Device:
    name: str
    kind: Optional[str] = "veth"
    index: int = 0
    peer_index: Optional[int] = None       # IFLA_LINK
    peer_elsewhere: bool = False           # the peer is in another netns


def list_devices() -> List[Device]:
    """``cali*`` / ``tmp*`` links of the current network namespace."""
    from pyroute2 import IPRoute

    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get("IFLA_IFNAME") or ""
            if not name.startswith(("cali", "tmp")):
                continue
            info = msg.get("IFLA_LINKINFO")
            nsid = msg.get("IFLA_LINK_NETNSID")
            out.append(Device(name=name, kind=info.get("IFLA_INFO_KIND") if info else None,
                              index=msg["index"], peer_index=msg.get("IFLA_LINK"),
                              peer_elsewhere=nsid is not None and nsid >= 0))
    return out


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


def parse_record(key: str, host: str, orchestrator: str, workload: str, eid: str,
                 value: str, version: int) -> Record:
    libnet = orchestrator == keys.ORCHESTRATOR and workload == keys.WORKLOAD
    rec = Record(key, host, libnet, eid, version)
    try:
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        addresses = []
        for name in ("ipv4_nets", "ipv6_nets"):
            nets = data.get(name) or []
            if not isinstance(nets, list):
                raise ValueError(f"{name} is not a list")
            for n in nets:
                if not isinstance(n, str):
                    raise ValueError(f"{name} holds {n!r}")
                addresses.append(ipaddress.ip_interface(n).ip)
        rec.addresses = tuple(addresses)
        name = data.get("name")
        rec.name = name if isinstance(name, str) else None
        profiles = data.get("profile_ids") or []
        if isinstance(profiles, list) and profiles and isinstance(profiles[0], str):
            rec.network = profiles[0]
    except ValueError as exc:
        rec.corrupt = str(exc)
    return rec


@dataclass
class Snapshot:
    """One look at the datastore, the host's devices and Docker."""
    records: List[Record]                      # every workload endpoint, every host
    tunnel_addresses: Set[IPAddress]
    network_records: Dict[str, Optional[dict]]  # nid -> CreateNetwork body (None: corrupt)
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


def is_calico_ipam_network(record: Optional[dict]) -> bool:
    from backends.calico.driver import is_calico_ipam
    if not isinstance(record, dict):
        return False
    for name in ("IPv4Data", "IPv6Data"):
        for entry in record.get(name) or []:
            if isinstance(entry, dict) and is_calico_ipam(entry.get("AddressSpace"),
                                                          entry.get("Gateway")):
                return True
    return False


# --------------------------------------------------------------------------
# the audit


class Auditor:
    """One audit run for ``backend`` (a CalicoBackend).  ``docker_view``,
    ``devices`` and ``delete_device`` are seams for tests."""

    def __init__(self, backend, *, docker_view: Optional[Callable[[], DockerView]] = None,
                 devices: Optional[Callable[[], List[Device]]] = None,
                 delete_device: Optional[Callable[[str], bool]] = None,
                 grace: Optional[float] = None, stop: Optional[threading.Event] = None):
        self.backend = backend
        self.store = backend.datastore
        self.host = backend.config.calico.hostname
        cfg = backend.config
        self.driver = cfg.driver_name
        self._docker_view = docker_view or (lambda: fetch_docker_view(
            cfg.calico.docker_endpoint, cfg.calico.docker_timeout, self.driver))
        self._devices = devices or list_devices
        self._delete_device = delete_device or delete_device_default()
        self.grace = default_grace() if grace is None else grace
        self.stop = stop or threading.Event()

    # -- reading ---------------------------------------------------------------
    def _read(self) -> Snapshot:
        """Our state first (datastore, devices), then Docker (rule 3)."""
        records: List[Record] = []
        tunnels: Set[IPAddress] = set()
        problems: List[str] = []
        root = keys.HOST_ROOT + "/"
        for item in self.store.list_prefix(keys.HOST_ROOT):
            parts = item.key[len(root):].split("/")
            if len(parts) == 6 and parts[1] == "workload" and parts[4] == "endpoint":
                records.append(parse_record(item.key, parts[0], parts[2], parts[3], parts[5],
                                            item.value, item.version))
            elif len(parts) == 3 and parts[1] == "config" and parts[2] == "IpInIpTunnelAddr":
                try:
                    tunnels.add(ipaddress.ip_address(item.value.strip()))
                except ValueError:
                    if item.value.strip():
                        problems.append(f"tunnel address {item.key} = {item.value!r} "
                                        f"cannot be read")
        networks: Dict[str, Optional[dict]] = {}
        for item in self.store.list_prefix(keys.NETWORK_ROOT):
            nid = item.key.rsplit("/", 1)[-1]
            try:
                body = json.loads(item.value)
                networks[nid] = body if isinstance(body, dict) else None
            except ValueError:
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
        snap = Snapshot(records, tunnels, networks, blocks, affine, problems, devices)
        snap.docker = self._docker_view()
        return snap

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
        for rec in snap.host_records(self.host):
            if not rec.libnetwork or rec.eid in docker.endpoints:
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
            names = [dev.name]
            peer = by_index.get(dev.peer_index) if not dev.peer_elsewhere else None
            if peer is not None and peer.name == f"tmp{m.group(1)}":
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
            if attr.get("handle_id") is not None:
                continue            # someone else's allocation (rule 5)
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
        docker = first.docker | second.docker
        v2 = self._verdict(second, docker, only=set(v1.endpoints))
        endpoints = {e: r for e, r in v2.endpoints.items() if e in v1.endpoints}
        devices = {n: v for n, v in v2.devices.items() if n in v1.devices}
        addresses = (v1.addresses & v2.addresses) - docker.addresses
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
        self._remove(summary, endpoints, devices, addresses)
        return summary

    def _unreachable(self, summary: Dict[str, Any], exc: Exception) -> Dict[str, Any]:
        summary["docker"] = f"unreachable: {exc}"
        log.warning("audit: Docker cannot be asked (%s); nothing removed", exc)
        return summary

    def _remove(self, summary: Dict[str, Any], endpoints: Dict[str, Record],
                devices: Dict[str, List[str]], addresses: Set[IPAddress]) -> None:
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
                self.backend.gateways.release(eid)
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
        if addresses:
            ipam = calico_ipam.CalicoIpam(self.store)
            for ip in _sorted_ips(addresses):
                try:
                    not_allocated = ipam.release_ips([ip])
                except Exception as exc:
                    errors.append(f"address {ip}: {exc}")
                    continue
                if not not_allocated:
                    summary["addresses_released"].append(str(ip))
                    log.info("audit: released Calico IPAM address %s: no endpoint and "
                             "nothing Docker knows uses it", ip)
        summary["devices_removed"].sort()
        for line in errors:
            log.warning("audit: %s", line)


def host_device_name(eid: str) -> str:
    return "cali" + eid[:ID_CHARS]


def _sorted_ips(ips: Iterable[IPAddress]) -> List[IPAddress]:
    return sorted(ips, key=lambda a: (a.version, int(a)))


def _describe(addresses: Iterable[IPAddress]) -> str:
    text = ", ".join(str(a) for a in addresses)
    return text or "no address"


def default_grace() -> float:
    text = os.environ.get(GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_GRACE
    try:
        value = float(text)
        if value < 0 or value > 600:
            raise ValueError
        return value
    except ValueError:
        log.warning("ignoring %s=%r: not a number of seconds between 0 and 600; using %s",
                    GRACE_ENV, text, DEFAULT_GRACE)
        return DEFAULT_GRACE


def audit(backend, dry_run: bool = False, **seams) -> Dict[str, Any]:
    """``CalicoBackend.audit``: one audit run, summary dict."""
    return Auditor(backend, **seams).run(dry_run=dry_run)


def audit_at_startup(backend, stop: Optional[threading.Event] = None) -> None:
    """The agent's start-up audit: a failure is logged, never raised."""
    started = time.monotonic()
    try:
        summary = Auditor(backend, stop=stop).run()
    except Exception as exc:
        log.warning("start-up audit failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return
    log.info("start-up audit done in %.1f s: %s", time.monotonic() - started,
             json.dumps(summary, sort_keys=True))
